"""Seeded offline augmentation of uint8 images [C, H, W]."""

from __future__ import annotations

import numpy as np

from aigc_pipeline.config import AugmentConfig


def augment_image(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip (if enabled) and a random shift of up to ``max_shift`` pixels.

    The shift pads by edge replication and crops back to the original size, so no black
    border is invented on images whose background is not black.
    """
    out = img
    if cfg.hflip and rng.random() < 0.5:
        out = out[:, :, ::-1]
    if cfg.max_shift:
        s = cfg.max_shift
        padded = np.pad(out, ((0, 0), (s, s), (s, s)), mode="edge")
        dy, dx = rng.integers(0, 2 * s + 1, size=2)
        h, w = out.shape[1:]
        out = padded[:, dy : dy + h, dx : dx + w]
    return np.ascontiguousarray(out)


def image_rng(seed: int, index: int, copy: int) -> np.random.Generator:
    """One independent stream per (seed, image, copy): output does not depend on processing order."""
    return np.random.default_rng([seed, index, copy])
