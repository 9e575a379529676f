"""Ingest: read a dataset source, validate and normalise every image, write a prepared dataset.

The source is streamed: files are decoded in worker processes (ordered, so the result does not
depend on the number of workers), accepted images go straight into the shard writer, and the
report, card statistics and preview are accumulated on the way; no stage holds the whole dataset.

``report.json`` lists ``accepted`` (count), ``rejected`` (``{"path", "reason"}``, path relative
to the source root), ``duplicates`` (``{"path", "duplicate_of"}``), ``skipped`` (non-image
files), ``per_class`` and ``splits``.

Failure: when nothing usable is left, when the rejected share (rejected / (accepted + rejected))
is above ``ingest.max_rejected_fraction``, or when the source cannot be read, a
:class:`DataError` is raised and the previous prepared dataset at ``out`` (if any) is left
untouched: the failed attempt's report is written *beside* it, as ``<out>.failed-report.json``
(e.g. ``data/prepared/pets.failed-report.json``), never inside the DVC-tracked folder. A later
successful ingest removes that file.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aigc_pipeline.config import Config, DatasetConfig
from aigc_pipeline.data.parallel import default_workers, ordered_map
from aigc_pipeline.data.prepared import split_for, write_prepared
from aigc_pipeline.data.records import Rejected, Skipped
from aigc_pipeline.data.sources import SOURCE_OPTIONS, get_source
from aigc_pipeline.data.validate import MEMBER_BYTES_IN_FLIGHT, DecodeSpec, in_memory_bytes, process_chunk
from aigc_pipeline.errors import DataError
from aigc_pipeline.images import save_grid
from aigc_pipeline.io import atomic_dir, atomic_write_json, atomic_write_text

PREVIEW = 64  # images in preview.png


@dataclass(frozen=True)
class IngestResult:
    out: Path
    accepted: int
    rejected: int
    duplicates: int
    digest: str
    splits: dict[str, int]
    skipped: int = 0
    report: Path | None = None


def run(
    cfg: Config,
    out: Path,
    *,
    dataset: str | None = None,
    project_dir: Path = Path("."),
    workers: int | None = None,
) -> IngestResult:
    """Prepare ``dataset`` (default: ``cfg.dataset``) into ``out``, replacing it atomically."""
    name = dataset or cfg.dataset
    if name not in cfg.datasets:
        raise DataError(f"dataset {name!r} is not registered in params.yaml (known: {', '.join(cfg.datasets)})")
    return prepare(
        cfg.datasets[name],
        out,
        name=name,
        eval_fraction=cfg.ingest.eval_fraction,
        max_rejected_fraction=cfg.ingest.max_rejected_fraction,
        project_dir=project_dir,
        workers=workers,
    )


def failure_report_path(out: Path) -> Path:
    """Where a failed ingest into ``out`` writes its report: beside ``out``, never inside it."""
    out = Path(out)
    return out.parent / f"{out.name}.failed-report.json"


def prepare(
    dcfg: DatasetConfig,
    out: Path,
    *,
    name: str,
    eval_fraction: float = 0.2,
    max_rejected_fraction: float = 0.1,
    project_dir: Path = Path("."),
    workers: int | None = None,
    threshold_name: str = "ingest.max_rejected_fraction",
) -> IngestResult:
    """Validate and prepare the source described by ``dcfg`` into ``out`` (see the module docstring).

    ``workers`` defaults to the usable CPU cores; ``threshold_name`` is how the error message
    names ``max_rejected_fraction`` (the CLI's ``--max-rejected`` for ad-hoc sources).
    """
    out = Path(out)
    report: dict = {
        "dataset": name,
        "source": dcfg.source,
        "path": dcfg.path,
        "status": "failed",
        "accepted": 0,
        "rejected": [],
        "duplicates": [],
        "skipped": [],
        "per_class": {},
    }
    stats = _Stats()
    failed = failure_report_path(out)
    try:
        with atomic_dir(out) as tmp:
            meta = write_prepared(
                tmp,
                _accepted(dcfg, project_dir, eval_fraction, report, stats, workers),
                size=dcfg.size,
                channels=dcfg.channels,
            )
            report.update(accepted=meta["count"], per_class={c: stats.per_class[c] for c in meta["classes"]})
            _check_usable(name, report, max_rejected_fraction, threshold_name)
            report.update(
                status="ok",
                splits=dict(sorted(stats.splits.items())),
                digest=meta["digest"],
                size=dcfg.size,
                channels=dcfg.channels,
            )
            atomic_write_json(tmp / "report.json", report)
            atomic_write_text(tmp / "card.md", _card(name, dcfg, stats, report))
            save_grid(np.stack(stats.preview), tmp / "preview.png", nrow=8)
    except DataError as e:
        report.update(
            error=str(e),
            accepted=sum(stats.splits.values()),
            per_class={c: stats.per_class[c] for c in sorted(stats.per_class)},
        )
        atomic_write_json(failed, report)
        kept = f"; the previous dataset at {out} is unchanged" if out.exists() else ""
        raise DataError(f"{e} (report: {failed}{kept})") from None
    failed.unlink(missing_ok=True)  # a stale failure report would contradict the new dataset
    return IngestResult(
        out=out,
        accepted=meta["count"],
        rejected=len(report["rejected"]),
        duplicates=len(report["duplicates"]),
        digest=meta["digest"],
        splits=report["splits"],
        skipped=len(report["skipped"]),
        report=out / "report.json",
    )


def _check_usable(name: str, report: dict, max_fraction: float, threshold_name: str) -> None:
    rejected = report["rejected"]
    reasons = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:5])
    if report["accepted"] == 0:
        raise DataError(
            f"dataset {name!r}: no usable image (rejected {len(rejected)}"
            + (f"; first reasons: {reasons})" if rejected else ")")
        )
    share = len(rejected) / (report["accepted"] + len(rejected))
    if share > max_fraction:
        raise DataError(
            f"dataset {name!r}: {share:.1%} of images rejected ({len(rejected)} of "
            f"{report['accepted'] + len(rejected)}), above {threshold_name}={max_fraction}; first reasons: {reasons}"
        )


@dataclass
class _Stats:
    """What the report, card and preview need, accumulated while streaming."""

    per_class: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    preview: list = field(default_factory=list)
    pixels: int = 0  # per channel
    total: np.ndarray | None = None  # int64 per-channel sums (exact, so the card does not depend on order)
    squares: np.ndarray | None = None

    def add(self, image: np.ndarray, label: str | None, split: str) -> None:
        if label is not None:
            self.per_class[label] += 1
        self.splits[split] += 1
        if len(self.preview) < PREVIEW:
            self.preview.append(image)
        x = image.reshape(image.shape[0], -1).astype(np.int64)
        total, squares = x.sum(axis=1), (x * x).sum(axis=1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.pixels += x.shape[1]


def _accepted(
    dcfg: DatasetConfig,
    project_dir: Path,
    eval_fraction: float,
    report: dict,
    stats: _Stats,
    workers: int | None,
) -> Iterator[tuple[np.ndarray, dict]]:
    """Decode and normalise source items in order; record rejected, skipped and duplicate ones in ``report``."""
    spec = DecodeSpec(
        size=dcfg.size,
        channels=dcfg.channels,
        background=dcfg.background,
        min_side=dcfg.min_side,
        max_pixels=dcfg.max_pixels,
    )
    options = SOURCE_OPTIONS.get(dcfg.source)
    # In-memory sources (sklearn-digits, torchvision) only resize small arrays: no worker processes.
    n_workers = (workers or default_workers()) if options and options.decodes_files else 1
    seen: dict[str, str] = {}
    kept = 0
    with (
        contextlib.closing(get_source(dcfg.source)(dcfg, project_dir)) as items,
        contextlib.closing(
            ordered_map(
                functools.partial(process_chunk, spec=spec),
                items,
                workers=n_workers,
                describe=lambda item: getattr(item, "key", repr(item)),
                preload=(process_chunk.__module__,),
                weight=in_memory_bytes,
                budget=MEMBER_BYTES_IN_FLIGHT,
            )
        ) as outcomes,
    ):
        for outcome in outcomes:
            if dcfg.limit and kept >= dcfg.limit:
                break
            if isinstance(outcome, Skipped):
                report["skipped"].append({"path": outcome.key, "reason": outcome.reason})
                continue
            if isinstance(outcome, Rejected):
                report["rejected"].append({"path": outcome.key, "reason": outcome.reason})
                continue
            if outcome.sha256 in seen:
                report["duplicates"].append({"path": outcome.key, "duplicate_of": seen[outcome.sha256]})
                continue
            seen[outcome.sha256] = outcome.key
            kept += 1
            split = split_for(outcome.sha256, eval_fraction)
            stats.add(outcome.image, outcome.label, split)
            yield outcome.image, {"key": outcome.key, "sha256": outcome.sha256, "label": outcome.label, "split": split}


def _card(name: str, dcfg: DatasetConfig, stats: _Stats, report: dict) -> str:
    # _check_usable ran first (at least one image accepted): the sums are set
    assert stats.total is not None and stats.squares is not None
    n = stats.pixels
    mean = stats.total / n / 255.0
    std = np.sqrt(np.maximum(stats.squares / n - (stats.total / n) ** 2, 0.0)) / 255.0
    mean_s = ", ".join(f"{m:.4f}" for m in mean)
    std_s = ", ".join(f"{s:.4f}" for s in std)
    classes = "\n".join(f"| {c} | {k} |" for c, k in report["per_class"].items()) or "| (unlabelled) | |"
    skipped = f", {len(report['skipped'])} non-image files skipped" if report["skipped"] else ""
    dropped = f"{len(report['duplicates'])} exact duplicates dropped"
    return f"""# Dataset card: {name}

- source: `{dcfg.source}`
- images: {report["accepted"]} accepted, {len(report["rejected"])} rejected, {dropped}{skipped}
- size: {dcfg.size}x{dcfg.size}, {dcfg.channels} channel(s), uint8
- splits (by content hash): {", ".join(f"{k}: {v}" for k, v in sorted(report["splits"].items()))}
- pixel mean (0..1, per channel): {mean_s}
- pixel std (0..1, per channel): {std_s}
- content digest: `{report["digest"]}`

| class | images |
| --- | --- |
{classes}

![preview](preview.png)
"""
