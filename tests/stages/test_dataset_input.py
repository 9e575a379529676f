"""The prepared dataset logged with `mlflow.log_input`: its digest is the hash DVC recorded in dvc.lock
(real `dvc repro` of the ingest stage, real MLflow SQLite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aigc_pipeline.config import write_overrides_to_params
from aigc_pipeline.errors import DataError
from aigc_pipeline.tracking.datasets import dvc_md5, locked_output, log_prepared_dataset
from aigc_pipeline.tracking.store import use_store
from tests.conftest import copy_project, run_cli


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("input") / "project")
    write_overrides_to_params(project, ["datasets.digits.limit=120", "datasets.digits.size=8"])
    proc = run_cli(project, "dvc", "repro", "ingest@digits")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return project


def test_dvc_md5_is_the_hash_dvc_records(ingested: Path) -> None:
    lock = yaml.safe_load((ingested / "dvc.lock").read_text())["stages"]["ingest@digits"]
    (out,) = lock["outs"]
    assert out["path"] == "data/prepared/digits" and out["md5"].endswith(".dir")
    assert dvc_md5(ingested / out["path"]) == out["md5"]  # a folder
    (source,) = [d for d in lock["deps"] if d["path"] == "uv.lock"]  # the digits' DVC-watched path
    assert dvc_md5(ingested / "uv.lock") == source["md5"]  # a single file
    assert locked_output(ingested, "ingest@digits") == (ingested / out["path"], out["md5"])
    assert locked_output(ingested, "ingest@pets") is None


def test_log_input_carries_the_dvc_hash_counts_card_and_preview(ingested: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    md5 = locked_output(ingested, "ingest@digits")[1]
    with use_store(ingested, "datasets-test"):
        uri = mlflow.get_tracking_uri()
        with mlflow.start_run() as run:
            logged = log_prepared_dataset(ingested, "digits")
    assert uri.startswith("sqlite:///") and logged is not None and logged.digest == md5

    client = MlflowClient(tracking_uri=uri)
    (inp,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "digits" and inp.dataset.digest == md5
    assert inp.dataset.source_type == "local"
    assert json.loads(inp.dataset.source)["uri"] == str((ingested / "data" / "prepared" / "digits").resolve())
    profile = json.loads(inp.dataset.profile)
    report = json.loads((ingested / "data" / "prepared" / "digits" / "report.json").read_text())
    assert profile["images"] == report["accepted"] == 120
    assert profile["splits"] == report["splits"] and sum(profile["splits"].values()) == 120
    assert sorted(profile["per_class"]) == [str(d) for d in range(10)]
    assert (profile["size"], profile["channels"]) == (8, 1)
    schema = json.loads(inp.dataset.schema)["mlflow_tensorspec"]
    assert json.loads(schema["features"])[0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 1, 8, 8]}
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "prepared" and tags["dvc.stage"] == "ingest@digits"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "datasets/digits")}
    assert artifacts == {"datasets/digits/card.md", "datasets/digits/preview.png", "datasets/digits/report.json"}


def test_a_prepared_dataset_changed_since_dvc_recorded_it_is_refused(ingested: Path, tmp_path: Path) -> None:
    import mlflow

    card = ingested / "data" / "prepared" / "digits" / "card.md"
    original = card.read_bytes()
    card.write_bytes(original + b"\nedited by hand\n")
    try:
        with use_store(ingested, "datasets-test"), mlflow.start_run():
            with pytest.raises(DataError, match="not what dvc.lock records for stage ingest@digits"):
                log_prepared_dataset(ingested, "digits")
    finally:
        card.write_bytes(original)
    # Outside a DVC project (a stage function called directly) there is nothing to point at.
    assert log_prepared_dataset(tmp_path, "digits") is None
