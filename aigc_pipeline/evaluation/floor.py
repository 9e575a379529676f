"""The data's own floor: the scores *real* images get under a model's evaluation protocol.

FID, KID and precision/recall of a few hundred images are biased (FID strongly upwards), so a
model's raw FID says little on its own. The floor answers "what would a perfect model score
here?": ``num_samples`` real images that are not in the reference split, drawn with the
evaluation's seed, scored against the reference exactly as generated images are (same extractor,
weights, reference statistics, sample count, bootstrap). A model's FID is then read as a ratio to
the floor's (``fid_ratio``: 1.0 is as good as real data).

The floor's images come from the split the reference does not use (train for an ``eval``
reference and for ``all``, whose floor then overlaps the reference and is optimistic: flagged in
``overlaps_reference``; eval for a ``train`` reference). If that split holds fewer than
``num_samples`` images, all of them are used and ``num_samples`` records how many (a smaller
sample makes the floor's FID larger, so the ratio is conservative).

Results are cached by content (the floor images' pixels, the reference's pixels, the weights,
the settings, the feature pass: torch-fidelity's version, precision, resize) as JSON, written
atomically: computed once per dataset version and protocol.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aigc_pipeline.data.prepared import Split
from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics
from aigc_pipeline.evaluation.inception import InceptionWeights
from aigc_pipeline.evaluation.protocol import FEATURE_PASS
from aigc_pipeline.evaluation.reference import pixel_digest
from aigc_pipeline.io import atomic_write_json

__all__ = ["Floor", "FLOOR_SPLIT", "data_floor", "floor_cached", "floor_images"]

_FORMAT = 2  # 2: with FID-infinity
# The split the floor's real images come from, for each reference split.
FLOOR_SPLIT: dict[str, Split] = {"eval": "train", "train": "eval", "all": "train"}


@dataclass(frozen=True)
class Floor:
    """Scores of real images under the evaluation protocol (see the module docstring)."""

    fid: float
    fid_std: float | None  # bootstrap spread, None when the bootstrap is off
    kid: float
    precision: float
    recall: float
    num_samples: int  # real images scored (the protocol's sample count unless the split is smaller)
    split: str  # where they came from
    overlaps_reference: bool  # True for reference_split "all": optimistic
    key: str  # content key of the cache entry
    fid_inf: float | None = None  # FID-infinity of the same real images (aigc_pipeline.evaluation.frechet)
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("from_cache")
        return d


def floor_images(images: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """``num_samples`` of ``images`` (all of them if fewer), chosen by a permutation seeded with ``seed``."""
    order = np.random.default_rng(seed).permutation(len(images))[:num_samples]
    return images[np.sort(order)]


def floor_cached(
    real: np.ndarray,
    reference: np.ndarray,
    *,
    num_samples: int,
    seed: int,
    weights: InceptionWeights,
    bootstrap: int = 0,
    cache_dir: Path | None = None,
) -> bool:
    """Whether :func:`data_floor` with these arguments would read its result from the cache."""
    chosen = floor_images(real, num_samples, seed)
    return _entry(chosen, reference, weights=weights, seed=seed, bootstrap=bootstrap, cache_dir=cache_dir)[2].is_file()


def _entry(
    chosen: np.ndarray,
    reference: np.ndarray,
    *,
    weights: InceptionWeights,
    seed: int,
    bootstrap: int,
    cache_dir: Path | None,
) -> tuple[dict[str, Any], str, Path]:
    """The floor's settings, their content key and the cache file they name."""
    settings = {
        "format": _FORMAT,
        "floor_pixels": pixel_digest(chosen),
        "reference_pixels": pixel_digest(reference),
        "weights": weights.sha256,
        "num_samples": len(chosen),
        "seed": seed,
        "bootstrap": bootstrap,
        "feature_pass": FEATURE_PASS,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "floor" / f"floor-{key[:32]}.json"
    return settings, key, path


def data_floor(
    real: np.ndarray,
    reference: np.ndarray,
    *,
    split: str,
    reference_split: str,
    reference_key: str,
    num_samples: int,
    seed: int,
    weights: InceptionWeights,
    bootstrap: int = 0,
    batch_size: int = 50,
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> Floor:
    """The floor of ``reference`` at ``num_samples`` images, from the real images ``real`` (the
    ``split`` the reference does not use); read from the cache when this exact floor was computed."""
    chosen = floor_images(real, num_samples, seed)
    if len(chosen) < 4:
        raise EvaluationError(
            f"the data's floor needs at least 4 real images in the {split} split (precision/recall "
            f"uses 3 nearest neighbours), it has {len(chosen)}"
        )
    settings, key, path = _entry(
        chosen, reference, weights=weights, seed=seed, bootstrap=bootstrap, cache_dir=cache_dir
    )
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"cached floor {path} cannot be read ({exc}); delete it to recompute") from exc
        if doc.get("settings") != settings:
            raise EvaluationError(f"cached floor {path} was made for other inputs; delete it to recompute")
        return Floor(**doc["floor"], from_cache=True)
    scores = compute_fidelity_metrics(
        chosen,
        reference,
        reference_key=reference_key,
        weights=weights,
        batch_size=batch_size,
        device=device,
        kid=True,
        prc=True,
        bootstrap=bootstrap,
        bootstrap_seed=seed,
        extrapolate=True,
        cache_dir=cache_dir,
    )
    floor = Floor(
        fid=scores["fid"],
        fid_std=(scores.get("fid_bootstrap") or {}).get("std"),
        kid=scores["kid_mean"],
        precision=scores["precision"],
        recall=scores["recall"],
        num_samples=len(chosen),
        split=split,
        overlaps_reference=reference_split == "all",
        key=key,
        fid_inf=scores["fid_inf"]["value"],
    )
    atomic_write_json(path, {"settings": settings, "floor": floor.to_dict()})
    return floor
