"""The data of a pipeline run as MLflow run inputs, identified by DVC's content hashes.

A run has three dataset inputs, each with its role as the input's context
(:func:`log_dataset_inputs`):

- ``training``: the augmented set the model was trained on (``data/augmented/NAME``, the output
  of ``augment@NAME``), named ``NAME-augmented``;
- ``prepared``: the prepared set it was made from (``data/prepared/NAME``, ``ingest@NAME``), named
  ``NAME``;
- ``evaluation``: the ``evaluate.reference_split`` split of the prepared set, the real images the
  samples are scored against, named ``NAME-<split>``.

For the first two the digest is the hash DVC recorded for the folder in ``dvc.lock``
(``<md5>.dir``), recomputed from the files on disk the way DVC does (:func:`dvc_md5`): a folder
changed since DVC recorded it is refused, so the digest names the data really used. The
evaluation split's digest is its content hash (the one in the protocol id, ``eval-68707b3d…``),
cut to MLflow's 36 characters. The counts go into each input's profile, a uint8 image tensor
schema into its schema; the prepared set's ``card.md``, ``preview.png`` and ``report.json`` (the
augmented set's ``preview.png`` and ``report.json``) are logged under ``datasets/<input name>/``.
MLflow's markdown viewer renders only images with an absolute URL, so the logged card's
``![preview](preview.png)`` points at the MLflow UI's ``get-artifact`` URL of the logged preview
(:func:`aigc_pipeline.tracking.store.ui_url`); the card in the prepared folder is not changed.

Without a ``dvc.lock`` entry for a stage (a stage function called outside DVC and the flow)
there is no DVC hash to point at: that input is left out.
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
import pandas as pd
import yaml
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.schema import TensorDatasetSchema
from mlflow.types import Schema, TensorSpec

from aigc_pipeline.data.prepared import content_digest
from aigc_pipeline.errors import DataError

INGEST_STAGE = "ingest@{name}"  # dvc.yaml's foreach stage that prepares dataset NAME
AUGMENT_STAGE = "augment@{name}"  # ... and the one that augments it
ARTIFACTS = ("card.md", "preview.png", "report.json")
# Input roles (the input's ``mlflow.data.context`` tag).
TRAINING, PREPARED, EVALUATION = "training", "prepared", "evaluation"
_MAX_DIGEST = 36  # MLflow's dataset digest column (VARCHAR(36) on PostgreSQL)


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


def log_prepared_dataset(
    project_dir: Path | str, name: str, *, context: str = PREPARED, ui: str | None = None
) -> LoggedDataset | None:
    """Log dataset ``name``'s prepared folder to the active MLflow run (see the module docstring)."""
    from mlflow import MlflowClient

    if locked_output(project_dir, INGEST_STAGE.format(name=name)) is None:
        return None
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_prepared_dataset: no active MLflow run (call it inside mlflow.start_run())")
    return _log_stage_output(
        MlflowClient(), run.info.run_id, project_dir, INGEST_STAGE.format(name=name), name, context=context, ui=ui
    )


def log_dataset_inputs(
    client: Any, run_id: str, project_dir: Path | str, dataset: str, reference_split: str, *, ui: str
) -> list[LoggedDataset]:
    """The run's three dataset inputs (training, prepared, evaluation: see the module docstring),
    those not on the run yet; returns what was logged. ``ui`` is the MLflow UI's base URL, for the
    logged card's image link."""
    present = {(i.dataset.name, i.dataset.digest) for i in client.get_run(run_id).inputs.dataset_inputs}
    logged = []
    for stage, name, context in (
        (AUGMENT_STAGE.format(name=dataset), f"{dataset}-augmented", TRAINING),
        (INGEST_STAGE.format(name=dataset), dataset, PREPARED),
    ):
        found = locked_output(project_dir, stage)
        if found is not None and (name, found[1]) not in present:
            entry = _log_stage_output(client, run_id, project_dir, stage, name, context=context, ui=ui)
            assert entry is not None  # dvc.lock records the stage (found above)
            logged.append(entry)
    prepared = locked_output(project_dir, INGEST_STAGE.format(name=dataset))
    if prepared is not None:
        split = _split_dataset(prepared[0], f"{dataset}-{reference_split}", reference_split, prepared[1])
        if (split.name, split.digest) not in present:
            _log_input(
                client,
                run_id,
                split,
                EVALUATION,
                {"dvc.stage": INGEST_STAGE.format(name=dataset), "aigc.split": reference_split},
            )
            logged.append(LoggedDataset(name=split.name, digest=split.digest, path=prepared[0], profile=split.profile))
    return logged


def _log_stage_output(
    client: Any, run_id: str, project_dir: Path | str, stage: str, name: str, *, context: str, ui: str | None
) -> LoggedDataset | None:
    """Log the prepared-format folder DVC records as ``stage``'s output as input ``name``."""
    found = locked_output(project_dir, stage)
    if found is None:
        return None
    path, recorded = found
    current = dvc_md5(path)
    if current != recorded:
        raise DataError(
            f"{path}: its content (DVC hash {current}) is not what dvc.lock records for stage {stage} "
            f"({recorded}); run `dvc repro` (or `dvc commit {stage}` if the change is intended)"
        )
    report = json.loads((path / "report.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    profile = _profile(report, meta)
    folder = f"datasets/{name}"
    for artifact in ARTIFACTS:
        if not (path / artifact).is_file():
            continue
        if artifact == "card.md":
            _log_card(client, run_id, path / artifact, folder, ui)
        else:
            client.log_artifact(run_id, str(path / artifact), folder)
    dataset = PreparedDataset(path, name=name, digest=recorded, profile=profile, labelled=bool(meta["classes"]))
    tags = {"dvc.stage": stage}
    if "source" in report:
        tags["aigc.source"] = str(report["source"])
    _log_input(client, run_id, dataset, context, tags)
    return LoggedDataset(name=name, digest=recorded, path=path, profile=profile)


def _profile(report: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Counts of an ingest report (accepted, rejected, splits, ...) or an augment report (originals, copies)."""
    common = {"size": meta["size"], "channels": meta["channels"], "content_digest": meta["digest"]}
    if "accepted" in report:  # ingest
        return {
            "images": report["accepted"],
            "rejected": len(report["rejected"]),
            "duplicates": len(report["duplicates"]),
            "skipped": len(report.get("skipped", [])),
            "splits": report["splits"],
            "per_class": report["per_class"],
            **common,
        }
    return {
        "images": meta["count"],
        "originals": report.get("originals"),
        "copies": (report.get("augment") or {}).get("copies"),
        "source_digest": report.get("source_digest"),
        **common,
    }


def _split_dataset(prepared: Path, name: str, split: str, prepared_hash: str) -> PreparedDataset:
    """The ``split`` of a prepared folder as a dataset: its content hash (from the manifest, no pixels read)."""
    meta = json.loads((prepared / "meta.json").read_text())
    manifest = pd.read_parquet(prepared / "manifest.parquet", columns=["sha256", "label", "split"])
    if split != "all":
        manifest = manifest[manifest["split"] == split]
    digest = content_digest(manifest, (meta["channels"], meta["size"], meta["size"]))
    per_class = {str(k): int(v) for k, v in manifest["label"].value_counts(dropna=False).sort_index().items()}
    profile = {
        "images": len(manifest),
        "split": split,
        "per_class": per_class,
        "size": meta["size"],
        "channels": meta["channels"],
        "content_digest": digest,
        "of_prepared": prepared_hash,
    }
    return PreparedDataset(
        prepared, name=name, digest=digest[:_MAX_DIGEST], profile=profile, labelled=bool(meta["classes"])
    )


def _log_input(client: Any, run_id: str, dataset: PreparedDataset, context: str, tags: dict[str, str]) -> None:
    """Log ``dataset`` as an input of the run; once more if a concurrent run inserted the same dataset first.

    MLflow's SQL store looks the dataset up, then inserts it: two runs logging a new dataset at the
    same moment both insert, and the second fails on the unique key (experiment, name, digest).
    Then the row exists, and a second call links to it.
    """
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)] + [InputTag(k, v) for k, v in tags.items()]
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=input_tags)]
    try:
        client.log_inputs(run_id, inputs)
    except MlflowException as exc:
        text = str(exc)
        if not ("dataset" in text and ("duplicate key" in text or "UNIQUE constraint failed" in text)):
            raise
        client.log_inputs(run_id, inputs)


def _log_card(client: Any, run_id: str, card: Path, folder: str, ui: str | None) -> None:
    """The dataset card with its preview linked by the MLflow UI's URL of the logged preview."""
    import tempfile

    text = card.read_text()
    if ui is not None:
        text = text.replace(
            "![preview](preview.png)", f"![preview]({artifact_url(ui, run_id, f'{folder}/preview.png')})"
        )
    with tempfile.TemporaryDirectory(prefix="aigc-card-") as tmp:
        copy = Path(tmp) / card.name
        copy.write_text(text)
        client.log_artifact(run_id, str(copy), folder)


def artifact_url(base: str, run_id: str, path: str) -> str:
    """The URL MLflow's server answers with artifact ``path`` of run ``run_id``. ``base`` is the
    UI's address (absolute: what MLflow's markdown artifact viewer renders), or "" for the link
    relative to the UI page (what model version and run descriptions render)."""
    from urllib.parse import quote

    url = f"get-artifact?path={quote(path)}&run_uuid={run_id}"
    return f"{base.rstrip('/')}/{url}" if base else url


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
        # targets=None is mlflow's own default; its hint leaves None out.
        return TensorDatasetSchema(features=features, targets=targets)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config.update(schema=json.dumps(self.schema.to_dict()), profile=json.dumps(self.profile))
        return config
