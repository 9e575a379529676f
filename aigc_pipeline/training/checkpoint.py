"""Resumable checkpoints: one safetensors file per checkpoint, written atomically, last few kept.

A checkpoint holds a nested state (module and optimizer states, RNG states, data order, step,
history...). Its tensors are stored as safetensors tensors and everything else (the structure,
ints, floats, strings) as JSON in the file's metadata, so loading runs no pickled code at all
(not even ``torch.load(weights_only=True)``). JSON keeps Python floats exactly (``repr``
round-trips), and dict keys that are not strings (optimizer states are keyed by int) and tuples
are tagged so they come back with their type.

A checkpoint file appears under its final name only once complete (temp file, fsync,
``os.replace``), so a kill at any moment leaves either the previous set of checkpoints or the
new one, plus at most a ``.step-*.tmp`` file that is never read and is removed on the next save.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from aigc_pipeline.io import atomic_write_bytes

FORMAT = "aigc-checkpoint/3"  # 3: epoch records without timing, the caller's own state
_NAME = re.compile(r"^step-(\d{9})\.safetensors$")
CHECKPOINT_GLOB = "step-*.safetensors"  # what a watcher of a checkpoint folder looks for
_META_KEY = "aigc"


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.safetensors"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint file named ``name``, or None when it is not a checkpoint's name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path | None) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first (temp files never match)."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def encode_state(state: Any) -> bytes:
    """``state`` (nested dicts/lists/tuples of tensors, numbers, strings, None) as safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = f"t{len(tensors)}"
            # safetensors wants dense, contiguous, unshared storage; a CPU copy gives all three.
            tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {"__dict__": {k: enc(v) for k, v in obj.items()}}
            return {"__items__": [[enc(k), enc(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v) for v in obj]}
        if isinstance(obj, list):
            return [enc(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__}")

    skeleton = enc(state)
    meta = json.dumps({"format": FORMAT, "state": skeleton}, allow_nan=True)
    return save(tensors, metadata={_META_KEY: meta})


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Decode a checkpoint file written by :func:`save_checkpoint` (tensors on the CPU)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = (f.metadata() or {}).get(_META_KEY)
        if meta is None:
            raise ValueError(f"{path}: not an aigc checkpoint (no '{_META_KEY}' metadata)")
        doc = json.loads(meta)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: checkpoint format {doc.get('format')!r}, this version reads {FORMAT!r}")

        def dec(obj: Any) -> Any:
            if isinstance(obj, list):
                return [dec(v) for v in obj]
            if not isinstance(obj, dict):
                return obj
            ((tag, value),) = obj.items()
            if tag == "__tensor__":
                return f.get_tensor(value)
            if tag == "__dict__":
                return {k: dec(v) for k, v in value.items()}
            if tag == "__items__":
                return {dec(k): dec(v) for k, v in value}
            if tag == "__tuple__":
                return tuple(dec(v) for v in value)
            raise ValueError(f"{path}: unknown tag {tag!r} in checkpoint metadata")

        return dec(doc["state"])


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` for ``step`` atomically, then drop all but the newest ``keep``."""
    folder = Path(folder)
    data = encode_state(state)
    path = checkpoint_path(folder, step)
    remove_stale_temp_files(folder)
    atomic_write_bytes(path, data)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files of a write that was killed: never read, safe to delete (one writer per folder)."""
    if Path(folder).is_dir():
        for tmp in Path(folder).glob(".step-*.tmp"):
            tmp.unlink(missing_ok=True)


def load_latest_checkpoint(folder: Path | None) -> dict[str, Any] | None:
    """The newest checkpoint's state, or None when there is none."""
    found = list_checkpoints(folder)
    return read_checkpoint(found[-1][1]) if found else None


# ---------------------------------------------------------------------------
# Global random states. The loop draws its own randomness from per-(seed, step) generators; the
# global states are saved and restored too, so any code that uses them (a model's dropout, a
# user callback, numpy or `random` in a data transform) also continues exactly after a resume.


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python ``random`` global states."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is MT19937: the legacy tuple form
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
