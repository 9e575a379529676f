"""What a model cost: wall-clock and CPU (or GPU) seconds, the device, the images shown.

Each stage measures itself with a :class:`Meter` (wall clock, and CPU time: this process's over
all its threads, plus its finished child processes', e.g. torchrun's workers). The train stage writes
``compute.json`` into the model folder (like ``timing.csv``, not reproducible by nature, so it is
left out of the byte-identical checks); the evaluate stage logs its own to the MLflow run; the
register stage puts the training's on the run (``compute.*`` metrics), the model version (tag
``aigc.compute``), the model card and the receipt; :mod:`aigc_pipeline.pipeline` sums every stage
a run executed. On a GPU a "GPU-second" is a second of wall clock on each device in use.
Standard library only (and the package's errors).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc_pipeline.errors import DataError

__all__ = [
    "COMPUTE_FILE",
    "COMPUTE_TAG",
    "RUN_COMPUTE_TAG",
    "Meter",
    "compute_metrics",
    "describe",
    "read_compute",
    "run_totals",
]

COMPUTE_FILE = "compute.json"
COMPUTE_TAG = "aigc.compute"  # on the run and the model version: describe() of the training
RUN_COMPUTE_TAG = "aigc.compute_run"  # the same, for every stage the pipeline run executed


def _cpu_now() -> float:
    """CPU seconds of this process (all threads) and of its finished child processes (torchrun's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Meter:
    """Wall-clock and CPU seconds since it was made."""

    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=_cpu_now)

    def read(self) -> dict[str, float]:
        return {"wall_seconds": time.perf_counter() - self.wall0, "cpu_seconds": _cpu_now() - self.cpu0}


def accelerator_seconds(record: Mapping[str, Any]) -> float | None:
    """GPU-seconds of a record whose device is a GPU (wall x devices); None on a CPU."""
    if not str(record.get("device", "")).startswith("cuda"):
        return None
    return float(record.get("wall_seconds", 0.0)) * int(record.get("devices", 1) or 1)


def compute_metrics(record: Mapping[str, Any], stage: str) -> dict[str, float]:
    """MLflow metrics of a stage's record: ``compute.<stage>_wall_s``, ``_cpu_s``, ``_gpu_s`` (on a
    GPU) and, for training, ``compute.images_shown``."""
    out = {
        f"compute.{stage}_wall_s": float(record["wall_seconds"]),
        f"compute.{stage}_cpu_s": float(record["cpu_seconds"]),
    }
    if (gpu := accelerator_seconds(record)) is not None:
        out[f"compute.{stage}_gpu_s"] = gpu
    if record.get("images_shown") is not None:
        out["compute.images_shown"] = float(record["images_shown"])
    return out


def run_totals(stages: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Wall and CPU seconds of the stages a run executed (each ``{"stage", "wall_seconds", "cpu_seconds"}``)."""
    return {
        "wall_seconds": sum(float(s["wall_seconds"]) for s in stages),
        "cpu_seconds": sum(float(s["cpu_seconds"]) for s in stages),
    }


def describe(record: Mapping[str, Any]) -> str:
    """``trained in 3.1 CPU-minutes (1.6 wall-minutes on cpu, fp32; 150,784 images shown)``."""
    wall, cpu = float(record.get("wall_seconds", math.nan)), float(record.get("cpu_seconds", math.nan))
    gpu = accelerator_seconds(record)
    head = f"trained in {gpu / 60:.1f} GPU-minutes" if gpu is not None else f"trained in {cpu / 60:.1f} CPU-minutes"
    parts = [f"{wall / 60:.1f} wall-minutes on {record.get('device', '?')}"]
    if int(record.get("devices", 1) or 1) > 1:
        parts[0] += f" x {int(record['devices'])} processes"
    if record.get("images_shown") is not None:
        parts.append(f"{int(record['images_shown']):,} images shown")
    if record.get("resumed_from_step"):
        parts.append(
            f"this session only: resumed at step {int(record['resumed_from_step'])}, the time before is not counted"
        )
    return f"{head} ({'; '.join(parts)})"


def read_compute(model: Path) -> dict[str, Any] | None:
    """The model folder's ``compute.json``; None when there is none (a model from before it existed)."""
    path = Path(model) / COMPUTE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run `aigc train`") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object; re-run `aigc train`")
    return doc
