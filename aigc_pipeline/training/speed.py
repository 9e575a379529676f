"""Speed settings: device, mixed precision, memory format, ``torch.compile``, TF32.

``auto`` picks per device what was measured to help (bench/training.py):

- CUDA: bf16 autocast (when the GPU supports bf16), channels_last, TF32 matmuls/convolutions.
- CPU: channels_last and bf16 autocast only on a CPU with native bf16 instructions
  (``avx512_bf16`` or ``amx_bf16``); on this project's reference machine (2-core AMD EPYC with
  avx512_bf16) they made DCGAN training about 1.3x and 1.5x faster, and CPU runs stay bitwise
  reproducible and resumable with them (every kernel is deterministic).

Under autocast the model families compute their losses in float32 and the spectral-norm power
iteration stays in float32; parameters, optimizer states and EMA weights are always float32.
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
Toggle = Literal["auto"] | bool


@dataclass(frozen=True)
class Speed:
    """What the loop does to run fast on ``device``."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full float32
    channels_last: bool
    compile: bool

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        prec = "bf16 autocast" if self.autocast_dtype == torch.bfloat16 else "fp32"
        parts = [str(self.device), prec]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("torch.compile")
        return ", ".join(parts)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a device (``cuda:<local rank>`` under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available (use auto or cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise ValueError(f"unknown device {name!r} (auto | cpu | cuda)")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (else bf16 autocast is emulated, slow)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_speed(
    device: torch.device, precision: Precision = "auto", channels_last: Toggle = "auto", compile: bool = False
) -> Speed:
    """The settings for ``device``; ``auto`` follows the table in this module's docstring.

    On CUDA this also allows TF32 for float32 matmuls and convolutions (process-wide).
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        native_bf16 = torch.cuda.is_bf16_supported()
    else:
        native_bf16 = cpu_has_native_bf16()
    if precision == "auto":
        dtype = torch.bfloat16 if native_bf16 else None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp32":
        dtype = None
    else:
        raise ValueError(f"unknown precision {precision!r} (auto | fp32 | bf16)")
    cl = (device.type == "cuda" or native_bf16) if channels_last == "auto" else bool(channels_last)
    return Speed(device=device, autocast_dtype=dtype, channels_last=cl, compile=bool(compile))
