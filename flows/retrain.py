"""The retraining flow: one Prefect task per dvc.yaml stage, in DAG order.

ingest and augment are DVC ``foreach`` stages, one per registered dataset (``ingest@digits``,
...); the flow runs all of them, as ``dvc repro`` does, so ``dvc status`` is clean afterwards,
then train, evaluate and register on the active ``dataset``.

Tasks hold no logic: each runs its stage through :func:`aigc_pipeline.pipeline.run_stage`,
which lets DVC skip up-to-date stages and record what ran. No Prefect result caching is
layered on top: DVC owns caching.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from aigc_pipeline.pipeline import StageOutcome, dataset_stages, require_champion, run_stage, summarize
from aigc_pipeline.stages.register import FLOW_RUN_ENV


def _stage(project_dir: str, name: str) -> StageOutcome:
    return run_stage(project_dir, name, extra_env={FLOW_RUN_ENV: str(flow_run.id or "")})


@task(name="ingest", task_run_name="{stage}", cache_policy=NO_CACHE)
def ingest(project_dir: str, stage: str) -> StageOutcome:
    return _stage(project_dir, stage)


@task(name="augment", task_run_name="{stage}", cache_policy=NO_CACHE)
def augment(project_dir: str, stage: str) -> StageOutcome:
    return _stage(project_dir, stage)


PER_DATASET = {"ingest": ingest, "augment": augment}


@task(name="train", cache_policy=NO_CACHE)
def train(project_dir: str) -> StageOutcome:
    return _stage(project_dir, "train")


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(project_dir: str) -> StageOutcome:
    return _stage(project_dir, "evaluate")


# No automatic retry yet: a failure after the version is created but before `dvc commit`
# would register a second version on retry.
@task(name="register", cache_policy=NO_CACHE)
def register(project_dir: str) -> StageOutcome:
    return _stage(project_dir, "register")


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(project_dir: str, registered: StageOutcome, scored: StageOutcome) -> dict:
    from flows import artifacts

    summary = summarize(project_dir, registered, scored)
    summary["links"] = artifacts.publish(summary)  # summary markdown, MLflow run link, sample grid
    return summary


@task(name="require-champion", cache_policy=NO_CACHE)
def check_champion(summary: dict) -> None:
    require_champion(summary)


@flow(name="retrain")
def retrain(project_dir: str = ".") -> dict:
    """ingest@NAME and augment@NAME for every registered dataset (DVC skips those up to date),
    then train -> evaluate -> register on the active dataset; returns the run summary. Fails (after
    publishing the summary) when the registered model has no champion: nothing would serve."""
    for stage in dataset_stages(project_dir):
        PER_DATASET[stage.partition("@")[0]](project_dir, stage)
    train(project_dir)
    scored = evaluate(project_dir)
    registered = register(project_dir)
    summary = publish_summary(project_dir, registered, scored)
    check_champion(summary)
    return summary
