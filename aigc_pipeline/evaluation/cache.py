"""Location of the local, machine-wide cache for evaluation artefacts (converted weights, statistics)."""

from __future__ import annotations

import os
from pathlib import Path

from aigc_pipeline.io import atomic_write_bytes

__all__ = ["CACHE_DIR_ENV", "atomic_write_bytes", "default_cache_dir"]

CACHE_DIR_ENV = "AIGC_CACHE_DIR"


def default_cache_dir() -> Path:
    """Return ``$AIGC_CACHE_DIR`` if set (and non-empty), else ``~/.cache/aigc-pipeline``; created on demand.

    Read on every call (not at import) so tests and callers can redirect it with the environment.
    """
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "aigc-pipeline"
    path.mkdir(parents=True, exist_ok=True)
    return path
