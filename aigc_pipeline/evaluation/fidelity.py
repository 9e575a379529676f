"""FID (and optionally KID, precision/recall, IS) of uint8 image arrays via torch-fidelity, offline.

Reference statistics are cached by torch-fidelity under ``<cache_dir>/fidelity``. torch-fidelity
keys a cache entry by its name only, so the name built here carries everything the statistics
depend on: a digest of the reference pixels, the weights' sha256, the image shape and the
torch-fidelity version. ``reference_key`` is only a readable label in that name.

Cache writes: torch-fidelity 0.4.0 saves each entry to a temp file in the same folder and
``os.rename``s it over the final name (``utils_torch.torch_atomic_save``), so readers never see a
partial entry; it does not fsync, so the entries written for a call are fsynced here afterwards.
A killed run can leave ``tmp*`` files in that folder; they are never read and can be deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset

from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.inception import InceptionWeights

__all__ = ["FEATURE_EXTRACTOR", "compute_fidelity_metrics", "reference_cache_name"]

log = logging.getLogger(__name__)

FEATURE_EXTRACTOR = "inception-v3-compat"
# Below the feature dimension the covariance is singular and FID is strongly biased upwards;
# fine for smoke tests, not for comparing models.
FID_RECOMMENDED_MIN_SAMPLES = 2048
_KID_MAX_SUBSET_SIZE = 1000
# torch-fidelity's defaults, which our inputs must satisfy (k-th neighbour, IS splits).
_PRC_NEIGHBORHOOD = 3
_ISC_SPLITS = 10
_HASH_CHUNK_BYTES = 64 << 20


class _UInt8Images(Dataset):
    """Serves uint8 [3, H, W] tensors (1 channel repeated), the only input torch-fidelity accepts."""

    def __init__(self, images: np.ndarray) -> None:
        self._images = images

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        # Copy one image: the array may be read-only or a memmap, which torch.from_numpy rejects/warns on.
        image = torch.from_numpy(np.array(self._images[index], dtype=np.uint8, copy=True))
        if image.shape[0] == 1:
            image = image.repeat(3, 1, 1)
        return image


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
    cache_dir: Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Compute FID between ``generated`` and ``reference`` (and KID / precision-recall / IS on request).

    Args:
        generated: uint8 array [N, C, H, W], C in {1, 3}; the model's samples (torch-fidelity's input1).
        reference: uint8 array [M, C, H, W], C in {1, 3}; real images (input2, statistics cached).
        reference_key: readable label of the reference set (e.g. dataset name and version) used in
            the cache entry name; correctness does not depend on it (a pixel digest is included).
        weights: from :func:`aigc_pipeline.evaluation.inception.resolve_inception_weights`.
        batch_size: images per Inception forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``.
        kid: also compute KID (subset size ``min(1000, N, M)``).
        prc: also compute precision/recall (Inception pool3 features, 3rd nearest neighbour).
        isc: also compute Inception Score of ``generated``; only possible when
            ``weights.has_logits``, otherwise ``isc_unavailable`` explains why.
        cache_dir: root of the evaluation cache; default :func:`default_cache_dir`.
        verbose: let torch-fidelity print progress to stderr.

    Returns:
        ``fid``; ``kid_mean``, ``kid_std``, ``kid_subset_size`` if ``kid``; ``precision``, ``recall``
        if ``prc``; ``isc_mean``, ``isc_std`` or ``isc_unavailable`` (a reason string) if ``isc``;
        always ``extractor`` (name, weights_sha256, weights_source, has_logits), ``num_generated``,
        ``num_reference``.

    Raises:
        EvaluationError: invalid arrays, too few images for a requested metric, bad arguments, or
            an unavailable device.
    """
    _validate_images("generated", generated)
    _validate_images("reference", reference)
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
    if min(n, m) < FID_RECOMMENDED_MIN_SAMPLES:
        log.warning(
            "FID from %d generated / %d reference images: below %d (the feature dimension) the covariance "
            "is singular and FID is biased upwards; use >= %d per side (10k-50k is standard) to compare models",
            n,
            m,
            FID_RECOMMENDED_MIN_SAMPLES,
            FID_RECOMMENDED_MIN_SAMPLES,
        )
    use_cuda, cuda_index = _parse_device(device)

    cache_root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "fidelity"
    cache_root.mkdir(parents=True, exist_ok=True)
    cache_name = reference_cache_name(reference, reference_key=reference_key, weights=weights)
    kid_subset_size = min(_KID_MAX_SUBSET_SIZE, n, m)

    with _cuda_device(cuda_index):
        raw = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(generated),
            input2=_UInt8Images(reference),
            fid=True,
            kid=kid,
            prc=prc,
            isc=compute_isc,
            # Explicit: with prc=True and no extractor torch-fidelity switches to VGG16 (a download).
            feature_extractor=FEATURE_EXTRACTOR,
            feature_extractor_weights_path=str(weights.path),
            cuda=use_cuda,
            # Also means num_workers=0: no worker processes pickling the arrays.
            save_cpu_ram=True,
            batch_size=batch_size,
            kid_subset_size=kid_subset_size,
            cache=True,
            cache_root=str(cache_root),
            # input1 (generated) gets no cache name: its features are never cached.
            input2_cache_name=cache_name,
            verbose=verbose,
        )
    _fsync_cache_entries(cache_root, cache_name)

    result: dict[str, Any] = {"fid": float(raw[torch_fidelity.KEY_METRIC_FID])}
    if kid:
        result["kid_mean"] = float(raw[torch_fidelity.KEY_METRIC_KID_MEAN])
        result["kid_std"] = float(raw[torch_fidelity.KEY_METRIC_KID_STD])
        result["kid_subset_size"] = kid_subset_size
    if prc:
        result["precision"] = float(raw[torch_fidelity.KEY_METRIC_PRECISION])
        result["recall"] = float(raw[torch_fidelity.KEY_METRIC_RECALL])
    if compute_isc:
        result["isc_mean"] = float(raw[torch_fidelity.KEY_METRIC_ISC_MEAN])
        result["isc_std"] = float(raw[torch_fidelity.KEY_METRIC_ISC_STD])
    elif isc:
        result["isc_unavailable"] = (
            f"Inception weights from {weights.source} ({weights.path.name}) have no classifier layer, "
            "so there are no real logits; configure a torch-fidelity Inception state dict with fc weights "
            "to get Inception Score"
        )
    result["extractor"] = {
        "name": FEATURE_EXTRACTOR,
        "weights_sha256": weights.sha256,
        "weights_source": weights.source,
        "has_logits": weights.has_logits,
    }
    result["num_generated"] = n
    result["num_reference"] = m
    return result


def reference_cache_name(reference: np.ndarray, *, reference_key: str, weights: InceptionWeights) -> str:
    """torch-fidelity cache name for ``reference``: ``ref-<key>-px<pixels>-w<weights>-<H>x<W>x<C>-tf<version>``.

    ``<pixels>`` is the first 16 hex digits of a sha256 over dtype, shape and pixel bytes,
    ``<weights>`` the first 16 of the weights file's sha256. torch-fidelity appends
    ``-inception-v3-compat-{features|stat-fid}-<layer>`` and ``.pt``.
    """
    _, channels, height, width = reference.shape
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", reference_key.strip())[:64]
    return (
        f"ref-{label}-px{_pixel_digest(reference)[:16]}-w{weights.sha256[:16]}"
        f"-{height}x{width}x{channels}-tf{torch_fidelity.__version__}"
    )


def _pixel_digest(images: np.ndarray) -> str:
    """sha256 of dtype, shape and pixels, hashed in chunks so a memmap is never loaded whole."""
    digest = hashlib.sha256(f"{images.dtype.str}|{tuple(images.shape)}|".encode())
    per_image = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    step = max(1, _HASH_CHUNK_BYTES // per_image)
    for start in range(0, images.shape[0], step):
        digest.update(memoryview(np.ascontiguousarray(images[start : start + step])).cast("B"))
    return digest.hexdigest()


def _validate_images(name: str, images: object) -> None:
    if not isinstance(images, np.ndarray):
        raise EvaluationError(
            f"{name} images must be a numpy array [N, C, H, W] of uint8, got {type(images).__name__}"
        )
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


def _parse_device(device: str) -> tuple[bool, int | None]:
    """Map a torch device string onto torch-fidelity's ``cuda`` flag (+ CUDA index to select)."""
    if device == "cpu":
        return False, None
    match = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if match is None:
        raise EvaluationError(f"device must be 'cpu', 'cuda' or 'cuda:<index>' for torch-fidelity, got {device!r}")
    if not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    index = int(match.group(1)) if match.group(1) is not None else None
    if index is not None and index >= torch.cuda.device_count():
        raise EvaluationError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return True, index


@contextlib.contextmanager
def _cuda_device(index: int | None) -> Iterator[None]:
    # torch-fidelity calls .cuda() without an index, i.e. on the current device.
    if index is None:
        yield
        return
    with torch.cuda.device(index):
        yield


def _fsync_cache_entries(cache_root: Path, cache_name: str) -> None:
    """Make this call's cache entries durable; torch-fidelity renames them into place without fsync."""
    # The name holds only [A-Za-z0-9._-] (see reference_cache_name), so it is glob-safe.
    for entry in cache_root.glob(f"{cache_name}-*.pt"):
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dir_fd = os.open(cache_root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

