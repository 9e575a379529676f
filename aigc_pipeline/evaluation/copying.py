"""Data copying: do the samples sit closer to training images than unseen real images do?

FID rewards a model that replays its training set (it scores at the data's floor), so the gate
asks this separately, by nearest-neighbour distances in two spaces: the Inception features the
evaluation already computed (pool3, 2048-d, Euclidean), and the pixels themselves (Euclidean on
[0, 1] values). Both are needed: on small images Inception features move far under faint pixel
noise (a 28 px digit with +-6/255 noise lands as far from its original, in pool3 distance, as an
unseen digit lands from its nearest training digit: tests/unit/test_copies_cli.py), while pixel
distance misses a copy that is shifted or recoloured, which Inception features keep close.

- ``copy_share``: the share of samples that are copies in either space: nearer their nearest
  training image than the ``COPY_QUANTILE / 2`` quantile of held-out real images' nearest-training
  distances in that space (the *thresholds*; halved per space so that about ``COPY_QUANTILE`` of
  unseen real images fall below one of them).
- ``copy_ct``: Meehan, Chaudhuri and Dasgupta's data-copying statistic C_T (AISTATS 2020, "A
  Non-Parametric Test to Detect Data-Copying in Generative Models"): the training images are cut
  into cells by k-means on their Inception features; in every cell holding at least
  :data:`MIN_CELL_SAMPLES` samples the samples' distances to that cell's training images are set
  against the held-out images' by a Mann-Whitney U test, z-scored; C_T is their average weighted
  by the held-out images' share of each cell. Computed in both spaces; ``copy_ct`` is the lower.
  About 0 for a model that generalises, strongly negative (around -3 and below) for one that
  copies, positive for one that stays far from the data (underfitting).
- ``exact_copies``: samples whose pixels equal a training image's (sha256 of the bytes).

Calibration and floor: the held-out images are split in two at random (seeded): the first half
sets the thresholds and plays the held-out side of C_T; the second half is scored exactly as the
samples are, which gives real data's own figures (``floor_copy_share`` near ``COPY_QUANTILE``,
``floor_copy_ct`` near 0) to read the model's against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aigc_pipeline.evaluation.errors import EvaluationError

__all__ = ["COPY_QUANTILE", "MIN_CELL_SAMPLES", "CopyReport", "copying_report", "nearest_neighbours"]

COPY_QUANTILE = 0.05  # threshold: this quantile of held-out real images' nearest-training distances
MIN_CELL_SAMPLES = 20  # a k-means cell enters C_T with at least this many samples (Meehan et al.'s tau * m)
MAX_CELLS = 10
HELDOUT_PER_CELL = 50  # cells = held-out calibration images // this, between 1 and MAX_CELLS
_CHUNK = 1024


@dataclass(frozen=True)
class CopyReport:
    """The copying figures of one set of samples, and real data's beside them."""

    copy_share: float
    copy_ct: float | None  # None when no cell holds MIN_CELL_SAMPLES samples (the reason in ct_unavailable)
    exact_copies: int
    floor_copy_share: float
    floor_copy_ct: float | None
    spaces: dict[str, dict[str, Any]]  # per space (inception, pixels): threshold, share, C_T, and real data's
    cells: int
    cells_used: int
    num_samples: int
    num_train: int
    num_heldout: int  # calibration half
    num_floor: int  # the other half, scored like the samples
    ct_unavailable: str | None = None
    # Per sample: distance to and index of its nearest training image in the space where it is
    # nearest relative to that space's threshold, and that ratio (< 1: a copy); for the grid.
    distances: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    nearest: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False, compare=False)
    ratios: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    def metrics(self) -> dict[str, float | None]:
        """The numbers under their metric-table names."""
        return {
            "copy_share": self.copy_share,
            "copy_ct": self.copy_ct,
            "exact_copies": float(self.exact_copies),
            "floor_copy_share": self.floor_copy_share,
            "floor_copy_ct": self.floor_copy_ct,
        }

    def details(self) -> dict[str, Any]:
        """How they were measured, for evaluation.json."""
        return {
            "quantile": COPY_QUANTILE,
            "spaces": self.spaces,
            "cells": self.cells,
            "cells_used": self.cells_used,
            "min_cell_samples": MIN_CELL_SAMPLES,
            "num_samples": self.num_samples,
            "num_train": self.num_train,
            "num_heldout": self.num_heldout,
            "num_floor": self.num_floor,
            "ct_unavailable": self.ct_unavailable,
            "what": f"copy_share: share of samples nearer their nearest training image, in Inception pool3 or "
            f"in pixel space (L2), than the {COPY_QUANTILE / 2:g} quantile of held-out real images are "
            "in that space; copy_ct: the lower of the two spaces' C_T (Meehan et al. 2020: z-scored "
            "Mann-Whitney U per k-means cell of the training features; ~0 generalises, <= -3 copies); "
            "exact_copies: samples pixel-identical to a training image; floor_*: the other half of the "
            "held-out images scored the same way",
        }


def _rows(x: torch.Tensor, start: int) -> torch.Tensor:
    """Rows ``start:start + _CHUNK`` in float64; uint8 pixels become [0, 1] values."""
    chunk = x[start : start + _CHUNK].double()
    return chunk / 255.0 if x.dtype == torch.uint8 else chunk


def nearest_neighbours(
    queries: torch.Tensor, keys: torch.Tensor, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each row of ``queries`` to its nearest row of ``keys``, and that row's
    index; ``exclude[i]`` (when given, >= 0) is a row of ``keys`` that query ``i`` may not pick (itself).
    Exact float64 distances, a chunk of rows of each side at a time (uint8 pixel rows are read as
    [0, 1]): a 50k-image 64 px RGB training set is never held in floating point at once."""
    dist, idx = [], []
    for q in range(0, len(queries), _CHUNK):
        query = _rows(queries, q)
        best_d = torch.full((len(query),), torch.inf, dtype=torch.float64)
        best_i = torch.zeros(len(query), dtype=torch.int64)
        own = None
        if exclude is not None:
            own = torch.from_numpy(np.asarray(exclude[q : q + _CHUNK], dtype=np.int64))
        for k in range(0, len(keys), _CHUNK):
            d = torch.cdist(query, _rows(keys, k), compute_mode="donot_use_mm_for_euclid_dist")
            if own is not None:
                rows = torch.nonzero((own >= k) & (own < k + _CHUNK)).flatten()
                d[rows, own[rows] - k] = torch.inf
            values, indices = d.min(dim=1)
            better = values < best_d
            best_d[better], best_i[better] = values[better], indices[better] + k
        dist.append(best_d)
        idx.append(best_i)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def mann_whitney_z(x: np.ndarray, y: np.ndarray) -> float:
    """Z-score of the Mann-Whitney U of ``x`` against ``y`` (U counts pairs with x > y, ties half):
    negative when ``x`` tends to be smaller."""
    n1, n2 = len(x), len(y)
    ranks = _average_ranks(np.concatenate([x, y]))
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float((u - n1 * n2 / 2.0) / np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0))


def _pixel_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in images]


def _c_t_in(
    samples: torch.Tensor,
    samples_own: np.ndarray | None,
    heldout: torch.Tensor,
    own: np.ndarray | None,
    train: torch.Tensor,
    centres: np.ndarray,
    train_cells: np.ndarray,
    assign: tuple[torch.Tensor, torch.Tensor],
) -> tuple[float | None, int, str | None]:
    """C_T of ``samples`` against ``heldout`` (rows in one space) over the k-means cells, each row
    put in a cell by its Inception features (``assign``: the samples', the held-out rows').
    ``samples_own`` / ``own``: each row's index in ``train`` when those rows are training images
    left out of their own search."""
    centre_t = torch.from_numpy(centres)
    s_cells = nearest_neighbours(assign[0], centre_t)[1]
    h_cells = nearest_neighbours(assign[1], centre_t)[1]
    zs, weights = [], []
    for cell in range(len(centres)):
        s_in, h_in, t_in = s_cells == cell, h_cells == cell, train_cells == cell
        if s_in.sum() < MIN_CELL_SAMPLES or h_in.sum() == 0 or t_in.sum() < 2:
            continue
        cell_train = train[torch.from_numpy(t_in)]
        # A left-out training row's position among this cell's training rows (-1: not in the cell).
        position = np.full(len(train), -1, dtype=np.int64)
        position[t_in] = np.arange(int(t_in.sum()))
        d_s = nearest_neighbours(
            samples[torch.from_numpy(s_in)], cell_train, None if samples_own is None else position[samples_own[s_in]]
        )[0]
        d_h = nearest_neighbours(
            heldout[torch.from_numpy(h_in)], cell_train, None if own is None else position[own[h_in]]
        )[0]
        zs.append(mann_whitney_z(d_s, d_h))
        weights.append(h_in.mean())
    if not zs:
        return (
            None,
            0,
            (
                f"no k-means cell holds {MIN_CELL_SAMPLES} samples and a held-out image "
                f"({len(samples)} samples, {len(centres)} cells): score more samples"
            ),
        )
    w = np.asarray(weights)
    return float(np.dot(w / w.sum(), zs)), len(zs), None


def _flat_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 rows (read as [0, 1] by :func:`nearest_neighbours`, a chunk at a time)."""
    return torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1))


def copying_report(
    samples: torch.Tensor,
    sample_pixels: np.ndarray,
    train: torch.Tensor,
    train_pixels: np.ndarray,
    heldout: torch.Tensor | None,
    heldout_pixels: np.ndarray | None,
    *,
    seed: int,
) -> CopyReport:
    """The copying figures of ``samples`` (Inception features [N, D] and their uint8 pixels) against
    the training images (``train``, ``train_pixels``), calibrated on held-out real images
    (``heldout``, ``heldout_pixels``); ``seed`` draws the held-out halves and seeds k-means. See
    the module docstring.

    ``heldout`` None: the training images themselves calibrate, each left out of its own search
    (its distance to the nearest *other* training image), for folders that come without held-out
    images (``aigc copies`` without ``--heldout``).
    """
    from sklearn.cluster import KMeans

    if (heldout is None) != (heldout_pixels is None):
        raise EvaluationError("held-out images need both their features and their pixels")
    if sample_pixels.shape[1:] != train_pixels.shape[1:]:
        raise EvaluationError(
            f"samples are {'x'.join(map(str, sample_pixels.shape[1:]))} images but training "
            f"images {'x'.join(map(str, train_pixels.shape[1:]))}: bring both to one size"
        )
    loo = heldout is None
    pool = train if heldout is None else heldout  # i.e. `if loo`, spelled so the type narrows
    if len(pool) < 4:
        raise EvaluationError(
            f"the copying check needs at least 4 held-out real images (two halves: the "
            f"threshold and the floor), got {len(pool)}"
        )
    if len(train) < 2 or len(samples) < 1:
        raise EvaluationError(
            f"the copying check needs samples and at least 2 training images, got "
            f"{len(samples)} samples and {len(train)} training images"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    half = len(order) // 2
    calib_rows, probe_rows = np.sort(order[:half]), np.sort(order[half:])
    calib_own, probe_own = (calib_rows, probe_rows) if loo else (None, None)

    cells = int(np.clip(len(calib_rows) // HELDOUT_PER_CELL, 1, min(MAX_CELLS, len(train) // 2)))
    if cells <= 1:
        cells = 1
        centres, train_cells = train.double().numpy().mean(axis=0, keepdims=True), np.zeros(len(train), np.int64)
    else:
        km = KMeans(n_clusters=cells, n_init=3, random_state=seed).fit(train.double().numpy())
        centres, train_cells = km.cluster_centers_, km.labels_.astype(np.int64)

    spaces = {
        "inception": (samples, train, pool),
        "pixels": (
            _flat_pixels(sample_pixels),
            _flat_pixels(train_pixels),
            _flat_pixels(train_pixels if heldout_pixels is None else heldout_pixels),  # None exactly when loo
        ),
    }
    per_space: dict[str, dict[str, Any]] = {}
    # Per sample: its distance to the nearest training image over that space's threshold (< 1: a copy).
    sample_ratio, probe_ratio = np.full(len(samples), np.inf), np.full(len(probe_rows), np.inf)
    nearest = np.zeros(len(samples), dtype=np.int64)
    distances = np.zeros(len(samples))
    for space, (s_x, t_x, p_x) in spaces.items():
        calib, probe = p_x[torch.from_numpy(calib_rows)], p_x[torch.from_numpy(probe_rows)]
        threshold = float(np.quantile(nearest_neighbours(calib, t_x, calib_own)[0], COPY_QUANTILE / 2))
        d_s, idx = nearest_neighbours(s_x, t_x)
        d_p = nearest_neighbours(probe, t_x, probe_own)[0]
        scale = threshold if threshold > 0 else np.finfo(float).tiny
        better = d_s / scale < sample_ratio
        sample_ratio[better], nearest[better], distances[better] = d_s[better] / scale, idx[better], d_s[better]
        probe_ratio = np.minimum(probe_ratio, d_p / scale)
        # C_T: cells from the Inception features (a partition of the training set), distances in this space.
        ct, used, why = _c_t_in(
            s_x, None, calib, calib_own, t_x, centres, train_cells, assign=(samples, pool[torch.from_numpy(calib_rows)])
        )
        floor_ct = _c_t_in(
            probe,
            probe_own,
            calib,
            calib_own,
            t_x,
            centres,
            train_cells,
            assign=(pool[torch.from_numpy(probe_rows)], pool[torch.from_numpy(calib_rows)]),
        )[0]
        per_space[space] = {
            "threshold": threshold,
            "copy_share": float(np.mean(d_s < threshold)),
            "floor_copy_share": float(np.mean(d_p < threshold)),
            "copy_ct": ct,
            "floor_copy_ct": floor_ct,
            "cells_used": used,
            "ct_unavailable": why,
        }

    def lowest(key: str) -> float | None:
        values = [v[key] for v in per_space.values() if v[key] is not None]
        return min(values) if values else None

    train_hashes = set(_pixel_hashes(train_pixels))
    exact = sum(h in train_hashes for h in _pixel_hashes(sample_pixels))
    why = next((v["ct_unavailable"] for v in per_space.values() if v["ct_unavailable"]), None)
    return CopyReport(
        copy_share=float(np.mean(sample_ratio < 1)),
        copy_ct=lowest("copy_ct"),
        exact_copies=int(exact),
        floor_copy_share=float(np.mean(probe_ratio < 1)),
        floor_copy_ct=lowest("floor_copy_ct"),
        spaces=per_space,
        cells=cells,
        cells_used=min(v["cells_used"] for v in per_space.values()),
        num_samples=len(samples),
        num_train=len(train),
        num_heldout=len(calib_rows),
        num_floor=len(probe_rows),
        ct_unavailable=why,
        distances=distances,
        nearest=nearest,
        ratios=sample_ratio,
    )
