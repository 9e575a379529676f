"""What an evaluation will put through Inception, known before it starts.

A model's evaluation computes the Inception features of its samples every time, and of real
images whose cached entries are missing (the reference split's features, the floor, the training
split for the copying check), once per dataset version and protocol. On a dataset's first run on
a CPU that once can take longer than training: the training plan prices it and the evaluation's
first line names it, both from :func:`inception_work`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc_pipeline.config import EvaluateConfig
from aigc_pipeline.data.prepared import Split, load_prepared
from aigc_pipeline.errors import DataError
from aigc_pipeline.evaluation.floor import FLOOR_SPLIT, floor_cached
from aigc_pipeline.evaluation.inception import InceptionWeights, resolve_inception_weights

__all__ = ["COPY_SPLITS", "InceptionWork", "inception_work"]

COPY_SPLITS: tuple[Split, Split] = ("train", "eval")  # the copying check: samples against train, calibrated on eval


@dataclass(frozen=True)
class InceptionWork:
    """The images an evaluation puts through Inception: its samples every time, and the real images
    whose cached features or floor are missing (``once``: what, count), computed once per dataset
    version and protocol and read from the cache afterwards."""

    samples: int
    once: tuple[tuple[str, int], ...] = ()
    copying: int = 0  # of the images in ``once``, those only the copying check needs

    @property
    def images(self) -> int:
        return self.samples + sum(count for _, count in self.once)

    def describe(self) -> str:
        """E.g. ``Inception features of 300 samples and, once per dataset version, of 4326 real
        images (300 for the floor, 4026 of the train split for the copying check)``."""
        text = f"Inception features of {self.samples} samples"
        if self.once:
            parts = ", ".join(f"{count} {what}" for what, count in self.once)
            text += f" and, once per dataset version, of {self.images - self.samples} real images ({parts})"
        return text


def inception_work(
    ecfg: EvaluateConfig,
    reference: Path,
    *,
    weights: InceptionWeights | None = None,
    split_of: Callable[[Split], Any] | None = None,
) -> InceptionWork:
    """What the evaluate stage puts through Inception when it scores a model against ``reference``
    (a prepared dataset) under ``ecfg``, the caches being as they are now. A split that is missing
    is left out, as the stage leaves out the score that needs it. ``weights`` and ``split_of`` (a
    split's loader) spare a caller that holds them a second hashing and loading."""
    from aigc_pipeline.evaluation.reference import reference_cached

    if weights is None:
        weights = resolve_inception_weights(ecfg.inception_weights)
    split = split_of or functools.cache(functools.partial(load_prepared, reference))

    # (what, count, cached) per pass, in the stage's order; a split's features are one cache entry
    passes: dict[str, tuple[str, int, bool]] = {}
    copying = 0
    try:
        real = split(ecfg.reference_split)
        passes[ecfg.reference_split] = (
            f"of the {ecfg.reference_split} split for the reference",
            len(real.images),
            reference_cached(real.images, reference_key=real.digest, weights=weights),
        )
        pool = split(FLOOR_SPLIT[ecfg.reference_split]).images
        cached = floor_cached(
            pool, real.images, num_samples=ecfg.num_samples, seed=ecfg.seed, weights=weights, bootstrap=ecfg.bootstrap
        )
        passes["floor"] = ("for the floor", min(ecfg.num_samples, len(pool)), cached)
        for name in COPY_SPLITS if ecfg.copy_check else ():
            if name not in passes:
                part = split(name)
                cached = reference_cached(part.images, reference_key=part.digest, weights=weights)
                passes[name] = (f"of the {name} split for the copying check", len(part.images), cached)
                copying += 0 if cached else len(part.images)
    except DataError:
        pass  # the stage fails on a missing reference split, and reports the floor or copying check unavailable
    once = tuple((what, count) for what, count, cached in passes.values() if not cached)
    return InceptionWork(samples=ecfg.num_samples, once=once, copying=copying)
