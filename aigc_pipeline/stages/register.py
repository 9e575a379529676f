"""Register: log the run to MLflow (params, losses, metrics, grids, the pyfunc model), register
the model version and move the champion alias when it wins on the same protocol."""

from __future__ import annotations

import csv
import json
import os
import logging
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from aigc_pipeline.config import Config
from aigc_pipeline.evaluation.protocol import metric_key
from aigc_pipeline.io import atomic_write_json
from aigc_pipeline.models.export import read_model_meta
from aigc_pipeline.tracking.runs import FLOW_RUN_ENV, flat_params  # FLOW_RUN_ENV: re-exported for flows/


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    run_id: str
    champion: bool
    reason: str
    tracking_uri: str
    fid: float


def run(cfg: Config, model: Path, evaluation: Path, receipt: Path, *, project_dir: Path = Path(".")) -> RegisterResult:
    """Log and register the model in ``model`` scored in ``evaluation``; write a JSON ``receipt``."""
    import mlflow
    from mlflow import MlflowClient

    from aigc_pipeline.tracking import pyfunc
    from aigc_pipeline.tracking.datasets import log_prepared_dataset
    from aigc_pipeline.tracking.registry import decide_champion
    from aigc_pipeline.tracking.store import use_store

    metrics_doc = json.loads((Path(evaluation) / "metrics.json").read_text())
    meta = read_model_meta(model)
    protocol_id = metrics_doc["protocol"]["id"]
    fid = float(metrics_doc["fid"][protocol_id])
    name = cfg.model_name
    alias = cfg.register.champion_alias

    # The pyfunc has an explicit signature; MLflow's advice to add type hints does not apply.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
    logging.getLogger("mlflow.utils.uv_utils").setLevel(logging.WARNING)
    with use_store(project_dir, cfg.register.experiment):
        uri = mlflow.get_tracking_uri()
        client = MlflowClient()
        tags = {"aigc.dataset": cfg.dataset, "aigc.model": meta["model"], "aigc.data_digest": meta["data_digest"],
                "aigc.protocol": protocol_id, **_lineage(project_dir)}
        with mlflow.start_run(run_name=f"{name}-{meta['data_digest'][:8]}", tags=tags) as active:
            run_id = active.info.run_id
            mlflow.log_params(flat_params(cfg))
            log_prepared_dataset(project_dir, cfg.dataset)  # mlflow.log_input, digest = DVC's hash
            _log_history(client, run_id, Path(model) / "history.csv")
            # Per epoch: images/s, learning rates, mean losses (at the epoch's last step).
            _log_history(client, run_id, Path(model) / "epochs.csv", prefix="train_epoch/")
            mlflow.log_metric(metric_key("fid", protocol_id), fid)
            for key in ("isc", "isc_std"):
                if key in metrics_doc:
                    mlflow.log_metric(metric_key(key, protocol_id), float(metrics_doc[key][protocol_id]))
            if "isc_unavailable" in metrics_doc:
                mlflow.set_tag("aigc.isc_unavailable", metrics_doc["isc_unavailable"][:5000])
            mlflow.log_artifact(str(Path(evaluation) / "metrics.json"))
            mlflow.log_artifact(str(Path(evaluation) / "samples.png"), "evaluation")
            mlflow.log_artifact(str(Path(model) / "samples.png"), "training")
            if (Path(model) / "samples").is_dir():
                mlflow.log_artifacts(str(Path(model) / "samples"), "training/epochs")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=pyfunc.GeneratorModel(),
                artifacts={pyfunc.WEIGHTS_ARTIFACT: str(model)},
                code_paths=[str(Path(__file__).resolve().parents[1])],
                signature=pyfunc.signature_for(meta["arch"]["channels"], meta["arch"]["size"]),
                input_example=pyfunc.input_example(),
                pip_requirements=_requirements(),
                registered_model_name=name,
            )
            version = str(info.registered_model_version)
            decision = decide_champion(client, name, alias, metric_key("fid", protocol_id), fid)
            if decision.promote:
                client.set_registered_model_alias(name, alias, version)
            for target in ("run", "version"):
                for k, v in {"aigc.decision": "champion" if decision.promote else "not promoted",
                             "aigc.decision_reason": decision.reason, **tags}.items():
                    if target == "run":
                        mlflow.set_tag(k, v)
                    else:
                        client.set_model_version_tag(name, version, k, v)
    result = RegisterResult(name=name, version=version, run_id=run_id, champion=decision.promote,
                            reason=decision.reason, tracking_uri=uri, fid=fid)
    atomic_write_json(receipt, result.__dict__)
    return result


def _log_history(client, run_id: str, path: Path, prefix: str = "train/") -> None:
    """Per-step records of a CSV written by the train stage (a ``step`` column), as metrics."""
    from aigc_pipeline.tracking.runs import log_step_metrics

    if not path.exists():
        return
    with path.open() as f:
        log_step_metrics(client, run_id, csv.DictReader(f), prefix=prefix)


def _lineage(project_dir: Path) -> dict[str, str]:
    """Git commit, DVC stage hashes from dvc.lock and the Prefect flow run id, when known."""
    tags: dict[str, str] = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True)
        tags["git.commit"] = commit.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True, check=True)
        tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.CalledProcessError):
        tags["git.commit"] = "unknown (not a git checkout)"
    lock = Path(project_dir) / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage, entry in stages.items():
            outs = [o.get("md5", "") for o in entry.get("outs", [])]
            if outs:
                # MLflow tag keys may not hold "@" (foreach stages: ingest@digits -> dvc.lock.ingest.digits).
                tags[f"dvc.lock.{stage.replace('@', '.')}"] = ",".join(outs)
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags


def _requirements() -> list[str]:
    reqs = []
    for dist in ("mlflow", "torch", "safetensors", "numpy", "pandas", "pyyaml"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"warning: {dist} is not installed; left out of the model's requirements", file=sys.stderr)
    return reqs
