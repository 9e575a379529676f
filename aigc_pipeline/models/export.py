"""The exported model: generator weights (safetensors, no pickle) plus ``model.json``.

This is what evaluate, register, ``aigc sample`` and the MLflow pyfunc load; it needs only
torch and safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save

from aigc_pipeline.errors import DataError
from aigc_pipeline.io import atomic_write_bytes, atomic_write_json
from aigc_pipeline.models.base import Arch
from aigc_pipeline.models.families import build_generator

WEIGHTS_FILE = "generator.safetensors"
META_FILE = "model.json"


def save_generator(
    folder: Path, generator: torch.nn.Module, arch: Arch, meta: dict[str, Any], spec: dict[str, Any] | None = None
) -> None:
    """Write the generator's weights and ``model.json`` (arch, the family's generator ``spec`` and
    ``meta``) into ``folder``."""
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, save(state))
    atomic_write_json(folder / META_FILE, {"arch": arch.__dict__, "generator": spec or {}, **meta})


def read_model_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; is {folder} a trained model folder (run `aigc train`)?") from None


def load_generator(folder: Path | str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Arch]:
    """Rebuild the generator from ``folder`` in eval mode."""
    folder = Path(folder)
    meta = read_model_meta(folder)
    arch = Arch(**meta["arch"])
    g = build_generator(arch, meta.get("generator") or {})
    g.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return g.to(device).eval(), arch


@torch.no_grad()
def generate(
    generator: torch.nn.Module,
    arch: Arch,
    n: int,
    *,
    seed: int,
    label: int | None = None,
    steps: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``n`` uint8 images [n, C, H, W] from latents drawn with ``seed``.

    For a class-conditional model, ``label`` picks the class of every image; without it the
    classes cycle 0, 1, 2, ... so any sample set is class-balanced. ``steps`` sets a diffusion
    sampler's number of steps (default: the one it was exported with; an error for a GAN or VAE).
    Latents are drawn on the CPU in one go, so the images depend only on (weights, seed, n, label,
    steps), not on the device or batch size; the generator runs in eval mode for the same reason.
    """
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    if steps is not None:
        if not hasattr(generator, "with_steps"):
            raise ValueError(f"steps={steps}: a {arch.family} model has no sampling steps (only diffusion models do)")
        # torch types a module's own attributes as Tensor | Module: this one is the sampler's method.
        generator = cast(Callable[[int], torch.nn.Module], generator.with_steps)(steps)
    labels = class_labels(arch, n, label)
    latent_shape = cast(tuple[int, ...], generator.latent_shape)  # a plain attribute (Tensor | Module to torch)
    z = torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(seed))
    out = np.empty((n, arch.channels, arch.size, arch.size), dtype=np.uint8)
    for i in range(0, n, batch_size):
        y = labels[i : i + batch_size].to(device) if labels is not None else None
        x = generator(z[i : i + batch_size].to(device), y)
        out[i : i + batch_size] = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return out


def class_labels(arch: Arch, n: int, label: int | None = None) -> torch.Tensor | None:
    """Labels for ``n`` samples: ``label`` repeated, or cycling through the classes; None when
    the model is unconditional (asking it for a label is an error, not silently ignored)."""
    if not arch.num_classes:
        if label is not None:
            raise ValueError("this model is not class-conditional: it cannot generate a given label")
        return None
    if label is None:
        return torch.arange(n) % arch.num_classes
    if not 0 <= label < arch.num_classes:
        raise ValueError(f"label {label} is out of range: the model knows classes 0..{arch.num_classes - 1}")
    return torch.full((n,), label, dtype=torch.long)
