"""Benchmarks for aigc-pipeline, run with ``python -m bench`` (``make bench``).

Each benchmark writes one JSON document to ``bench/results/<name>.json`` (schema in
``bench/README.md``); :mod:`bench.report` renders every such file into ``bench/RESULTS.md``.
"""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"  # git-ignored: project copies, caches, logs
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
COMMAND = "make bench"


class BenchError(RuntimeError):
    """A benchmark could not produce a trustworthy measurement; no result is written."""
