"""Where MLflow writes: ``MLFLOW_TRACKING_URI`` if set, else a SQLite file inside the project."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

MLFLOW_DIR = "mlflow"
_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


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


@contextlib.contextmanager
def use_store(project_dir: Path | str, experiment: str) -> Iterator[str]:
    """Point MLflow's fluent API at the project's store and ``experiment`` for the ``with`` block.

    The experiment is created with a project-local artifact folder when the store is embedded.
    Yields the experiment id. On exit the previous tracking/registry URIs and environment are
    restored: ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which would
    otherwise send every later call in this process (another project, another test) to this store.
    """
    import mlflow

    saved_env = {k: os.environ.get(k) for k in _URI_VARS}
    uri = tracking_uri(project_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if is_embedded(uri):
                location = (Path(project_dir).resolve() / MLFLOW_DIR / "artifacts").as_uri()
            exp_id = _create_experiment(experiment, location)
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
        yield exp_id
    finally:
        _restore_uris(saved_env)


def _create_experiment(experiment: str, location: str | None) -> str:
    """Create ``experiment``; if another process created it since we looked, use that one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except MlflowException as exc:
        exp = mlflow.get_experiment_by_name(experiment)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def use_tracking(project_dir: Path | str) -> Iterator[str]:
    """Like :func:`use_store` for reading (loading ``models:/`` URIs): the URIs are set and restored,
    no experiment is created. Yields the tracking URI."""
    import mlflow

    saved_env = {k: os.environ.get(k) for k in _URI_VARS}
    uri = tracking_uri(project_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        _restore_uris(saved_env)


def _restore_uris(saved_env: dict[str, str | None]) -> None:
    """Put back the MLflow URIs and their environment variables as they were before a ``use_*`` block
    (mlflow.set_tracking_uri exports the variable, so both must be restored)."""
    import mlflow

    mlflow.set_tracking_uri(saved_env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
