"""`aigc deploy` and the dataset event without a server: what they refuse, and what they carry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aigc_pipeline.config import apply_overrides, config_from_dict, read_params
from flows.deploy import DeployError, ensure_crash_automation, work_pools
from flows.events import DATASET_EVENT, dataset_payload, emit_dataset_updated
from tests.conftest import REPO, copy_project, run_cli


def test_deploy_needs_a_prefect_server(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    proc = run_cli(project, "aigc", "deploy")
    assert proc.returncode == 2
    assert "no Prefect server: export PREFECT_API_URL" in proc.stderr


def test_crash_detection_must_outlast_the_heartbeat() -> None:
    with pytest.raises(DeployError, match="must exceed the 30 s heartbeat"):
        ensure_crash_automation(30)


def test_prefect_yaml_routes_training_to_the_gpu_pool() -> None:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert work_pools(REPO) == ["cpu", "gpu"]
    retrain, train = by_name["retrain"], by_name["train"]
    assert retrain["work_pool"]["name"] == "cpu" and train["work_pool"]["name"] == "gpu"
    assert retrain["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert [s["cron"] for s in retrain["schedules"]] == ["0 3 * * 1"]
    assert set(retrain["parameters"]) == {"dataset", "model", "overrides"}
    (trigger,) = retrain["triggers"]
    assert trigger["expect"] == [DATASET_EVENT]
    # The remote stage clones the exact commit it is given; the retrain flow clones the branch.
    (clone,) = [s for s in train["pull"] if "prefect.deployments.steps.git_clone" in s]
    assert clone["prefect.deployments.steps.git_clone"]["commit_sha"] == "{{ $AIGC_COMMIT }}"
    for d in (retrain, train):
        assert d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"


def test_dataset_event_overrides_rebuild_the_entry() -> None:
    entry = {"source": "image-folder", "path": "/data/pets", "labels": "folders", "size": 64, "channels": 3}
    payload = dataset_payload("pets", entry)
    assert payload["dataset"] == "pets"
    params = apply_overrides(read_params(REPO / "params.yaml"), [*payload["overrides"], "dataset=pets"])
    assert params["datasets"]["pets"] == entry
    assert config_from_dict(params).active_dataset.size == 64


def test_no_event_without_a_configured_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert emit_dataset_updated("pets", {"source": "image-folder"}) is None
