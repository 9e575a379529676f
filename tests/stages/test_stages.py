"""Each stage on a tiny slice of digits, chained through files as DVC chains them, with a real
MLflow SQLite store for registration: the promotion gate's decisions and reasons, lineage, plots
and model card, the pyfunc from models:/NAME@champion (no pickle), `aigc promote`, `aigc rollback`,
`aigc sample`, and retries after failures at every point of a registration."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aigc_pipeline import cli
from aigc_pipeline.config import Config, load_config
from aigc_pipeline.data.prepared import load_prepared
from aigc_pipeline.evaluation.results import read_evaluation
from aigc_pipeline.models import families as registry_module
from aigc_pipeline.stages import augment, evaluate, ingest, register, train
from aigc_pipeline.tracking import registry
from aigc_pipeline.tracking.registry import RegistryError
from tests.conftest import PROGRESS, QUICK, REPO

NAME = "digits"  # the registered model: one per dataset, whatever the family


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(REPO, [*QUICK, PROGRESS])


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
def model(cfg: Config, augmented: Path, prepared: Path, work: Path) -> Path:
    train.run(cfg, augmented, work / "model", work / "checkpoints", reference=prepared, quiet=True)
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
    assert meta["arch"]["size"] == 16 and meta["model"] == load_config(REPO, QUICK).train.model
    assert (model / "generator.safetensors").exists() and (model / "samples.png").exists()
    assert (model / "samples" / "epoch-001.png").exists()
    header = (model / "history.csv").read_text().splitlines()[0]
    assert header == "step,loss_d,loss_g,grad_norm_d,grad_norm_g"
    epochs = (model / "epochs.csv").read_text().splitlines()
    assert epochs[0] == "epoch,step,lr_generator,lr_discriminator,loss_d,loss_g,grad_norm_d,grad_norm_g"
    assert len(epochs) == 2 and epochs[1].startswith("1,10,")
    # Wall-clock figures apart (they are not reproducible; everything else is).
    timing = (model / "timing.csv").read_text().splitlines()
    assert timing[0] == "epoch,seconds,images_per_s" and len(timing) == 2 and float(timing[1].split(",")[2]) > 0
    # What it cost: wall and CPU seconds of the stage, the device, the images shown.
    compute = json.loads((model / "compute.json").read_text())
    assert compute["wall_seconds"] > float(timing[1].split(",")[1]) and compute["cpu_seconds"] > 0
    assert compute["device"] == meta["speed"] and compute["devices"] == 1 and compute["resumed_from_step"] == 0
    assert compute["images_shown"] == 10 * 32 == compute["steps"] * 32
    # FID over training, named with its small sample count; one epoch = the last one, so measured.
    rows = (model / "fid_progress.csv").read_text().splitlines()
    assert re.fullmatch(r"epoch,fid_progress_incv3-[0-9a-f]{8}_fx[0-9a-f]{6}_n16_eval-[0-9a-f]{8}_16px", rows[0]), rows
    assert len(rows) == 2 and rows[1].startswith("1,") and float(rows[1].split(",")[1]) > 0


def test_evaluate_writes_numbers_beside_the_data_floor_and_the_protocol_apart(evaluation: Path, cfg: Config) -> None:
    headline = json.loads((evaluation / "metrics.json").read_text())
    details = json.loads((evaluation / "evaluation.json").read_text())
    # metrics.json: the headline numbers only (what `dvc metrics show` prints, in 120 columns); every
    # other number in evaluation.json's more_metrics; read_evaluation merges them.
    assert set(headline) == {"fid", "fid_std", "fid_inf", "fid_ratio", "floor_fid", "kid", "precision", "recall"}
    assert all(isinstance(v, float) for v in headline.values()), headline
    more = details.pop("more_metrics")
    assert {"kid_std", "floor_precision", "classifier_score"} <= set(more) and not set(more) & set(headline)
    metrics = read_evaluation(evaluation).metrics
    assert metrics == {**more, **headline}
    protocol = details["protocol"]
    pid = protocol["id"]
    assert protocol["num_samples"] == cfg.evaluate.num_samples and protocol["reference_split"] == "eval"
    assert protocol["extractor"] == "inception-v3-compat" and len(protocol["weights_sha256"]) == 64
    assert re.fullmatch(r"incv3-[0-9a-f]{8}_fx[0-9a-f]{6}_n24_eval-[0-9a-f]{8}_16px", pid)
    fid = metrics["fid"]
    assert np.isfinite(fid) and fid > 0
    assert 0 < metrics["fid_std"] < fid and details["bootstrap"]["replicas"] == cfg.evaluate.bootstrap
    assert np.isfinite(metrics["kid"]) and metrics["kid_std"] >= 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    # The data's own floor under the same protocol: real train images, as many as generated ones.
    floor = details["floor"]
    assert floor["split"] == "train" and floor["num_samples"] == cfg.evaluate.num_samples
    assert not floor["overlaps_reference"]
    assert 0 < metrics["floor_fid"] < fid and metrics["fid_ratio"] == pytest.approx(fid / metrics["floor_fid"])
    assert metrics["floor_precision"] > metrics["precision"] and metrics["floor_fid_std"] > 0
    assert details["metric_names"]["fid"] == f"fid_{pid}" and details["metric_names"]["floor_fid"] == f"floor_fid_{pid}"
    # Offline weights carry no logits: IS is reported unavailable, never as a number.
    assert "isc" not in metrics and "no classifier layer" in details["isc_unavailable"]
    # Labelled digits: a classifier score, named as such, under its own protocol.
    cid = details["classifier"]["id"]
    assert re.fullmatch(r"logreg-[0-9a-f]{8}_n24_16px", cid) and 1.0 <= metrics["classifier_score"] <= 10.0
    assert details["metric_names"]["classifier_score"] == f"classifier_score_{cid}"
    assert metrics["classifier_accuracy"] == details["classifier"]["accuracy"] > 0.8
    assert "not an Inception Score" in details["classifier"]["what"]


def test_the_floor_is_computed_once_per_content(
    cfg: Config, model: Path, prepared: Path, evaluation: Path, tmp_path: Path
) -> None:
    from aigc_pipeline.evaluation import floor as floor_module

    calls = []
    real = floor_module.compute_fidelity_metrics

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    floor_module.compute_fidelity_metrics = counting
    try:
        again = evaluate.run(cfg, model, prepared, tmp_path / "again", quiet=True)
        other = evaluate.run(
            load_config(REPO, [*QUICK, "evaluate.seed=7"]), model, prepared, tmp_path / "seed7", quiet=True
        )
    finally:
        floor_module.compute_fidelity_metrics = real
    first = read_evaluation(evaluation).metrics
    assert again.floor.from_cache and again.floor.fid == first["floor_fid"]  # cached by content: same number
    assert not other.floor.from_cache and other.floor.key != again.floor.key  # another sample of real images
    assert calls == [(cfg.evaluate.num_samples, 1, 16, 16)]  # only the new floor was computed
    assert f"floor {again.floor.fid:.1f} = {again.fid_ratio:.2f}x" in evaluate.summary_line(again)
    assert "no classifier layer" in again.isc_unavailable  # what `aigc evaluate` prints


def test_the_evaluations_inception_work_is_known_before_it_starts(
    cfg: Config, model: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """inception_work (what the training plan prices) counts the images evaluate.run then puts through
    Inception, with an empty cache and with the entries that first run left."""
    from aigc_pipeline.evaluation import features as features_module
    from aigc_pipeline.evaluation.work import inception_work

    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path / "cache"))
    counted: list[int] = []
    real = features_module.get_featuresdict_from_dataset

    def counting(dataset, *args, **kwargs):
        counted.append(len(dataset))
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(features_module, "get_featuresdict_from_dataset", counting)
    splits = {name: len(load_prepared(prepared, name).images) for name in ("train", "eval")}
    n = cfg.evaluate.num_samples
    cold = inception_work(cfg.evaluate, prepared)
    assert cold.samples == n and dict((what, count) for what, count in cold.once) == {
        "of the eval split for the reference": splits["eval"],
        "for the floor": n,
        "of the train split for the copying check": splits["train"],
    }
    assert cold.copying == splits["train"]  # the eval split's features serve the reference too
    evaluate.run(cfg, model, prepared, tmp_path / "cold")
    assert sum(counted) == cold.images
    assert f"evaluate: {cold.describe()}" in capsys.readouterr().err
    warm = inception_work(cfg.evaluate, prepared)
    assert warm.once == () and warm.images == n
    counted.clear()
    evaluate.run(cfg, model, prepared, tmp_path / "warm", quiet=True)
    assert counted == [n]


def test_classifier_is_trained_once_per_content(prepared: Path, tmp_path: Path) -> None:
    from aigc_pipeline.evaluation.classifier import classifier_score, load_or_train_classifier

    first = load_or_train_classifier(prepared, cache_dir=tmp_path)
    again = load_or_train_classifier(prepared, cache_dir=tmp_path)
    assert first is not None and not first.from_cache and again is not None and again.from_cache
    assert again.key == first.key and np.array_equal(again.coef, first.coef) and again.accuracy == first.accuracy
    real = load_prepared(prepared, "eval")
    probs = again.predict_proba(real.images)
    assert probs.shape == (len(real.images), 10) and np.allclose(probs.sum(1), 1)
    assert classifier_score(probs) > 3  # real digits: confident and spread over the classes
    assert classifier_score(np.full((5, 10), 0.1)) == pytest.approx(1.0)
    assert classifier_score(np.eye(10)) == pytest.approx(10.0, rel=1e-6)


@pytest.fixture
def restore_env() -> Iterator[None]:
    """`aigc` commands run in-process set environment defaults (PREFECT_HOME, ...); undo them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _variant(evaluation: Path, dest: Path, **changes: Any) -> Path:
    """A copy of ``evaluation`` whose metrics are changed (None deletes one)."""
    shutil.copytree(evaluation, dest)
    doc = json.loads((dest / "metrics.json").read_text())
    for metric, value in changes.items():
        if value is None:
            doc.pop(metric)
        else:
            doc[metric] = value
    (dest / "metrics.json").write_text(json.dumps(doc))
    return dest


def _scores(evaluation: Path) -> tuple[str, dict[str, float]]:
    """(protocol id, metrics) of an evaluation folder."""
    details = json.loads((evaluation / "evaluation.json").read_text())
    return details["protocol"]["id"], read_evaluation(evaluation).metrics


def _client(project: Path):
    import mlflow

    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(client, name: str = NAME) -> dict[str, str]:
    return {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}


def test_register_gate_decisions_lineage_and_pyfunc(
    cfg: Config, model: Path, evaluation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import pandas as pd

    project = tmp_path / "mlproject"
    project.mkdir()
    monkeypatch.setenv(register.FLOW_RUN_ENV, "0c1d2e3f-0000-4000-8000-000000000001")
    pid, doc = _scores(evaluation)
    fid, std = doc["fid"], doc["fid_std"]

    def reg(label: str, **changes: Any) -> register.RegisterResult:
        ev = _variant(evaluation, tmp_path / f"ev-{label}", **changes) if changes else evaluation
        return register.run(cfg, model, ev, tmp_path / f"{label}.json", project_dir=project)

    first = reg("first")
    assert first.champion and first.decision == "champion" and "first model" in first.reason
    assert json.loads((tmp_path / "first.json").read_text())["decision"] == "champion"
    worse = reg("worse", fid=fid + 50)
    assert worse.decision == "challenger" and "not better" in worse.reason
    noisy = reg("noisy", fid=fid - 1.0, fid_std=5.0)  # better by 1, noise 2 * hypot(5, std) > 10
    assert noisy.decision == "challenger" and "within the noise" in noisy.reason
    nan = reg("nan", fid=float("nan"))
    assert nan.decision == "rejected" and "fid is nan" in nan.reason
    partial = reg("partial", recall=None)
    assert partial.decision == "rejected" and "recall under protocol" in partial.reason
    better = reg("better", fid=fid - 100 * std - 10)
    assert better.champion and better.decision == "champion" and "better by" in better.reason

    client = _client(project)
    assert [first.version, worse.version, noisy.version, nan.version, partial.version, better.version] == [
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    ]
    assert _aliases(client) == {"champion": "6", "challenger": "3"}  # the rejected ones got no alias
    assert client.get_registered_model(NAME).tags[registry.HISTORY_TAG] == "1,6"
    for result in (worse, nan, better):  # decision and reasons on both the version and its run
        v = client.get_model_version(NAME, result.version)
        r = client.get_run(result.run_id)
        for tags in (v.tags, r.data.tags):
            assert tags["aigc.decision"] == result.decision and tags["aigc.decision_reason"] == result.reason
            assert tags["prefect.flow_run_id"] == "0c1d2e3f-0000-4000-8000-000000000001"
            assert tags["aigc.protocol"] == pid and tags["aigc.data_digest"]
            assert "git.commit" in tags
        assert v.tags[registry.STATE_TAG] == registry.DONE
    gate = client.get_model_version(NAME, better.version).tags
    assert float(gate["aigc.gate.delta"]) > float(gate["aigc.gate.noise"]) and gate["aigc.gate.champion_version"] == "1"
    details = json.loads((evaluation / "evaluation.json").read_text())
    assert r.data.tags["aigc.protocol.reference_digest"] == details["protocol"]["reference_digest"]
    family = cfg.train.model
    assert v.tags["aigc.family"] == family and json.loads(v.tags["aigc.train_config"])["model"] == family

    # Every metric under its short name and its protocol-named key; FID over training by epoch;
    # resolved hyperparameters as params; charts and the card.
    metrics = client.get_run(first.run_id).data.metrics
    params = client.get_run(first.run_id).data.params
    assert params["train.epochs"] == "1"
    recipe = registry_module.recipe_for(family)
    assert params["train.lr"] == str(recipe.lr) and params["train.lr_setting"] == "auto"  # the recipe's value
    assert params["train.beta1"] == str(recipe.beta1) and params["train.beta1_setting"] == "auto"
    assert len(client.get_metric_history(first.run_id, "train/loss_g")) >= 1
    assert len(client.get_metric_history(first.run_id, "train/grad_norm_d")) >= 1
    assert client.get_metric_history(first.run_id, "train_epoch/lr_generator")[0].value == recipe.lr
    for m in ("fid", "fid_std", "kid", "precision", "recall", "floor_fid", "fid_ratio"):
        assert f"{m}_{pid}" in metrics and metrics[m] == metrics[f"{m}_{pid}"], m
    assert any(k.startswith("classifier_score_logreg-") for k in metrics)
    (progress,) = [k for k in metrics if k.startswith("fid_progress_")]
    # The training ran without MLflow: register logged it from the model folder, every curve by the
    # global step (one epoch = 10 steps), the grid as an image at that step.
    assert "_n16_" in progress and [m.step for m in client.get_metric_history(first.run_id, progress)] == [10]
    assert [m.step for m in client.get_metric_history(first.run_id, "train_epoch/loss_d")] == [10]
    assert [m.step for m in client.get_metric_history(first.run_id, "fid")] == [10]
    run = client.get_run(first.run_id)
    assert run.data.tags["aigc.training"] == "from model folder" and run.data.params["evaluate.protocol"] == pid
    assert any(a.path.startswith("images/samples+step+10+") for a in client.list_artifacts(first.run_id, "images"))
    artifacts = {a.path for a in client.list_artifacts(first.run_id)} | {
        a.path for a in client.list_artifacts(first.run_id, "plots")
    }
    assert {
        "model_card.md",
        "metrics.json",
        "evaluation.json",
        "plots/losses.png",
        "plots/fid_progress.png",
    } <= artifacts
    card = Path(client.download_artifacts(first.run_id, "model_card.md", str(tmp_path))).read_text()
    assert pid in card and "Lineage" in card and "prefect.flow_run_id" in card and "not an Inception Score" in card
    assert f"models:/{NAME}@champion" in card and "the data's floor" in card

    # The champion as a pyfunc: seeded images; its files hold safetensors and code, no pickle.
    mlflow.set_tracking_uri(first.tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    images = loaded.predict(pd.DataFrame({"n": [3, 2], "seed": [0, 1]}))
    assert images.shape == (5, 1, 16, 16) and images.dtype == np.uint8
    assert (loaded.predict(pd.DataFrame({"n": [3], "seed": [0]})) == images[:3]).all()
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "dl")))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert "artifacts/generator/generator.safetensors" in files and "artifacts/model_card.md" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model.pkl" not in mlmodel
    assert "input_example.json" in files and '"name": "label", "required": false' in mlmodel


def test_a_model_that_replays_its_training_images_is_refused_by_the_copying_gate(
    cfg: Config, model: Path, prepared: Path, evaluation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The honest (if weak) one-epoch model: figures beside real data's, no exact copies.
    honest = read_evaluation(evaluation)
    # (floor_copy_ct too when the held-out half holds 20 images: here it has fewer)
    assert {"copy_share", "copy_ct", "exact_copies", "floor_copy_share"} <= set(honest.metrics)
    assert honest.metrics["exact_copies"] == 0 and honest.metrics["copy_share"] <= 0.5
    assert honest.details["copying"]["spaces"].keys() == {"inception", "pixels"}
    assert Image.open(evaluation / "copies.png").size[0] > 8 * 16
    # A "model" whose samples are its training images.
    train_images = load_prepared(prepared, "train").images
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: train_images[: cfg.evaluate.num_samples].copy())
    copier = evaluate.run(cfg, model, prepared, tmp_path / "copier", quiet=True)
    scored = read_evaluation(tmp_path / "copier")
    assert scored.metrics["copy_share"] == 1.0 and scored.metrics["exact_copies"] == cfg.evaluate.num_samples
    assert copier.fid < honest.metrics["fid"]  # what FID alone would reward
    barred = load_config(REPO, QUICK)  # params.yaml's own copying bar
    assert barred.register.max_copy_share == 0.2
    project = tmp_path / "mlproject"
    project.mkdir()
    refused = register.run(barred, model, tmp_path / "copier", tmp_path / "copier.json", project_dir=project)
    assert refused.decision == "rejected" and refused.champion_version is None
    assert "copies its training data: copy_share 1.000 (real data" in refused.reason
    assert f"{cfg.evaluate.num_samples} exact copies" in refused.reason
    passed = register.run(barred, model, evaluation, tmp_path / "honest.json", project_dir=project)
    assert "copies" not in passed.reason and passed.decision == "champion"
    # What the version cost, on the receipt, the version, the run and the card.
    assert re.fullmatch(
        r"trained in \d+\.\d CPU-minutes \(\d+\.\d wall-minutes on cpu.*; 320 images shown\)", passed.compute
    ), passed.compute
    client = _client(project)
    version = client.get_model_version(NAME, passed.version)
    assert version.tags["aigc.compute"] == passed.compute and "- compute: trained in" in version.description
    run_metrics = client.get_run(passed.run_id).data.metrics
    assert run_metrics["compute.train_cpu_s"] > 0 and run_metrics["compute.images_shown"] == 320
    assert json.loads((tmp_path / "honest.json").read_text())["compute"] == passed.compute


def test_the_quality_bar_rejects_weak_candidates_with_their_numbers(
    model: Path, evaluation: Path, tmp_path: Path
) -> None:
    from aigc_pipeline.pipeline import NoChampion, require_champion

    project = tmp_path / "mlproject"
    project.mkdir()
    barred = load_config(REPO, [*QUICK, "register.max_fid_ratio=3.0", "register.min_recall=0.05"])
    floor = _scores(evaluation)[1]["floor_fid"]

    def reg(label: str, **changes: Any) -> register.RegisterResult:
        ev = _variant(evaluation, tmp_path / f"ev-{label}", **changes)
        return register.run(barred, model, ev, tmp_path / f"{label}.json", project_dir=project)

    # No champion yet, and the first candidate is 10x the floor: rejected, nothing serves.
    weak = reg("weak", fid=10 * floor, fid_ratio=10.0)
    assert weak.decision == "rejected" and weak.champion_version is None
    assert f"FID {10 * floor:.2f} is 10.00x the data's floor {floor:.2f} (register.max_fid_ratio 3)" in weak.reason
    summary = {"receipt": json.loads((tmp_path / "weak.json").read_text()), "champion_version": None}
    with pytest.raises(NoChampion, match="digits has no champion: v1 .*rejected.*10.00x the data's floor"):
        require_champion(summary)
    good = reg("good", fid=2 * floor, fid_ratio=2.0, recall=0.5)
    assert good.decision == "champion" and good.champion_version == good.version == "2"
    # A later weak one (here: recall under the minimum) is rejected; the champion stays.
    low_recall = reg("low-recall", fid=1.5 * floor, fid_ratio=1.5, recall=0.01)
    assert (
        low_recall.decision == "rejected" and "recall 0.010 < register.min_recall 0.05; real data:" in low_recall.reason
    )
    assert low_recall.champion_version == "2" and _aliases(_client(project)) == {"champion": "2"}


def test_register_then_promote_rollback_and_sample_from_the_cli(
    cfg: Config, model: Path, evaluation: Path, tmp_path: Path, restore_env: None
) -> None:
    project = tmp_path / "mlproject"
    project.mkdir()
    fid = _scores(evaluation)[1]["fid"]
    register.run(cfg, model, evaluation, tmp_path / "1.json", project_dir=project)
    register.run(
        cfg, model, _variant(evaluation, tmp_path / "e2", fid=fid + 30), tmp_path / "2.json", project_dir=project
    )
    register.run(
        cfg, model, _variant(evaluation, tmp_path / "e3", fid=float("nan")), tmp_path / "3.json", project_dir=project
    )
    client = _client(project)
    assert _aliases(client) == {"champion": "1", "challenger": "2"}

    def aigc(*args: str):
        return cli.run_command(["--project", str(project), *args])

    change = aigc("promote", NAME, "2", "--reason", "sharper digits in review")
    assert (change.previous, change.version) == ("1", "2")
    assert _aliases(client) == {"champion": "2"}  # no longer a challenger
    v2 = client.get_model_version(NAME, "2")
    assert (
        v2.tags["aigc.promoted_by"] == getpass.getuser()
        and v2.tags["aigc.promoted_reason"] == "sharper digits in review"
    )
    assert client.get_run(v2.run_id).data.tags["aigc.promoted_from"] == "1"
    with pytest.raises(RegistryError, match="rejected at registration.*--force"):
        aigc("promote", NAME, "3", "--reason", "try")
    with pytest.raises(RegistryError, match="already"):
        aigc("promote", NAME, "2", "--reason", "again")
    with pytest.raises(RegistryError, match="no such registered model version"):
        aigc("promote", NAME, "9", "--reason", "x")
    assert cli.main(["--project", str(project), "promote", NAME, "9", "--reason", "x"]) == 2  # one line, exit 2

    back = aigc("rollback", NAME, "--reason", "v2 drifted")
    assert (back.previous, back.version) == ("2", "1") and _aliases(client) == {"champion": "1"}
    assert client.get_model_version(NAME, "1").tags["aigc.rollback_from"] == "2"
    assert client.get_registered_model(NAME).tags[registry.HISTORY_TAG] == "1"
    with pytest.raises(RegistryError, match="no previous"):
        aigc("rollback", NAME)

    out = tmp_path / "grid.png"
    aigc("sample", f"models:/{NAME}@champion", "-n", "9", "--out", str(out), "--seed", "3")
    with Image.open(out) as img:
        assert img.size == (3 * 34 + 2, 3 * 34 + 2)  # 3x3 grid of 16 px images shown at 32 px, 2 px padding
        first = np.asarray(img)
    aigc("sample", f"models:/{NAME}/1", "-n", "9", "--out", str(tmp_path / "again.png"), "--seed", "3")
    with Image.open(tmp_path / "again.png") as img:
        assert np.array_equal(np.asarray(img), first)  # same version, same seed: same grid
    with pytest.raises(Exception, match="not class-conditional"):
        aigc("sample", f"models:/{NAME}@champion", "-n", "4", "--out", str(out), "--label", "3")
    status = aigc("status", "--json")
    (m,) = status["models"]
    assert m["champion_history"] == ["1"] and m["latest_decision"] == "rejected"


def test_a_per_family_model_keeps_working_and_migrates_into_the_datasets_model(
    model: Path, evaluation: Path, tmp_path: Path, restore_env: None
) -> None:
    import mlflow
    import pandas as pd

    project = tmp_path / "mlproject"
    project.mkdir()
    old = load_config(REPO, [*QUICK, "register.model_name=digits-dcgan"])  # how models were named before
    fid = _scores(evaluation)[1]["fid"]
    register.run(old, model, evaluation, tmp_path / "1.json", project_dir=project)
    register.run(
        old, model, _variant(evaluation, tmp_path / "e2", fid=fid + 30), tmp_path / "2.json", project_dir=project
    )
    client = _client(project)
    assert _aliases(client, "digits-dcgan") == {"champion": "1", "challenger": "2"}

    def aigc(*args: str):
        return cli.run_command(["--project", str(project), *args])

    # The old name keeps working: promote, roll back, sample.
    aigc("promote", "digits-dcgan", "2", "--reason", "review")
    aigc("rollback", "digits-dcgan", "--reason", "back")
    assert _aliases(client, "digits-dcgan") == {"champion": "1"}
    aigc("sample", "models:/digits-dcgan@champion", "-n", "4", "--out", str(tmp_path / "old.png"))

    moved = aigc("migrate", "digits-dcgan", "--to", NAME)
    assert moved.copied == {"1": "1", "2": "2"} and moved.champion == "1" and moved.champion_carried
    assert _aliases(client) == {"champion": "1"}
    copy = client.get_model_version(NAME, "2")
    assert copy.tags["aigc.migrated_from"] == "digits-dcgan/v2" and copy.tags["aigc.decision"] == "challenger"
    assert copy.run_id == client.get_model_version("digits-dcgan", "2").run_id  # same run: metrics, lineage
    again = aigc("migrate", "digits-dcgan", "--to", NAME)
    assert again.copied == {} and again.skipped == ["1", "2"]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow/mlflow.db")
    request = pd.DataFrame({"n": [3], "seed": [5]})
    assert np.array_equal(
        mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(request),
        mlflow.pyfunc.load_model("models:/digits-dcgan@champion").predict(request),
    )
    with pytest.raises(RegistryError, match="no versions"):
        aigc("migrate", "digits-nothing", "--to", NAME)


class _Killed(BaseException):
    """Stands for the process dying: no exception handler of ours would run."""


def test_register_failures_leave_nothing_half_registered_and_retries_are_safe(
    cfg: Config, model: Path, evaluation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "mlproject"
    project.mkdir()
    client = _client(project)
    fid = _scores(evaluation)[1]["fid"]
    register.run(cfg, model, evaluation, tmp_path / "r.json", project_dir=project)
    better = _variant(evaluation, tmp_path / "better", fid=fid - 200)

    def versions() -> list[str]:
        return sorted((str(v.version) for v in client.search_model_versions(f"name='{NAME}'")), key=int)

    # 1. An error after the version exists (moving the alias): version discarded, run FAILED.
    with monkeypatch.context() as mp:
        mp.setattr(registry, "move_alias", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("store went away")))
        with pytest.raises(RuntimeError, match="store went away"):
            register.run(cfg, model, better, tmp_path / "r.json", project_dir=project)
    assert versions() == ["1"] and _aliases(client) == {"champion": "1"}
    failed = client.search_runs(
        [client.get_experiment_by_name(cfg.register.experiment).experiment_id], "attributes.status = 'FAILED'"
    )
    assert len(failed) == 1 and failed[0].data.tags["aigc.registration"] == "failed: version discarded"

    # 2. The retry registers it (MLflow never reuses the discarded number 2); a second retry finds
    # it done and creates nothing.
    retry = register.run(cfg, model, better, tmp_path / "r.json", project_dir=project)
    assert retry.champion and not retry.reused and retry.version == "3"
    again = register.run(cfg, model, better, tmp_path / "r.json", project_dir=project)
    assert again.reused and again.version == "3" and versions() == ["1", "3"]
    assert json.loads((tmp_path / "r.json").read_text())["version"] == "3"

    # 3. Killed after the decision, before the alias: the retry finishes that version.
    best = _variant(evaluation, tmp_path / "best", fid=fid - 400)
    with monkeypatch.context() as mp:
        mp.setattr(registry, "move_alias", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
        mp.setattr(registry, "undo_registration", lambda *a, **k: None)
        with pytest.raises(_Killed):
            register.run(cfg, model, best, tmp_path / "r.json", project_dir=project)
    assert client.get_model_version(NAME, "4").tags[registry.STATE_TAG] == registry.DECIDED
    assert _aliases(client) == {"champion": "3"}
    finished = register.run(cfg, model, best, tmp_path / "r.json", project_dir=project)
    assert finished.reused and finished.version == "4" and finished.champion
    assert _aliases(client) == {"champion": "4"} and versions() == ["1", "3", "4"]
    assert client.get_registered_model(NAME).tags[registry.HISTORY_TAG] == "1,3,4"

    # 4. Killed before the decision: the retry discards the pending version and registers afresh.
    worse = _variant(evaluation, tmp_path / "worse", fid=fid + 10)
    with monkeypatch.context() as mp:
        mp.setattr(register, "decide", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
        mp.setattr(registry, "undo_registration", lambda *a, **k: None)
        with pytest.raises(_Killed):
            register.run(cfg, model, worse, tmp_path / "r.json", project_dir=project)
    assert client.get_model_version(NAME, "5").tags[registry.STATE_TAG] == registry.PENDING
    fresh = register.run(cfg, model, worse, tmp_path / "r.json", project_dir=project)
    assert fresh.version == "6" and fresh.decision == "challenger" and versions() == ["1", "3", "4", "6"]
    assert _aliases(client) == {"champion": "4", "challenger": "6"}


def test_a_retry_of_a_decided_registration_decides_again_against_the_champion_of_the_moment(
    cfg: Config, model: Path, evaluation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registration killed after its decision, retried after the champion changed: the retry
    compares with the new champion instead of re-applying the old decision, and puts back the
    alias the killed attempt had taken before deciding."""
    project = tmp_path / "mlproject"
    project.mkdir()
    client = _client(project)
    fid = _scores(evaluation)[1]["fid"]

    def reg(label: str, **changes: Any) -> register.RegisterResult:
        """Register the evaluation variant ``label`` (the same files again on a retry)."""
        ev = tmp_path / f"ev-{label}"
        if not ev.exists():
            _variant(evaluation, ev, fid_std=0.5, **changes)
        return register.run(cfg, model, ev, tmp_path / f"{label}.json", project_dir=project)

    def killed(label: str, where: str, **changes: Any) -> None:
        """Register, dying at ``where`` (no exception handler of ours runs, nothing is discarded)."""
        with monkeypatch.context() as mp:
            mp.setattr(registry, where, lambda *a, **k: (_ for _ in ()).throw(_Killed()))
            mp.setattr(registry, "undo_registration", lambda *a, **k: None)
            with pytest.raises(_Killed):
                reg(label, **changes)

    def gate(version: str) -> tuple[str, str | None]:
        tags = client.get_model_version(NAME, version).tags
        return tags["aigc.decision"], tags.get("aigc.gate.champion_version")

    assert reg("first", fid=fid).version == "1"
    # v2 (better than v1) is decided champion, then killed before the alias moves.
    killed("good", "move_alias", fid=fid - 50)
    assert gate("2") == ("champion", "1") and client.get_model_version(NAME, "2").tags[registry.STATE_TAG] == "decided"
    # Meanwhile v3, better still, registers and becomes champion.
    assert reg("best", fid=fid - 100).champion
    # The retry of v2 compares with v3 now: a challenger, not a second promotion over a better model.
    retry = reg("good", fid=fid - 50)
    assert retry.reused and retry.version == "2" and retry.decision == "challenger" and not retry.champion
    assert "vs champion v3's" in retry.reason and "not better" in retry.reason
    assert gate("2") == ("challenger", "3") and client.get_model_version(NAME, "2").tags[registry.STATE_TAG] == "done"
    assert _aliases(client) == {"champion": "3", "challenger": "2"}
    assert registry.champion_history(client, NAME) == ["1", "3"]
    assert registry.decision_history(client, NAME) == [
        ("1", "champion", None),
        ("3", "champion", "1"),
        ("2", "challenger", "3"),
    ]

    # v4 (worse than v3) is decided challenger and takes the challenger alias from v2, then is
    # killed before it is done; meanwhile a worse model (v5) is promoted by hand.
    killed("fair", "record_decision", fid=fid - 20)
    assert gate("4") == ("challenger", "3") and _aliases(client) == {"champion": "3", "challenger": "4"}
    weak = reg("weak", fid=fid + 50)
    assert weak.decision == "challenger" and _aliases(client) == {"champion": "3", "challenger": "5"}
    registry.promote(client, NAME, "5", reason="reviewed by hand")
    # The retry of v4 compares with v5: champion now.
    retry = reg("fair", fid=fid - 20)
    assert retry.version == "4" and retry.decision == "champion" and "vs champion v5's" in retry.reason
    assert gate("4") == ("champion", "5") and _aliases(client) == {"champion": "4"}
    assert registry.champion_history(client, NAME) == ["1", "3", "5", "4"]
    assert registry.decision_history(client, NAME)[-2:] == [("5", "challenger", "3"), ("4", "champion", "5")]

    # A decided champion whose alias move went through before the kill stays champion on retry.
    killed("top", "record_decision", fid=fid - 200)
    assert _aliases(client) == {"champion": "6"}
    retry = reg("top", fid=fid - 200)
    assert retry.version == "6" and retry.champion and gate("6") == ("champion", "4")
    assert registry.champion_history(client, NAME) == ["1", "3", "5", "4", "6"]
    assert registry.decision_history(client, NAME)[-1] == ("6", "champion", "4")


def test_register_refuses_to_compare_across_feature_pass_versions_and_says_why(
    cfg: Config, model: Path, evaluation: Path, tmp_path: Path
) -> None:
    """A champion evaluated with torch-fidelity 0.4.0 and a candidate evaluated as after an upgrade:
    the protocol ids differ, so the gate does not compare them, and its reason names the difference."""
    from aigc_pipeline.evaluation.protocol import Protocol

    project = tmp_path / "mlproject"
    project.mkdir()
    first = register.run(cfg, model, evaluation, tmp_path / "1.json", project_dir=project)
    assert first.decision == "champion"

    upgraded = _variant(evaluation, tmp_path / "ev-upgraded", fid=_scores(evaluation)[1]["fid"] - 100.0)  # far better
    details = json.loads((upgraded / "evaluation.json").read_text())
    old_pid = details["protocol"]["id"]
    fields = {k: v for k, v in details["protocol"].items() if k not in ("id", "feature_pass_digest")}
    new = Protocol(**{**fields, "torch_fidelity": "0.5.0"})
    assert new.id != old_pid
    details["protocol"] = new.to_dict()
    (upgraded / "evaluation.json").write_text(json.dumps(details))

    second = register.run(cfg, model, upgraded, tmp_path / "2.json", project_dir=project)

    assert second.decision == "challenger" and "not comparable" in second.reason
    assert f"measured under {old_pid}" in second.reason
    assert "torch_fidelity: 0.4.0 -> 0.5.0" in second.reason
    assert _aliases(_client(project))["champion"] == first.version
