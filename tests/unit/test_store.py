"""Where MLflow writes, on a real SQLite store: the experiment tagged to open on training runs (also
one created before the tag), a DVC experiment's temporary copy writing to the project's store, and
the UI address cards link to."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_pipeline.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    store_root,
    tracking_uri,
    ui_url,
    use_store,
)

pytestmark = pytest.mark.slow  # a real MLflow SQLite store: a few seconds


def test_the_experiment_opens_on_training_runs_also_when_it_existed_before(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = tracking_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    with use_store(tmp_path, "made-before") as exp_id:
        assert exp_id == old
    with use_store(tmp_path, "new-one") as new:
        pass
    for exp in (old, new):
        assert client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_a_dvc_experiment_copy_writes_to_the_projects_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / ".dvc" / "config").write_text("")
    copy = project / ".dvc" / "tmp" / "exps" / "tmpab12cd"  # where `dvc exp run --temp` / queued runs work
    copy.mkdir(parents=True)
    assert store_root(copy) == store_root(project) == project.resolve()
    assert tracking_uri(copy) == f"sqlite:///{project.resolve()}/mlflow/mlflow.db"
    # A folder merely named like it, outside a DVC project, is its own store.
    lookalike = tmp_path / "x" / ".dvc" / "tmp" / "exps" / "t"
    lookalike.mkdir(parents=True)
    assert store_root(lookalike) == lookalike.resolve()


def test_ui_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIGC_MLFLOW_UI_URL", raising=False)
    assert ui_url("sqlite:////p/mlflow/mlflow.db") == "http://127.0.0.1:5000"  # make mlflow-ui
    assert ui_url("http://mlflow:5000/") == "http://mlflow:5000"  # the tracking server serves the UI
    monkeypatch.setenv("AIGC_MLFLOW_UI_URL", "https://mlflow.example/ui/")
    assert ui_url("http://mlflow:5000") == "https://mlflow.example/ui"
