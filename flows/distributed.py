"""Retraining across work pools, with nothing shared but git, the DVC remote and MLflow.

``retrain_at_scale`` (deployment ``retrain``, pool ``cpu``) runs in a fresh clone made by the
deployment's ``git_clone`` pull step. It writes the run's parameters into params.yaml, then
walks dvc.yaml's stages up to the register stage in the order ``dvc repro`` would:

- a stage named in ``remote_stages`` (``train``) runs on another pool: the flow commits
  params.yaml and dvc.lock so far and pushes them to ``refs/aigc/runs/<flow run id>``, then
  ``run_deployment``s ``remote_stage`` (deployment ``train``, pool ``gpu``) with that commit;
  that flow run clones exactly that commit, pulls the stage's inputs from the DVC remote, runs
  the stage, pushes its outputs and leaves its ``dvc.lock`` entry on the remote, which this flow
  records in its own dvc.lock before pulling the outputs;
- every other stage runs here, through the same ``run_stage`` as ``aigc run``, and its outputs
  are pushed;
- before the register stage the run is committed and pushed, so the model's ``git.commit`` tag
  names a commit whose dvc.lock holds every hash that made it; after it, the register entry is
  committed too.

Two flow runs never share a workspace: each has its own clone. I/O steps (DVC pull/push, git
push, MLflow) retry with exponential backoff; a remote stage is retried only when its flow run
crashed (its worker was lost), never when the stage itself failed, and the retry resumes from the
checkpoint the lost worker mirrored to the DVC remote. A register step that fails is rolled back
(its MLflow runs and versions deleted, the aliases they took put back where they still point at
them) before the error propagates.

In the Prefect UI both flows' runs describe themselves as ``retrain`` does (flows/retrain.py):
named ``digits-resgan-<time>`` (``digits-resgan-train-<time>`` for the remote stage), tagged with
dataset and model, each stage's lines in the log of the run that ran it, the training's progress
artifact on the ``remote-stage`` run, the summary artifacts on this one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from aigc_pipeline import remote, workspace
from aigc_pipeline.errors import AigcError
from aigc_pipeline.pipeline import StageOutcome, run_stage, summarize
from aigc_pipeline.stages.register import FLOW_RUN_ENV
from flows import describe
from flows.retrain import check_champion
from flows.stage_logs import TrainingProgress, stage_output

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from prefect.client.schemas.objects import FlowRun

COMMIT_ENV = "AIGC_COMMIT"  # job variable: the commit the `train` deployment's git_clone checks out
BACKOFF_ENV = "AIGC_RETRY_BACKOFF_SECONDS"  # first retry delay of I/O steps (doubles each retry)
RETRIES_ENV = "AIGC_IO_RETRIES"  # retries of an I/O step after its first attempt


def _io(**extra: Any) -> dict[str, Any]:
    """Task options for an I/O step: retries with exponential backoff and jitter, no caching."""
    first = float(os.environ.get(BACKOFF_ENV, "2"))
    return {
        "retries": int(os.environ.get(RETRIES_ENV, "3")),
        "retry_delay_seconds": exponential_backoff(backoff_factor=first),
        "retry_jitter_factor": 0.5,
        "cache_policy": NO_CACHE,
        **extra,
    }


class RemoteStageLost(AigcError, RuntimeError):
    """The flow run executing a remote stage crashed (worker lost); a retry resumes it elsewhere."""


class RemoteStageFailed(AigcError, RuntimeError):
    """A remote stage failed on its own (bad data, divergence...): retrying would fail again."""


def _only_when_lost(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a remote stage only when its worker was lost, never a training that failed by itself."""
    return isinstance(state.data, RemoteStageLost)


def _here() -> Path:
    """The clone this flow run works in (the pull step's working directory)."""
    project = Path.cwd().resolve()
    workspace.assert_runs_own_code(project)
    return project


def _lineage_env() -> dict[str, str]:
    return {FLOW_RUN_ENV: str(flow_run.id or "")}


def _observer(project: Path, stage: str) -> TrainingProgress | None:
    """The train stage keeps a progress artifact through its observer; other stages only log."""
    if stage != "train":
        return None
    info = describe.resolve(project, [])
    return TrainingProgress(describe.artifact_key(info.registered_model, "training"), info.model_name)


# --- tasks of the cpu flow ---------------------------------------------------------------------


@task(name="prepare-clone", task_run_name="prepare-clone", cache_policy=NO_CACHE)
def prepare_clone(project: Path, dataset: str | None, model: str | None, overrides: list[str]) -> dict[str, str]:
    """Write the run's parameters into params.yaml (validated; errors name the key); tag the flow
    run with its dataset and model."""
    from aigc_pipeline.config import write_overrides_to_params

    write_overrides_to_params(project, describe.settings(dataset, model, overrides))
    info = describe.resolve(project, [])
    describe.tag_flow_run(info)
    return {
        "commit": workspace.head_commit(project),
        "dataset": info.dataset,
        "model": info.model,
        "model_name": info.model_name,
    }


@task(name="restore-recorded", **_io(task_run_name="restore {stage}"))
def restore_recorded(project: Path, stage: str) -> bool:
    return remote.restore_recorded_outputs(project, stage)


# log_prints=False on the tasks that run a stage: stage_output copies the stage's lines into the
# log itself, and needs them to reach the stream (the flows' log_prints would divert them).
@task(name="run-stage", cache_policy=NO_CACHE, task_run_name="{stage}", log_prints=False)
def run_local_stage(project: Path, stage: str) -> StageOutcome:
    with stage_output(stage):
        return run_stage(project, stage, extra_env=_lineage_env(), observer=_observer(project, stage))


@task(name="push-outputs", **_io(task_run_name="push {stage}"))
def push_outputs(project: Path, stage: str) -> None:
    remote.push_stage_outputs(project, stage)


@task(name="record-run", **_io(task_run_name="record run: {message}"))
def record_run(project: Path, message: str) -> str:
    """Commit what ran so far and push it to this flow run's ref; returns the commit."""
    commit = workspace.commit_run(project, f"aigc run {flow_run.id}: {message}")
    workspace.push_run(project, workspace.run_ref(str(flow_run.id)))
    return commit


@task(
    name="run-remote-stage",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_only_when_lost,
    task_run_name="{stage} on {deployment}",
)
def run_remote_stage(stage: str, deployment: str, commit: str) -> str:
    """Run ``stage`` as a flow run of ``deployment`` on ``commit``; returns that flow run's id."""
    from prefect.deployments import run_deployment

    attempt = task_run.run_count
    # A sync task: run_deployment returns the FlowRun (its hint adds the coroutine of an async caller).
    child = cast(
        "FlowRun",
        run_deployment(
            deployment,
            parameters={"stage": stage, "lineage_flow_run_id": str(flow_run.id)},
            job_variables={"env": {COMMIT_ENV: commit}},
            poll_interval=2,
            idempotency_key=f"{flow_run.id}:{stage}:{attempt}",
        ),
    )
    state = child.state
    where = f"stage {stage!r} (flow run {child.name} {child.id} of {deployment}, attempt {attempt})"
    if state is not None and state.is_completed():
        return str(child.id)
    if state is not None and state.is_crashed():
        raise RemoteStageLost(f"{where} crashed: {state.message or 'its worker was lost'}")
    kind = state.type.value if state is not None else "UNKNOWN"
    raise RemoteStageFailed(f"{where} ended {kind}: {state.message if state is not None else ''}".rstrip(": "))


@task(name="fetch-remote-outputs", **_io(task_run_name="fetch {stage}"))
def fetch_remote_outputs(project: Path, stage: str, child_flow_run_id: str) -> dict[str, Any]:
    """Record the remote stage's dvc.lock entry here, pull its outputs, and check DVC agrees."""
    record = remote.read_record(project, child_flow_run_id)
    workspace.record_lock_entry(project, stage, record["lock"])
    remote.pull_stage_outputs(project, stage)
    stale = workspace.stale_stages(project, stage)
    if stale:
        raise workspace.WorkspaceError(
            f"stage {stage!r} from flow run {child_flow_run_id} does not match this "
            f"clone (dvc status: {stale}): it ran on other inputs"
        )
    return record


@task(name="registry-snapshot", **_io(task_run_name="registry-snapshot"))
def registry_snapshot(project: Path):
    from mlflow import MlflowClient

    from aigc_pipeline.config import load_config
    from aigc_pipeline.tracking.store import tracking_uri
    from aigc_pipeline.tracking.undo import snapshot

    uri = tracking_uri(project)
    return snapshot(MlflowClient(tracking_uri=uri, registry_uri=uri), load_config(project).registered_model)


@task(name="register", **_io(task_run_name="{stage}", log_prints=False))
def register_stage(project: Path, stage: str, before: Any, extra_tags: dict[str, str]) -> StageOutcome:
    """Run the register stage; on any failure undo what this flow run registered, then re-raise.

    Each attempt first undoes what an earlier attempt of this flow run may have left (a crash
    can skip the ``except``), so a retry never registers a second version.
    """
    from mlflow import MlflowClient

    from aigc_pipeline.config import load_config
    from aigc_pipeline.tracking.store import tracking_uri
    from aigc_pipeline.tracking.undo import undo_flow_run

    logger = get_run_logger()
    uri = tracking_uri(project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    rcfg = load_config(project).register
    experiment, champion = rcfg.experiment, rcfg.champion_alias
    undone = undo_flow_run(client, before, experiment, str(flow_run.id), champion_alias=champion)
    if undone.changed:
        logger.warning("undid an earlier attempt's partial registration: %s", undone.describe())
    # An earlier attempt may have written the receipt (and dvc.lock) before failing: without it DVC
    # sees the stage as stale again, so this attempt registers afresh instead of trusting it.
    for out in workspace.stage_outputs(project, stage):
        if (project / out).is_file():
            (project / out).unlink()
    try:
        with stage_output(stage):
            outcome = run_stage(project, stage, extra_env=_lineage_env())
        receipt = _receipt(project, outcome)
        for k, v in extra_tags.items():
            client.set_tag(receipt["run_id"], k, v)
            client.set_model_version_tag(receipt["name"], receipt["version"], k, v)
        return outcome
    except BaseException:
        report = undo_flow_run(client, before, experiment, str(flow_run.id), champion_alias=champion)
        logger.error("register failed; rolled back: %s", report.describe())
        raise


def _receipt(project: Path, outcome: StageOutcome) -> dict[str, Any]:
    import json

    (path,) = [p for p in outcome.outputs if p.endswith(".json")]
    return json.loads((project / path).read_text())


@task(name="publish-artifacts", **_io(task_run_name="publish-artifacts"))
def publish_artifacts(
    project: Path, registered: StageOutcome, scored: StageOutcome, extra: dict[str, str]
) -> dict[str, Any]:
    from flows import artifacts

    summary = summarize(project, registered, scored)
    summary["links"] = artifacts.publish(summary, extra=extra)
    return summary


def _stage_with(project: Path, plan: list[str], suffix: str) -> str:
    """The one stage in ``plan`` with an output ending in ``suffix`` (metrics.json: the evaluation)."""
    found = [s for s in plan if any(o.endswith(suffix) for o in workspace.stage_outputs(project, s))]
    if len(found) != 1:
        raise workspace.WorkspaceError(f"dvc.yaml: expected one stage writing *{suffix}, found {found}")
    return found[0]


@flow(name="retrain-at-scale", log_prints=True, flow_run_name=describe.clone_run_name)
def retrain_at_scale(
    dataset: str | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
    remote_stages: list[str] | None = None,
    stage_deployment: str = "remote-stage/train",
    target: str = "register",
) -> dict[str, Any]:
    """Retrain in this clone, with ``remote_stages`` (default ``["train"]``) on ``stage_deployment``'s pool.

    ``dataset``/``model`` select ``dataset``/``train.model``; ``overrides`` are more ``KEY=VALUE``
    settings (as ``aigc run --set``), all written to params.yaml and so recorded in dvc.lock.
    """
    logger = get_run_logger()
    project = _here()
    remote_stages = ["train"] if remote_stages is None else list(remote_stages)
    run = prepare_clone(project, dataset, model, list(overrides or []))
    register = target  # the stage that registers the model: the run is recorded in git before it
    plan = workspace.stage_plan(project, register)
    unknown = sorted(set(remote_stages) - set(plan))
    if unknown:
        raise workspace.WorkspaceError(f"remote_stages {unknown} are not stages leading to {register!r}: {plan}")
    logger.info(
        "%s on %s at %s: stages %s (%s on %s)",
        run["model_name"],
        run["dataset"],
        run["commit"][:12],
        plan,
        remote_stages,
        stage_deployment,
    )
    outcomes: dict[str, StageOutcome] = {}
    records: dict[str, dict[str, Any]] = {}
    for stage in plan:
        if stage == register:
            continue
        restored = restore_recorded(project, stage)
        if stage in remote_stages and not (restored and not workspace.stale_stages(project, stage)):
            commit = record_run(project, f"before {stage}")
            child = run_remote_stage(stage, stage_deployment, commit)
            records[stage] = fetch_remote_outputs(project, stage, child)
            outcomes[stage] = StageOutcome(stage, ran=records[stage]["ran"], outputs=tuple(records[stage]["outputs"]))
        else:
            outcomes[stage] = run_local_stage(project, stage)
            if outcomes[stage].ran:
                push_outputs(project, stage)
    commit = record_run(project, f"before {register}")
    before = registry_snapshot(project)
    tags = {
        "aigc.run_ref": workspace.run_ref(str(flow_run.id)),
        "git.repository": workspace.origin_url(project),
        "dvc.remote": remote.RemoteArea(project).url,
    }
    if os.environ.get("PREFECT_UI_URL"):
        tags["prefect.flow_run_url"] = f"{os.environ['PREFECT_UI_URL'].rstrip('/')}/runs/flow-run/{flow_run.id}"
    outcomes[register] = register_stage(project, register, before, tags)
    record_run(project, f"after {register}")
    evaluation = _stage_with(project, plan, "metrics.json")
    notes = {
        f"{stage} (remote)": f"flow run {rec['flow_run_id']}, resumed from step {rec['resumed_from']}"
        for stage, rec in records.items()
    }
    summary = publish_artifacts(project, outcomes[register], outcomes[evaluation], notes)
    summary["remote_stages"] = records
    summary["commit"] = commit
    print(summary["line"])
    check_champion(summary)
    return summary


# --- the remote stage flow (gpu pool) ----------------------------------------------------------


@task(name="pull-inputs", **_io(task_run_name="pull inputs of {stage}"))
def pull_inputs(project: Path, stage: str) -> list[str]:
    return remote.pull_stage_inputs(project, stage)


@task(name="run-checkpointed-stage", cache_policy=NO_CACHE, task_run_name="{stage}", log_prints=False)
def run_checkpointed_stage(project: Path, stage: str, key: str, lineage_flow_run_id: str) -> dict[str, Any]:
    """Restore mirrored checkpoints, run the stage with its checkpoints mirrored as they appear."""
    logger = get_run_logger()
    mirror = remote.CheckpointMirror(project, key)
    restored = mirror.restore()
    if restored:
        logger.info("restored checkpoints from the DVC remote: %s", restored)
    with mirror, stage_output(stage):
        outcome = run_stage(
            project, stage, extra_env={FLOW_RUN_ENV: lineage_flow_run_id}, observer=_observer(project, stage)
        )
    result = outcome.result
    # A stage's result is an instance, never a dataclass itself (which is_dataclass would also accept).
    detail = dataclasses.asdict(cast("DataclassInstance", result)) if dataclasses.is_dataclass(result) else {}
    return {
        "ran": outcome.ran,
        "outputs": list(outcome.outputs),
        "restored_checkpoints": restored,
        "resumed_from": int(detail.get("resumed_from") or 0),
        "result": detail,
        "mirror_failures": mirror.failures,
    }


@task(name="finish-remote-stage", **_io(task_run_name="record {stage}"))
def finish_remote_stage(project: Path, stage: str, key: str, ran: dict[str, Any]) -> dict[str, Any]:
    """Leave the stage's dvc.lock entry and result on the remote; drop its mirrored checkpoints."""
    record = {
        **ran,
        "stage": stage,
        "flow_run_id": str(flow_run.id),
        "commit": workspace.head_commit(project),
        "lock": workspace.lock_entry(project, stage),
    }
    if record["lock"] is None:
        raise workspace.WorkspaceError(f"stage {stage!r} ran but dvc.lock has no entry for it")
    remote.write_record(project, str(flow_run.id), record)
    remote.CheckpointMirror(project, key).discard()
    return record


@flow(name="remote-stage", log_prints=True, flow_run_name=describe.remote_stage_run_name)
def remote_stage(stage: str = "train", lineage_flow_run_id: str = "") -> dict[str, Any]:
    """Run one dvc.yaml stage in this clone (checked out at ``$AIGC_COMMIT`` by the pull step).

    Pulls the stage's inputs, runs it with checkpoints mirrored to the DVC remote (resuming from
    a mirrored checkpoint when an earlier attempt was lost), pushes its outputs and writes its
    dvc.lock entry to ``<remote>/aigc/runs/<this flow run id>.json``.
    """
    project = _here()
    wanted = os.environ.get(COMMIT_ENV, "")
    commit = workspace.head_commit(project)
    if wanted and commit != wanted:
        raise workspace.WorkspaceError(
            f"clone is at {commit}, but {COMMIT_ENV}={wanted}: the pull step must "
            f"check out {COMMIT_ENV} (git_clone commit_sha)"
        )
    # Same tree -> same key: a lost attempt's checkpoints are found by the retry (and by a re-run
    # of identical inputs), a changed input starts a new folder.
    key = workspace.run_key(stage, workspace.git(project, "rev-parse", "HEAD^{tree}"))
    describe.tag_flow_run(describe.resolve(project, []))
    pull_inputs(project, stage)
    ran = run_checkpointed_stage(project, stage, key, lineage_flow_run_id)
    if ran["ran"]:
        push_outputs(project, stage)
    record = finish_remote_stage(project, stage, key, ran)
    print(f"{stage}: ran={record['ran']} resumed_from={record['resumed_from']} commit={record['commit'][:12]}")
    return record
