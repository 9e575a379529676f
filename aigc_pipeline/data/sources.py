"""Registry of dataset sources. A source turns a :class:`DatasetConfig` into raw samples.

Adding a source is a function plus one ``@register_source("name")`` line; params.yaml
then picks it with ``datasets.<name>.source``. A source is a generator yielding, in a
deterministic order, :class:`RawSample` (pixels in memory), :class:`EncodedSample` (a file or
archive member to decode, in parallel), :class:`Rejected` or :class:`Skipped` records
(see :mod:`aigc_pipeline.data.records`). It never decodes files itself: ingest does, with the
rules of :mod:`aigc_pipeline.data.validate`.

Built-in sources (``path`` is relative to the project folder unless absolute):

- ``sklearn-digits``: scikit-learn's bundled 8x8 digits (no download). It reads no file of the
  project; its optional ``path`` names the file DVC watches for it instead (``uv.lock``, which
  pins the scikit-learn version that ships the digits), since dvc.yaml's ingest stage depends on
  every dataset's ``path``.
- ``image-folder``: ``path`` is a folder; ``labels: folders`` labels each image with its first
  sub-folder (``cats/a.png`` -> ``cats``), ``labels: none`` (default) leaves images unlabelled.
- ``archive``: ``path`` is a .zip or .tar(.gz/.bz2/.xz) read in place, same ``labels`` option.
- ``manifest``: ``path`` is a .csv or .parquet file with a ``path_column`` (default ``path``) of
  file paths relative to the manifest's folder, and an optional ``label_column``; labels are
  stripped of surrounding spaces and an empty label rejects the row.
- ``torchvision``: ``variant`` MNIST | FashionMNIST | CIFAR10 from the torchvision layout under
  ``path``; the official train and test files are both read (train first; the pipeline makes its
  own content-hash split); ``download: true`` downloads them first (never by default).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aigc_pipeline.data.records import EncodedSample, RawSample, Rejected, Skipped, SourceItem
from aigc_pipeline.errors import ConfigError, DataError

if TYPE_CHECKING:  # config.py checks entries against this registry: importing it here would be a cycle
    from aigc_pipeline.config import DatasetConfig

__all__ = [
    "EncodedSample",
    "RawSample",
    "Rejected",
    "Skipped",
    "SOURCES",
    "SOURCE_OPTIONS",
    "SourceOptions",
    "get_source",
    "register_source",
    "source_path",
    "TORCHVISION_VARIANTS",
]

# A generator function: callers close() it when they stop early.
SourceFn = Callable[["DatasetConfig", Path], Generator[SourceItem, None, None]]
SOURCES: dict[str, SourceFn] = {}


@dataclass(frozen=True)
class SourceOptions:
    """What a source needs from its params.yaml entry (checked when params.yaml is loaded)."""

    requires: tuple[str, ...] = ()  # DatasetConfig fields that must be set
    options: tuple[str, ...] = ()  # source-specific fields it reads (others must stay unset)
    decodes_files: bool = False  # yields EncodedSample: decoded in worker processes


SOURCE_OPTIONS: dict[str, SourceOptions] = {}
# Fields that only some sources read; setting one for another source is a config error.
SOURCE_SPECIFIC_FIELDS = ("path", "labels", "path_column", "label_column", "variant", "download")


def register_source(
    name: str, *, requires: tuple[str, ...] = (), options: tuple[str, ...] = (), decodes_files: bool = False
) -> Callable[[SourceFn], SourceFn]:
    """Register a source reader under ``name`` (unique), with the config fields it uses."""

    def deco(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"source {name!r} is already registered")
        SOURCES[name] = fn
        SOURCE_OPTIONS[name] = SourceOptions(tuple(requires), tuple(options) + tuple(requires), decodes_files)
        return fn

    return deco


def get_source(name: str) -> SourceFn:
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"source: unknown source {name!r} (known: {', '.join(sorted(SOURCES))})") from None


def source_path(cfg: DatasetConfig, project_dir: Path) -> Path:
    """The dataset's ``path``, relative paths taken from the project folder."""
    if cfg.path is None:
        raise ConfigError(f"path: required for source {cfg.source}")
    p = Path(cfg.path).expanduser()
    return p if p.is_absolute() else Path(project_dir) / p


@register_source("sklearn-digits", options=("path",))
def sklearn_digits(cfg: DatasetConfig, project_dir: Path) -> Generator[RawSample, None, None]:
    """scikit-learn's bundled 8x8 digits: 1797 images, values 0..16, labels 0..9 (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255 with rounding, so the full uint8 range is used.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images, digits.target)):
        yield RawSample(key=f"digits/{i:05d}", pixels=img, label=str(int(label)))


@register_source("image-folder", requires=("path",), options=("labels",), decodes_files=True)
def image_folder(cfg: DatasetConfig, project_dir: Path) -> Generator[SourceItem, None, None]:
    """Every image file under a folder, in sorted order; labels from class folders or none."""
    from aigc_pipeline.data.files import walk_images

    root = source_path(cfg, project_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (datasets entry source: image-folder)")
    yield from walk_images(root, labels=cfg.labels or "none")


@register_source("archive", requires=("path",), options=("labels",), decodes_files=True)
def archive(cfg: DatasetConfig, project_dir: Path) -> Generator[SourceItem, None, None]:
    """The image members of a .zip or .tar(.gz/.bz2/.xz), read in place."""
    from aigc_pipeline.data.archive import read_archive

    yield from read_archive(source_path(cfg, project_dir), labels=cfg.labels or "none")


@register_source("manifest", requires=("path",), options=("path_column", "label_column"), decodes_files=True)
def manifest(cfg: DatasetConfig, project_dir: Path) -> Generator[SourceItem, None, None]:
    """Rows of a CSV or Parquet manifest: file paths relative to its folder, optional labels."""
    from aigc_pipeline.data.files import resolve_relative

    path = source_path(cfg, project_dir)
    table = _read_table(path, cfg.path_column or "path", cfg.label_column)
    root = path.parent.resolve()
    paths = table[cfg.path_column or "path"].tolist()
    labels = table[cfg.label_column].tolist() if cfg.label_column else [None] * len(paths)
    for row, (name, label) in enumerate(zip(paths, labels), start=1):
        if _missing(name) or not str(name).strip():
            yield Rejected(f"(row {row})", f"empty path in column {cfg.path_column or 'path'!r}")
            continue
        checked = resolve_relative(root, str(name))
        if isinstance(checked, Rejected):
            yield checked
            continue
        rel, real = checked
        if cfg.label_column:
            label = None if _missing(label) else str(label).strip()
            if not label:
                yield Rejected(rel, f"empty label in column {cfg.label_column!r} (row {row})")
                continue
        yield EncodedSample(rel, label, file=str(real))


def _missing(value: object) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _read_table(path: Path, path_column: str, label_column: str | None):
    """The manifest as a DataFrame with string-like columns; errors name the file and column."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"{path}: a manifest must be a .csv or .parquet file")
    try:
        if suffix == ".csv":
            # Strings, not inferred numbers: label "01" stays "01" and a missing label never turns "3" into "3.0".
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            table = pd.read_parquet(path, dtype_backend="numpy_nullable")
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read the manifest: {e}") from None
    for column, key in ((path_column, "path_column"), (label_column, "label_column")):
        if column is not None and column not in table.columns:
            raise DataError(f"{path}: no column {column!r} ({key}); columns: {', '.join(map(str, table.columns))}")
    return table


TORCHVISION_VARIANTS = ("MNIST", "FashionMNIST", "CIFAR10")


@register_source("torchvision", requires=("path", "variant"), options=("download",))
def torchvision_source(cfg: DatasetConfig, project_dir: Path) -> Generator[RawSample, None, None]:
    """MNIST, FashionMNIST or CIFAR10 from a local torchvision root (train then test files)."""
    import torchvision.datasets as tvd

    root = source_path(cfg, project_dir)
    variant = cfg.variant or ""
    cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST, "CIFAR10": tvd.CIFAR10}[variant]
    for split in ("train", "test"):
        try:
            ds = cls(str(root), train=split == "train", download=cfg.download)
        except RuntimeError as e:  # torchvision's "Dataset not found ..." for missing or corrupt files
            hint = "" if cfg.download else " (set `download: true` in its params.yaml entry to download it)"
            raise DataError(f"{root}: torchvision {variant} {split} files not found or corrupt: {e}{hint}") from None
        images = np.asarray(ds.data, dtype=np.uint8)  # N x H x W (MNIST-like) or N x H x W x 3 (CIFAR10)
        targets = [int(t) for t in ds.targets]
        for i, (img, target) in enumerate(zip(images, targets)):
            # MNIST's class names are "0 - zero"...: use the digit, as sklearn-digits does.
            label = str(target) if variant == "MNIST" else ds.classes[target]
            yield RawSample(key=f"{variant.lower()}/{split}/{i:05d}", pixels=img, label=label)
