"""FID, KID, precision/recall and Inception Score of uint8 image arrays with torch-fidelity, offline.

Each image goes through torch-fidelity's Inception extractor once; KID, precision/recall and IS
are then computed from those features with torch-fidelity's own functions (the ones
``calculate_metrics`` calls), and FID from torch-fidelity's statistics (mean, covariance) with the
exact low-rank Fréchet distance of :mod:`aigc_pipeline.evaluation.frechet`: the same value as
torch-fidelity's to 1e-6 relative (tested), without its 2048x2048 non-symmetric eigendecomposition,
which takes 2 s on an idle 2-core machine and 15-35 s on a busy one. The reference side comes from
the content-keyed statistics cache (:mod:`aigc_pipeline.evaluation.reference`). On request, a
bootstrap over the generated features measures the FID's noise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.features import (
    FEATURE_EXTRACTOR,
    FEATURE_LAYER,
    LOGITS_LAYER,
    UInt8Images,
    extract_features,
    parse_device,
)
from aigc_pipeline.evaluation.frechet import bootstrap_fid, fid_infinity, frechet_distance
from aigc_pipeline.evaluation.inception import InceptionWeights
from aigc_pipeline.evaluation.reference import ReferenceStats, reference_cache_name, reference_statistics

__all__ = [
    "FEATURE_EXTRACTOR",
    "FID_RECOMMENDED_MIN_SAMPLES",
    "compute_fidelity_metrics",
    "metrics_from_features",
    "reference_cache_name",
    "validate_images",
    "UInt8Images",
]

log = logging.getLogger(__name__)

# Below the feature dimension the covariance is singular and FID is strongly biased upwards;
# fine for smoke tests, not for comparing models.
FID_RECOMMENDED_MIN_SAMPLES = 2048
_KID_MAX_SUBSET_SIZE = 1000
# torch-fidelity's defaults, which our inputs must satisfy (k-th neighbour, IS splits).
_PRC_NEIGHBORHOOD = 3
_ISC_SPLITS = 10
_MIN_BOOTSTRAP = 2


def compute_fidelity_metrics(
    generated: np.ndarray,
    reference: np.ndarray,
    *,
    reference_key: str,
    weights: InceptionWeights,
    batch_size: int = 64,
    device: str = "cpu",
    kid: bool = False,
    prc: bool = False,
    isc: bool = False,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    extrapolate: bool = False,
    cache: bool = True,
    cache_dir: Path | None = None,
    verbose: bool = False,
    keep_features: bool = False,
) -> dict[str, Any]:
    """Compute FID between ``generated`` and ``reference`` (and KID / precision-recall / IS on request).

    Args:
        generated: uint8 array [N, C, H, W], C in {1, 3}; the model's samples (torch-fidelity's input1).
        reference: uint8 array [M, C, H, W], C in {1, 3}; real images (input2, statistics cached).
        reference_key: readable label of the reference set (e.g. dataset name and version) used in
            the cache entry name; correctness does not depend on it (a pixel digest is included).
        weights: from :func:`aigc_pipeline.evaluation.inception.resolve_inception_weights`.
        batch_size: images per Inception forward pass (the values do not depend on it).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``.
        kid: also compute KID (100 subsets of size ``min(1000, N, M)``).
        prc: also compute precision/recall (Inception pool3 features, 3rd nearest neighbour).
        isc: also compute Inception Score of ``generated``; only possible when
            ``weights.has_logits``, otherwise ``isc_unavailable`` explains why.
        bootstrap: FID over this many resamplings of the generated features (0 = none).
        bootstrap_seed: seed of the resampling (and of FID-infinity's subsets).
        extrapolate: also FID-infinity (:func:`~aigc_pipeline.evaluation.frechet.fid_infinity`).
        cache: read/write the reference statistics cache (off: same numbers, computed afresh).
        cache_dir: root of the evaluation cache; default :func:`default_cache_dir`.
        verbose: let torch-fidelity print progress to stderr.
        keep_features: also return the generated images' features (``features``, float32 [N, 2048]).

    Returns:
        ``fid``; ``kid_mean``, ``kid_std``, ``kid_subset_size`` if ``kid``; ``precision``, ``recall``
        if ``prc``; ``isc_mean``, ``isc_std`` or ``isc_unavailable`` (a reason string) if ``isc``;
        ``fid_bootstrap`` (``replicas``, ``seed``, ``mean``, ``std``) if ``bootstrap``; ``fid_inf``
        (``value``, ``std``, ``slope``, ``sizes``, ``means``) if ``extrapolate``; always
        ``extractor`` (name, weights_sha256, weights_source, has_logits), ``num_generated``,
        ``num_reference``, ``reference_cached`` (statistics read from the cache).

    Raises:
        EvaluationError: invalid arrays, too few images for a requested metric, bad arguments, or
            an unavailable device.
    """
    validate_images("generated", generated)
    validate_images("reference", reference)
    n, m = int(generated.shape[0]), int(reference.shape[0])
    if not isinstance(reference_key, str) or not reference_key.strip():
        raise EvaluationError("reference_key must be a non-empty string naming the reference image set")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
    if prc and min(n, m) < _PRC_NEIGHBORHOOD + 1:
        raise EvaluationError(
            f"precision/recall needs at least {_PRC_NEIGHBORHOOD + 1} images per side "
            f"(k={_PRC_NEIGHBORHOOD} nearest neighbours), got generated={n}, reference={m}"
        )
    compute_isc = isc and weights.has_logits
    if compute_isc and n < _ISC_SPLITS:
        raise EvaluationError(
            f"Inception Score needs at least {_ISC_SPLITS} generated images ({_ISC_SPLITS} splits), got {n}"
        )
    if bootstrap and (not isinstance(bootstrap, int) or bootstrap < _MIN_BOOTSTRAP):
        raise EvaluationError(f"bootstrap must be 0 (off) or at least {_MIN_BOOTSTRAP} replicas, got {bootstrap!r}")
    parse_device(device)
    if min(n, m) < FID_RECOMMENDED_MIN_SAMPLES:
        log.warning(
            "FID from %d generated / %d reference images: below %d (the feature dimension) the covariance "
            "is singular and FID is biased upwards; compare values only within one protocol (10k-50k is standard)",
            n,
            m,
            FID_RECOMMENDED_MIN_SAMPLES,
        )

    ref = reference_statistics(
        reference,
        reference_key=reference_key,
        weights=weights,
        batch_size=batch_size,
        device=device,
        cache=cache,
        cache_dir=cache_dir,
        verbose=verbose,
    )
    gen = extract_features(
        generated, weights, batch_size=batch_size, device=device, logits=compute_isc, verbose=verbose
    )
    result = metrics_from_features(
        gen,
        ref,
        kid=kid,
        prc=prc,
        bootstrap=bootstrap,
        bootstrap_seed=bootstrap_seed,
        extrapolate=extrapolate,
        device=device,
    )
    if compute_isc:
        isc_raw = isc_features_to_metric(gen[LOGITS_LAYER], splits=_ISC_SPLITS)
        result["isc_mean"] = float(isc_raw[KEY_METRIC_ISC_MEAN])
        result["isc_std"] = float(isc_raw[KEY_METRIC_ISC_STD])
    elif isc:
        result["isc_unavailable"] = isc_unavailable_reason(weights)
    result["extractor"] = {
        "name": FEATURE_EXTRACTOR,
        "weights_sha256": weights.sha256,
        "weights_source": weights.source,
        "has_logits": weights.has_logits,
    }
    result["num_generated"] = n
    result["num_reference"] = m
    result["reference_cached"] = ref.from_cache
    if keep_features:
        result["features"] = gen[FEATURE_LAYER]
    return result


def metrics_from_features(
    generated: dict[str, torch.Tensor],
    reference: ReferenceStats,
    *,
    kid: bool = False,
    prc: bool = False,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    extrapolate: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """FID (+ KID, precision/recall, bootstrap, FID-infinity) from generated features and reference
    statistics, with torch-fidelity's settings (KID: 100 subsets, cubic kernel; precision/recall: k=3)."""
    feats = generated[FEATURE_LAYER]
    n, m = len(feats), len(reference.features)
    result: dict[str, Any] = {"fid": frechet_distance(feats, reference.mu, reference.sigma)}
    if kid:
        subset = min(_KID_MAX_SUBSET_SIZE, n, m)
        raw = kid_features_to_metric(feats, reference.features, kid_subset_size=subset, verbose=False)
        result["kid_mean"] = float(raw[KEY_METRIC_KID_MEAN])
        result["kid_std"] = float(raw[KEY_METRIC_KID_STD])
        result["kid_subset_size"] = subset
    if prc:
        use_cuda, _ = parse_device(device)
        raw = prc_features_to_metric(feats, reference.features, save_cpu_ram=True, cuda=use_cuda, verbose=False)
        result["precision"] = float(raw[KEY_METRIC_PRECISION])
        result["recall"] = float(raw[KEY_METRIC_RECALL])
    if bootstrap:
        b = bootstrap_fid(feats, reference.mu, reference.sigma, replicas=bootstrap, seed=bootstrap_seed)
        result["fid_bootstrap"] = {"replicas": b.replicas, "seed": b.seed, "mean": b.mean, "std": b.std}
    if extrapolate:
        e = fid_infinity(feats, reference.mu, reference.sigma, seed=bootstrap_seed)
        result["fid_inf"] = {
            "value": e.value,
            "std": e.std,
            "slope": e.slope,
            "sizes": list(e.sizes),
            "means": list(e.means),
        }
    return result


def isc_unavailable_reason(weights: InceptionWeights) -> str:
    """Why Inception Score is not computed with ``weights``."""
    return (
        f"Inception weights from {weights.source} ({weights.path.name}) have no classifier layer known to give "
        "real logits (only torch-fidelity's published file has one); run `aigc weights fetch` (or set "
        "evaluate.inception_weights: download) where the network allows to get Inception Score"
    )


def validate_images(name: str, images: object) -> None:
    """Raise :class:`EvaluationError` unless ``images`` is a uint8 array [N >= 2, 1 or 3, H, W]."""
    if not isinstance(images, np.ndarray):
        raise EvaluationError(f"{name} images must be a numpy array [N, C, H, W] of uint8, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise EvaluationError(
            f"{name} images must have dtype uint8 (pixel values 0-255), got {images.dtype}; "
            "convert e.g. with np.clip(x * 255, 0, 255).round().astype(np.uint8) for [0, 1] floats"
        )
    if images.ndim != 4:
        raise EvaluationError(f"{name} images must be 4-D [N, C, H, W], got shape {tuple(images.shape)}")
    count, channels, height, width = images.shape
    if channels not in (1, 3):
        raise EvaluationError(
            f"{name} images must have 1 or 3 channels in axis 1 ([N, C, H, W]), got shape {tuple(images.shape)}"
            + ("; channels-last input? transpose with .transpose(0, 3, 1, 2)" if width in (1, 3) else "")
        )
    if height < 1 or width < 1:
        raise EvaluationError(f"{name} images have an empty spatial size: shape {tuple(images.shape)}")
    if count < 2:
        raise EvaluationError(
            f"{name} set has {count} image(s); FID needs at least 2 per side to estimate a covariance "
            f"(and >= {FID_RECOMMENDED_MIN_SAMPLES} for a meaningful value)"
        )
