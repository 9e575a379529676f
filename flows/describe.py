"""What a flow run says about itself in the Prefect UI: its name, its tags, its artifact keys.

A run is named after what it trains, ``<dataset>-<family>-<YYYYmmdd-HHMMSS>`` (``Config.model_name``
plus the run's scheduled start time, e.g. ``digits-resgan-20261201-115300``), and tagged
``dataset:<dataset>`` and ``model:<family>``. Both are resolved from params.yaml with the run's
``dataset``/``model``/``overrides`` parameters applied in memory, so the name is right before
the run writes them to params.yaml (where dvc.lock records them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

NAME_TIME = "%Y%m%d-%H%M%S"
_KEY_BAD = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class RunInfo:
    """What a run trains, resolved from params.yaml plus the run's parameters."""

    dataset: str
    model: str  # the family (train.model)
    model_name: str  # Config.model_name: dataset-family, the model folder and MLflow run names
    registered_model: str  # Config.registered_model: the MLflow registered model (one per dataset)

    @property
    def tags(self) -> list[str]:
        return [f"dataset:{self.dataset}", f"model:{self.model}"]


def settings(dataset: str | None, model: str | None, overrides: list[str] | None) -> list[str]:
    """The ``KEY=VALUE`` settings a run's parameters stand for, in the order they apply."""
    return (
        ([f"dataset={dataset}"] if dataset else [])
        + ([f"train.model={model}"] if model else [])
        + list(overrides or [])
    )


def resolve(project: str | Path, sets: list[str]) -> RunInfo:
    """The run's dataset and model from ``project``'s params.yaml with ``sets`` applied (not written).

    Raises :class:`aigc_pipeline.errors.ConfigError` naming the key when a setting is invalid.
    """
    from aigc_pipeline.config import load_config

    cfg = load_config(project, sets)
    return RunInfo(cfg.dataset, cfg.train.model, cfg.model_name, cfg.registered_model)


def run_name(info: RunInfo, when: datetime, suffix: str = "") -> str:
    """``digits-resgan-20261201-115300`` (``suffix`` goes before the time: ``digits-resgan-train-...``)."""
    return "-".join(p for p in (info.model_name, suffix, when.astimezone().strftime(NAME_TIME)) if p)


def _parameters_and_time() -> tuple[dict[str, Any], datetime]:
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time
    return dict(flow_run.parameters), when if isinstance(when, datetime) else datetime.now().astimezone()


def retrain_run_name() -> str:
    """``flow_run_name`` of ``retrain``: resolved in ``project_dir`` with the run's parameters."""
    params, when = _parameters_and_time()
    sets = settings(params.get("dataset"), params.get("model"), params.get("overrides"))
    return run_name(resolve(params.get("project_dir") or ".", sets), when)


def clone_run_name() -> str:
    """``flow_run_name`` of ``retrain-at-scale``: resolved in the clone (the working directory)."""
    params, when = _parameters_and_time()
    sets = settings(params.get("dataset"), params.get("model"), params.get("overrides"))
    return run_name(resolve(Path.cwd(), sets), when)


def remote_stage_run_name() -> str:
    """``flow_run_name`` of ``remote-stage``: the clone is checked out at the commit holding the
    run's params.yaml, so it names the model as the parent run did: ``digits-resgan-train-...``."""
    params, when = _parameters_and_time()
    return run_name(resolve(Path.cwd(), []), when, suffix=str(params.get("stage") or "stage"))


def tag_flow_run(info: RunInfo) -> list[str]:
    """Add ``dataset:``/``model:`` tags to the current flow run (kept with the tags it had); returns them."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        tags = sorted(set(run.tags) | set(info.tags))
        client.update_flow_run(run.id, tags=tags)
    return tags


def artifact_key(registered_model: str, what: str) -> str:
    """``digits-summary``: a Prefect artifact key (lowercase letters, digits, dashes) for one
    registered model, so runs of different registered models keep their own latest artifact."""
    slug = _KEY_BAD.sub("-", registered_model.lower()).strip("-") or "model"
    return f"{slug}-{what}"
