"""The prepared dataset as an MLflow run input, identified by DVC's content hash.

:func:`log_prepared_dataset`, called inside the register stage's MLflow run:

- finds the output of the dataset's ``ingest@NAME`` stage in ``dvc.lock``: its path and the
  hash DVC recorded for it (``<md5>.dir`` for a folder);
- recomputes that hash from the files on disk the way DVC does (:func:`dvc_md5`) and refuses a
  prepared dataset that no longer matches the lock (the digest must name the data really used);
- logs ``card.md``, ``preview.png`` and ``report.json`` as artifacts under ``datasets/NAME/``,
  and the dataset itself with ``mlflow.log_input``: its name, the DVC hash as the digest, the
  folder as a local source, the counts (accepted, rejected, duplicates, splits, per class) as
  the profile and a uint8 image tensor schema.

Without a ``dvc.lock`` entry for the stage (a stage function called outside DVC and the flow)
there is no DVC hash to point at: nothing is logged and ``None`` is returned.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.schema import TensorDatasetSchema
from mlflow.types import Schema, TensorSpec

from aigc_pipeline.errors import DataError

INGEST_STAGE = "ingest@{name}"  # dvc.yaml's foreach stage that prepares dataset NAME
ARTIFACTS = ("card.md", "preview.png", "report.json")


@dataclass(frozen=True)
class LoggedDataset:
    name: str
    digest: str  # DVC's hash of the prepared dataset, as in dvc.lock
    path: Path
    profile: dict[str, Any]


def dvc_md5(path: Path | str) -> str:
    """The hash DVC 3 records for ``path``: the md5 of a file, or for a folder the md5 of the JSON
    list of ``{"md5", "relpath"}`` of its files (sorted by relative path) followed by ``.dir``.

    Files DVC ignores (``.dvcignore``) are not expected inside a prepared dataset.
    """
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    if not path.is_dir():
        raise DataError(f"{path}: not found")
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            full = Path(root) / name
            entries.append({"md5": _file_md5(full), "relpath": full.relative_to(path).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def locked_output(project_dir: Path | str, stage: str) -> tuple[Path, str] | None:
    """``(path, hash)`` of the single output DVC recorded for ``stage`` in dvc.lock, or None."""
    lock = Path(project_dir) / "dvc.lock"
    if not lock.exists():
        return None
    entry = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(stage)
    if not entry:
        return None
    outs = entry.get("outs") or []
    if len(outs) != 1 or not outs[0].get("md5"):
        raise DataError(f"{lock}: stage {stage} should record one output with an md5, found {outs}")
    path = Path(outs[0]["path"])
    return (path if path.is_absolute() else Path(project_dir) / path), outs[0]["md5"]


def log_prepared_dataset(project_dir: Path | str, name: str, *, context: str = "training") -> LoggedDataset | None:
    """Log dataset ``name``'s prepared folder to the active MLflow run (see the module docstring)."""
    stage = INGEST_STAGE.format(name=name)
    found = locked_output(project_dir, stage)
    if found is None:
        return None
    path, recorded = found
    current = dvc_md5(path)
    if current != recorded:
        raise DataError(f"{path}: its content (DVC hash {current}) is not what dvc.lock records for stage {stage} "
                        f"({recorded}); run `dvc repro` (or `dvc commit {stage}` if the change is intended)")
    report = json.loads((path / "report.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    profile = {
        "images": report["accepted"],
        "rejected": len(report["rejected"]),
        "duplicates": len(report["duplicates"]),
        "skipped": len(report.get("skipped", [])),
        "splits": report["splits"],
        "per_class": report["per_class"],
        "size": meta["size"],
        "channels": meta["channels"],
        "content_digest": meta["digest"],
    }
    for artifact in ARTIFACTS:
        mlflow.log_artifact(str(path / artifact), f"datasets/{name}")
    dataset = PreparedDataset(path, name=name, digest=recorded, profile=profile,
                              labelled=bool(meta["classes"]))
    _log_input(dataset, context=context, tags={"dvc.stage": stage, "aigc.source": str(report["source"])})
    return LoggedDataset(name=name, digest=recorded, path=path, profile=profile)


def _log_input(dataset: Dataset, **kwargs: Any) -> None:
    """``mlflow.log_input``, once more if a concurrent registration inserted the same dataset first.

    MLflow's SQL store looks the dataset up, then inserts it: two runs logging a new dataset at
    the same moment both insert, and the second fails on the unique key (experiment, name,
    digest). Then the row exists, and a second call links to it.
    """
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_input(dataset, **kwargs)
    except MlflowException as exc:
        text = str(exc)
        if not ("dataset" in text and ("duplicate key" in text or "UNIQUE constraint failed" in text)):
            raise
        mlflow.log_input(dataset, **kwargs)


class PreparedDataset(Dataset):
    """A prepared dataset folder for ``mlflow.log_input``: digest, counts and schema given, never computed."""

    def __init__(self, path: Path, *, name: str, digest: str, profile: dict, labelled: bool) -> None:
        self._profile = profile
        self._labelled = labelled
        source = get_dataset_source_from_json(json.dumps({"uri": str(Path(path).resolve())}), "local")
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:
        raise AssertionError("the digest is DVC's hash, always given")

    @property
    def profile(self) -> dict:
        return self._profile

    @property
    def schema(self) -> TensorDatasetSchema:
        c, s = self._profile["channels"], self._profile["size"]
        features = Schema([TensorSpec(np.dtype(np.uint8), (-1, c, s, s), "image")])
        targets = Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]) if self._labelled else None
        return TensorDatasetSchema(features=features, targets=targets)

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config.update(schema=json.dumps(self.schema.to_dict()), profile=json.dumps(self.profile))
        return config
