"""Evaluate: generate samples and score them against the real reference split with torch-fidelity,
next to the data's own floor (real images scored the same way: :mod:`aigc_pipeline.evaluation.floor`).

With a ``project_dir`` the scores also go to the MLflow run that trained the model (found by its
weights' sha256; a fresh run holding the training from the model folder when there is none, see
:mod:`aigc_pipeline.tracking.runs`), at the model's last training step.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aigc_pipeline.compute import Meter, compute_metrics
from aigc_pipeline.config import Config
from aigc_pipeline.data.prepared import Split, load_prepared
from aigc_pipeline.errors import DataError
from aigc_pipeline.evaluation.classifier import classifier_score, label_accuracy, load_or_train_classifier
from aigc_pipeline.evaluation.copying import CopyReport, copying_report
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics
from aigc_pipeline.evaluation.floor import FLOOR_SPLIT, Floor, data_floor
from aigc_pipeline.evaluation.inception import InceptionWeights, resolve_inception_weights
from aigc_pipeline.evaluation.metrics import copying_text
from aigc_pipeline.evaluation.protocol import ClassifierProtocol, Protocol
from aigc_pipeline.evaluation.results import COPIES_GRID, SAMPLES_GRID, Evaluation, write_evaluation
from aigc_pipeline.evaluation.work import COPY_SPLITS, inception_work
from aigc_pipeline.images import save_grid
from aigc_pipeline.models.export import class_labels, generate, load_generator, read_model_meta
from aigc_pipeline.training.loop import resolve_device

COPIES_SHOWN = 8  # sample/training-image pairs in the copies grid


@dataclass(frozen=True)
class EvaluateResult:
    out: Path
    fid: float
    fid_std: float | None  # bootstrap spread; None when evaluate.bootstrap is 0
    kid: float
    precision: float
    recall: float
    protocol: Protocol
    isc_unavailable: str | None
    classifier_score: float | None  # None when the dataset has no labels or the score is off
    classifier_protocol: ClassifierProtocol | None
    seconds: float
    floor: Floor | None = None

    @property
    def fid_ratio(self) -> float | None:
        return self.fid / self.floor.fid if self.floor is not None and self.floor.fid > 0 else None


def run(
    cfg: Config, model: Path, reference: Path, out: Path, *, quiet: bool = False, project_dir: Path | None = None
) -> EvaluateResult:
    """Score the model in ``model`` against ``reference`` (a prepared dataset); write ``out/metrics.json``
    (numbers only: FID, its bootstrap spread ``fid_std``, KID, precision, recall, the floor's
    ``floor_*`` and ``fid_ratio``, IS when computable, the classifier scores on labelled data) and
    ``out/evaluation.json`` (the protocols, why a metric is unavailable, the floor's sample); see
    :mod:`aigc_pipeline.evaluation.results`. With ``project_dir``, log them to the model's MLflow run
    (:func:`log_to_run`).
    """
    ecfg = cfg.evaluate
    t0, meter = time.perf_counter(), Meter()
    device = resolve_device(ecfg.device)
    # Each split of the prepared set read once: the reference, floor and copying check share them.
    split: Callable[[Split], Any] = functools.cache(functools.partial(load_prepared, reference))

    real = split(ecfg.reference_split)
    generator, arch = load_generator(model, device)
    if (arch.channels, arch.size) != real.images.shape[1:3]:
        raise DataError(
            f"model {model} makes {arch.channels}x{arch.size}px images but reference {reference} "
            f"holds {real.images.shape[1]}x{real.images.shape[2]}px"
        )
    fake = generate(generator, arch, ecfg.num_samples, seed=ecfg.seed, batch_size=ecfg.batch_size, device=device)
    weights = resolve_inception_weights(ecfg.inception_weights)
    if not quiet:
        print(
            f"  evaluate: {ecfg.num_samples} generated vs {len(real.images)} real ({ecfg.reference_split} split), "
            f"Inception weights from {weights.source}",
            file=sys.stderr,
            flush=True,
        )
        work = inception_work(ecfg, reference, weights=weights, split_of=split)
        print(f"  evaluate: {work.describe()}", file=sys.stderr, flush=True)
    scores = compute_fidelity_metrics(
        fake,
        real.images,
        reference_key=real.digest,
        weights=weights,
        batch_size=ecfg.batch_size,
        device=str(device),
        kid=True,
        prc=True,
        isc=True,
        bootstrap=ecfg.bootstrap,
        bootstrap_seed=ecfg.seed,
        extrapolate=True,
        keep_features=ecfg.copy_check,
    )
    protocol = Protocol(
        extractor=scores["extractor"]["name"],
        weights_sha256=weights.sha256,
        num_samples=ecfg.num_samples,
        reference_split=ecfg.reference_split,
        reference_digest=real.digest,
        num_reference=len(real.images),
        size=arch.size,
    )
    floor, floor_details = _floor(cfg, split, real, weights=weights, device=str(device))
    metrics: dict[str, float | None] = {
        "fid": scores["fid"],
        "kid": scores["kid_mean"],
        "kid_std": scores["kid_std"],
        "precision": scores["precision"],
        "recall": scores["recall"],
    }
    if floor is not None:
        metrics.update(
            floor_fid=floor.fid,
            floor_fid_std=floor.fid_std,
            floor_fid_inf=floor.fid_inf,
            floor_kid=floor.kid,
            floor_precision=floor.precision,
            floor_recall=floor.recall,
            fid_ratio=scores["fid"] / floor.fid if floor.fid > 0 else None,
        )
    meta = read_model_meta(model)
    details: dict[str, Any] = {
        "protocol": protocol.to_dict(),
        "extractor": scores["extractor"],
        "kid_subset_size": scores["kid_subset_size"],
        "floor": floor_details,
        "model": meta["model"],
        "dataset": meta["dataset"],
    }
    fid_std = None
    if "fid_bootstrap" in scores:
        boot = scores["fid_bootstrap"]
        fid_std = boot["std"]
        metrics["fid_std"] = fid_std
        details["bootstrap"] = {"replicas": boot["replicas"], "seed": boot["seed"], "fid_mean": boot["mean"]}
    else:
        details["bootstrap"] = {"replicas": 0}
    inf = scores["fid_inf"]
    metrics["fid_inf"], metrics["fid_inf_std"] = inf["value"], inf["std"]
    details["fid_inf"] = {
        "sizes": inf["sizes"],
        "means": inf["means"],
        "slope": inf["slope"],
        "what": "FID-infinity (Chong and Forsyth 2020): FID of random subsets of the samples at "
        "these sizes, a line in 1/N, its intercept; fid_inf_std is the fit's standard error. "
        "Free of the generated sample count only: the reference side (its size included) "
        "and the floor still apply",
    }
    if "isc_mean" in scores:
        metrics["isc"], metrics["isc_std"] = scores["isc_mean"], scores["isc_std"]
    else:
        details["isc_unavailable"] = scores.get("isc_unavailable", "not computed")

    cscore, cprotocol = None, None
    clf = load_or_train_classifier(reference) if ecfg.classifier_score else None
    if clf is not None:
        cprotocol = ClassifierProtocol(
            classifier=clf.id, accuracy=clf.accuracy, num_samples=ecfg.num_samples, size=arch.size
        )
        probs = clf.predict_proba(fake)
        cscore = classifier_score(probs)
        metrics["classifier_score"] = cscore
        metrics["classifier_accuracy"] = clf.accuracy
        details["classifier"] = {
            **cprotocol.to_dict(),
            "what": "exp(E KL(p(y|x) || p(y))) under a logistic-regression classifier trained on the real train "
            "split's pixels; 1 to the number of classes; not an Inception Score. classifier_accuracy: its "
            "accuracy on the real eval split; classifier_label_accuracy (conditional models): the share of "
            "samples it assigns to the class they were generated for",
        }
        labels = class_labels(arch, ecfg.num_samples)
        if labels is not None:
            metrics["classifier_label_accuracy"] = label_accuracy(probs, labels.numpy())
    elif ecfg.classifier_score:
        details["classifier_score_unavailable"] = "the dataset has no class labels to train a classifier on"
    copies = None
    if ecfg.copy_check:
        copies, details["copying"] = _copying(
            cfg,
            split,
            fake,
            scores["features"],
            weights=weights,
            device=str(device),
            out=Path(out),
            reference=Path(reference),
        )
    else:
        details["copying"] = {"unavailable": "evaluate.copy_check is off"}
    if copies is not None:
        metrics.update(copies.metrics())
        if not quiet:
            print(f"  evaluate: {copying_line(copies)}", file=sys.stderr, flush=True)
    else:
        # copies.png is a DVC output: blank tiles when there is nothing to show (evaluation.json says why).
        save_grid(np.zeros((2 * COPIES_SHOWN, *fake.shape[1:]), np.uint8), Path(out) / COPIES_GRID, nrow=COPIES_SHOWN)
    details["metric_names"] = Evaluation({k: v for k, v in metrics.items() if v is not None}, details).protocol_names()

    # Separate DVC outputs (metrics are not cached), each written atomically; metrics last.
    save_grid(fake[:64], Path(out) / SAMPLES_GRID)
    write_evaluation(Path(out), metrics, details)
    seconds = time.perf_counter() - t0
    result = EvaluateResult(
        out=out,
        fid=scores["fid"],
        fid_std=fid_std,
        kid=scores["kid_mean"],
        precision=scores["precision"],
        recall=scores["recall"],
        protocol=protocol,
        isc_unavailable=details.get("isc_unavailable"),
        classifier_score=cscore,
        classifier_protocol=cprotocol,
        seconds=seconds,
        floor=floor,
    )
    if not quiet:
        print(f"  evaluate: {summary_line(result)} in {seconds:.1f}s", file=sys.stderr, flush=True)
    if project_dir is not None:
        run_id = log_to_run(
            cfg, Path(model), Path(out), project_dir=Path(project_dir), compute={**meter.read(), "device": str(device)}
        )
        if not quiet:
            print(f"  evaluate: logged to MLflow run {run_id}", file=sys.stderr, flush=True)
    return result


def log_to_run(
    cfg: Config, model: Path, evaluation: Path, *, project_dir: Path, compute: dict[str, Any] | None = None
) -> str:
    """Log the evaluation in ``evaluation`` to the MLflow run of the model in ``model`` (and what the
    evaluation cost, ``compute``: :mod:`aigc_pipeline.compute`); returns its id."""
    import mlflow
    from mlflow import MlflowClient

    from aigc_pipeline.evaluation.results import read_evaluation
    from aigc_pipeline.tracking import runs
    from aigc_pipeline.tracking.store import ui_url, use_store

    scored = read_evaluation(evaluation)
    meta = read_model_meta(model)
    with use_store(project_dir, cfg.register.experiment) as experiment_id:
        client = MlflowClient()
        ui = ui_url(mlflow.get_tracking_uri())
        run_id, _ = runs.pipeline_run(
            client,
            experiment_id,
            cfg,
            project_dir,
            model,
            stage="evaluate",
            evaluation=runs.evaluation_digest(evaluation),
            extra_params=runs.evaluation_params(scored),
            ui=ui,
        )
        client.update_run(run_id, status="RUNNING")  # while it is written to, as a resumed run is
        try:
            runs.log_evaluation(client, run_id, scored, evaluation, step=int(meta.get("steps") or 0))
            for key, value in compute_metrics(compute, "evaluate").items() if compute else ():
                client.log_metric(run_id, key, value)
            client.set_tag(run_id, runs.STAGE_TAG, "evaluate")
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def _floor(
    cfg: Config, split_of: Callable[[Split], Any], real_reference: Any, *, weights: InceptionWeights, device: str
) -> tuple[Floor | None, dict[str, Any]]:
    """The data's floor under this evaluation's protocol (cached by content) and its description;
    (None, {"unavailable": why}) when the split it is drawn from is too small."""
    ecfg = cfg.evaluate
    split = FLOOR_SPLIT[ecfg.reference_split]
    try:
        pool = split_of(split)
        floor = data_floor(
            pool.images,
            real_reference.images,
            split=split,
            reference_split=ecfg.reference_split,
            reference_key=real_reference.digest,
            num_samples=ecfg.num_samples,
            seed=ecfg.seed,
            weights=weights,
            bootstrap=ecfg.bootstrap,
            batch_size=ecfg.batch_size,
            device=device,
        )
    except (DataError, EvaluationError) as exc:
        return None, {"unavailable": str(exc)}
    return floor, {
        **floor.to_dict(),
        "what": "real images not in the reference split, scored like the model's "
        "samples: what a perfect model would get under this protocol",
    }


def _copying(
    cfg: Config,
    split_of: Callable[[Split], Any],
    fake: Any,
    features: Any,
    *,
    weights: InceptionWeights,
    device: str,
    out: Path,
    reference: Path,
) -> tuple[CopyReport | None, dict[str, Any]]:
    """The data-copying check of the samples ``fake`` (features ``features``) against the prepared
    dataset's train split, calibrated on its eval split (:mod:`aigc_pipeline.evaluation.copying`);
    writes the grid of the most-copied samples. (None, {"unavailable": why}) when a split is too small."""
    from aigc_pipeline.evaluation.reference import reference_statistics

    ecfg = cfg.evaluate
    try:
        train, heldout = (split_of(name) for name in COPY_SPLITS)
        feats = {}
        for name, part in zip(COPY_SPLITS, (train, heldout), strict=True):
            if len(part.images) < 2:
                raise EvaluationError(f"the {name} split of {reference} holds {len(part.images)} image(s)")
            # The reference statistics' own cache entries (same label: the split's digest, as the FID's
            # reference uses): the eval split's features are read, not computed again; the train
            # split's are computed once per dataset version.
            feats[name] = reference_statistics(
                part.images, reference_key=part.digest, weights=weights, batch_size=ecfg.batch_size, device=device
            ).features
        report = copying_report(
            features, fake, feats["train"], train.images, feats["eval"], heldout.images, seed=ecfg.seed
        )
    except (DataError, EvaluationError) as exc:
        return None, {"unavailable": f"data-copying check not computed: {exc}"}
    shown = np.argsort(report.ratios, kind="stable")[:COPIES_SHOWN]
    save_grid(np.concatenate([fake[shown], train.images[report.nearest[shown]]]), out / COPIES_GRID, nrow=len(shown))
    return report, {
        **report.details(),
        "grid": f"{COPIES_GRID}: top row the {len(shown)} samples nearest a training "
        "image, bottom row that training image",
    }


def copying_line(report: CopyReport) -> str:
    """One line of the copying figures beside real data's."""
    return f"data copying: {copying_text(report.metrics())}"


def summary_line(r: EvaluateResult) -> str:
    """One line with every score, the floor and the protocol."""
    noise = f" ± {r.fid_std:.3f} (bootstrap sd)" if r.fid_std is not None else ""
    floor = ""
    if r.floor is not None and r.fid_ratio is not None:
        floor = f" (floor {r.floor.fid:.1f} = {r.fid_ratio:.2f}x)"
    line = (
        f"FID {r.fid:.3f}{noise}{floor}, KID {r.kid:.4f}, precision {r.precision:.3f}, recall {r.recall:.3f} "
        f"[{r.protocol.id}]"
    )
    if r.classifier_score is not None and r.classifier_protocol is not None:
        line += (
            f"; classifier score {r.classifier_score:.3f} [{r.classifier_protocol.id}, "
            f"classifier accuracy on real eval {r.classifier_protocol.accuracy:.3f}]"
        )
    return line
