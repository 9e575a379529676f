"""Seeded offline augmentation of uint8 images [C, H, W].

Each augmented copy applies, in this order, the operations that are switched on in
``augment`` (params.yaml), every random draw coming from the copy's own generator
(:func:`image_rng`), so the output is a function of (seed, image index, copy) only:

1. ``hflip``: mirror left-right with probability 1/2;
2. ``max_shift``: translate by up to that many pixels each way (edge pixels repeated, no black border);
3. ``max_rotation``: rotate by an angle drawn uniformly in [-max_rotation, +max_rotation] degrees
   (positive = counter-clockwise) about the image centre, bilinear, edge pixels repeated outside;
4. colour jitter, RGB images only (grayscale ones are left as they are): ``brightness``
   multiplies every value by a factor drawn in [1 - b, 1 + b]; ``contrast`` scales the distance
   to the image's mean luma by a factor in [1 - c, 1 + c]; ``saturation`` scales each pixel's
   distance to its own luma by a factor in [1 - s, 1 + s] (luma: ITU-R 601). Values are clipped
   to 0..255 after each step and rounded (half to even) once at the end.

A draw is made only for an operation that is on, so switching a new operation on leaves the
draws of the others unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from aigc_pipeline.config import AugmentConfig

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L" conversion


def augment_image(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One augmented copy of ``img`` (uint8 [C, H, W]) by the module's rules; same shape and dtype."""
    out = img
    if cfg.hflip and rng.random() < 0.5:
        out = out[:, :, ::-1]
    if cfg.max_shift:
        s = cfg.max_shift
        padded = np.pad(out, ((0, 0), (s, s), (s, s)), mode="edge")
        dy, dx = rng.integers(0, 2 * s + 1, size=2)
        h, w = out.shape[1:]
        out = padded[:, dy : dy + h, dx : dx + w]
    if cfg.max_rotation:
        out = rotate(out, float(rng.uniform(-cfg.max_rotation, cfg.max_rotation)))
    if out.shape[0] == 3 and (cfg.brightness or cfg.contrast or cfg.saturation):
        factors = [
            float(rng.uniform(1 - x, 1 + x)) if x else 1.0 for x in (cfg.brightness, cfg.contrast, cfg.saturation)
        ]
        out = color_jitter(out, *factors)
    return np.ascontiguousarray(out)


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate uint8 [C, H, W] counter-clockwise by ``degrees`` about the centre; bilinear, edges repeated."""
    _, h, w = img.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = ys - cy, xs - cx
    # Inverse map: where each output pixel comes from (rows grow downwards, so the signs of a
    # counter-clockwise turn as displayed are those of a clockwise one in (x, y)).
    sx = np.clip(cos * dx - sin * dy + cx, 0, w - 1)
    sy = np.clip(sin * dx + cos * dy + cy, 0, h - 1)
    x0, y0 = np.floor(sx).astype(np.intp), np.floor(sy).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = sx - x0, sy - y0
    src = img.astype(np.float64)
    top = src[:, y0, x0] * (1 - fx) + src[:, y0, x1] * fx
    bottom = src[:, y1, x0] * (1 - fx) + src[:, y1, x1] * fx
    return _to_uint8(top * (1 - fy) + bottom * fy)


def color_jitter(img: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Scale brightness, contrast and saturation of an RGB uint8 [3, H, W] image by the given factors."""
    if img.shape[0] != 3:
        raise ValueError(f"colour jitter needs an RGB image [3, H, W], got {img.shape}")
    x = img.astype(np.float64)
    if brightness != 1.0:
        x = np.clip(x * brightness, 0, 255)
    if contrast != 1.0:
        mean = float(np.tensordot(_LUMA, x, axes=1).mean())
        x = np.clip((x - mean) * contrast + mean, 0, 255)
    if saturation != 1.0:
        gray = np.tensordot(_LUMA, x, axes=1)[None]
        x = np.clip((x - gray) * saturation + gray, 0, 255)
    return _to_uint8(x)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def image_rng(seed: int, index: int, copy: int) -> np.random.Generator:
    """One independent stream per (seed, image, copy): output does not depend on processing order."""
    return np.random.default_rng([seed, index, copy])
