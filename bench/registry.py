"""The benchmarks ``python -m bench`` knows: a name and the module that runs it.

A new benchmark is a module exposing ``run(ctx: Context) -> dict`` (a result document, see
bench/README.md; raise :class:`bench.BenchError` when no trustworthy figure can be produced)
plus one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BENCHMARKS: dict[str, str] = {
    "pipeline": "bench.pipeline",
    "ingest": "bench.ingest",
    "training": "bench.training",
    "evaluation": "bench.evaluation",
    "scale": "bench.scale",
    "quality": "bench.quality",
    "datasets": "bench.datasets",
    "memory": "bench.memory",
}


@dataclass(frozen=True)
class Context:
    """What one benchmark run is asked to do."""

    name: str  # the registry name (= the result file's stem)
    profile: str  # default | quick | custom | quick-custom
    quick: bool  # smoke-test sizes
    overrides: tuple[str, ...]  # extra params.yaml overrides for project copies
    work: Path  # this benchmark's scratch folder under bench/.work (the benchmark wipes it first)
    dvc_repeats: int = 3
    cli_run: bool = True
    wait_idle: float = 60.0  # before each phase, wait up to this long for other processes to go quiet
