"""MLflow runs outside registration: the params of a config, and the record of a failed training.

A diverged training leaves a FAILED run in the project's experiment (params, the per-step
losses up to the failure, the error as a tag) and registers nothing: the train stage records
it here and re-raises, so the flow stops before ``register``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

from aigc_pipeline.config import Config

FLOW_RUN_ENV = "AIGC_FLOW_RUN_ID"  # set by the Prefect flow; tagged for lineage
_MAX_TAG = 5000  # MLflow's tag value limit is 8000 characters; keep room
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
_METRICS_PER_BATCH = 900  # under MLflow's 1000


# train.* settings that may say "auto": the model's recipe decides (aigc_pipeline.models.registry.recipe_for).
RESOLVED_KEYS = ("lr", "beta1", "beta2")


def flat_params(cfg: Config, resolved: dict[str, Any] | None = None) -> dict[str, str]:
    """The active dataset's entry and every stage section, as dotted keys -> strings.

    With ``resolved`` (the hyperparameters training used, model.json's ``hparams``), ``train.lr``,
    ``train.beta1`` and ``train.beta2`` hold the values used, so a params diff shows the real
    difference between two families' recipes; the setting itself (``auto`` or a number) stays
    beside them as ``train.lr_setting`` etc.
    """
    d = cfg.to_dict()
    out: dict[str, Any] = {"dataset": cfg.dataset}
    for k, v in d["datasets"][cfg.dataset].items():
        out[f"datasets.{cfg.dataset}.{k}"] = v
    for section in ("ingest", "augment", "train", "evaluate", "register"):
        for k, v in d[section].items():
            out[f"{section}.{k}"] = v
    if resolved is None:
        from aigc_pipeline.models.registry import resolve_hparams

        resolved = dataclasses.asdict(resolve_hparams(cfg.train))
    for k in RESOLVED_KEYS:
        if k in resolved:
            out[f"train.{k}_setting"] = out[f"train.{k}"]
            out[f"train.{k}"] = resolved[k]
    return {k: str(v) for k, v in out.items()}


def log_step_metrics(client: Any, run_id: str, rows: Iterable[dict[str, float]], prefix: str = "train/") -> None:
    """Log per-step records (``{"step": s, name: value, ...}``) as metrics ``<prefix><name>``, in batches."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch: list[Metric] = []
    for row in rows:
        step = int(float(row["step"]))
        batch += [Metric(f"{prefix}{k}", float(v), now, step) for k, v in row.items() if k != "step"]
        if len(batch) >= _METRICS_PER_BATCH:
            client.log_batch(run_id, metrics=batch)
            batch = []
    if batch:
        client.log_batch(run_id, metrics=batch)


def record_failed_training(project_dir: Path | str, cfg: Config, error: BaseException,
                           history: list[dict[str, float]] | None = None, step: int | None = None) -> str:
    """Create a FAILED run for a training that stopped with ``error``; returns its run id.

    Tags: ``aigc.stage=train``, ``aigc.error`` (the message), ``aigc.error_type``,
    ``aigc.failed_step``, dataset and model; params: the whole config; metrics: ``history``.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from aigc_pipeline.tracking.store import use_store

    tags = {
        "mlflow.runName": f"{cfg.model_name}-train-failed",
        "aigc.stage": "train",
        "aigc.dataset": cfg.dataset,
        "aigc.model": cfg.train.model,
        "aigc.error_type": type(error).__name__,
        "aigc.error": str(error)[:_MAX_TAG],
    }
    if step is not None:
        tags["aigc.failed_step"] = str(step)
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    with use_store(project_dir, cfg.register.experiment) as experiment_id:
        client = MlflowClient()
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        try:
            params = [Param(k, v) for k, v in flat_params(cfg).items()]
            for i in range(0, len(params), _PARAMS_PER_BATCH):
                client.log_batch(run_id, params=params[i : i + _PARAMS_PER_BATCH])
            log_step_metrics(client, run_id, history or [])
        finally:
            client.set_terminated(run_id, status="FAILED")
    return run_id
