"""Where MLflow writes: ``MLFLOW_TRACKING_URI`` if set, else a SQLite file inside the project.

The project's experiment is tagged ``mlflow.experimentKind=custom_model_development`` (also an
experiment created before the tag existed), so MLflow's UI opens it on its training runs instead of
its GenAI traces overview.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

MLFLOW_DIR = "mlflow"
_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
# The tag (and value) MLflow's UI reads to open an experiment on its runs table ("Model training").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_ENV = "AIGC_MLFLOW_UI_URL"  # where the MLflow UI is served, for absolute links (cards, summaries)
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`


def tracking_uri(project_dir: Path | str) -> str:
    """The tracking URI in force: the environment's, or the project's embedded SQLite store.

    ``dvc exp run --temp`` and queued experiments run in a copy of the project under
    ``<project>/.dvc/tmp/exps/<tmp>/``, deleted afterwards; their store is the project's own,
    so their runs and registrations are kept with the others.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = store_root(project_dir) / MLFLOW_DIR / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"  # sqlite:/// + absolute path = four slashes


def store_root(project_dir: Path | str) -> Path:
    """The project whose ``mlflow/`` folder holds the embedded store: ``project_dir``, or for a DVC
    experiment's temporary copy (``ROOT/.dvc/tmp/exps/TMP/...``) the ``ROOT`` it was copied from."""
    path = Path(project_dir).resolve()
    parts = path.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps") and (Path(*parts[:i]) / ".dvc" / "config").exists():
            return Path(*parts[:i])
    return path


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def ui_url(uri: str) -> str:
    """Base URL of the MLflow UI for tracking URI ``uri``: ``$AIGC_MLFLOW_UI_URL``, else the tracking
    server itself (it serves the UI), else ``make mlflow-ui``'s address for the embedded store."""
    if os.environ.get(UI_ENV):
        return os.environ[UI_ENV].rstrip("/")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return LOCAL_UI


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
                location = (store_root(project_dir) / MLFLOW_DIR / "artifacts").as_uri()
            exp_id = _create_experiment(experiment, location)
        else:
            exp_id = exp.experiment_id
            if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=exp_id)
        yield exp_id
    finally:
        _restore_uris(saved_env)


def _create_experiment(experiment: str, location: str | None) -> str:
    """Create ``experiment``; if another process created it since we looked, use that one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(
            experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
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

    # None puts MLflow's URI back to unset (its initial state); its hints leave None out.
    mlflow.set_tracking_uri(saved_env["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
    mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
