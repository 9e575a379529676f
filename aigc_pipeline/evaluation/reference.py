"""Reference statistics: Inception features, mean and covariance of a set of real images, cached
on disk by content.

An entry's name carries everything its numbers depend on: a sha256 of the reference pixels
(dtype, shape and bytes), the weights' sha256, the extractor and layer, the image shape, the
torch-fidelity version and a digest of the feature pass (precision, resize: ``FEATURE_PASS``);
``reference_key`` (e.g. the dataset's digest) is a readable label in
it. So the statistics are computed once per (dataset content, extractor, weights, size), and a
changed dataset, however small the change, gets a new entry instead of stale numbers.

Entries are ``.npz`` files read with ``allow_pickle=False`` (torch-fidelity's own cache is a
pickle), written to a temp file in the same folder, fsynced and renamed into place: a reader sees
a whole entry or none. The metadata stored inside each entry is checked on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics

from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.features import FEATURE_EXTRACTOR, FEATURE_LAYER, extract_features
from aigc_pipeline.evaluation.inception import InceptionWeights
from aigc_pipeline.evaluation.protocol import FEATURE_PASS
from aigc_pipeline.io import atomic_write_bytes, compute_once

__all__ = [
    "ReferenceStats",
    "lock_path",
    "pixel_digest",
    "reference_cache_name",
    "reference_cached",
    "reference_statistics",
]

_HASH_CHUNK_BYTES = 64 << 20
_FORMAT = 1


@dataclass(frozen=True)
class ReferenceStats:
    """Features and FID statistics of a reference set, as torch-fidelity computes them."""

    features: torch.Tensor  # float32 [M, 2048]
    mu: np.ndarray  # torch-fidelity's dtype (float32)
    sigma: np.ndarray  # float64 [2048, 2048]
    name: str  # cache entry name
    pixel_digest: str  # sha256 of the reference pixels
    from_cache: bool  # True when read from disk, False when computed by this call

    @property
    def statistics(self) -> dict[str, np.ndarray]:
        """``{"mu", "sigma"}`` as torch-fidelity's ``fid_statistics_to_metric`` takes them."""
        return {"mu": self.mu, "sigma": self.sigma}


def reference_cache_name(
    reference: np.ndarray, *, reference_key: str, weights: InceptionWeights, digest: str | None = None
) -> str:
    """Cache name for ``reference``: ``ref-<key>-px<pixels>-w<weights>-<H>x<W>x<C>-tf<version>-fx<pass>``.

    ``<pixels>`` is the first 16 hex digits of :func:`pixel_digest`, ``<weights>`` the first 16 of
    the weights' sha256, ``<pass>`` :func:`feature_pass_digest`. The extractor and layer are appended
    to form the file name.
    ``digest`` saves hashing the pixels again when the caller already has it.
    """
    _, channels, height, width = reference.shape
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", reference_key.strip())[:64]
    return (
        f"ref-{label}-px{(digest or pixel_digest(reference))[:16]}-w{weights.sha256[:16]}"
        f"-{height}x{width}x{channels}-tf{torch_fidelity.__version__}-fx{feature_pass_digest()}"
    )


def feature_pass_digest() -> str:
    """Eight hex digits of a sha256 over :data:`~aigc_pipeline.evaluation.protocol.FEATURE_PASS`: an
    entry computed by a feature pass that differs in any way (e.g. TF32 convolutions) is never reused."""
    return hashlib.sha256(json.dumps(FEATURE_PASS, sort_keys=True).encode()).hexdigest()[:8]


def pixel_digest(images: np.ndarray) -> str:
    """sha256 of dtype, shape and pixels, hashed in chunks so a memmap is never loaded whole."""
    digest = hashlib.sha256(f"{images.dtype.str}|{tuple(images.shape)}|".encode())
    per_image = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    step = max(1, _HASH_CHUNK_BYTES // per_image)
    for start in range(0, images.shape[0], step):
        # numpy's stubs give ndarray its __buffer__ only on Python >= 3.12
        digest.update(memoryview(np.ascontiguousarray(images[start : start + step])).cast("B"))  # type: ignore[arg-type]
    return digest.hexdigest()


def reference_statistics(
    reference: np.ndarray,
    *,
    reference_key: str,
    weights: InceptionWeights,
    batch_size: int = 64,
    device: str = "cpu",
    cache: bool = True,
    cache_dir: Path | None = None,
    verbose: bool = False,
) -> ReferenceStats:
    """Features and statistics of ``reference`` (uint8 [M, C, H, W]); from the cache when present.

    With ``cache=False`` nothing is read or written (the numbers are the same: see the tests).
    """
    digest = pixel_digest(reference)
    name = reference_cache_name(reference, reference_key=reference_key, weights=weights, digest=digest)
    meta = {
        "format": _FORMAT,
        "pixel_digest": digest,
        "shape": list(reference.shape),
        "weights_sha256": weights.sha256,
        "extractor": FEATURE_EXTRACTOR,
        "layer": FEATURE_LAYER,
        "torch_fidelity": torch_fidelity.__version__,
        "feature_pass": FEATURE_PASS,
    }
    if not cache:
        return _compute(reference, weights, batch_size, device, verbose, name, digest)
    path = cache_path(name, cache_dir)
    if path.is_file():
        return _load(path, meta, name)
    # Evaluations of one dataset started together (workers of a pool, stages side by side) compute
    # its statistics once: the others wait for the entry rather than run Inception on it too.
    with compute_once(lock_path(path)):
        if path.is_file():
            return _load(path, meta, name)
        stats = _compute(reference, weights, batch_size, device, verbose, name, digest)
        _save(path, features=stats.features.numpy(), mu=stats.mu, sigma=stats.sigma, meta=np.array(json.dumps(meta)))
    return stats


def reference_cached(
    reference: np.ndarray, *, reference_key: str, weights: InceptionWeights, cache_dir: Path | None = None
) -> bool:
    """Whether :func:`reference_statistics` would read ``reference``'s features from the cache."""
    name = reference_cache_name(reference, reference_key=reference_key, weights=weights)
    return cache_path(name, cache_dir).is_file()


def _compute(
    reference: np.ndarray,
    weights: InceptionWeights,
    batch_size: int,
    device: str,
    verbose: bool,
    name: str,
    digest: str,
) -> ReferenceStats:
    features = extract_features(reference, weights, batch_size=batch_size, device=device, verbose=verbose)[
        FEATURE_LAYER
    ]
    stats = fid_features_to_statistics(features)
    return ReferenceStats(features, stats["mu"], stats["sigma"], name, digest, from_cache=False)


def cache_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where the entry ``name`` lives: ``<cache_dir>/fidelity/<name>-<extractor>-<layer>.npz``."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "fidelity"
    return root / f"{name}-{FEATURE_EXTRACTOR}-{FEATURE_LAYER}.npz"


def lock_path(entry: Path) -> Path:
    """The lock file of the cache entry ``entry`` (:func:`~aigc_pipeline.io.compute_once`), kept out
    of the entries' folder: ``<cache_dir>/locks/fidelity/<entry name>.lock``."""
    return entry.parent.parent / "locks" / entry.parent.name / f"{entry.name}.lock"


def _load(path: Path, expected: dict, name: str) -> ReferenceStats:
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["meta"]))
            features, mu, sigma = data["features"], data["mu"], data["sigma"]
    except (OSError, ValueError, KeyError) as exc:
        raise EvaluationError(
            f"cached reference statistics {path} cannot be read ({exc}); delete the file to recompute it"
        ) from exc
    if stored != expected:
        raise EvaluationError(
            f"cached reference statistics {path} were made for other inputs (stored {stored}, expected {expected}); "
            "delete the file to recompute it"
        )
    return ReferenceStats(torch.from_numpy(features), mu, sigma, name, expected["pixel_digest"], from_cache=True)


def _save(path: Path, **arrays: np.ndarray) -> None:
    """Write the entry atomically (temp file, fsync, rename), then fsync the folder so the rename
    itself survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # mypy also matches **arrays against savez's `allow_pickle: bool` (no caller passes that name)
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue())
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
