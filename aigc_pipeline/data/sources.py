"""Registry of dataset sources. A source turns a :class:`DatasetConfig` into raw samples.

Adding a source is a function plus one ``@register_source("name")`` line; params.yaml
then picks it with ``datasets.<name>.source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from aigc_pipeline.config import DatasetConfig
from aigc_pipeline.errors import ConfigError


@dataclass(frozen=True)
class RawSample:
    """One source image before normalisation."""

    key: str  # stable identifier within the source (a relative path or an index)
    pixels: np.ndarray  # uint8, HxW or HxWxC
    label: str | None = None


SourceFn = Callable[[DatasetConfig, Path], Iterator[RawSample]]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Register a source reader under ``name`` (unique)."""

    def deco(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"source {name!r} is already registered")
        SOURCES[name] = fn
        return fn

    return deco


def get_source(name: str) -> SourceFn:
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"source: unknown source {name!r} (known: {', '.join(sorted(SOURCES))})") from None


@register_source("sklearn-digits")
def sklearn_digits(cfg: DatasetConfig, project_dir: Path) -> Iterator[RawSample]:
    """scikit-learn's bundled 8x8 digits: 1797 images, values 0..16, labels 0..9 (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255 with rounding, so the full uint8 range is used.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images, digits.target)):
        yield RawSample(key=f"digits/{i:05d}", pixels=img, label=str(int(label)))
