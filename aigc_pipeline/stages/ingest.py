"""Ingest: read a dataset source, validate and normalise every image, write a prepared dataset."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from aigc_pipeline.config import Config, DatasetConfig
from aigc_pipeline.data.normalize import normalize
from aigc_pipeline.data.prepared import load_prepared, split_for, write_prepared
from aigc_pipeline.data.sources import get_source
from aigc_pipeline.errors import DataError
from aigc_pipeline.images import save_grid
from aigc_pipeline.io import atomic_dir, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class IngestResult:
    out: Path
    accepted: int
    rejected: int
    duplicates: int
    digest: str
    splits: dict[str, int]


def run(cfg: Config, out: Path, *, dataset: str | None = None, project_dir: Path = Path(".")) -> IngestResult:
    """Prepare ``dataset`` (default: ``cfg.dataset``) into ``out``, replacing it atomically."""
    name = dataset or cfg.dataset
    if name not in cfg.datasets:
        raise DataError(f"dataset {name!r} is not registered in params.yaml (known: {', '.join(cfg.datasets)})")
    dcfg = cfg.datasets[name]
    report: dict = {"dataset": name, "source": dcfg.source, "rejected": [], "duplicates": []}

    with atomic_dir(out) as tmp:
        meta = write_prepared(
            tmp,
            _accepted(dcfg, project_dir, cfg.ingest.eval_fraction, report),
            size=dcfg.size,
            channels=dcfg.channels,
        )
        total = meta["count"] + len(report["rejected"])
        if meta["count"] == 0:
            raise DataError(f"dataset {name!r}: no usable image (rejected {len(report['rejected'])})")
        share = len(report["rejected"]) / total
        if share > cfg.ingest.max_rejected_fraction:
            raise DataError(
                f"dataset {name!r}: {share:.1%} of images rejected, above "
                f"ingest.max_rejected_fraction={cfg.ingest.max_rejected_fraction}; see the reasons: "
                + "; ".join(f"{r['path']}: {r['reason']}" for r in report["rejected"][:5])
            )
        data = load_prepared(tmp)
        splits = dict(Counter(_splits(tmp)))
        per_class = {data.classes[k]: int(v) for k, v in sorted(Counter(data.labels.tolist()).items()) if k >= 0}
        report.update(
            accepted=meta["count"],
            per_class=per_class,
            splits=splits,
            digest=meta["digest"],
            size=dcfg.size,
            channels=dcfg.channels,
        )
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "card.md", _card(name, dcfg, data.images, report))
        save_grid(data.images[:64], tmp / "preview.png", nrow=8)
    return IngestResult(
        out=out,
        accepted=meta["count"],
        rejected=len(report["rejected"]),
        duplicates=len(report["duplicates"]),
        digest=meta["digest"],
        splits=splits,
    )


def _splits(root: Path) -> list[str]:
    import pandas as pd

    return pd.read_parquet(root / "manifest.parquet", columns=["split"])["split"].tolist()


def _accepted(
    dcfg: DatasetConfig, project_dir: Path, eval_fraction: float, report: dict
) -> Iterator[tuple[np.ndarray, dict]]:
    """Normalise source samples; record rejected and duplicate ones in ``report``."""
    seen: dict[str, str] = {}
    kept = 0
    for sample in get_source(dcfg.source)(dcfg, project_dir):
        if dcfg.limit and kept >= dcfg.limit:
            break
        try:
            img = normalize(sample.pixels, size=dcfg.size, channels=dcfg.channels)
        except (ValueError, OSError) as e:
            report["rejected"].append({"path": sample.key, "reason": f"cannot normalise: {e}"})
            continue
        sha = hashlib.sha256(img.tobytes()).hexdigest()
        if sha in seen:
            report["duplicates"].append({"path": sample.key, "duplicate_of": seen[sha]})
            continue
        seen[sha] = sample.key
        kept += 1
        yield img, {"key": sample.key, "sha256": sha, "label": sample.label, "split": split_for(sha, eval_fraction)}


def _card(name: str, dcfg: DatasetConfig, images: np.ndarray, report: dict) -> str:
    x = images.astype(np.float64) / 255.0
    mean = ", ".join(f"{m:.4f}" for m in x.mean(axis=(0, 2, 3)))
    std = ", ".join(f"{s:.4f}" for s in x.std(axis=(0, 2, 3)))
    classes = "\n".join(f"| {c} | {n} |" for c, n in report["per_class"].items()) or "| (unlabelled) | |"
    return f"""# Dataset card: {name}

- source: `{dcfg.source}`
- images: {report['accepted']} accepted, {len(report['rejected'])} rejected, {len(report['duplicates'])} exact duplicates dropped
- size: {dcfg.size}x{dcfg.size}, {dcfg.channels} channel(s), uint8
- splits (by content hash): {', '.join(f'{k}: {v}' for k, v in sorted(report['splits'].items()))}
- pixel mean (0..1, per channel): {mean}
- pixel std (0..1, per channel): {std}
- content digest: `{report['digest']}`

| class | images |
| --- | --- |
{classes}

![preview](preview.png)
"""
