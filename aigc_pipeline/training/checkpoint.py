"""Resumable checkpoints: every module and optimizer state plus the step, written atomically."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from aigc_pipeline.io import atomic_write_bytes

_NAME = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first (temp files never match)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` for ``step`` atomically, then drop all but the newest ``keep``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path = checkpoint_path(folder, step)
    atomic_write_bytes(path, buf.getvalue())
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint's state, or None. ``weights_only`` loading: no pickled code runs."""
    found = list_checkpoints(folder)
    if not found:
        return None
    return torch.load(found[-1][1], map_location="cpu", weights_only=True)
