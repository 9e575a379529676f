"""Where MLflow writes: ``MLFLOW_TRACKING_URI`` if set, else a SQLite file inside the project."""

from __future__ import annotations

import os
from pathlib import Path

MLFLOW_DIR = "mlflow"


def tracking_uri(project_dir: Path | str) -> str:
    """The tracking URI in force: the environment's, or the project's embedded SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(project_dir).resolve() / MLFLOW_DIR / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"  # sqlite:/// + absolute path = four slashes


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def use_store(project_dir: Path | str, experiment: str) -> str:
    """Point mlflow at the store and select ``experiment`` (created with a project-local artifact
    folder when the store is embedded). Returns the experiment id."""
    import mlflow

    uri = tracking_uri(project_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if is_embedded(uri):
            location = (Path(project_dir).resolve() / MLFLOW_DIR / "artifacts").as_uri()
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
