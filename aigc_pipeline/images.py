"""Image grids and PNG encoding shared by every stage (numpy + PIL, no torchvision import)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from aigc_pipeline.io import atomic_write_bytes

# Grids are for people: images smaller than this are enlarged (nearest neighbour, an integer
# factor, so every pixel stays a visible square) before tiling; 8x8 digits become 32x32 cells.
MIN_CELL = 32


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, min_cell: int = MIN_CELL) -> np.ndarray:
    """Tile uint8 images [N, C, H, W] into one uint8 image [H', W', C] (C=1 squeezed); images
    smaller than ``min_cell`` pixels are enlarged by the smallest integer factor that reaches it."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    factor = max(1, -(-min_cell // max(1, min(images.shape[2:]))))
    if factor > 1:
        images = images.repeat(factor, axis=2).repeat(factor, axis=3)
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    grid = grid.transpose(1, 2, 0)
    return grid[:, :, 0] if c == 1 else grid


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: np.ndarray, path: Path | str, nrow: int | None = None) -> Path:
    """Write a PNG grid of uint8 images [N, C, H, W] atomically and return its path."""
    atomic_write_bytes(path, png_bytes(make_grid(images, nrow)))
    return Path(path)
