"""The evaluation benchmark: scoring a new model against the same real data, with our cached
reference statistics vs. a cold ``torch_fidelity.calculate_metrics`` call on the same images.

For each case (a reference set and a number of generated images), untimed set-up first: the
real digits are prepared with the ingest stage, the Inception weights converted, and our reference
statistics computed once (timed, reported as the one-time cost). Then, per repeat, a "new model"
(a DCGAN generator with fresh random weights, seed k) generates N images, and the same images are
scored twice, in alternating order: by a cold torch-fidelity call (features of both sides, no
cache, its own Fréchet distance) and by ``compute_fidelity_metrics`` (features of the generated
side only; reference statistics from our content-keyed cache). Both FIDs must agree to 1e-6
relative, else the benchmark fails.

Where the time goes is measured separately on the same features: Inception on N images, the
Fréchet distance by torch-fidelity (a non-symmetric 2048x2048 eigendecomposition) and by our exact
low-rank form, the bootstrap, a full evaluation (FID + KID + precision/recall + bootstrap), and
Inception throughput on CPU (and on CUDA when a GPU is present; left out otherwise).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import COMMAND, REPO, BenchError
from bench.report import SCHEMA_VERSION, row
from bench.workspace import (
    cpu_snapshot,
    cpu_span,
    fresh_dir,
    isolate_environment,
    load_average,
    machine_info,
    utc_now,
    wait_for_quiet,
)

NAME = "evaluation"
TITLE = "Evaluation: cached reference statistics vs. a cold torch-fidelity call"
TARGET_SPEEDUP = 5.0
FID_RTOL = 1e-6
CONTENDED_CORES = 0.25


@dataclass(frozen=True)
class Case:
    label: str
    split: str  # reference split of the prepared digits
    generated: int  # images per new model
    repeats: int


def _cases(quick: bool, num_samples: int, split: str) -> list[Case]:
    if quick:
        return [Case("quick: 64 generated vs the eval split", "eval", 64, 2)]
    return [
        Case(
            f"the pipeline's protocol ({num_samples} generated vs the {split} split, params.yaml)",
            split,
            num_samples,
            2,
        ),
        Case(
            f"full reference ({num_samples} generated vs all real digits, as FID-vs-full-dataset protocols do)",
            "all",
            num_samples,
            1,
        ),
    ]


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if not line[3:].startswith("bench/")]
    return {"git_commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "changed_files": changed}


def _new_model_images(seed: int, n: int, arch: Any):
    import torch

    from aigc_pipeline.models.blocks import Generator
    from aigc_pipeline.models.export import generate

    torch.manual_seed(seed)
    g = Generator(arch.latent_dim, arch.size, arch.channels, arch.width, arch.num_classes).eval()
    return generate(g, arch, n, seed=seed)


def measure(ctx: Any) -> dict[str, Any]:
    """Run every measurement and return the result document (nothing is written here)."""
    work = fresh_dir(ctx.work)
    isolated = isolate_environment(work)
    revision = _revision()
    load_before = load_average()
    began = time.perf_counter()
    t_import, _ = _timed(lambda: __import__("torch_fidelity"))

    import torch
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.utils import get_featuresdict_from_dataset

    from aigc_pipeline.config import load_config
    from aigc_pipeline.data.prepared import load_prepared, read_meta
    from aigc_pipeline.evaluation.features import FEATURE_LAYER, UInt8Images, extract_features
    from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics
    from aigc_pipeline.evaluation.frechet import bootstrap_fid, frechet_distance
    from aigc_pipeline.evaluation.inception import build_extractor, load_state_dict, resolve_inception_weights
    from aigc_pipeline.evaluation.reference import reference_statistics
    from aigc_pipeline.models.base import Arch
    from aigc_pipeline.stages import ingest
    from aigc_pipeline.stages.train import resolve_auto
    from aigc_pipeline.training.budget import resolve_model

    cfg = load_config(REPO, list(ctx.overrides))
    ecfg = cfg.evaluate
    batch = ecfg.batch_size
    prepared = work / "prepared"
    ingest.run(cfg, prepared)
    size = read_meta(prepared)["size"]
    # The family and width `auto` train at this size (the generated images stand in for a new model's).
    tcfg = resolve_auto(cfg.train, family=resolve_model(cfg.train.model, size=size, device="cpu"), size=size)
    t_weights, weights = _timed(lambda: resolve_inception_weights(ecfg.inception_weights))
    _log(f"weights from {weights.source} ready in {t_weights:.1f} s; load {load_before}")
    # The baseline is torch-fidelity's own loader, which unpickles its file: it gets a plain state
    # dict written here from the checked tensors (the pipeline never hands it a file).
    baseline_weights = work / "torch-fidelity-state-dict.pth"
    torch.save(load_state_dict(weights), baseline_weights)
    waits: dict[str, Any] = {}
    phases: dict[str, Any] = {}

    def phase(label: str, fn: Callable[[], Any]) -> Any:
        if ctx.wait_idle > 0:
            waits[label] = wait_for_quiet(ctx.wait_idle, CONTENDED_CORES, log=_log)
        before = cpu_snapshot()
        out = fn()
        phases[label] = cpu_span(before, cpu_snapshot())
        _log(f"{label}: {phases[label]['wall_s']:.1f} s")
        return out

    cases_out = []
    for case in _cases(ctx.quick, ecfg.num_samples, ecfg.reference_split):
        real = load_prepared(prepared, case.split)
        ref = real.images
        arch = Arch(
            family=tcfg.model, size=ref.shape[-1], channels=ref.shape[1], latent_dim=tcfg.latent_dim, width=tcfg.width
        )
        t_ref, _ = phase(
            f"{case.split}: reference statistics",
            lambda: _timed(
                lambda: reference_statistics(ref, reference_key=real.digest, weights=weights, batch_size=batch)
            ),
        )
        runs = []
        for k in range(case.repeats):
            images = _new_model_images(1000 + k, case.generated, arch)

            def cold() -> tuple[float, float]:
                t, raw = _timed(
                    lambda: torch_fidelity.calculate_metrics(
                        input1=UInt8Images(images),
                        input2=UInt8Images(ref),
                        fid=True,
                        feature_extractor="inception-v3-compat",
                        feature_extractor_weights_path=str(baseline_weights),
                        cuda=False,
                        save_cpu_ram=True,
                        batch_size=batch,
                        cache=False,
                        verbose=False,
                    )
                )
                return t, float(raw[torch_fidelity.KEY_METRIC_FID])

            def ours() -> tuple[float, float]:
                t, res = _timed(
                    lambda: compute_fidelity_metrics(
                        images, ref, reference_key=real.digest, weights=weights, batch_size=batch
                    )
                )
                if not res["reference_cached"]:
                    raise BenchError("our evaluation missed the reference statistics cache")
                return t, res["fid"]

            order = [("cold", cold), ("ours", ours)] if k % 2 == 0 else [("ours", ours), ("cold", cold)]
            got = {label: phase(f"{case.split} repeat {k + 1}: {label}", fn) for label, fn in order}
            rel = abs(got["ours"][1] - got["cold"][1]) / abs(got["cold"][1])
            if rel > FID_RTOL:
                raise BenchError(
                    f"FID differs: ours {got['ours'][1]!r} vs torch-fidelity {got['cold'][1]!r} "
                    f"(relative {rel:.2e} > {FID_RTOL})"
                )
            runs.append(
                {
                    "seed": 1000 + k,
                    "cold_s": got["cold"][0],
                    "ours_s": got["ours"][0],
                    "fid_cold": got["cold"][1],
                    "fid_ours": got["ours"][1],
                    "fid_rel_diff": rel,
                }
            )
        cases_out.append(
            {
                "label": case.label,
                "split": case.split,
                "generated": case.generated,
                "reference": int(len(ref)),
                "size": int(ref.shape[-1]),
                "reference_stats_s": t_ref,
                "runs": runs,
                "cold_median_s": statistics.median(r["cold_s"] for r in runs),
                "ours_median_s": statistics.median(r["ours_s"] for r in runs),
            }
        )

    # Where the time goes, on the first case's data.
    first = _cases(ctx.quick, ecfg.num_samples, ecfg.reference_split)[0]
    real = load_prepared(prepared, first.split)
    arch = Arch(
        family=tcfg.model,
        size=real.images.shape[-1],
        channels=real.images.shape[1],
        latent_dim=tcfg.latent_dim,
        width=tcfg.width,
    )
    images = _new_model_images(2000, first.generated, arch)
    ref_stats = reference_statistics(real.images, reference_key=real.digest, weights=weights, batch_size=batch)
    t_feat, feats = phase(
        "Inception features", lambda: _timed(lambda: extract_features(images, weights, batch_size=batch)[FEATURE_LAYER])
    )
    # The same pass in torch-fidelity's own NCHW layout (what extract_features did before it moved
    # the network to channels-last on CPU): its time, and how far its features are from ours.
    nchw = build_extractor(weights, [FEATURE_LAYER])
    t_nchw, feats_nchw = phase(
        "Inception features, NCHW",
        lambda: _timed(
            lambda: get_featuresdict_from_dataset(UInt8Images(images), nchw, batch, False, True, False)[FEATURE_LAYER]
        ),
    )
    layout_diff = float(((feats - feats_nchw).abs().max() / feats_nchw.abs().max()).item())
    gen_stats = fid_features_to_statistics(feats)
    t_tf, fid_tf = phase(
        "Fréchet distance, torch-fidelity",
        lambda: _timed(
            lambda: fid_statistics_to_metric(gen_stats, ref_stats.statistics, False)[torch_fidelity.KEY_METRIC_FID]
        ),
    )
    t_ours, fid_ours = phase(
        "Fréchet distance, ours", lambda: _timed(lambda: frechet_distance(feats, ref_stats.mu, ref_stats.sigma))
    )
    replicas = ecfg.bootstrap or 100
    t_boot, _ = phase(
        "bootstrap",
        lambda: _timed(lambda: bootstrap_fid(feats, ref_stats.mu, ref_stats.sigma, replicas=replicas, seed=0)),
    )
    t_full, _ = phase(
        "full evaluation",
        lambda: _timed(
            lambda: compute_fidelity_metrics(
                images,
                real.images,
                reference_key=real.digest,
                weights=weights,
                batch_size=batch,
                kid=True,
                prc=True,
                isc=True,
                bootstrap=replicas,
            )
        ),
    )
    gpu = None
    if torch.cuda.is_available():
        extract_features(images[:batch], weights, batch_size=batch, device="cuda")  # warm-up
        torch.cuda.synchronize()
        t_gpu, _ = _timed(lambda: extract_features(images, weights, batch_size=batch, device="cuda"))
        gpu = {"device": torch.cuda.get_device_name(0), "seconds": t_gpu, "images_per_s": len(images) / t_gpu}
    load_after = load_average()
    timings = {
        "imports_s": t_import,
        "weights_s": t_weights,
        "cases": cases_out,
        "breakdown": {
            "generated": len(images),
            "reference": int(len(real.images)),
            "features_s": t_feat,
            "features_nchw_s": t_nchw,
            "features_layout_max_rel_diff": layout_diff,
            "frechet_torch_fidelity_s": t_tf,
            "frechet_ours_s": t_ours,
            "frechet_rel_diff": abs(fid_ours - fid_tf) / abs(fid_tf),
            "bootstrap_s": t_boot,
            "bootstrap_replicas": replicas,
            "full_evaluation_s": t_full,
            "cpu_images_per_s": len(images) / t_feat,
            "gpu": gpu,
        },
        "phases_cpu": phases,
        "waits_for_quiet": waits,
        "bench_wall_seconds": time.perf_counter() - began,
    }
    profile = "default" if ctx.profile == "default" else ctx.profile
    return {
        "schema_version": SCHEMA_VERSION,
        "name": NAME if profile == "default" else f"{NAME}-{profile}",
        "title": TITLE if profile == "default" else f"{TITLE} ({profile} profile)",
        "command": f"{COMMAND} (python -m bench evaluation)"
        if profile == "default"
        else f"python -m bench evaluation --{profile}",
        "date": utc_now(),
        "machine": machine_info(),
        "project": revision,
        "profile": {"name": profile, "overrides": list(ctx.overrides)},
        "environment": {
            "set": {k: v for k, v in isolated.items() if not k.startswith("GIT_")},
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "rows": _rows(timings),
        "notes": _notes(timings, load_before, load_after),
        "timings": timings,
    }


def _rows(t: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for case in t["cases"]:
        g = (
            f"Repeated evaluation of a new model, FID only: {case['label']} — {case['generated']} generated vs "
            f"{case['reference']} real, {case['size']} px (median of {len(case['runs'])})"
        )
        rows.append(
            row(g, "cold `torch_fidelity.calculate_metrics` (both sides through Inception)", case["cold_median_s"], "s")
        )
        rows.append(
            row(
                g,
                "ours: `compute_fidelity_metrics`, reference statistics cached",
                case["ours_median_s"],
                "s",
                baseline=case["cold_median_s"],
                baseline_label="cold torch-fidelity",
            )
        )
        rows.append(row(g, "speed-up (cold ÷ ours, derived)", case["cold_median_s"] / case["ours_median_s"], "×"))
        rows.append(
            row(
                g,
                "largest FID difference, ours vs torch-fidelity (parts per million)",
                1e6 * max(r["fid_rel_diff"] for r in case["runs"]),
                "ppm",
            )
        )
        rows.append(
            row(
                g,
                f"one-time: reference statistics of the {case['reference']} real images",
                case["reference_stats_s"],
                "s",
            )
        )
    b = t["breakdown"]
    g = f"Where the time goes ({b['generated']} generated vs {b['reference']} real, same features)"
    rows.append(
        row(
            g,
            f"Inception features of {b['generated']} images, torch-fidelity's NCHW layout (CPU)",
            b["features_nchw_s"],
            "s",
        )
    )
    rows.append(
        row(
            g,
            f"Inception features of {b['generated']} images, channels-last as the pipeline runs it (CPU)",
            b["features_s"],
            "s",
            baseline=b["features_nchw_s"],
            baseline_label="NCHW",
        )
    )
    rows.append(
        row(
            g,
            "largest feature difference, channels-last vs NCHW (parts per million of the largest feature)",
            1e6 * b["features_layout_max_rel_diff"],
            "ppm",
        )
    )
    rows.append(
        row(
            g,
            "Fréchet distance, torch-fidelity (non-symmetric 2048×2048 eigenvalues)",
            b["frechet_torch_fidelity_s"],
            "s",
        )
    )
    rows.append(row(g, "Fréchet distance, ours (exact low-rank form)", b["frechet_ours_s"], "s"))
    rows.append(
        row(
            g,
            "Fréchet distance speed-up (torch-fidelity's ÷ ours, derived)",
            b["frechet_torch_fidelity_s"] / b["frechet_ours_s"],
            "×",
        )
    )
    rows.append(row(g, f"FID bootstrap, {b['bootstrap_replicas']} replicas", b["bootstrap_s"], "s"))
    rows.append(
        row(
            g,
            "full evaluation: FID + KID + precision/recall + bootstrap, statistics cached",
            b["full_evaluation_s"],
            "s",
        )
    )
    g = "Throughput"
    rows.append(row(g, "Inception feature extraction, CPU", b["cpu_images_per_s"], "images/s"))
    if b["gpu"] is not None:
        rows.append(
            row(
                g,
                f"Inception feature extraction, CUDA ({b['gpu']['device']})",
                b["gpu"]["images_per_s"],
                "images/s",
                baseline=b["cpu_images_per_s"],
                baseline_label="CPU",
            )
        )
    return rows


def _notes(t: dict[str, Any], load_before: list[float], load_after: list[float]) -> list[str]:
    b = t["breakdown"]
    notes = []
    for case in t["cases"]:
        speedup = case["cold_median_s"] / case["ours_median_s"]
        verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
        notes.append(
            f"{case['label']}: {speedup:.1f}× faster than a cold torch-fidelity call (target ≥ "
            f"{TARGET_SPEEDUP:g}×: {verdict}); FIDs "
            + ", ".join(f"{r['fid_ours']:.6f} vs {r['fid_cold']:.6f}" for r in case["runs"])
            + f" (ours vs torch-fidelity, must agree to {FID_RTOL:g} relative)."
        )
    notes += [
        "Per-image Inception cost dominates both calls, so the speed-up is close to (N + M) / N for N "
        "generated and M real images, plus the Fréchet distance saved (see 'Where the time goes'): the "
        "larger the reference set relative to the sample, the larger the gain. The cached path pays the "
        "reference statistics once per (data content, extractor, weights, size); that one-time cost is "
        "shown per case.",
        "A 'new model' is a DCGAN generator with fresh random weights (seed 1000 + repeat): what is measured "
        "is evaluation time, which does not depend on what the images show.",
        f"Fréchet distance: ours and torch-fidelity's differ by {b['frechet_rel_diff']:.1e} relative on the same "
        "statistics.",
        f"Weights from the offline conversion took {t['weights_s']:.1f} s to prepare (outside every timing); "
        f"AIGC_CACHE_DIR and TORCH_HOME point inside bench/.work/ and start empty.",
        f"Load average (1/5/15 min) before {load_before}, after {load_after}; another process sharing the "
        "CPUs inflates every figure.",
    ]
    if b["gpu"] is None:
        notes.append("No CUDA device: GPU throughput left out.")
    busy = [
        f"{label} {span['other_cores']:.2f}"
        for label, span in t["phases_cpu"].items()
        if span.get("other_cores") is not None and span["other_cores"] >= CONTENDED_CORES
    ]
    if busy:
        notes.append(
            f"Other processes kept >= {CONTENDED_CORES} cores busy (average) during: "
            + ", ".join(busy)
            + "; those figures are inflated."
        )
    return notes


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench evaluation`` (see :mod:`bench.registry`)."""
    return measure(ctx)
