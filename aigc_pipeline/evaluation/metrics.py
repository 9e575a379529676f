"""The metric table: every number an evaluation reports, once, with what each reader needs of it.

A metric's entry says what it is called in print (``label``), which protocol names it in MLflow
and the gate (``inception``: ``fid_incv3-…_32px``; ``classifier``: ``classifier_score_logreg-…``;
``None``: its short name), whether it is a headline number of ``metrics.json`` (the DVC metric;
few enough for a 120-column ``dvc metrics show``), the name of the real-data value beside it (the
floor), which way is better, and where it is shown: the model card, the per-version summary of
``aigc status``, the metrics table of the run summary and the Prefect artifact.

Everything else reads this table (:mod:`aigc_pipeline.evaluation.results`, the card, the registry
summary, the run summary, the Prefect artifacts, the CLI), so a new metric is one entry here plus
the code that computes it. Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["METRICS", "Metric", "copying_text", "entries", "fid_text", "metric", "names", "protocol_names"]


@dataclass(frozen=True)
class Metric:
    """One reported number (see the module docstring)."""

    name: str
    label: str  # the model card's row
    short: str = ""  # the row of the run summary's and Prefect artifact's table (default: name)
    protocol: str | None = "inception"  # inception | classifier | None: the protocol id its MLflow name carries
    headline: bool = False  # in metrics.json (the DVC metric), else evaluation.json's more_metrics
    floor: str | None = None  # the metric holding real data's value of it (under the same protocol)
    better: str | None = None  # lower | higher | None (not a quality score)
    card: bool = True  # a row of the model card's metrics table
    summary: bool = False  # shown per version by `aigc status` (tracking.registry.list_models)
    table: bool = False  # a row of the run summary's and the Prefect artifact's metrics table
    ratio: bool = True  # table: model / floor makes sense (not for KID, whose real-vs-real value hovers at 0)

    @property
    def row(self) -> str:
        """Its name in a metrics table."""
        return self.short or self.name


METRICS: tuple[Metric, ...] = (
    Metric(
        "fid",
        "FID (lower is better)",
        "FID",
        headline=True,
        floor="floor_fid",
        better="lower",
        summary=True,
        table=True,
    ),
    Metric(
        "fid_std",
        "FID bootstrap standard deviation (measurement noise)",
        headline=True,
        floor="floor_fid_std",
        summary=True,
    ),
    Metric(
        "fid_inf",
        "FID-infinity (FID extrapolated to infinitely many samples; Chong and Forsyth 2020)",
        headline=True,
        floor="floor_fid_inf",
        better="lower",
        summary=True,
    ),
    Metric("fid_inf_std", "FID-infinity fit's standard error", summary=True),
    Metric(
        "kid",
        "KID (lower is better)",
        "KID",
        headline=True,
        floor="floor_kid",
        better="lower",
        summary=True,
        table=True,
        ratio=False,
    ),
    Metric("kid_std", "KID standard deviation over subsets"),
    Metric(
        "precision",
        "precision (share of samples inside the real manifold)",
        headline=True,
        floor="floor_precision",
        better="higher",
        summary=True,
        table=True,
    ),
    Metric(
        "recall",
        "recall (share of real images covered by samples)",
        headline=True,
        floor="floor_recall",
        better="higher",
        summary=True,
        table=True,
    ),
    Metric("isc", "Inception Score", headline=True, better="higher"),
    Metric("isc_std", "Inception Score std over splits"),
    Metric(
        "fid_ratio",
        "FID / the data's floor FID (1.0 = as good as real data)",
        headline=True,
        better="lower",
        summary=True,
        card=False,
    ),
    Metric(
        "classifier_score", "classifier score (NOT Inception Score; see below)", protocol="classifier", better="higher"
    ),
    Metric(
        "classifier_label_accuracy",
        "label accuracy of class-conditional samples",
        protocol="classifier",
        better="higher",
    ),
    Metric("classifier_accuracy", "the classifier's accuracy on the real eval split", protocol=None),
    # Data copying (evaluation.copying): the floor is held-out real images scored the same way.
    Metric(
        "copy_share",
        "share of samples copying a training image (nearer to it than 95% of held-out real images are to theirs)",
        "copying share",
        floor="floor_copy_share",
        better="lower",
        summary=True,
        table=True,
        ratio=False,
    ),
    Metric(
        "copy_ct",
        "data-copying statistic C_T (Meehan et al. 2020; ~0 generalises, <= -3 copies)",
        "copying C_T",
        floor="floor_copy_ct",
        summary=True,
        table=True,
        ratio=False,
    ),
    Metric(
        "exact_copies",
        "samples pixel-identical to a training image",
        "exact copies",
        protocol=None,
        better="lower",
        summary=True,
        table=True,
    ),
    # The data's own floor: real images scored like the samples (evaluation.floor).
    Metric("floor_fid", "FID of real data (the floor)", headline=True, summary=True, card=False),
    Metric("floor_fid_std", "the floor's FID bootstrap standard deviation", card=False),
    Metric("floor_fid_inf", "FID-infinity of real data", summary=True, card=False),
    Metric("floor_kid", "KID of real data", card=False),
    Metric("floor_precision", "precision of real data", summary=True, card=False),
    Metric("floor_recall", "recall of real data", summary=True, card=False),
    Metric("floor_copy_share", "copying share of held-out real data", summary=True, card=False),
    Metric("floor_copy_ct", "C_T of held-out real data", summary=True, card=False),
)

if len({m.name for m in METRICS}) != len(METRICS):  # pragma: no cover - a table error, caught on import
    raise RuntimeError("aigc_pipeline.evaluation.metrics: a metric name appears twice in METRICS")


# Readers select from the table when they run (not at import), so an entry is all a metric needs.
def entries(where: str) -> tuple[Metric, ...]:
    """The entries shown ``where``: ``card``, ``summary``, ``table`` or ``headline``, in table order."""
    return tuple(m for m in METRICS if getattr(m, where))


def names(where: str | None = None) -> tuple[str, ...]:
    """The names of :func:`entries` ``where`` (all of them when None)."""
    return tuple(m.name for m in (METRICS if where is None else entries(where)))


def protocol_names(protocol: str) -> tuple[str, ...]:
    """The names of the metrics named after ``protocol`` (``inception`` or ``classifier``) in MLflow."""
    return tuple(m.name for m in METRICS if m.protocol == protocol)


def metric(name: str) -> Metric:
    """The table's entry for ``name``; KeyError naming it and the known names when there is none."""
    for m in METRICS:
        if m.name == name:
            return m
    raise KeyError(f"unknown metric {name!r} (aigc_pipeline/evaluation/metrics.py knows: {', '.join(names())})")


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def fid_text(values: Mapping[str, Any], digits: int = 2) -> str:
    """``FID 25.40 ± 0.61 (floor 19.10 = 1.33x)``: what there is of FID, its noise and its floor."""
    fid = _number(values.get("fid"))
    if fid is None:
        return "no FID"
    text = f"FID {fid:.{digits}f}"
    if (std := _number(values.get("fid_std"))) is not None:
        text += f" ± {std:.{digits}f}"
    floor = _number(values.get("floor_fid"))
    if floor is not None and floor > 0:
        text += f" (floor {floor:.{digits}f} = {fid / floor:.2f}x)"
    return text


def copying_text(values: Mapping[str, Any]) -> str:
    """``copy_share 0.030 (real data 0.050), C_T 1.20 (real data -0.40), 0 exact copies``: what there is."""
    share = _number(values.get("copy_share"))
    if share is None:
        return "no data-copying figures"
    text = f"copy_share {share:.3f}"
    if (floor := _number(values.get("floor_copy_share"))) is not None:
        text += f" (real data {floor:.3f})"
    ct = _number(values.get("copy_ct"))
    text += f", C_T {ct:.2f}" if ct is not None else ", C_T n/a"
    if (floor_ct := _number(values.get("floor_copy_ct"))) is not None:
        text += f" (real data {floor_ct:.2f})"
    if (exact := _number(values.get("exact_copies"))) is not None:
        text += f", {int(exact)} exact copies"
    return text
