"""Normalise raw pixels to the dataset's channel count and size.

Rules (documented in the README):
- channels: grayscale -> RGB repeats the channel; RGB -> grayscale uses ITU-R 601 luma (PIL's "L").
- size: the shorter side is scaled to ``size`` (bicubic with antialiasing when shrinking, bilinear
  when enlarging), then the centre is cropped to a square.

Decoded files reach :func:`normalize_image` already in mode "L" or "RGB" (see
:mod:`aigc_pipeline.data.validate` for the colour-mode, alpha and bit-depth rules).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def normalize(pixels: np.ndarray, *, size: int, channels: int) -> np.ndarray:
    """Return a uint8 array [channels, size, size] from uint8 HxW or HxWxC pixels."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return normalize_image(Image.fromarray(pixels), size=size, channels=channels)


def normalize_image(img: Image.Image, *, size: int, channels: int) -> np.ndarray:
    """Return a uint8 array [channels, size, size] from a PIL image (mode "L" or "RGB" expected)."""
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1.0:
        resample = Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BICUBIC
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample, reducing_gap=None)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)
