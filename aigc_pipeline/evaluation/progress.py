"""FID over training: a small FID every few epochs, for a curve, never for comparing models.

:class:`FidProgress` is the trainer's ``on_epoch_generator`` hook. It generates
``samples`` images with a fixed seed (the same latents every time) and measures FID against the
reference split's cached statistics. The metric's name carries its protocol, including the small
sample count (``fid_progress_incv3-…_n64_eval-…_32px``), so it is never mistaken for, or plotted
with, the evaluation's FID.

The rows are written at the end of training (``fid_progress.csv``) and travel in every checkpoint
(:meth:`FidProgress.state` / :meth:`FidProgress.restore`, the trainer's ``save_state`` /
``restore_state`` hooks), so a resumed training writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import torch

from aigc_pipeline.evaluation.features import FEATURE_EXTRACTOR, FEATURE_LAYER, extract_features
from aigc_pipeline.evaluation.frechet import frechet_distance
from aigc_pipeline.evaluation.inception import InceptionWeights
from aigc_pipeline.evaluation.protocol import Protocol, metric_key
from aigc_pipeline.evaluation.reference import ReferenceStats, reference_statistics
from aigc_pipeline.models.base import Arch
from aigc_pipeline.models.export import generate

__all__ = ["PROGRESS_FILE", "FidProgress", "read_progress"]

PROGRESS_FILE = "fid_progress.csv"
PREFIX = "fid_progress"


class FidProgress:
    """``on_epoch_generator(epoch, generator)``: FID of ``samples`` images every ``every`` epochs and
    at the last one (``epochs``)."""

    def __init__(
        self,
        reference: np.ndarray,
        *,
        reference_digest: str,
        reference_split: str,
        arch: Arch,
        weights: InceptionWeights,
        every: int,
        epochs: int,
        samples: int,
        seed: int,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        cache_dir: Path | None = None,
    ) -> None:
        self.reference, self.arch, self.weights = reference, arch, weights
        self.reference_digest = reference_digest
        self.every, self.epochs, self.samples, self.seed = every, epochs, samples, seed
        self.batch_size, self.device, self.cache_dir = batch_size, torch.device(device), cache_dir
        self.protocol = Protocol(
            FEATURE_EXTRACTOR, weights.sha256, samples, reference_split, reference_digest, len(reference), arch.size
        )
        self.rows: list[dict[str, float]] = []
        self._stats: ReferenceStats | None = None

    @property
    def metric(self) -> str:
        """``fid_progress_<protocol id>``: the column and MLflow metric name."""
        return metric_key(PREFIX, self.protocol.id)

    def due(self, epoch: int) -> bool:
        return self.every > 0 and (epoch % self.every == 0 or epoch == self.epochs)

    def prepare(self) -> float | None:
        """The reference statistics, loaded or computed now rather than inside the first point.

        Returns the measured seconds per image of the Inception pass when the statistics had to be
        computed (the rate the time estimate uses for the points to come), None when they came
        from the cache.
        """
        if self._stats is not None:
            return None
        t0 = time.perf_counter()
        self._stats = reference_statistics(
            self.reference,
            reference_key=self.reference_digest,
            weights=self.weights,
            batch_size=self.batch_size,
            device=_fidelity_device(self.device),
            cache_dir=self.cache_dir,
        )
        return None if self._stats.from_cache else (time.perf_counter() - t0) / max(len(self.reference), 1)

    def __call__(self, epoch: int, generator: torch.nn.Module) -> None:
        if not self.due(epoch):
            return
        t0 = time.perf_counter()
        self.prepare()
        images = generate(
            generator, self.arch, self.samples, seed=self.seed, batch_size=self.batch_size, device=self.device
        )
        feats = extract_features(
            images, self.weights, batch_size=self.batch_size, device=_fidelity_device(self.device)
        )[FEATURE_LAYER]
        assert self._stats is not None  # set by prepare() above
        fid = frechet_distance(feats, self._stats.mu, self._stats.sigma)
        self.rows.append({"epoch": epoch, self.metric: fid, "seconds": time.perf_counter() - t0})

    def state(self) -> dict[str, list[dict[str, float]]]:
        """The points so far, for a checkpoint."""
        return {"rows": [dict(r) for r in self.rows]}

    def restore(self, state: dict[str, list[dict[str, float]]]) -> None:
        """Continue from a checkpoint's points (a resumed training)."""
        self.rows = [dict(r) for r in state.get("rows", [])]

    def csv_text(self) -> str:
        """The rows as CSV: ``epoch,<metric>`` (one y column, so a DVC plot needs no column name)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["epoch", self.metric], lineterminator="\n")
        w.writeheader()
        for row in self.rows:
            w.writerow({"epoch": int(row["epoch"]), self.metric: f"{row[self.metric]:.6f}"})
        return buf.getvalue()


def read_progress(path: Path) -> tuple[str, list[tuple[int, float]]]:
    """(metric name, [(epoch, value)]) from a ``fid_progress.csv``; ("", []) when the file is absent."""
    if not Path(path).is_file():
        return "", []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names = [c for c in (reader.fieldnames or []) if c.startswith(PREFIX)]
        if len(names) != 1:
            return "", []
        return names[0], [(int(r["epoch"]), float(r[names[0]])) for r in reader]


def _fidelity_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)


def progress_hook(cfg, reference: Path, arch: Arch, *, device: str | torch.device) -> FidProgress | None:
    """The FID-over-training hook the train stage installs, from ``evaluate.progress_*`` (None when off).

    ``reference`` is the prepared dataset; its ``evaluate.reference_split`` is the reference,
    so the statistics are the very ones the evaluate stage uses (computed once, cached).
    """
    from aigc_pipeline.data.prepared import load_prepared
    from aigc_pipeline.errors import DataError
    from aigc_pipeline.evaluation.inception import resolve_inception_weights

    ecfg = cfg.evaluate
    if ecfg.progress_every <= 0:
        return None
    real = load_prepared(reference, ecfg.reference_split)
    if tuple(real.images.shape[1:]) != (arch.channels, arch.size, arch.size):
        raise DataError(
            f"FID over training: reference {reference} holds images of shape "
            f"{tuple(real.images.shape[1:])}, the model makes {(arch.channels, arch.size, arch.size)}"
        )
    return FidProgress(
        real.images,
        reference_digest=real.digest,
        reference_split=ecfg.reference_split,
        arch=arch,
        weights=resolve_inception_weights(ecfg.inception_weights),
        every=ecfg.progress_every,
        epochs=cfg.train.epochs,
        samples=ecfg.progress_samples,
        seed=ecfg.seed,
        batch_size=ecfg.batch_size,
        device=device,
    )
