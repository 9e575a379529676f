"""What a user sees in MLflow after a real `dvc repro` (QUICK settings) and while training runs.

- One run per pipeline run: opened by the train stage, completed by evaluate and register; every
  curve by the global step, with the times the points were measured; the epoch grids as MLflow
  images; system metrics; the protocol id as a param beside the short metric names; the three
  dataset inputs with their roles; the experiment tagged to open on training runs.
- The model version's description is the model card; its images (and the logged cards' images)
  are links a real MLflow server answers with the PNGs.
- Live: a training in a subprocess is visible in MLflow (losses and a grid) before it ends; killed
  with SIGKILL its run stays RUNNING, the resumed training continues that same run; SIGTERM ends
  it KILLED; the last resume finishes it with every step logged exactly once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from aigc_pipeline.config import write_overrides_to_params
from aigc_pipeline.io import sha256_file
from tests.conftest import BIN, MODEL_DIR, QUICK, REGISTERED, copy_project, run_cli, stop_group

pytestmark = pytest.mark.slow
EPOCHS = 3  # 10 steps each (330 augmented images, batch 32)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def viewed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A QUICK `dvc repro` (3 epochs, a grid and an FID point every epoch); the MLflow UI address
    the cards link to is a free port, where the tests start a real MLflow server."""
    project = copy_project(tmp_path_factory.mktemp("view") / "project")
    write_overrides_to_params(
        project, [*QUICK, f"train.epochs={EPOCHS}", "train.sample_every=1", "evaluate.progress_every=1"]
    )
    port = _free_port()
    with _env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1", AIGC_MLFLOW_UI_URL=f"http://127.0.0.1:{port}"):
        _ok(run_cli(project, "dvc", "repro"))
    return project, port


def test_one_run_holds_the_training_live_its_evaluation_and_its_registration(viewed: tuple[Path, int]) -> None:
    project, _ = viewed
    client = _client(project)
    experiment = client.get_experiment_by_name("aigc-pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on training runs
    (run,) = client.search_runs([experiment.experiment_id])
    run_id, tags, params = run.info.run_id, run.data.tags, run.data.params
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert version.run_id == run_id and run.info.status == "FINISHED"
    assert tags["aigc.training"] == "live" and tags["aigc.stage"] == "register"
    assert tags["aigc.weights_sha256"] == sha256_file(project / "models" / MODEL_DIR / "generator.safetensors")

    # One step unit: the global step (10 per epoch) for losses, epoch stats, FID over training, the
    # evaluation (at the last step) and the grids.
    steps = [10 * e for e in range(1, EPOCHS + 1)]
    history = {k: client.get_metric_history(run_id, k) for k in run.data.metrics}
    assert [m.step for m in history["train/loss_d"]] == list(range(1, 10 * EPOCHS + 1))
    assert [m.step for m in history["train_epoch/loss_d"]] == steps
    assert [m.value for m in history["train_epoch/epoch"]] == [1.0, 2.0, 3.0]
    (progress,) = [k for k in history if k.startswith("fid_progress_")]
    assert [m.step for m in history[progress]] == steps
    assert [m.step for m in history["fid"]] == [steps[-1]]
    # Real timestamps: logged as measured, during training, before the evaluation, inside the run.
    first, fid_points, evaluated = history["train/loss_d"][0], history[progress], history["fid"][0]
    assert run.info.start_time <= first.timestamp < fid_points[0].timestamp < fid_points[-1].timestamp
    assert fid_points[-1].timestamp < evaluated.timestamp <= run.info.end_time
    assert len({m.timestamp for m in history["train/loss_d"]}) >= EPOCHS
    # The grids as MLflow images (the charts view's image grid with a step slider).
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert (
        sorted(
            int(re.match(r"images/samples\+step\+(\d+)\+", p).group(1))
            for p in images
            if p.startswith("images/samples+") and p.endswith(".png")
        )
        == steps
    )
    assert tags["mlflow.loggedImages"] == "True"
    assert any(k.startswith("system/cpu_utilization") for k in history)  # system metrics on

    # The protocol beside the short names; resolved hyperparameters with their setting.
    details = json.loads((project / "eval" / "digits" / "evaluation.json").read_text())
    pid = details["protocol"]["id"]
    assert params["evaluate.protocol"] == tags["aigc.protocol"] == pid
    assert run.data.metrics["fid"] == run.data.metrics[f"fid_{pid}"]
    assert params["train.lr_setting"] == "auto" and float(params["train.lr"]) > 0

    # The three datasets, with their roles; DVC's hashes as digests.
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    inputs = {({t.key: t.value for t in i.tags}["mlflow.data.context"]): i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "prepared", "evaluation"}
    assert (
        inputs["training"].name == "digits-augmented"
        and inputs["training"].digest == lock["augment@digits"]["outs"][0]["md5"]
    )
    assert inputs["prepared"].name == "digits" and inputs["prepared"].digest == lock["ingest@digits"]["outs"][0]["md5"]
    assert inputs["evaluation"].name == "digits-eval"
    assert details["protocol"]["reference_digest"].startswith(inputs["evaluation"].digest)
    assert json.loads(inputs["evaluation"].profile)["images"] == details["protocol"]["num_reference"]

    assert json.loads(_ok(run_cli(project, "dvc", "status", "--json"))) == {}


@contextlib.contextmanager
def _mlflow_server(project: Path, port: int) -> Iterator[str]:
    """A real `mlflow server` over the project's store on 127.0.0.1:``port``."""
    log = project / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{project}/mlflow/mlflow.db",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=project,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield base
    finally:
        stop_group(proc)


def _fetch_png(url: str) -> tuple[int, int]:
    from PIL import Image

    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200 and r.headers.get_content_type() == "image/png", (url, r.headers)
        return Image.open(io.BytesIO(r.read())).size


def test_the_version_description_is_the_model_card_and_its_images_are_served(
    viewed: tuple[Path, int], tmp_path: Path
) -> None:
    project, port = viewed
    client = _client(project)
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    run_id = version.run_id
    description = version.description
    assert description.startswith(f"# Model card: {REGISTERED}\n") and len(description) <= 5000
    assert f"models:/{REGISTERED}@champion" in description and "## Metrics" in description
    # MLflow renders descriptions with showdown + sanitize-html: a relative <img src> is kept, and
    # resolves against the UI page (http://host:port/#/models/...).
    relative = re.findall(r"!\[[^]]*\]\((get-artifact\?[^)]+)\)", description)
    assert relative == [
        f"get-artifact?path=evaluation/samples.png&run_uuid={run_id}",
        f"get-artifact?path=training/samples.png&run_uuid={run_id}",
        f"get-artifact?path=evaluation/copies.png&run_uuid={run_id}",
    ]
    # Markdown artifacts go through react-markdown, which shows a URL without a scheme as text:
    # the logged cards link the UI's absolute address.
    base = f"http://127.0.0.1:{port}"
    card = Path(client.download_artifacts(run_id, "model_card.md", str(tmp_path))).read_text()
    absolute = re.findall(r"!\[[^]]*\]\((http[^)]+)\)", card)
    assert absolute == [f"{base}/{link}" for link in relative]
    dataset_card = Path(client.download_artifacts(run_id, "datasets/digits/card.md", str(tmp_path))).read_text()
    (preview,) = re.findall(r"!\[preview\]\(([^)]+)\)", dataset_card)
    assert preview == f"{base}/get-artifact?path=datasets/digits/preview.png&run_uuid={run_id}"
    assert "![preview](preview.png)" in (project / "data" / "prepared" / "digits" / "card.md").read_text()  # untouched

    with _mlflow_server(project, port) as served:
        for link in relative:
            width, height = _fetch_png(f"{served}/{link}")
            assert width > 0 and height > 0
        assert _fetch_png(absolute[0]) == _fetch_png(f"{served}/{relative[0]}")
        assert min(_fetch_png(preview)) > 0


# --- live ------------------------------------------------------------------------------------------


def _train_command(project: Path) -> list[str]:
    """The train stage's command, as dvc.yaml declares it."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        (stage,) = repo.stage.collect(f"{project / 'dvc.yaml'}:train")
        return shlex.split(stage.cmd)


def _start_training(project: Path, log: Path) -> subprocess.Popen:
    cmd = _train_command(project)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(BIN / cmd[0]), *cmd[1:]],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _training_run(client, key: str | None = None):
    experiment = client.get_experiment_by_name("aigc-pipeline")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _wait(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert proc.poll() is None, f"training ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _max_step(client, run_id: str) -> int:
    history = client.get_metric_history(run_id, "train/loss_d")
    return max((m.step for m in history), default=0)


def test_training_is_visible_live_and_a_killed_training_continues_its_run(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    epochs = 12
    write_overrides_to_params(
        project,
        [
            *QUICK,
            f"train.epochs={epochs}",
            "train.sample_every=1",
            "train.checkpoint_every=10",
        ],
    )
    _ok(run_cli(project, "dvc", "repro", "augment@digits"))
    client = _client(project)
    log = project / "train.log"
    checkpoints = project / "checkpoints" / MODEL_DIR

    def live_with_image():
        run = _training_run(client)
        if run is None or "train/loss_d" not in run.data.metrics:
            return None
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        return run if any(p.startswith("images/samples+step+") for p in images) else None

    # 1. While the training runs: losses and a grid are in MLflow, the run is RUNNING.
    proc = _start_training(project, log)
    run = _wait(live_with_image, proc, log, "losses and a grid in MLflow")
    run_id = run.info.run_id
    assert proc.poll() is None and run.info.status == "RUNNING"
    assert run.data.tags["aigc.training"] == "live" and run.data.params["train.epochs"] == str(epochs)
    # 2. SIGKILL after a checkpoint: nothing can end the run, it stays RUNNING.
    _wait(lambda: list(checkpoints.rglob("*.safetensors")), proc, log, "a checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert client.get_run(run_id).info.status == "RUNNING"
    held = _max_step(client, run_id)

    # 3. The resumed training continues the same run; SIGTERM ends it KILLED.
    proc = _start_training(project, log)
    _wait(
        lambda: (
            _max_step(client, run_id) > held
            and client.get_run(run_id).info.status == "RUNNING"
            and int(client.get_run(run_id).data.tags["aigc.resumed_from"]) > 0
        ),
        proc,
        log,
        "the run continued",
    )
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.tags["aigc.error_type"] == "Terminated"

    # 4. The last resume finishes it: every step exactly once, every epoch's grid once, FINISHED.
    proc = _start_training(project, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    (final,) = client.search_runs([run.info.experiment_id])
    assert final.info.run_id == run_id and final.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss_d")] == list(range(1, 10 * epochs + 1))
    assert [m.step for m in client.get_metric_history(run_id, "train_epoch/loss_d")] == [
        10 * e for e in range(1, epochs + 1)
    ]
    grids = sorted(
        int(re.match(r"images/samples\+step\+(\d+)\+", a.path).group(1))
        for a in client.list_artifacts(run_id, "images")
        if a.path.endswith(".png")
    )
    assert grids == [10 * e for e in range(1, epochs + 1)]
    assert final.data.tags["aigc.weights_sha256"] == sha256_file(
        project / "models" / MODEL_DIR / "generator.safetensors"
    )
