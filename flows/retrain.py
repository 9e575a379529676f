"""The retraining flow: one Prefect task per dvc.yaml stage, in DAG order.

ingest and augment are DVC ``foreach`` stages, one per registered dataset (``ingest@digits``,
...); the flow runs all of them, as ``dvc repro`` does, so ``dvc status`` is clean afterwards,
then train, evaluate and register on the active ``dataset``.

Tasks hold no logic: each runs its stage through :func:`aigc_pipeline.pipeline.run_stage`,
which lets DVC skip up-to-date stages and record what ran. No Prefect result caching is
layered on top: DVC owns caching.

What the Prefect UI shows (flows/describe.py, flows/stage_logs.py, flows/artifacts.py): the run
is named ``<dataset>-<family>-<time>`` and tagged ``dataset:``/``model:``; its parameters are the
dataset, the model and the ``KEY=VALUE`` overrides, which the first task writes to params.yaml
(so params.yaml stays the one source of config and dvc.lock records what ran); task runs carry
their stage's name; each stage's output lines are in the run's log; training updates a progress
artifact; the summary, the sample grid and the metrics against the floor are artifacts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from aigc_pipeline.pipeline import StageOutcome, dataset_stages, record_run_cost, require_champion, run_stage, summarize
from aigc_pipeline.stages.register import FLOW_RUN_ENV
from flows import describe
from flows.stage_logs import TrainingProgress, stage_output


def _stage(project_dir: str, name: str, observer: TrainingProgress | None = None) -> StageOutcome:
    with stage_output(name):
        return run_stage(project_dir, name, extra_env={FLOW_RUN_ENV: str(flow_run.id or "")}, observer=observer)


@task(name="params", task_run_name="params", cache_policy=NO_CACHE)
def apply_params(project_dir: str, dataset: str | None, model: str | None, overrides: list[str]) -> describe.RunInfo:
    """Write the run's settings to params.yaml when they change it (validated first: errors name
    the key), tag the flow run with its dataset and model; returns what the run trains."""
    from aigc_pipeline.config import load_config, write_overrides_to_params

    sets = describe.settings(dataset, model, overrides)
    info = describe.resolve(project_dir, sets)
    # Only when something changes: rewriting identical values would still touch the file.
    if sets and load_config(project_dir, sets).to_dict() != load_config(project_dir).to_dict():
        write_overrides_to_params(project_dir, sets)
        get_run_logger().info("params.yaml updated: %s", ", ".join(sets))
    describe.tag_flow_run(info)
    return info


@task(name="ingest", task_run_name="{stage}", cache_policy=NO_CACHE)
def ingest(project_dir: str, stage: str) -> StageOutcome:
    return _stage(project_dir, stage)


@task(name="augment", task_run_name="{stage}", cache_policy=NO_CACHE)
def augment(project_dir: str, stage: str) -> StageOutcome:
    return _stage(project_dir, stage)


PER_DATASET = {"ingest": ingest, "augment": augment}


@task(name="train", task_run_name="train", cache_policy=NO_CACHE)
def train(project_dir: str, info: describe.RunInfo) -> StageOutcome:
    progress = TrainingProgress(describe.artifact_key(info.registered_model, "training"), info.model_name)
    return _stage(project_dir, "train", observer=progress)


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE)
def evaluate(project_dir: str) -> StageOutcome:
    return _stage(project_dir, "evaluate")


# No automatic retry yet: a failure after the version is created but before `dvc commit`
# would register a second version on retry.
@task(name="register", task_run_name="register", cache_policy=NO_CACHE)
def register(project_dir: str) -> StageOutcome:
    return _stage(project_dir, "register")


@task(name="publish-summary", task_run_name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(
    project_dir: str, registered: StageOutcome, scored: StageOutcome, stages: list[StageOutcome] | None = None
) -> dict:
    from flows import artifacts

    summary = summarize(project_dir, registered, scored, stages or [])
    record_run_cost(summary)  # what this run's stages cost, on the MLflow run and the version
    summary["links"] = artifacts.publish(summary)  # summary, samples, metrics table, MLflow link
    get_run_logger().info(summary["line"])  # FID, floor, protocol, decision and its reason
    return summary


@task(name="require-champion", task_run_name="require-champion", cache_policy=NO_CACHE)
def check_champion(summary: dict) -> None:
    require_champion(summary)


@flow(name="retrain", flow_run_name=describe.retrain_run_name)
def retrain(
    project_dir: str = ".", dataset: str | None = None, model: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Set ``dataset``/``train.model`` and the ``KEY=VALUE`` ``overrides`` (as ``aigc run --set``)
    in params.yaml, then ingest@NAME and augment@NAME for every registered dataset (DVC skips those
    up to date), then train -> evaluate -> register on the active dataset; returns the run summary.
    ``None`` keeps params.yaml's value. Fails (after publishing the summary) when the registered
    model has no champion: nothing would serve."""
    info = apply_params(project_dir, dataset, model, list(overrides or []))
    ran = [PER_DATASET[stage.partition("@")[0]](project_dir, stage) for stage in dataset_stages(project_dir)]
    ran.append(train(project_dir, info))
    scored = evaluate(project_dir)
    registered = register(project_dir)
    summary = publish_summary(project_dir, registered, scored, [*ran, scored, registered])
    check_champion(summary)
    return summary
