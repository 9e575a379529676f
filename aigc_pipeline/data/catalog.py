"""Datasets named by a path: infer the source type, build a params.yaml entry, scan it, register it.

Used by ``aigc ingest SOURCE --out DIR`` (ad-hoc, params.yaml untouched) and
``aigc dataset add NAME SOURCE`` (writes ``datasets.NAME``).

Source type from the path: a folder -> ``image-folder``; ``.zip``/``.tar``/``.tar.gz``/``.tgz``/
``.tar.bz2``/``.tbz2``/``.tar.xz``/``.txz`` -> ``archive``; ``.csv``/``.parquet``/``.pq`` -> ``manifest``.
``--labels``: ``folders`` or ``none`` for a folder or an archive, a column name (or ``none``) for a
manifest. Without it, a folder whose top level holds sub-folders and no image file is labelled by
folders; archives and manifests are unlabelled.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aigc_pipeline.config import PARAMS_FILE, DatasetConfig, config_from_dict, read_params, yaml_round_trip
from aigc_pipeline.data.archive import is_archive_name
from aigc_pipeline.data.files import is_ignored
from aigc_pipeline.data.records import Accepted, Rejected
from aigc_pipeline.data.sources import get_source
from aigc_pipeline.data.validate import DecodeSpec, has_image_extension, process
from aigc_pipeline.errors import ConfigError, DataError
from aigc_pipeline.io import atomic_write_text

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def infer_source(path: Path) -> str:
    """The registry source that reads ``path``, from what it is; DataError when it cannot tell."""
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_dir():
        return "image-folder"
    if is_archive_name(path):
        return "archive"
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    raise DataError(
        f"{path}: cannot tell the source type; expected a folder of images, a .zip/.tar(.gz/.bz2/.xz) "
        "archive or a .csv/.parquet manifest"
    )


def source_entry(
    path: Path, *, stored_path: str, labels: str | None = None, size: int | None = None, channels: int | None = None
) -> dict[str, Any]:
    """A ``datasets`` entry (plain dict, in params.yaml key order) for the source at ``path``.

    ``stored_path`` is what the entry records as ``path`` (relative to the project when inside it).
    """
    source = infer_source(path)
    entry: dict[str, Any] = {"source": source, "path": stored_path}
    if source == "manifest":
        if labels == "folders":
            raise ConfigError("--labels: a manifest takes a label column name (or none), not 'folders'")
        if labels not in (None, "none"):
            entry["label_column"] = labels
    else:
        if labels not in (None, "folders", "none"):
            raise ConfigError(f"--labels: must be folders or none for a folder or an archive, got {labels!r}")
        entry["labels"] = labels or (_guess_folder_labels(path) if source == "image-folder" else "none")
    entry["size"] = 32 if size is None else size
    entry["channels"] = 1 if channels is None else channels
    return entry


def _guess_folder_labels(root: Path) -> str:
    """ "folders" when the top level holds visible sub-folders and no image file, else "none"."""
    names = [e for e in os.scandir(root) if not is_ignored(e.name)]
    has_dirs = any(e.is_dir(follow_symlinks=False) for e in names)
    has_images = any(e.is_file() and has_image_extension(e.name) for e in names)
    return "folders" if has_dirs and not has_images else "none"


def stored_path(path: Path, project_dir: Path) -> str:
    """``path`` as params.yaml should record it: relative to the project when inside it, else absolute."""
    real, project = path.resolve(), Path(project_dir).resolve()
    try:
        return real.relative_to(project).as_posix()
    except ValueError:
        return str(real)


@dataclass(frozen=True)
class ScanResult:
    first_image: str  # key of the first decodable image
    rejected_before: list[dict]  # rejections met before it


def quick_scan(dcfg: DatasetConfig, project_dir: Path) -> ScanResult:
    """Decode the source's items in order until one image is usable; DataError when none is."""
    spec = DecodeSpec(
        size=dcfg.size,
        channels=dcfg.channels,
        background=dcfg.background,
        min_side=dcfg.min_side,
        max_pixels=dcfg.max_pixels,
    )
    rejected: list[dict] = []
    items = get_source(dcfg.source)(dcfg, project_dir)
    try:
        for item in items:
            outcome = process(item, spec)
            if isinstance(outcome, Accepted):
                return ScanResult(outcome.key, rejected)
            if isinstance(outcome, Rejected):
                rejected.append({"path": outcome.key, "reason": outcome.reason})
    finally:
        items.close()
    reasons = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:5])
    raise DataError(
        f"{dcfg.path}: no decodable image found" + (f" (rejected {len(rejected)}: {reasons})" if rejected else "")
    )


def check_dvc_hashable(path: Path) -> None:
    """Refuse a folder that DVC cannot hash as the ingest stage's dependency; DataError naming the entries.

    DVC stops with "No such file or directory" on a broken symbolic link and blocks forever on a
    FIFO (it opens every file to hash it); ``aigc ingest`` itself rejects both without reading them.
    """
    if not path.is_dir():
        return
    bad: list[str] = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(root) / name
            if full.is_symlink() and not full.exists():
                bad.append(f"{full.relative_to(path).as_posix()} (broken symbolic link)")
            elif not full.is_symlink() and not (full.is_file() or full.is_dir()):
                bad.append(f"{full.relative_to(path).as_posix()} (FIFO, socket or device)")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"{path}: DVC hashes a registered folder to tell when to re-ingest it and cannot hash "
            f"{shown}: remove them, then add the dataset again"
        )


def check_name(name: str) -> None:
    """A dataset name usable as a params.yaml key and in ``--set datasets.NAME.key=...``."""
    if not _NAME.match(name):
        raise ConfigError(
            f"datasets.{name}: a dataset name is letters, digits, '-' and '_' (starting with a letter or digit)"
        )


def add_dataset(project_dir: Path | str, name: str, entry: dict[str, Any], *, force: bool = False) -> Path:
    """Write ``datasets.<name>: entry`` into params.yaml, keeping its comments; atomic and validated.

    Refuses an existing name unless ``force``. The active ``dataset:`` is not changed.
    """
    check_name(name)
    path = Path(project_dir) / PARAMS_FILE
    current = read_params(path)
    if name in (current.get("datasets") or {}) and not force:
        raise ConfigError(f"datasets.{name}: already registered in {path} (pass --force to replace it)")
    rt = yaml_round_trip()
    doc = rt.load(path.read_text())
    if doc.get("datasets") is None:
        doc["datasets"] = {}
    doc["datasets"][name] = dict(entry)
    buf = io.StringIO()
    rt.dump(doc, buf)
    text = buf.getvalue()
    try:  # validate the file exactly as it will be written, before replacing it
        config_from_dict(yaml.safe_load(text))
    except ConfigError as e:
        raise ConfigError(f"{path}: not updated: {e}") from None
    atomic_write_text(path, text)
    return path
