"""An evaluation's two files, the contract between the evaluate stage and everything that reads it.

- ``metrics.json``: the headline numbers (the metric table's ``headline`` entries:
  :mod:`aigc_pipeline.evaluation.metrics`) under short names
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc_pipeline.errors import DataError
from aigc_pipeline.evaluation.metrics import names, protocol_names
from aigc_pipeline.evaluation.protocol import metric_key
from aigc_pipeline.io import atomic_write_json

__all__ = [
    "COPIES_GRID",
    "DETAILS_FILE",
    "METRICS_FILE",
    "MORE_METRICS",
    "SAMPLES_GRID",
    "Evaluation",
    "read_evaluation",
    "write_evaluation",
]

METRICS_FILE = "metrics.json"
DETAILS_FILE = "evaluation.json"
# metrics.json holds the table's headline numbers (the DVC metric); every other number goes to
# evaluation.json's MORE_METRICS. Metrics are named after the Inception protocol in MLflow
# (``fid_<protocol id>``; the floor's too: it is measured under the same protocol) or the
# classifier's, as their entry in aigc_pipeline.evaluation.metrics says.
MORE_METRICS = "more_metrics"
SAMPLES_GRID = "samples.png"  # the evaluation's first 64 samples
COPIES_GRID = "copies.png"  # the samples nearest a training image (top row) above that image (bottom row)


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
        for group, pid in (
            (protocol_names("inception"), self.protocol_id),
            (protocol_names("classifier"), self.classifier_id),
        ):
            for name in group:
                if pid and self.value(name) is not None:
                    out[name] = metric_key(name, pid)
        return out

    def protocol_keys(self) -> dict[str, float]:
        """Every finite metric under its protocol-named key (``fid_incv3-…_32px``, ``classifier_score_logreg-…``)."""
        values = {long: self.value(short) for short, long in self.protocol_names().items()}
        # protocol_names() keeps only names with a value: the None test just narrows the type
        return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


def write_evaluation(out: Path, metrics: Mapping[str, float | None], details: Mapping[str, Any]) -> None:
    """Write both files atomically (details first: a reader of metrics.json finds its details):
    the metric table's headline numbers to metrics.json, the others to evaluation.json's ``more_metrics``."""
    unknown = sorted(set(metrics) - set(names()))
    if unknown:  # a metric outside the table would reach no reader: add its entry first
        raise ValueError(f"metrics {unknown} have no entry in aigc_pipeline/evaluation/metrics.py's METRICS")
    numbers = {k: float(v) for k, v in metrics.items() if v is not None}
    headline_names = names("headline")
    headline = {k: v for k, v in numbers.items() if k in headline_names}
    more = {k: v for k, v in numbers.items() if k not in headline_names}
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
