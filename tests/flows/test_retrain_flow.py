"""Both front doors end to end on real components: `aigc run` (Prefect flow, embedded server)
and `dvc repro`, each in a fresh git + DVC copy of the project with its own MLflow SQLite store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from aigc_pipeline.config import load_config, write_overrides_to_params
from tests.conftest import MODEL_DIR, PROGRESS, QUICK, REGISTERED, copy_project, invoke, run_cli, served_model

pytestmark = pytest.mark.slow
STAGES = ["ingest@digits", "augment@digits", "train", "evaluate", "register"]
MODEL = REGISTERED


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    project = copy_project(tmp_path_factory.mktemp("flow") / "project")
    sets = [a for s in (*QUICK, PROGRESS) for a in ("--set", s)]
    out = _ok(run_cli(project, "aigc", "run", *sets))
    return project, out


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    project = copy_project(tmp_path_factory.mktemp("repro") / "project")
    write_overrides_to_params(project, [*QUICK, PROGRESS])
    out = _ok(run_cli(project, "dvc", "repro"))
    return project, out


def test_aigc_run_registers_a_champion_and_summarises(flow_project: tuple[Path, str]) -> None:
    project, out = flow_project
    assert re.search(
        rf"{MODEL} v1 \(\w+\): FID [\d.]+ ± [\d.]+, floor [\d.]+ = [\d.]+x \[incv3-\w+_n24_eval-\w+_16px\], "
        rf"champion .*; champion: v1\. Cost: trained in [\d.]+ CPU-minutes \([\d.]+ wall-minutes on cpu"
        rf".*\. This run: [\d.]+ wall-minutes, [\d.]+ CPU-minutes in 5 stages \(ingest@digits [\d.]+, "
        rf"augment@digits [\d.]+, train [\d.]+, evaluate [\d.]+, register [\d.]+ wall-minutes\)",
        out,
    ), out[-3000:]
    status = json.loads(_ok(run_cli(project, "aigc", "status", "--json")))
    assert status["tracking_uri"] == f"sqlite:///{project}/mlflow/mlflow.db"
    (model,) = [m for m in status["models"] if m["name"] == MODEL]
    assert model["aliases"] == {"champion": "1"}
    assert any(k.startswith("fid_incv3-") for k in model["metrics"]) and "floor_fid" in model["metrics"]
    assert model["versions"]["1"]["aliases"] == ["champion"] and model["versions"]["1"]["metrics"]["fid_ratio"] > 0
    # What it cost: the training's and the whole run's, on the run and the version.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=status["tracking_uri"], registry_uri=status["tracking_uri"])
    version = client.get_model_version(MODEL, "1")
    assert version.tags["aigc.compute"].startswith("trained in ") and "in 5 stages" in version.tags["aigc.compute_run"]
    run_metrics = client.get_run(version.run_id).data.metrics
    assert (
        run_metrics["compute.run_wall_s"]
        >= run_metrics["compute.stage.train_wall_s"]
        >= run_metrics["compute.train_wall_s"]
        > 0
    )
    assert run_metrics["compute.stage.ingest_digits_cpu_s"] > 0 and run_metrics["compute.evaluate_cpu_s"] > 0
    # The flow published its summary as a Prefect artifact (read from the embedded server's database).
    import sqlite3

    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        rows = db.execute("select key, type, data from artifact").fetchall()
    (summary,) = [r for r in rows if r[0] == f"{MODEL}-summary"]
    assert summary[1] == "markdown" and "**decision**: champion" in summary[2] and "_n24_eval-" in summary[2]


def test_the_prefect_run_says_what_it_trained(flow_project: tuple[Path, str]) -> None:
    """Name, tags, parameters, task names, the stages' lines in the run's log and the artifacts,
    as the embedded server's database holds them (tests/ui/ checks them in the Prefect UI)."""
    import base64
    import io
    import sqlite3

    from PIL import Image

    project, out = flow_project
    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        ((run_id, name, tags, parameters),) = db.execute("select id, name, tags, parameters from flow_run").fetchall()
        tasks = {r[0] for r in db.execute("select name from task_run")}
        logs = [
            r for r in db.execute("select name, message from log where flow_run_id = ? order by timestamp", (run_id,))
        ]
        # data is JSON text (sqlite hands a bare number back as a number)
        artifacts = {
            k: (t, json.loads(d) if isinstance(d, str) else d)
            for k, t, d in db.execute("select key, type, data from artifact")
        }
    assert re.fullmatch(r"digits-resgan-\d{8}-\d{6}", name) and f"Flow run {name!r}" in out
    assert json.loads(tags) == ["dataset:digits", "model:resgan"]
    assert json.loads(parameters) == {
        "project_dir": str(project),
        "dataset": "digits",
        "model": "resgan",
        "overrides": [*QUICK, PROGRESS],
    }
    assert tasks == {
        "params",
        "ingest@digits",
        "augment@digits",
        "train",
        "evaluate",
        "register",
        "publish-summary",
        "require-champion",
    }  # no random suffixes
    stage_lines = [m for n, m in logs if n.startswith("aigc.stage.")]
    assert any(re.match(r"train epoch 1/1  step 10/10  loss_d ", m) for m in stage_lines), stage_lines
    assert any(
        re.match(r"evaluate: FID [\d.]+ .*\(floor [\d.]+ = [\d.]+x\).*\[incv3-\w+_n24_eval-", m) for m in stage_lines
    ), stage_lines
    assert any(m.startswith(f"register: {MODEL} v1: champion (") for m in stage_lines), stage_lines
    assert any(n == "prefect.task_runs" and m.startswith(f"{MODEL} v1 (resgan): FID ") for n, m in logs)
    # The stages' lines reached the terminal once each (Prefect's console did not print them again).
    assert out.count("train epoch 1/1") == 1, out[-3000:]
    assert {k: t for k, (t, _) in artifacts.items()} == {
        f"{MODEL}-summary": "markdown",
        f"{MODEL}-samples": "markdown",
        f"{MODEL}-metrics": "table",
        f"{MODEL}-mlflow-run": "markdown",
        f"{MODEL}-training": "progress",
        f"{MODEL}-copies": "markdown",
    }
    assert artifacts[f"{MODEL}-training"][1] == 100
    samples = artifacts[f"{MODEL}-samples"][1]
    (uri,) = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", samples)
    with Image.open(io.BytesIO(base64.b64decode(uri))) as grid:
        assert grid.width >= 384 and grid.height > 0
    copies = artifacts[f"{MODEL}-copies"][1]
    assert "Top row: the samples nearest a training image" in copies and "copy_share" in copies
    assert len(re.findall(r"\(data:image/png;base64,[A-Za-z0-9+/=]+\)", copies)) == 1
    rows = {r["metric"]: r for r in json.loads(artifacts[f"{MODEL}-metrics"][1])}
    assert set(rows) == {"FID", "KID", "precision", "recall", "copying share", "copying C_T", "exact copies"}
    assert rows["copying share"]["floor (real data)"] is not None and rows["exact copies"]["model"] == 0
    assert rows["FID"]["model / floor"] == pytest.approx(
        rows["FID"]["model"] / rows["FID"]["floor (real data)"], abs=0.01
    )


def test_after_aigc_run_dvc_is_clean_and_repro_is_a_noop(flow_project: tuple[Path, str]) -> None:
    project, _ = flow_project
    # Overrides were written to params.yaml (like `dvc exp run -S`), so dvc.lock matches what ran.
    assert load_config(project).train.epochs == 1
    lock = (project / "dvc.lock").read_text()
    assert all(f"  {s}:" in lock for s in STAGES)
    assert json.loads(_ok(run_cli(project, "dvc", "status", "--json"))) == {}
    out = _ok(run_cli(project, "dvc", "repro"))
    assert all(f"Stage '{s}' didn't change, skipping" in out for s in STAGES), out


def test_champion_pyfunc_generates_images_with_lineage(flow_project: tuple[Path, str]) -> None:
    import mlflow
    import pandas as pd

    project, _ = flow_project
    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    tags = client.get_run(version.run_id).data.tags
    assert re.fullmatch(r"[0-9a-f-]{36}", tags["prefect.flow_run_id"])
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"])
    assert tags["dvc.lock.train"].endswith(".dir")
    # Lineage on the model version too, where the registry's readers look.
    vtags = version.tags
    assert vtags["prefect.flow_run_id"] == tags["prefect.flow_run_id"] and vtags["git.commit"] == tags["git.commit"]
    assert vtags["dvc.lock.evaluate"] and vtags["aigc.data_digest"] and vtags["aigc.decision"] == "champion"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = model.predict(pd.DataFrame({"n": [4], "seed": [7]}))
    assert images.shape == (4, 1, 16, 16) and images.dtype == np.uint8 and images.std() > 0


def test_dvc_repro_registers_the_same_model(flow_project: tuple[Path, str], repro_project: tuple[Path, str]) -> None:
    flow_dir, _ = flow_project
    repro_dir, out = repro_project
    assert "Running stage 'register'" in out
    weights = f"models/{MODEL_DIR}/generator.safetensors"
    assert (flow_dir / weights).read_bytes() == (repro_dir / weights).read_bytes()
    metrics = "eval/digits/metrics.json"
    assert json.loads((flow_dir / metrics).read_text())["fid"] == json.loads((repro_dir / metrics).read_text())["fid"]
    status = json.loads(_ok(run_cli(repro_dir, "aigc", "status", "--json")))
    (model,) = [m for m in status["models"] if m["name"] == MODEL]
    assert model["aliases"] == {"champion": "1"}


def test_dvc_plots_show_json_works_offline(flow_project: tuple[Path, str]) -> None:
    project, _ = flow_project
    plots = json.loads(_ok(run_cli(project, "dvc", "plots", "show", "--json")))["data"]
    names = set(plots)
    assert f"models/{MODEL_DIR}/history.csv" in names and "eval/digits/samples.png" in names, names
    (progress,) = [n for n in names if n.endswith("fid_progress.csv")]
    ((plot,),) = [plots[progress]]
    assert plot["type"] == "vega"
    (point,) = plot["content"]["data"]["values"]  # one epoch: the last one is always measured
    (column,) = [k for k in point if k.startswith("fid_progress_")]
    assert re.fullmatch(r"fid_progress_incv3-\w+_n16_eval-\w+_16px", column) and float(point[column]) > 0
    assert set(point) == {"epoch", column, "rev"}
    assert any(n.startswith(f"models/{MODEL_DIR}/samples") and n.endswith(".png") for n in names), names


def test_mlflow_models_serve_answers_with_images(flow_project: tuple[Path, str]) -> None:
    import mlflow
    import pandas as pd

    project, _ = flow_project
    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    with served_model(f"models:/{MODEL}@champion", uri, project / "serve.log", cwd=project) as base:
        status, body = invoke(base, [[3, 7]])
    assert status == 200, body
    predictions = np.array(body["predictions"])
    assert predictions.shape == (3, 1, 16, 16) and predictions.min() >= 0 and predictions.max() <= 255
    # The same request through the Python API gives the same pixels.
    mlflow.set_tracking_uri(uri)
    local = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(pd.DataFrame({"n": [3], "seed": [7]}))
    assert np.array_equal(predictions, local)
