"""Evaluate: generate samples and score them against the real reference split with torch-fidelity."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc_pipeline.config import Config
from aigc_pipeline.data.prepared import load_prepared
from aigc_pipeline.errors import DataError
from aigc_pipeline.evaluation.classifier import classifier_score, label_accuracy, load_or_train_classifier
from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics
from aigc_pipeline.evaluation.inception import resolve_inception_weights
from aigc_pipeline.evaluation.protocol import ClassifierProtocol, Protocol
from aigc_pipeline.images import save_grid
from aigc_pipeline.io import atomic_write_json
from aigc_pipeline.models.export import class_labels, generate, load_generator, read_model_meta
from aigc_pipeline.training.loop import resolve_device


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


def run(cfg: Config, model: Path, reference: Path, out: Path, *, quiet: bool = False) -> EvaluateResult:
    """Score the model in ``model`` against ``reference`` (a prepared dataset); write ``out/metrics.json``.

    metrics.json holds each metric as ``{protocol id: value}`` (FID, its bootstrap spread ``fid_std``,
    KID, precision, recall; IS or the reason it is unavailable; the classifier score on labelled
    data under its own protocol id), and the protocols themselves.
    """
    ecfg = cfg.evaluate
    t0 = time.perf_counter()
    device = resolve_device(ecfg.device)
    real = load_prepared(reference, ecfg.reference_split)
    generator, arch = load_generator(model, device)
    if (arch.channels, arch.size) != real.images.shape[1:3]:
        raise DataError(
            f"model {model} makes {arch.channels}x{arch.size}px images but reference {reference} "
            f"holds {real.images.shape[1]}x{real.images.shape[2]}px"
        )
    fake = generate(generator, arch, ecfg.num_samples, seed=ecfg.seed, batch_size=ecfg.batch_size, device=device)
    weights = resolve_inception_weights(ecfg.inception_weights)
    if not quiet:
        print(f"  evaluate: {ecfg.num_samples} generated vs {len(real.images)} real ({ecfg.reference_split} split), "
              f"Inception weights from {weights.source}", file=sys.stderr, flush=True)
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
    pid = protocol.id
    meta = read_model_meta(model)
    metrics: dict[str, Any] = {
        "fid": {pid: scores["fid"]},
        "kid": {pid: scores["kid_mean"]},
        "kid_std": {pid: scores["kid_std"]},
        "precision": {pid: scores["precision"]},
        "recall": {pid: scores["recall"]},
        "protocol": protocol.to_dict(),
        "extractor": scores["extractor"],
        "kid_subset_size": scores["kid_subset_size"],
        "model": meta["model"],
        "dataset": meta["dataset"],
    }
    fid_std = None
    if "fid_bootstrap" in scores:
        boot = scores["fid_bootstrap"]
        fid_std = boot["std"]
        metrics["fid_std"] = {pid: fid_std}
        metrics["bootstrap"] = {"replicas": boot["replicas"], "seed": boot["seed"], "fid_mean": boot["mean"]}
    else:
        metrics["bootstrap"] = {"replicas": 0}
    if "isc_mean" in scores:
        metrics["isc"] = {pid: scores["isc_mean"]}
        metrics["isc_std"] = {pid: scores["isc_std"]}
    else:
        metrics["isc_unavailable"] = scores.get("isc_unavailable", "not computed")

    cscore, cprotocol = None, None
    clf = load_or_train_classifier(reference) if ecfg.classifier_score else None
    if clf is not None:
        cprotocol = ClassifierProtocol(classifier=clf.id, accuracy=clf.accuracy, num_samples=ecfg.num_samples,
                                       size=arch.size)
        probs = clf.predict_proba(fake)
        cscore = classifier_score(probs)
        metrics["classifier_score"] = {cprotocol.id: cscore}
        metrics["classifier"] = {
            **cprotocol.to_dict(),
            "what": "exp(E KL(p(y|x) || p(y))) under a logistic-regression classifier trained on the real train "
                    "split's pixels; 1 to the number of classes; not an Inception Score",
        }
        labels = class_labels(arch, ecfg.num_samples)
        if labels is not None:
            metrics["classifier_label_accuracy"] = {cprotocol.id: label_accuracy(probs, labels.numpy())}
    elif ecfg.classifier_score:
        metrics["classifier_score_unavailable"] = "the dataset has no class labels to train a classifier on"

    # Two separate DVC outputs (metrics are not cached), each written atomically; metrics last.
    save_grid(fake[:64], Path(out) / "samples.png")
    atomic_write_json(Path(out) / "metrics.json", metrics)
    seconds = time.perf_counter() - t0
    result = EvaluateResult(out=out, fid=scores["fid"], fid_std=fid_std, kid=scores["kid_mean"],
                            precision=scores["precision"], recall=scores["recall"], protocol=protocol,
                            isc_unavailable=metrics.get("isc_unavailable"), classifier_score=cscore,
                            classifier_protocol=cprotocol, seconds=seconds)
    if not quiet:
        print(f"  evaluate: {summary_line(result)} in {seconds:.1f}s", file=sys.stderr, flush=True)
    return result


def summary_line(r: EvaluateResult) -> str:
    """One line with every score and its protocol."""
    noise = f" ± {r.fid_std:.3f} (bootstrap sd)" if r.fid_std is not None else ""
    line = (f"FID {r.fid:.3f}{noise}, KID {r.kid:.4f}, precision {r.precision:.3f}, recall {r.recall:.3f} "
            f"[{r.protocol.id}]")
    if r.classifier_score is not None and r.classifier_protocol is not None:
        line += (f"; classifier score {r.classifier_score:.3f} [{r.classifier_protocol.id}, "
                 f"classifier accuracy on real eval {r.classifier_protocol.accuracy:.3f}]")
    return line
