"""Rolling back a half-finished registration on a real MLflow store (SQLite): only the aliases the
failed attempt moved go back, and only where they still point at its version."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_pipeline.tracking import registry
from aigc_pipeline.tracking.undo import FLOW_RUN_TAG, flow_run_mlflow_runs, snapshot, undo_flow_run

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
    """What register does: a run tagged with the flow run, a version from it, maybe an alias moved
    to it the way the register stage moves it (``registry.move_alias``)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, tags={FLOW_RUN_TAG: flow_run_id})
    if not client.search_registered_models(f"name='{NAME}'"):
        client.create_registered_model(NAME)
    source = tmp_path / f"model-{run.info.run_id}"
    source.mkdir()
    version = str(client.create_model_version(NAME, source.as_uri(), run_id=run.info.run_id).version)
    if alias:
        registry.move_alias(client, NAME, alias, version, record_history=alias == "champion")
    return version


def _aliases(client) -> dict[str, str]:
    return {a: str(v) for a, v in (client.get_registered_model(NAME).aliases or {}).items()}


def _versions(client) -> list[str]:
    return sorted((str(v.version) for v in client.search_model_versions(f"name='{NAME}'")), key=int)


def test_partial_registration_is_undone_and_the_champion_restored(client, tmp_path: Path) -> None:
    v1 = _register(client, tmp_path, "flow-a", alias="champion")
    before = snapshot(client, NAME)
    assert before.exists and before.aliases == {"champion": v1}
    # flow-b registered v2 and moved the alias, then failed before finishing.
    v2 = _register(client, tmp_path, "flow-b", alias="champion")
    client.set_registered_model_alias(NAME, "challenger", v2)  # with no record of where it was: removed
    report = undo_flow_run(client, before, EXPERIMENT, "flow-b")
    assert report.deleted_versions == [v2] and len(report.deleted_runs) == 1
    assert report.restored_aliases == {"champion": v1} and report.removed_aliases == ["challenger"]
    versions = {str(v.version) for v in client.search_model_versions(f"name='{NAME}'")}
    assert versions == {v1}
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1
    assert snapshot(client, NAME).aliases == {"champion": v1}
    assert flow_run_mlflow_runs(client, EXPERIMENT, "flow-b") == []
    assert len(flow_run_mlflow_runs(client, EXPERIMENT, "flow-a")) == 1  # another flow run's work is kept
    # Rolling back again finds nothing left to undo.
    assert not undo_flow_run(client, before, EXPERIMENT, "flow-b").changed


def test_a_model_created_by_the_failed_registration_is_removed(client, tmp_path: Path) -> None:
    before = snapshot(client, NAME)
    assert not before.exists
    _register(client, tmp_path, "flow-c", alias="champion")
    report = undo_flow_run(client, before, EXPERIMENT, "flow-c")
    assert report.deleted_model
    assert client.search_registered_models(f"name='{NAME}'") == []


def test_undo_registration_puts_back_the_challenger_it_took(client, tmp_path: Path) -> None:
    v1 = _register(client, tmp_path, "flow-1", alias="champion")
    v2 = _register(client, tmp_path, "flow-2", alias="challenger")
    v3 = _register(client, tmp_path, "flow-3", alias="challenger")  # a candidate that then fails
    assert _aliases(client) == {"champion": v1, "challenger": v3}
    done = registry.undo_registration(client, NAME, v3)
    assert _aliases(client) == {"champion": v1, "challenger": v2} and _versions(client) == [v1, v2]
    assert done.restored == {"challenger": v2} and not done.removed and not done.left

    # One that had taken the champion: the champion goes back, the version leaves the history.
    v4 = _register(client, tmp_path, "flow-4", alias="champion")
    assert registry.champion_history(client, NAME) == [v1, v4]
    assert registry.undo_registration(client, NAME, v4).restored == {"champion": v1}
    assert _aliases(client) == {"champion": v1, "challenger": v2} and registry.champion_history(client, NAME) == [v1]

    # The first challenger of a model: it pointed nowhere before, so it points nowhere after.
    client.delete_registered_model_alias(NAME, "challenger")
    v5 = _register(client, tmp_path, "flow-5", alias="challenger")
    assert registry.undo_registration(client, NAME, v5).removed == ["challenger"]
    assert _aliases(client) == {"champion": v1}


def test_undo_registration_leaves_an_alias_moved_since_alone(client, tmp_path: Path) -> None:
    v1 = _register(client, tmp_path, "flow-1", alias="champion")
    v2 = _register(client, tmp_path, "flow-2", alias="challenger")
    v3 = _register(client, tmp_path, "flow-3", alias="challenger")
    v4 = _register(client, tmp_path, "flow-4", alias="challenger")  # took it from v3 since
    assert client.get_model_version(NAME, v4).tags[registry.MOVED_PREFIX + "challenger"] == v3  # the record
    done = registry.undo_registration(client, NAME, v3)
    assert _aliases(client) == {"champion": v1, "challenger": v4} and _versions(client) == [v1, v2, v4]
    assert done.left == {"challenger": v4} and not done.restored and not done.removed


def test_rollback_leaves_a_concurrent_promote_alone(client, tmp_path: Path) -> None:
    v1 = _register(client, tmp_path, "flow-a", alias="champion")
    v2 = _register(client, tmp_path, "flow-a", alias="challenger")
    before = snapshot(client, NAME)
    # flow-b registers v3, which takes the champion; then, before flow-b fails and is rolled back,
    # someone promotes v2 by hand.
    v3 = _register(client, tmp_path, "flow-b", alias="champion")
    registry.promote(client, NAME, v2, reason="reviewed by hand", user="tester")
    assert _aliases(client) == {"champion": v2} and registry.champion_history(client, NAME) == [v1, v3, v2]
    report = undo_flow_run(client, before, EXPERIMENT, "flow-b")
    assert _aliases(client) == {"champion": v2}  # the promotion stands (the snapshot said champion=v1)
    assert registry.champion_history(client, NAME) == [v1, v2] and _versions(client) == [v1, v2]
    assert report.deleted_versions == [v3]
    assert report.left_aliases == {"champion": v2} and not report.restored_aliases and not report.removed_aliases
    assert "left champion=v2 alone" in report.describe()

    # One that took the (unset) challenger, while another registration took the champion since:
    # the challenger is unset again, the other registration's champion is untouched.
    before = snapshot(client, NAME)
    v4 = _register(client, tmp_path, "flow-c", alias="challenger")
    v5 = _register(client, tmp_path, "flow-d", alias="champion")
    report = undo_flow_run(client, before, EXPERIMENT, "flow-c")
    assert report.deleted_versions == [v4] and report.removed_aliases == ["challenger"]
    assert _aliases(client) == {"champion": v5}
