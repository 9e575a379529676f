"""Augment: add seeded augmented copies of the training split; output is a prepared dataset.

The operations and their order are described in :mod:`aigc_pipeline.data.augment`."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from aigc_pipeline.config import Config
from aigc_pipeline.data.augment import augment_image, image_rng
from aigc_pipeline.data.prepared import load_prepared, read_meta, write_prepared
from aigc_pipeline.images import save_grid
from aigc_pipeline.io import atomic_dir, atomic_write_json


@dataclass(frozen=True)
class AugmentResult:
    out: Path
    originals: int
    count: int
    digest: str


def run(cfg: Config, prepared: Path, out: Path) -> AugmentResult:
    """Write the training split of ``prepared`` plus ``augment.copies`` variants per image to ``out``."""
    meta = read_meta(prepared)
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    data = load_prepared(prepared, "train")
    acfg = cfg.augment

    def samples() -> Iterator[tuple[np.ndarray, dict]]:
        for i, (img, key, label) in enumerate(zip(data.images, train["key"], train["label"])):
            label = None if pd.isna(label) else label
            yield img, {"key": key, "sha256": train["sha256"][i], "label": label, "split": "train"}
            for c in range(acfg.copies):
                aug = augment_image(img, acfg, image_rng(acfg.seed, i, c))
                sha = hashlib.sha256(aug.tobytes()).hexdigest()
                yield aug, {"key": f"{key}#aug{c}", "sha256": sha, "label": label, "split": "train"}

    with atomic_dir(out) as tmp:
        new_meta = write_prepared(tmp, samples(), size=meta["size"], channels=meta["channels"])
        atomic_write_json(
            tmp / "report.json",
            {"source_digest": meta["digest"], "originals": len(train), "count": new_meta["count"],
             "augment": dataclasses.asdict(acfg),
             # Colour jitter applies to RGB images only (see aigc_pipeline/data/augment.py).
             "color_jitter_applied": meta["channels"] == 3 and any((acfg.brightness, acfg.contrast, acfg.saturation))},
        )
        preview = load_prepared(tmp).images[: 8 * (1 + acfg.copies) * 2]
        save_grid(preview, tmp / "preview.png", nrow=2 * (1 + acfg.copies))
    return AugmentResult(out=out, originals=len(train), count=new_meta["count"], digest=new_meta["digest"])
