"""Augment: add seeded augmented copies of the training split; output is a prepared dataset.

The operations and their order are described in :mod:`aigc_pipeline.data.augment`."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aigc_pipeline.config import Config
from aigc_pipeline.data.augment import augment_image, image_rng
from aigc_pipeline.data.prepared import iter_prepared, read_meta, write_prepared
from aigc_pipeline.errors import DataError
from aigc_pipeline.images import save_grid
from aigc_pipeline.io import atomic_dir, atomic_write_json


@dataclass(frozen=True)
class AugmentResult:
    out: Path
    originals: int
    count: int
    digest: str


def run(cfg: Config, prepared: Path, out: Path) -> AugmentResult:
    """Write the training split of ``prepared`` plus ``augment.copies`` variants per image to ``out``.

    Streams: images are read one shard at a time and written through the shard writer, so memory
    does not grow with the dataset (``python -m bench memory``)."""
    meta = read_meta(prepared)
    acfg = cfg.augment
    preview: list[np.ndarray] = []
    preview_count = 8 * (1 + acfg.copies) * 2
    originals = 0

    def samples() -> Iterator[tuple[np.ndarray, dict]]:
        nonlocal originals
        for i, (img, row) in enumerate(iter_prepared(prepared, "train")):
            originals += 1
            label = None if pd.isna(row.label) else row.label
            variants = [(img, {"key": row.key, "sha256": row.sha256, "label": label, "split": "train"})]
            for c in range(acfg.copies):
                aug = augment_image(img, acfg, image_rng(acfg.seed, i, c))
                sha = hashlib.sha256(aug.tobytes()).hexdigest()
                variants.append((aug, {"key": f"{row.key}#aug{c}", "sha256": sha, "label": label, "split": "train"}))
            for image, record in variants:
                if len(preview) < preview_count:
                    preview.append(np.array(image))
                yield image, record

    with atomic_dir(out) as tmp:
        new_meta = write_prepared(tmp, samples(), size=meta["size"], channels=meta["channels"])
        if not originals:
            raise DataError(f"{prepared}: the 'train' split is empty")
        atomic_write_json(
            tmp / "report.json",
            {
                "source_digest": meta["digest"],
                "originals": originals,
                "count": new_meta["count"],
                "augment": dataclasses.asdict(acfg),
                # Colour jitter applies to RGB images only (see aigc_pipeline/data/augment.py).
                "color_jitter_applied": meta["channels"] == 3
                and any((acfg.brightness, acfg.contrast, acfg.saturation)),
            },
        )
        save_grid(np.stack(preview), tmp / "preview.png", nrow=2 * (1 + acfg.copies))
    return AugmentResult(out=out, originals=originals, count=new_meta["count"], digest=new_meta["digest"])
