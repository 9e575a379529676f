"""Real images, entering the pipeline as a data team's own files would: the committed fixture
tests/data/mnist-small (600 MNIST digits, 28x28 grayscale PNGs in class folders) is added with
`aigc dataset add mnist FOLDER --size 32` and trained, evaluated and registered with
`aigc run --dataset mnist` (embedded Prefect, DVC, MLflow SQLite store) in a fresh git + DVC copy
of the project."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from aigc_pipeline.config import load_config
from tests.conftest import QUICK, copy_project, run_cli

pytestmark = pytest.mark.slow
NAME = "mnist"
FIXTURE = "tests/data/mnist-small"
# The flow tests' quick settings, with two epochs (of the 480 training digits: 30 steps) and no
# FID over training (the evaluate stage's FID is what this test checks).
SETTINGS = [s for s in QUICK if not s.startswith("train.epochs=")] + ["train.epochs=2", "evaluate.progress_every=0"]


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def test_mnist_files_added_at_32_px_train_evaluate_and_register(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    assert len(list((project / FIXTURE).glob("*/*.png"))) == 600
    _ok(run_cli(project, "aigc", "dataset", "add", NAME, FIXTURE, "--size", "32"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["datasets"][NAME] == {"source": "image-folder", "path": FIXTURE, "labels": "folders",
                                        "size": 32, "channels": 1}
    out = _ok(run_cli(project, "aigc", "run", "--dataset", NAME, *[a for s in SETTINGS for a in ("--set", s)]))

    cfg = load_config(project)
    assert cfg.dataset == NAME and cfg.train.epochs == 2
    family = cfg.train.model
    report = json.loads((project / "data" / "prepared" / NAME / "report.json").read_text())
    assert report["accepted"] == 600 and not report["rejected"], report
    assert report["per_class"] == {str(d): 60 for d in range(10)}

    arch = json.loads((project / "models" / f"{NAME}-{family}" / "model.json").read_text())["arch"]
    assert (arch["family"], arch["size"], arch["channels"]) == (family, 32, 1)

    metrics = json.loads((project / "eval" / NAME / "metrics.json").read_text())
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert math.isfinite(metrics["floor_fid"]) and metrics["floor_fid"] > 0
    assert metrics["fid_ratio"] == pytest.approx(metrics["fid"] / metrics["floor_fid"], rel=1e-3)

    # The evaluation's grid: min(64, num_samples) grayscale 32-px tiles, 2 px apart (aigc_pipeline.images).
    n = min(64, cfg.evaluate.num_samples)
    per_row = math.ceil(math.sqrt(n))
    rows = math.ceil(n / per_row)
    with Image.open(project / "eval" / NAME / "samples.png") as grid:
        assert grid.mode == "L"
        assert grid.size == (per_row * (32 + 2) + 2, rows * (32 + 2) + 2)
    assert f"{NAME} v1 ({family}): FID" in out, out[-3000:]
    receipt = json.loads((project / "registry" / f"{NAME}-{family}.json").read_text())
    assert receipt["name"] == NAME and receipt["family"] == family
