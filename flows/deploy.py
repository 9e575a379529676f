"""``aigc deploy``: put prefect.yaml's deployments on the Prefect server at ``$PREFECT_API_URL``.

1. the Prefect variables the deployments' ``git_clone`` pull steps read (``aigc_repository``,
   ``aigc_branch``), from this checkout's ``origin`` and current branch unless given;
2. every work pool prefect.yaml names (``cpu``, ``gpu``), created when missing (``process`` type
   by default; a Kubernetes pool with a GPU job template is made with ``prefect work-pool
   create``, see docs/scaling.md, and then left as it is);
3. ``prefect --no-prompt deploy --all`` (schedules, concurrency limit, event trigger);
4. an automation that marks a flow run ``Crashed`` when its heartbeats stop for
   ``crash_after`` seconds: a lost worker's run would otherwise stay ``Running`` for ever, and the
   retrain flow retries a remote stage only once it is known to have crashed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

import yaml

from aigc_pipeline import workspace
from aigc_pipeline.errors import AigcError

PREFECT_FILE = "prefect.yaml"
REPOSITORY_VAR, BRANCH_VAR = "aigc_repository", "aigc_branch"
CRASH_AUTOMATION = "aigc: crash flow runs whose heartbeats stopped"
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in prefect.yaml (Prefect's minimum)


class DeployError(AigcError, RuntimeError):
    """The deployments cannot be created; the message says what is missing."""


@dataclass(frozen=True)
class DeployResult:
    api_url: str
    repository: str
    branch: str
    pools: dict[str, str]  # name -> "created" | "exists"
    deployments: list[str]  # "flow/deployment"
    automation: str


def work_pools(project: Path) -> list[str]:
    """The work pool names prefect.yaml's deployments use, in order of appearance."""
    doc = yaml.safe_load((project / PREFECT_FILE).read_text())
    pools = [d["work_pool"]["name"] for d in doc.get("deployments", []) if d.get("work_pool", {}).get("name")]
    return list(dict.fromkeys(pools))


def ensure_pools(names: list[str], pool_type: str) -> dict[str, str]:
    """Create the work pools that do not exist yet; existing ones (and their templates) are kept."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    done = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
                done[name] = "exists"
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
                done[name] = "created"
    return done


def set_variables(values: dict[str, str]) -> None:
    from prefect.variables import Variable

    for name, value in values.items():
        Variable.set(name, value, overwrite=True)


def ensure_crash_automation(crash_after: float) -> str:
    """(Re)create the automation marking runs Crashed after ``crash_after`` s without a heartbeat."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if crash_after <= HEARTBEAT_SECONDS:
        raise DeployError(
            f"--crash-after {crash_after:g}: must exceed the {HEARTBEAT_SECONDS} s heartbeat "
            "interval, or healthy runs would be marked Crashed"
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(existing.id)
    automation = Automation(
        name=CRASH_AUTOMATION,
        description="A flow run that stops sending heartbeats lost its worker: mark it Crashed so the "
        "retrain flow can retry the stage elsewhere (docs/scaling.md).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after),
        ),
        actions=[
            # Prefect declares name and force with positional Field defaults, which mypy does not see.
            ChangeFlowRunState(  # type: ignore[call-arg]
                state=StateType.CRASHED, message=f"no heartbeat for {crash_after:g} s: its worker was lost"
            )
        ],
    ).create()
    # Called outside an event loop, create() returns the Automation (its hint adds the coroutine).
    return str(cast(Automation, automation).id)


def deploy(
    project: Path | str,
    *,
    repository: str | None = None,
    branch: str | None = None,
    pool_type: str = "process",
    crash_after: float = 90.0,
) -> DeployResult:
    """Create or update everything prefect.yaml describes on the server at ``$PREFECT_API_URL``."""
    project = Path(project).resolve()
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise DeployError(
            "no Prefect server: export PREFECT_API_URL=http://HOST:4200/api (see docs/scaling.md); "
            "without it the pipeline runs on the embedded server (`aigc run`)"
        )
    if not (project / PREFECT_FILE).exists():
        raise DeployError(f"{project / PREFECT_FILE}: not found (run from the project root, or pass --project)")
    repository = repository or workspace.origin_url(project)
    branch = branch or workspace.current_branch(project)
    set_variables({REPOSITORY_VAR: repository, BRANCH_VAR: branch})
    pools = ensure_pools(work_pools(project), pool_type)
    automation = ensure_crash_automation(crash_after)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise DeployError(
            f"`prefect --no-prompt deploy --all` failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return DeployResult(api, repository, branch, pools, deployed_names(project), automation)


def deployed_names(project: Path) -> list[str]:
    """``flow/deployment`` of each prefect.yaml deployment, as the server now holds them."""
    from prefect.client.orchestration import get_client

    wanted = [d["name"] for d in yaml.safe_load((project / PREFECT_FILE).read_text())["deployments"]]
    found = []
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            if deployment.name in wanted:
                found.append(f"{client.read_flow(deployment.flow_id).name}/{deployment.name}")
    missing = set(wanted) - {n.split("/", 1)[1] for n in found}
    if missing:
        raise DeployError(f"`prefect deploy` reported success but the server has no deployment {sorted(missing)}")
    return sorted(found)
