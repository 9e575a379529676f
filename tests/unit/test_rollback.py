"""Rolling back a half-finished registration on a real MLflow store (SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_pipeline.tracking.rollback import FLOW_RUN_TAG, flow_run_mlflow_runs, roll_back, snapshot

pytestmark = pytest.mark.slow  # a real MLflow SQLite store: ~5 s each

NAME = "digits"
EXPERIMENT = "aigc-pipeline"


@pytest.fixture
def client(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    return c


def _register(client, tmp_path: Path, flow_run_id: str, *, alias: str | None = None) -> str:
    """What register does: a run tagged with the flow run, a version from it, maybe an alias."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, tags={FLOW_RUN_TAG: flow_run_id})
    if not client.search_registered_models(f"name='{NAME}'"):
        client.create_registered_model(NAME)
    source = tmp_path / f"model-{run.info.run_id}"
    source.mkdir()
    version = client.create_model_version(NAME, source.as_uri(), run_id=run.info.run_id).version
    if alias:
        client.set_registered_model_alias(NAME, alias, version)
    return str(version)


def test_partial_registration_is_undone_and_the_champion_restored(client, tmp_path: Path) -> None:
    v1 = _register(client, tmp_path, "flow-a", alias="champion")
    before = snapshot(client, NAME)
    assert before.exists and before.aliases == {"champion": v1}
    # flow-b registered v2 and moved the alias, then failed before finishing.
    v2 = _register(client, tmp_path, "flow-b", alias="champion")
    client.set_registered_model_alias(NAME, "challenger", v2)
    report = roll_back(client, before, EXPERIMENT, "flow-b")
    assert report.deleted_versions == [v2] and len(report.deleted_runs) == 1
    assert report.restored_aliases == {"champion": v1}
    versions = {str(v.version) for v in client.search_model_versions(f"name='{NAME}'")}
    assert versions == {v1}
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1
    assert snapshot(client, NAME).aliases == {"champion": v1}
    assert flow_run_mlflow_runs(client, EXPERIMENT, "flow-b") == []
    assert len(flow_run_mlflow_runs(client, EXPERIMENT, "flow-a")) == 1  # another flow run's work is kept
    # Rolling back again finds nothing left to undo.
    assert not roll_back(client, before, EXPERIMENT, "flow-b").changed


def test_a_model_created_by_the_failed_registration_is_removed(client, tmp_path: Path) -> None:
    before = snapshot(client, NAME)
    assert not before.exists
    _register(client, tmp_path, "flow-c", alias="champion")
    report = roll_back(client, before, EXPERIMENT, "flow-c")
    assert report.deleted_model
    assert client.search_registered_models(f"name='{NAME}'") == []
