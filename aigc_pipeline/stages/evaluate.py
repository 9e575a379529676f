"""Evaluate: generate samples and score them against the real reference split with torch-fidelity."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aigc_pipeline.config import Config
from aigc_pipeline.data.prepared import load_prepared
from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics
from aigc_pipeline.evaluation.inception import resolve_inception_weights
from aigc_pipeline.evaluation.protocol import Protocol
from aigc_pipeline.images import save_grid
from aigc_pipeline.io import atomic_write_json
from aigc_pipeline.models.export import generate, load_generator, read_model_meta
from aigc_pipeline.training.loop import resolve_device


@dataclass(frozen=True)
class EvaluateResult:
    out: Path
    fid: float
    protocol: Protocol
    isc_unavailable: str | None
    seconds: float


def run(cfg: Config, model: Path, reference: Path, out: Path, *, quiet: bool = False) -> EvaluateResult:
    """Score the model in ``model`` against ``reference`` (a prepared dataset); write ``out/metrics.json``."""
    ecfg = cfg.evaluate
    t0 = time.perf_counter()
    device = resolve_device(ecfg.device)
    real = load_prepared(reference, ecfg.reference_split)
    generator, arch = load_generator(model, device)
    if (arch.channels, arch.size) != real.images.shape[1:3]:
        raise ValueError(
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
        isc=True,
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
    meta = read_model_meta(model)
    metrics = {
        "fid": {protocol.id: scores["fid"]},
        "protocol": protocol.to_dict(),
        "extractor": scores["extractor"],
        "model": meta["model"],
        "dataset": meta["dataset"],
    }
    if "isc_mean" in scores:
        metrics["isc"] = {protocol.id: scores["isc_mean"]}
        metrics["isc_std"] = {protocol.id: scores["isc_std"]}
    else:
        metrics["isc_unavailable"] = scores.get("isc_unavailable", "not computed")
    # Two separate DVC outputs (metrics are not cached), each written atomically; metrics last.
    save_grid(fake[:64], Path(out) / "samples.png")
    atomic_write_json(Path(out) / "metrics.json", metrics)
    seconds = time.perf_counter() - t0
    if not quiet:
        print(f"  evaluate: FID {scores['fid']:.3f} [{protocol.id}] in {seconds:.1f}s", file=sys.stderr, flush=True)
    return EvaluateResult(out=out, fid=scores["fid"], protocol=protocol,
                          isc_unavailable=metrics.get("isc_unavailable"), seconds=seconds)
