"""A project clone as the unit of work on a worker.

On several machines nothing is shared but the git repository, the DVC remote and the MLflow
server. Each flow run works in a fresh clone of the repository; this module reads what it needs
from DVC (the stage plan, each stage's inputs and outputs, ``dvc.lock`` entries), pins a clone to
an exact commit and params, and records what ran as a git commit pushed to a ref of its own
(``refs/aigc/runs/<flow run id>``), so that a fresh clone at that commit plus ``dvc pull`` holds
exactly what the run produced. No Prefect in here: the flows in ``flows/distributed.py`` call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from aigc_pipeline.config import PARAMS_FILE
from aigc_pipeline.errors import AigcError

LOCK_FILE = "dvc.lock"
RUNS_REF = "refs/aigc/runs"  # one ref per flow run, like DVC's refs/exps: not fetched by a plain clone
# Who commits run records when the worker has no git identity of its own.
DEFAULT_IDENTITY = ("aigc-pipeline", "aigc-pipeline@localhost")


class WorkspaceError(AigcError, RuntimeError):
    """A clone is not in the state a distributed run needs; the message says what and where."""


def _target(project: Path, stage: str) -> str:
    # An absolute target: DVC resolves a bare stage name against the cwd's dvc.yaml.
    return f"{Path(project).resolve() / 'dvc.yaml'}:{stage}"


def _repo(project: Path):
    from dvc.repo import Repo

    return Repo(str(Path(project).resolve()))


def _one_stage(repo, project: Path, stage: str):
    from dvc.stage.exceptions import StageNotFound

    try:
        stages = repo.stage.collect(_target(project, stage))
    except StageNotFound:
        known = ", ".join(s.name for s in repo.index.stages)
        raise WorkspaceError(f"{project}/dvc.yaml: no stage '{stage}' (stages: {known})") from None
    if len(stages) != 1:
        raise WorkspaceError(f"{project}/dvc.yaml: '{stage}' names {len(stages)} stages, expected one")
    return stages[0]


def stage_names(project: Path) -> list[str]:
    """Every stage of ``dvc.yaml`` (foreach entries expanded, e.g. ``ingest@digits``)."""
    with _repo(project) as repo:
        return [s.name for s in repo.index.stages]


def stage_plan(project: Path, target: str) -> list[str]:
    """``target`` and the stages it depends on, in the order ``dvc repro target`` runs them."""
    from dvc.repo.reproduce import plan_repro

    with _repo(project) as repo:
        stage = _one_stage(repo, project, target)
        return [s.name for s in plan_repro(repo.index.graph, [stage])]


def stage_outputs(project: Path, stage: str) -> list[str]:
    """Paths (relative to the project) of the stage's outs and metrics, as in dvc.yaml."""
    project = Path(project).resolve()
    with _repo(project) as repo:
        return [str(Path(o.fs_path).relative_to(project)) for o in _one_stage(repo, project, stage).outs]


def stage_inputs(project: Path, stage: str) -> list[str]:
    """Outputs of other stages that ``stage`` depends on: what a fresh clone must pull to run it."""
    project = Path(project).resolve()
    with _repo(project) as repo:
        target = _one_stage(repo, project, stage)
        produced = [Path(o.fs_path) for s in repo.index.stages if s is not target for o in s.outs]
        deps = [Path(d.fs_path) for d in target.deps]
    related = [p for p in produced if any(d == p or p in d.parents or d in p.parents for d in deps)]
    return sorted({str(p.relative_to(project)) for p in related})


def read_lock(project: Path) -> dict[str, Any]:
    """``dvc.lock`` as a mapping (empty when there is none yet)."""
    path = Path(project) / LOCK_FILE
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def lock_entry(project: Path, stage: str) -> dict[str, Any] | None:
    """The stage's entry in ``dvc.lock`` (cmd, deps, params and outs with their hashes), or None."""
    return (read_lock(project).get("stages") or {}).get(stage)


def record_lock_entry(project: Path, stage: str, entry: dict[str, Any]) -> None:
    """Write ``entry`` (from another clone) as the stage's entry in this clone's ``dvc.lock``."""
    from dvc.utils.serialize import modify_yaml

    path = Path(project) / LOCK_FILE
    if not path.exists():
        path.write_text("schema: '2.0'\nstages: {}\n")
    with modify_yaml(str(path)) as doc:
        stages = doc.setdefault("stages", {})
        # Keep dvc.yaml's order, as DVC itself does, so the file diffs cleanly.
        order = stage_names(project)
        merged = {**stages, stage: entry}
        stages.clear()
        for name in sorted(merged, key=lambda n: order.index(n) if n in order else len(order)):
            stages[name] = merged[name]


def stale_stages(project: Path, stage: str) -> dict[str, Any]:
    """What DVC reports as changed for ``stage`` alone (empty when it is up to date)."""
    with _repo(project) as repo:
        return repo.status(targets=[_target(project, stage)])


def run_key(*parts: Any) -> str:
    """A short, stable key for a unit of work from everything that determines its result."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# --- git ----------------------------------------------------------------------------------------


def git(project: Path, *args: str) -> str:
    """Run git in ``project``; returns stdout; raises :class:`WorkspaceError` with git's output."""
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WorkspaceError(
            f"git {' '.join(args)} in {project} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout.strip()


def head_commit(project: Path) -> str:
    return git(project, "rev-parse", "HEAD")


def checkout(project: Path, commit: str) -> None:
    """Put the clone at ``commit`` exactly (fetching it when the clone does not have it)."""
    if head_commit(project) == commit:
        return
    have = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=project, capture_output=True)
    if have.returncode != 0:
        git(project, "fetch", "--quiet", "origin", commit)
    git(project, "checkout", "--quiet", "--detach", commit)


def _identity(project: Path) -> list[str]:
    """``-c user.name=... -c user.email=...`` when this machine has no git identity configured."""
    have = subprocess.run(["git", "config", "user.email"], cwd=project, capture_output=True, text=True)
    if have.stdout.strip() or os.environ.get("GIT_AUTHOR_EMAIL"):
        return []
    return ["-c", f"user.name={DEFAULT_IDENTITY[0]}", "-c", f"user.email={DEFAULT_IDENTITY[1]}"]


def commit_run(project: Path, message: str) -> str:
    """Commit everything git sees as changed (params.yaml, dvc.lock, metrics); returns HEAD.

    Nothing to commit is fine (the run changed nothing git tracks): HEAD is returned as is.
    """
    git(project, "add", "--all")
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=project).returncode != 0:
        git(project, *_identity(project), "commit", "--quiet", "--no-verify", "-m", message)
    return head_commit(project)


def push_run(project: Path, ref: str) -> None:
    """Push HEAD to ``ref`` on origin (the same run pushing again fast-forwards)."""
    git(project, "push", "--quiet", "origin", f"HEAD:{ref}")


def run_ref(flow_run_id: str) -> str:
    return f"{RUNS_REF}/{flow_run_id}"


def origin_url(project: Path) -> str:
    return git(project, "remote", "get-url", "origin")


def current_branch(project: Path) -> str:
    return git(project, "rev-parse", "--abbrev-ref", "HEAD")


def params_text(project: Path) -> str:
    return (Path(project) / PARAMS_FILE).read_text()


def assert_runs_own_code(project: Path) -> None:
    """Fail unless the ``aigc_pipeline`` this process imported is the one in ``project``.

    A worker's environment may hold the package installed from elsewhere (an editable install of
    another checkout); running that code would make DVC record hashes of code that never ran.
    """
    import aigc_pipeline

    here = Path(aigc_pipeline.__file__).resolve().parent
    if Path(project).resolve() not in here.parents:
        raise WorkspaceError(
            f"this flow run imported aigc_pipeline from {here}, not from its clone {project}: "
            "start the worker from an environment where the clone's code comes first "
            "(the deployment's pull step sets the working directory to the clone)"
        )
