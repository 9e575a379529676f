"""The family-agnostic training loop.

It knows nothing of Prefect, MLflow or DVC: callers pass callbacks for progress, metrics,
sample grids and abort. All randomness comes from ``seed``: weights are initialised under
``torch.manual_seed(seed)``, each epoch's data order and each step's noise come from
generators seeded by (seed, epoch) and (seed, step). Nothing random carries state from step
to step, so resuming from a checkpoint continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aigc_pipeline.errors import TrainingDiverged
from aigc_pipeline.models.base import Arch, Family, Hparams
from aigc_pipeline.models.registry import build_family
from aigc_pipeline.training.checkpoint import load_latest_checkpoint, save_checkpoint

_EPOCH_STREAM, _STEP_STREAM, _SAMPLE_STREAM = 1, 2, 3


@dataclass
class Callbacks:
    """Hooks the loop calls; every one is optional."""

    on_progress: Callable[[int, int, int], None] | None = None  # (step, total_steps, epoch)
    on_metrics: Callable[[int, dict[str, float]], None] | None = None  # (step, scalars), flushed in batches
    on_epoch_end: Callable[[int, np.ndarray, dict[str, float]], None] | None = None  # (epoch, grid uint8, stats)
    # (epoch, generator in eval mode): e.g. a small FID over training; the mode is restored after.
    on_epoch_generator: Callable[[int, torch.nn.Module], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None  # (step, file) after a checkpoint is written
    should_abort: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    family: Family
    steps: int
    epochs: int
    resumed_from: int  # step of the checkpoint resumed from, 0 for a fresh start
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)


def seeded_generator(seed: int, stream: int, index: int, device: torch.device) -> torch.Generator:
    """A generator for one (stream, index) pair, independent of every other pair."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + stream) * 1_000_000_007 + index & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images -> uint8 numpy [B, C, H, W]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def train(
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    arch: Arch,
    hparams: Hparams,
    epochs: int,
    batch_size: int,
    seed: int,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    device: str = "auto",
    sample_grid: int = 64,
    log_every: int = 25,
    keep_checkpoints: int = 3,
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """Train ``arch.family`` on uint8 ``images`` [N, C, H, W]; resume from ``checkpoint_dir`` if it holds one.

    ``labels`` (int [N], 0..num_classes-1) are required when ``arch.num_classes`` > 0.

    Raises :class:`TrainingDiverged` naming the first step whose loss is not finite.
    """
    cb = callbacks or Callbacks()
    dev = resolve_device(device)
    n = images.shape[0]
    if n < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than the training set ({n} images)")
    steps_per_epoch = n // batch_size  # the last partial batch is dropped: batch norm wants full batches
    total = epochs * steps_per_epoch

    torch.manual_seed(seed)
    family = build_family(arch, hparams)
    for m in family.modules.values():
        m.to(dev).train()
    # Moved once; each batch is indexed and scaled on the device, no per-step host copies.
    data = torch.from_numpy(images).to(dev)
    targets = None
    if arch.num_classes:
        if labels is None or len(labels) != n or labels.min() < 0 or labels.max() >= arch.num_classes:
            raise ValueError(f"a conditional model needs a label in 0..{arch.num_classes - 1} for every image")
        targets = torch.from_numpy(np.array(labels, dtype=np.int64)).to(dev)
    fixed_z = torch.randn(
        sample_grid, arch.latent_dim, generator=seeded_generator(seed, _SAMPLE_STREAM, 0, torch.device("cpu"))
    ).to(dev)
    fixed_y = (torch.arange(sample_grid) % arch.num_classes).to(dev) if arch.num_classes else None

    start, history = 0, []
    state = load_latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if state is not None:
        if state["arch"] != arch.__dict__ or state["total_steps"] != total:
            raise ValueError(
                f"checkpoint in {checkpoint_dir} was made with a different configuration; "
                "delete that folder to start over"
            )
        for name, m in family.modules.items():
            m.load_state_dict(state["modules"][name])
        for name, opt in family.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        start, history = state["step"], list(state["history"])
    resumed_from = start

    pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def flush() -> None:
        """Move pending losses to the host in one transfer and check they are finite."""
        if not pending:
            return
        names = list(pending[0][1])
        values = torch.stack([torch.stack([p[1][k] for k in names]) for p in pending]).float().cpu().numpy()
        for (step, _), row in zip(pending, values):
            if not np.isfinite(row).all():
                bad = [k for k, v in zip(names, row) if not math.isfinite(v)]
                raise TrainingDiverged(
                    f"training diverged at step {step}: non-finite {', '.join(bad)}; "
                    "lower train.lr or check the data"
                )
            history.append({"step": step, **{k: float(v) for k, v in zip(names, row)}})
        if cb.on_metrics:
            for rec in history[-len(pending):]:
                cb.on_metrics(int(rec["step"]), {k: v for k, v in rec.items() if k != "step"})
        pending.clear()

    t0, done_images = time.perf_counter(), 0
    step = start
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=seeded_generator(seed, _EPOCH_STREAM, epoch, torch.device("cpu")))
        order = order.to(dev)
        for i in range(in_epoch, steps_per_epoch):
            if cb.should_abort and cb.should_abort():
                raise KeyboardInterrupt("training aborted by the caller")
            idx = order[i * batch_size : (i + 1) * batch_size]
            real = data.index_select(0, idx).float().div_(127.5).sub_(1.0)
            y = targets.index_select(0, idx) if targets is not None else None
            losses = family.train_step(real, y, seeded_generator(seed, _STEP_STREAM, step, dev))
            step += 1
            done_images += batch_size
            pending.append((step, losses))
            if len(pending) >= log_every:
                flush()
            if cb.on_progress:
                cb.on_progress(step, total, epoch + 1)
            if checkpoint_dir and (step % checkpoint_every == 0 or step == total):
                flush()  # never checkpoint a diverged state
                written = save_checkpoint(
                    checkpoint_dir,
                    step,
                    {
                        "arch": arch.__dict__,
                        "total_steps": total,
                        "step": step,
                        "modules": {k: m.state_dict() for k, m in family.modules.items()},
                        "optimizers": {k: o.state_dict() for k, o in family.optimizers.items()},
                        "history": history,
                    },
                    keep=keep_checkpoints,
                )
                if cb.on_checkpoint:
                    cb.on_checkpoint(step, written)
        flush()
        if cb.on_epoch_end:
            stats = {k: float(np.mean([h[k] for h in history[-steps_per_epoch:]])) for k in history[-1] if k != "step"}
            cb.on_epoch_end(epoch + 1, sample_images(family.generator, fixed_z, fixed_y), stats)
        if cb.on_epoch_generator:
            was_training = family.generator.training
            family.generator.eval()
            try:
                with torch.no_grad():
                    cb.on_epoch_generator(epoch + 1, family.generator)
            finally:
                family.generator.train(was_training)
    flush()
    elapsed = time.perf_counter() - t0
    return TrainResult(
        family=family,
        steps=total,
        epochs=epochs,
        resumed_from=resumed_from,
        images_per_second=done_images / elapsed if elapsed > 0 and done_images else float("nan"),
        history=history,
    )


@torch.no_grad()
def sample_images(generator: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None) -> np.ndarray:
    """Images for latent ``z`` in eval mode (batch-norm running stats), restoring the mode after."""
    was_training = generator.training
    generator.eval()
    try:
        return to_uint8(generator(z, labels))
    finally:
        generator.train(was_training)
