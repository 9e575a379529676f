"""Real images, entering the pipeline as a data team's own files would: the committed fixture
tests/data/mnist-small (600 MNIST digits, 28x28 grayscale PNGs in class folders) is added with
`aigc dataset add mnist FOLDER --size 32` and trained, evaluated and registered with
`aigc run --dataset mnist` (embedded Prefect, DVC, MLflow SQLite store) in a fresh git + DVC copy
of the project."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from aigc_pipeline.config import load_config
from aigc_pipeline.models.families import recipe_for
from aigc_pipeline.training.budget import auto_ema_decay, auto_lr, resolve_model
from tests.conftest import QUICK, copy_project, run_cli

pytestmark = pytest.mark.slow
NAME = "mnist"
FIXTURE = "tests/data/mnist-small"
# The flow tests' quick settings (no FID over training: the evaluate stage's FID is what this test
# checks), with the length as kimg, not epochs (0.96 kimg: a couple of epochs of the augmented
# training digits in batches of 32). No data-copying check: it runs Inception over the whole train
# split (470 images, two thirds of this test's time); tests/stages/test_stages.py and
# tests/unit/test_copies_cli.py check it, the latter on these same MNIST files.
SETTINGS = [s for s in QUICK if not s.startswith(("train.epochs=", "train.model="))] + [
    "train.epochs=null",
    "train.kimg=0.96",
    "evaluate.copy_check=false",
    "register.max_copy_share=null",  # the gate's copying bars, which would refuse an unchecked model
]


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc.stdout + proc.stderr


def test_mnist_files_added_at_32_px_train_evaluate_and_register(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    assert len(list((project / FIXTURE).glob("*/*.png"))) == 600
    _ok(run_cli(project, "aigc", "dataset", "add", NAME, FIXTURE, "--size", "32"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["datasets"][NAME] == {
        "source": "image-folder",
        "path": FIXTURE,
        "labels": "folders",
        "size": 32,
        "channels": 1,
    }
    out = _ok(
        run_cli(
            project, "aigc", "run", "--dataset", NAME, "--model", "auto", *[a for s in SETTINGS for a in ("--set", s)]
        )
    )

    cfg = load_config(project)
    assert (cfg.dataset, cfg.train.model, cfg.train.epochs, cfg.train.kimg) == (NAME, "auto", None, 0.96)
    family = resolve_model("auto", size=32, device="cpu")  # what train.model: auto trains at 32 px here
    folder = f"{NAME}-auto"  # DVC's paths say the setting (models/${dataset}-${train.model}); model.json the family
    report = json.loads((project / "data" / "prepared" / NAME / "report.json").read_text())
    assert report["accepted"] == 600 and not report["rejected"], report
    assert report["per_class"] == {str(d): 60 for d in range(10)}

    meta = json.loads((project / "models" / folder / "model.json").read_text())
    assert (meta["arch"]["family"], meta["arch"]["size"], meta["arch"]["channels"]) == (family, 32, 1)
    assert meta["model"] == meta["hparams"]["model"] == family and meta["train"]["model"] == "auto"
    # 0.96 kimg over the augmented training set (the train split plus one copy each) in batches of 32:
    # whole epochs of its full batches, as many as 960 images need.
    train_images = json.loads((project / "data" / "augmented" / NAME / "meta.json").read_text())["count"]
    per_epoch = train_images // 32
    epochs = math.ceil(960 / (per_epoch * 32))
    steps = epochs * per_epoch
    assert epochs >= 1 and steps * 32 >= 960
    assert meta["budget"] == {
        "kimg": steps * 32 / 1000,
        "images": steps * 32,
        "steps": steps,
        "epochs": epochs,
        "source": "train.kimg",
        "requested_kimg": 0.96,
    }
    assert meta["steps"] == steps
    # The plan before the wait, then its time estimate after the warm-up (the stage's own lines).
    assert (
        f"train plan: {steps * 32 / 1000:g} kimg (0.96 kimg asked, train.kimg) = {steps} steps = {epochs} "
        f"epoch{'s' if epochs != 1 else ''} of {per_epoch} batches of 32"
    ) in out, out[-3000:]
    assert re.search(r"train plan: .*; estimated .* left on cpu \(.* s/step over \d+ warm-up steps\)", out), out[-3000:]

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
    receipt = json.loads((project / "registry" / f"{folder}.json").read_text())
    assert receipt["name"] == NAME and receipt["family"] == family
    # MLflow: the run's params hold the resolved family and length beside the settings.
    import mlflow

    from aigc_pipeline.tracking.store import use_store

    with use_store(project, cfg.register.experiment):
        run = mlflow.get_run(receipt["run_id"])
    params = run.data.params
    assert (params["train.model"], params["train.model_setting"]) == (family, "auto")
    assert (params["train.kimg"], params["train.kimg_setting"]) == (str(steps * 32 / 1000), "0.96")
    assert (params["train.epochs"], params["train.epochs_setting"]) == (str(epochs), "None")
    # Width as set; the EMA decay as `auto` resolved for this family at 32 px.
    assert meta["arch"]["width"] == 16 and (params["train.width"], params["train.width_setting"]) == ("16", "16")
    decay = auto_ema_decay(family, 32)[0]
    assert meta["hparams"]["ema_decay"] == decay
    assert (params["train.ema_decay"], params["train.ema_decay_setting"]) == (str(decay), "auto")
    # The learning rate as `auto` resolved at 32 px (the size's measured value, else the family's recipe).
    lr = auto_lr(family, 32) or recipe_for(family).lr
    assert meta["hparams"]["lr"] == lr and (params["train.lr"], params["train.lr_setting"]) == (str(lr), "auto")
    assert run.data.tags["aigc.family"] == family
