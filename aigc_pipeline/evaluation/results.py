"""An evaluation's two files, the contract between the evaluate stage and everything that reads it.

- ``metrics.json``: the headline numbers (:data:`HEADLINE`: ``fid``, ``fid_std``, ``fid_ratio``,
  ``floor_fid``, ``kid``, ``precision``, ``recall``, and ``isc`` when computable) under short names
  that sort and compare: the DVC metric, what ``dvc metrics show/diff`` and ``dvc exp show``
  print. Few enough that their table fits a 120-column terminal.
- ``evaluation.json``: how they were measured: the protocol (its id names every metric in MLflow
  and the gate: values under different protocols are never compared), the extractor, the
  bootstrap, the floor's sample, why a metric is unavailable, the classifier used, the model;
  and under ``more_metrics`` every other number (KID's spread, the floor's other scores, the
  classifier scores, ...).

:func:`read_evaluation` merges the two: :attr:`Evaluation.metrics` holds every number.

Short names can be compared only within one protocol: the gate and MLflow use the
protocol-named keys (:func:`protocol_keys`), and every reader gets the protocol id beside the
numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from aigc_pipeline.errors import DataError
from aigc_pipeline.evaluation.protocol import metric_key
from aigc_pipeline.io import atomic_write_json

__all__ = ["DETAILS_FILE", "METRICS_FILE", "HEADLINE", "MORE_METRICS", "PROTOCOL_METRICS", "CLASSIFIER_METRICS",
           "Evaluation", "read_evaluation", "write_evaluation"]

METRICS_FILE = "metrics.json"
DETAILS_FILE = "evaluation.json"
# The numbers in metrics.json (the DVC metric); every other number goes to evaluation.json's MORE_METRICS.
HEADLINE = ("fid", "fid_std", "fid_ratio", "floor_fid", "kid", "precision", "recall", "isc")
MORE_METRICS = "more_metrics"
# Metrics named after the Inception protocol in MLflow (``fid_<protocol id>``); floor_* too: the
# floor is measured under the same protocol.
PROTOCOL_METRICS = ("fid", "fid_std", "fid_inf", "fid_inf_std", "kid", "kid_std", "precision", "recall", "isc",
                    "isc_std", "floor_fid", "floor_fid_std", "floor_fid_inf", "floor_kid", "floor_precision",
                    "floor_recall", "fid_ratio")
# Metrics named after the classifier protocol.
CLASSIFIER_METRICS = ("classifier_score", "classifier_label_accuracy")


@dataclass(frozen=True)
class Evaluation:
    """What ``aigc evaluate`` wrote: ``metrics`` (name -> number) and ``details`` (the rest)."""

    metrics: dict[str, float]
    details: dict[str, Any]

    @property
    def protocol_id(self) -> str | None:
        protocol = self.details.get("protocol")
        return protocol.get("id") if isinstance(protocol, Mapping) else None

    @property
    def classifier_id(self) -> str | None:
        clf = self.details.get("classifier")
        return clf.get("id") if isinstance(clf, Mapping) else None

    def value(self, name: str) -> float | None:
        """The metric ``name`` as a float, None when absent or not a number."""
        v = self.metrics.get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def protocol_names(self) -> dict[str, str]:
        """Short name -> protocol-named key (``fid`` -> ``fid_incv3-…_32px``) of every metric present."""
        out = {}
        for names, pid in ((PROTOCOL_METRICS, self.protocol_id), (CLASSIFIER_METRICS, self.classifier_id)):
            for name in names:
                if pid and self.value(name) is not None:
                    out[name] = metric_key(name, pid)
        return out

    def protocol_keys(self) -> dict[str, float]:
        """Every finite metric under its protocol-named key (``fid_incv3-…_32px``, ``classifier_score_logreg-…``)."""
        values = {long: self.value(short) for short, long in self.protocol_names().items()}
        return {k: v for k, v in values.items() if math.isfinite(v)}


def write_evaluation(out: Path, metrics: Mapping[str, float | None], details: Mapping[str, Any]) -> None:
    """Write both files atomically (details first: a reader of metrics.json finds its details):
    the :data:`HEADLINE` numbers to metrics.json, the others to evaluation.json's ``more_metrics``."""
    numbers = {k: float(v) for k, v in metrics.items() if v is not None}
    headline = {k: v for k, v in numbers.items() if k in HEADLINE}
    more = {k: v for k, v in numbers.items() if k not in HEADLINE}
    atomic_write_json(Path(out) / DETAILS_FILE, {**details, MORE_METRICS: more})
    atomic_write_json(Path(out) / METRICS_FILE, headline)


def read_evaluation(folder: Path) -> Evaluation:
    """Read an evaluation folder; errors name the file and say what to run."""
    docs = []
    for name in (METRICS_FILE, DETAILS_FILE):
        path = Path(folder) / name
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: not found; run `aigc evaluate` first") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); re-run `aigc evaluate`") from None
        if not isinstance(doc, dict):
            raise DataError(f"{path}: expected a JSON object; re-run `aigc evaluate`")
        docs.append(doc)
    metrics, details = docs
    more = details.pop(MORE_METRICS, None) or {}
    if not isinstance(more, dict):
        raise DataError(f"{Path(folder) / DETAILS_FILE}: '{MORE_METRICS}' should be an object; re-run `aigc evaluate`")
    return Evaluation(metrics={**more, **metrics}, details=details)
