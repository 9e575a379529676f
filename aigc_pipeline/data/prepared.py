"""The prepared-dataset format shared by ingest, augment, train and evaluate.

A prepared dataset is a folder:
- ``shard-NNNNN.npy``: uint8 arrays [n, C, H, W], at most ``SHARD_SIZE`` images and
  ``SHARD_BYTES`` of pixels each (so fewer images per shard at large sizes);
- ``manifest.parquet``: one row per image: ``key``, ``sha256`` (of its pixels), ``label``
  (class name or null), ``label_id`` (-1 when unlabelled), ``split`` (train | eval),
  ``shard``, ``offset``;
- ``meta.json``: size, channels, classes, count and ``digest``, a content hash of the whole set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from aigc_pipeline.errors import DataError
from aigc_pipeline.io import atomic_write_json

SHARD_SIZE = 4096
SHARD_BYTES = 32 * 2**20  # the writer holds one shard in memory: this bounds it whatever the image size
Split = Literal["train", "eval", "all"]


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset loaded in memory (uint8, as stored)."""

    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N], -1 when unlabelled
    classes: tuple[str, ...]
    digest: str  # content hash of the selected images, labels and split
    root: Path

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_for(sha256: str, eval_fraction: float) -> str:
    """Deterministic split from the content hash: the same image always lands in the same split."""
    return "eval" if int(sha256[:8], 16) / 0x1_0000_0000 < eval_fraction else "train"


def content_digest(manifest: pd.DataFrame, shape: tuple[int, int, int]) -> str:
    """sha256 over (pixel hash, label, split) rows in order, plus the image shape."""
    h = hashlib.sha256(json.dumps(list(shape)).encode())
    for sha, label, split in zip(manifest["sha256"], manifest["label"], manifest["split"]):
        h.update(f"{sha}\t{label}\t{split}\n".encode())
    return h.hexdigest()


def _class_order(labels: Iterable[str]) -> list[str]:
    """Sorted class names; numeric names sort as numbers (so "10" follows "9")."""
    names = set(labels)
    return sorted(names, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))


def shard_capacity(shape: tuple[int, int, int]) -> int:
    """Images per shard for images of ``shape`` (C, H, W)."""
    return max(1, min(SHARD_SIZE, SHARD_BYTES // int(np.prod(shape))))


def write_prepared(
    out: Path,
    samples: Iterable[tuple[np.ndarray, dict]],
    *,
    size: int,
    channels: int,
) -> dict:
    """Write shards, manifest and meta into ``out`` (an empty, temporary folder).

    ``samples`` yields ``(uint8 [C, H, W] image, row)`` pairs, row holding ``key``, ``sha256``,
    ``label`` and ``split``. Memory stays flat as the dataset grows: images go into one reused
    shard buffer (at most ``SHARD_BYTES``), rows into compact columns. Returns the meta dict.
    """
    shape = (channels, size, size)
    capacity = shard_capacity(shape)
    buffer: np.ndarray | None = None  # allocated on the first image; pages become resident as it fills
    filled = 0
    shard_idx = 0
    columns: dict[str, list] = {"key": [], "sha256": [], "label": [], "split": [], "shard": [], "offset": []}

    def flush() -> None:
        nonlocal filled, shard_idx
        if filled:
            assert buffer is not None  # allocated by the first image
            np.save(out / f"shard-{shard_idx:05d}.npy", buffer[:filled])  # a contiguous slice: no copy
            filled, shard_idx = 0, shard_idx + 1

    for img, row in samples:
        if img.shape != shape or img.dtype != np.uint8:
            raise AssertionError(f"image {row['key']} has {img.dtype} {img.shape}, expected uint8 {shape}")
        if buffer is None:
            buffer = np.empty((capacity, *shape), dtype=np.uint8)
        buffer[filled] = img
        for name in ("key", "sha256", "label", "split"):
            columns[name].append(row[name])
        columns["shard"].append(shard_idx)
        columns["offset"].append(filled)
        filled += 1
        if filled == capacity:
            flush()
    flush()
    classes = _class_order(label for label in columns["label"] if label is not None)
    index = {c: i for i, c in enumerate(classes)}
    label_ids = [index[label] if label is not None else -1 for label in columns["label"]]
    manifest = pd.DataFrame(
        {
            "key": columns["key"],
            "sha256": columns["sha256"],
            "label": columns["label"],
            "label_id": label_ids,
            "split": columns["split"],
            "shard": columns["shard"],
            "offset": columns["offset"],
        },
        columns=["key", "sha256", "label", "label_id", "split", "shard", "offset"],
    )
    del columns, label_ids
    manifest.to_parquet(out / "manifest.parquet", index=False)
    meta = {
        "format": 1,
        "size": size,
        "channels": channels,
        "count": len(manifest),
        "classes": classes,
        "digest": content_digest(manifest, shape),
    }
    atomic_write_json(out / "meta.json", meta)
    return meta


def read_meta(root: Path) -> dict:
    path = Path(root) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; is {root} a prepared dataset (run `aigc ingest` first)?") from None


def load_prepared(root: Path | str, split: Split = "all") -> PreparedData:
    """Load a prepared dataset, optionally one split, into memory."""
    root = Path(root)
    meta = read_meta(root)
    manifest = pd.read_parquet(root / "manifest.parquet")
    shards = [np.load(root / f"shard-{i:05d}.npy", mmap_mode="r") for i in sorted(set(manifest["shard"]))]
    if split != "all":
        manifest = manifest[manifest["split"] == split]
    if manifest.empty:
        raise DataError(f"{root}: the '{split}' split is empty")
    images = np.empty((len(manifest), meta["channels"], meta["size"], meta["size"]), dtype=np.uint8)
    for i, (s, o) in enumerate(zip(manifest["shard"], manifest["offset"])):
        images[i] = shards[s][o]
    shape = (meta["channels"], meta["size"], meta["size"])
    return PreparedData(
        images=images,
        labels=manifest["label_id"].to_numpy(dtype=np.int64),
        classes=tuple(meta["classes"]),
        digest=meta["digest"] if split == "all" else content_digest(manifest, shape),
        root=root,
    )


def iter_prepared(root: Path | str, split: Split = "all") -> Iterator[tuple[np.ndarray, Any]]:
    """``(uint8 [C, H, W] image, manifest row as a named tuple)`` of a prepared dataset in manifest order, reading one
    shard at a time: memory stays at one shard (``SHARD_BYTES``) whatever the dataset's size."""
    root = Path(root)
    manifest = pd.read_parquet(root / "manifest.parquet")
    if split != "all":
        manifest = manifest[manifest["split"] == split].reset_index(drop=True)
    loaded, shard = -1, None
    for row in manifest.itertuples(index=False):
        if row.shard != loaded:  # the writers fill shards in manifest order: each is read once
            loaded, shard = int(row.shard), None
            shard = np.load(root / f"shard-{loaded:05d}.npy")
        assert shard is not None  # the first row (shard != -1) loaded one
        yield shard[int(row.offset)], row
