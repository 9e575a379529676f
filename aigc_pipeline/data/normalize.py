"""Normalise raw pixels to the dataset's channel count and size.

Rules (documented in docs/datasets.md):
- channels: grayscale -> RGB repeats the channel; RGB -> grayscale uses ITU-R 601 luma (PIL's "L").
- size: the shorter side is scaled to ``size`` (bilinear when enlarging; when shrinking, a box
  reduction by an integer factor down to no less than twice the target, then bicubic with
  antialiasing, i.e. Pillow's ``reducing_gap=2``), then the centre is cropped to a square. JPEG
  files are already decoded at a reduced DCT scale of at least twice the target
  (:mod:`aigc_pipeline.data.validate`).

Decoded files reach :func:`normalize_image` already in mode "L" or "RGB" (see
:mod:`aigc_pipeline.data.validate` for the colour-mode, alpha and bit-depth rules).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

REDUCING_GAP = 2.0


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
        # Shrinking: a box reduction by an integer factor to within 2x of the target, then bicubic
        # (Pillow's thumbnail strategy; indistinguishable from a full bicubic at a fraction of the cost).
        resample = Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BICUBIC
        gap = None if scale > 1 else REDUCING_GAP
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample, reducing_gap=gap)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)
