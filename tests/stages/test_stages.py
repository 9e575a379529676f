"""Each stage on a tiny slice of digits, chained through files as DVC chains them, with a real
MLflow SQLite store for registration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aigc_pipeline.config import Config, load_config
from aigc_pipeline.data.prepared import load_prepared
from aigc_pipeline.stages import augment, evaluate, ingest, register, train
from tests.conftest import QUICK, REPO


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(REPO, QUICK)


@pytest.fixture(scope="module")
def prepared(cfg: Config, work: Path) -> Path:
    res = ingest.run(cfg, work / "prepared")
    assert res.accepted == 200 and res.rejected == 0
    return work / "prepared"


@pytest.fixture(scope="module")
def augmented(cfg: Config, prepared: Path, work: Path) -> Path:
    augment.run(cfg, prepared, work / "augmented")
    return work / "augmented"


@pytest.fixture(scope="module")
def model(cfg: Config, augmented: Path, work: Path) -> Path:
    train.run(cfg, augmented, work / "model", work / "checkpoints", quiet=True)
    return work / "model"


@pytest.fixture(scope="module")
def evaluation(cfg: Config, model: Path, prepared: Path, work: Path) -> Path:
    evaluate.run(cfg, model, prepared, work / "eval", quiet=True)
    return work / "eval"


def test_ingest_writes_report_card_preview(prepared: Path) -> None:
    report = json.loads((prepared / "report.json").read_text())
    assert report["accepted"] == 200 and report["rejected"] == []
    assert sorted(report["per_class"]) == [str(d) for d in range(10)]
    assert sum(report["splits"].values()) == 200 and report["splits"]["eval"] > 10
    data = load_prepared(prepared)
    assert data.images.shape == (200, 1, 16, 16) and data.images.dtype == np.uint8
    assert data.images.max() > 200  # rescaled from digits' 0..16 to the full 0..255 range
    assert "Dataset card: digits" in (prepared / "card.md").read_text()
    assert (prepared / "preview.png").stat().st_size > 100


def test_ingest_is_deterministic(cfg: Config, prepared: Path, work: Path) -> None:
    again = ingest.run(cfg, work / "prepared-again")
    assert again.digest == load_prepared(prepared).digest


def test_augment_keeps_originals_adds_seeded_copies(cfg: Config, prepared: Path, augmented: Path, work: Path) -> None:
    train_split = load_prepared(prepared, "train")
    data = load_prepared(augmented)
    assert len(data.images) == len(train_split.images) * (1 + cfg.augment.copies)
    again = augment.run(cfg, prepared, work / "augmented-again")
    assert again.digest == data.digest  # same seed: byte-identical
    other = augment.run(load_config(REPO, [*QUICK, "augment.seed=99"]), prepared, work / "augmented-other")
    assert other.digest != data.digest


def test_train_writes_model_folder(model: Path) -> None:
    meta = json.loads((model / "model.json").read_text())
    assert meta["arch"]["size"] == 16 and meta["model"] == "dcgan"
    assert (model / "generator.safetensors").exists() and (model / "samples.png").exists()
    assert (model / "samples" / "epoch-001.png").exists()
    header = (model / "history.csv").read_text().splitlines()[0]
    assert header == "step,loss_d,loss_g,grad_norm_d,grad_norm_g"
    epochs = (model / "epochs.csv").read_text().splitlines()
    assert epochs[0] == "epoch,step,images_per_s,lr_generator,lr_discriminator,loss_d,loss_g,grad_norm_d,grad_norm_g"
    assert len(epochs) == 2 and epochs[1].startswith("1,10,")


def test_evaluate_writes_protocol_named_fid(evaluation: Path, cfg: Config) -> None:
    metrics = json.loads((evaluation / "metrics.json").read_text())
    protocol = metrics["protocol"]
    assert protocol["num_samples"] == cfg.evaluate.num_samples and protocol["reference_split"] == "eval"
    assert protocol["id"] in metrics["fid"]
    fid = metrics["fid"][protocol["id"]]
    assert np.isfinite(fid) and fid > 0
    # Offline weights carry no logits: IS is reported unavailable, never as a number.
    assert "isc" not in metrics and "no classifier layer" in metrics["isc_unavailable"]


def _with_fid(evaluation: Path, dest: Path, fid: float) -> Path:
    shutil.copytree(evaluation, dest)
    doc = json.loads((dest / "metrics.json").read_text())
    doc["fid"][doc["protocol"]["id"]] = fid
    (dest / "metrics.json").write_text(json.dumps(doc))
    return dest


def test_register_champion_logic_and_pyfunc(cfg: Config, model: Path, evaluation: Path, work: Path) -> None:
    import mlflow

    project = work / "mlproject"
    project.mkdir()
    first = register.run(cfg, model, evaluation, work / "r1.json", project_dir=project)
    assert first.champion and first.version == "1" and "first model" in first.reason
    assert json.loads((work / "r1.json").read_text())["version"] == "1"

    worse = register.run(cfg, model, _with_fid(evaluation, work / "ev-worse", first.fid + 50), work / "r2.json",
                         project_dir=project)
    assert not worse.champion and worse.version == "2"
    better = register.run(cfg, model, _with_fid(evaluation, work / "ev-better", first.fid - 1), work / "r3.json",
                          project_dir=project)
    assert better.champion and better.version == "3"

    client = mlflow.MlflowClient(tracking_uri=first.tracking_uri, registry_uri=first.tracking_uri)
    assert str(client.get_model_version_by_alias("digits-dcgan", "champion").version) == "3"
    v2 = client.get_model_version("digits-dcgan", "2")
    assert v2.tags["aigc.decision"] == "not promoted" and ">=" in v2.tags["aigc.decision_reason"]
    run = client.get_run(first.run_id)
    assert run.data.params["train.epochs"] == "1"
    assert any(k.startswith("fid_incv3-") for k in run.data.metrics)
    assert run.data.tags["aigc.data_digest"]
    assert len(client.get_metric_history(first.run_id, "train/loss_g")) >= 1
    assert len(client.get_metric_history(first.run_id, "train/grad_norm_d")) >= 1
    (rate,) = client.get_metric_history(first.run_id, "train_epoch/images_per_s")  # one epoch
    assert rate.step == 10 and rate.value > 0
    assert client.get_metric_history(first.run_id, "train_epoch/lr_generator")[0].value == 2e-4  # lr: auto = the dcgan recipe

    mlflow.set_tracking_uri(first.tracking_uri)
    loaded = mlflow.pyfunc.load_model("models:/digits-dcgan@champion")
    import pandas as pd

    images = loaded.predict(pd.DataFrame({"n": [3, 2], "seed": [0, 1]}))
    assert images.shape == (5, 1, 16, 16) and images.dtype == np.uint8
    again = loaded.predict(pd.DataFrame({"n": [3], "seed": [0]}))
    assert (again == images[:3]).all()  # seeded: same request, same images
