"""PNG line charts for people who would rather look than read: loss curves and FID over training.

matplotlib figures without pyplot (Agg rendering, no display, no network); each chart is returned as PNG bytes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["line_chart", "loss_chart"]


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str, ylabel: str
) -> bytes:
    """One chart with a line per ``name -> (xs, ys)``; PNG bytes."""
    from matplotlib.figure import Figure

    # A Figure without pyplot renders with Agg and touches no global backend state.
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=name, marker="o" if len(xs) <= 20 else None, linewidth=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_chart(history_csv: Path) -> bytes | None:
    """Per-step training losses from the trainer's ``history.csv`` (None when it has no rows)."""
    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    series = {k: (steps, [float(r[k]) for r in rows]) for k in rows[0] if k != "step"}
    return line_chart(series, title="training losses", xlabel="step", ylabel="loss")
