"""The family-agnostic training loop.

It knows nothing of Prefect, MLflow or DVC: callers pass callbacks for progress, metrics,
sample grids, checkpoints and abort. All randomness comes from ``seed``: weights are
initialised under ``torch.manual_seed(seed)``; each epoch's data order and each step's noise
and augmentation come from generators seeded by (seed, epoch) and (seed, step)
(:mod:`aigc_pipeline.randomness`). Checkpoints also hold the global random states, the epoch's data order
and the position in it, so a resumed run continues exactly as an uninterrupted one would
(bitwise on the CPU).

No per-step host synchronisation: losses and gradient norms stay on the device and are
fetched in one transfer every ``log_every`` steps (and before each checkpoint), where they are
checked for divergence.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from aigc_pipeline.errors import TrainingDiverged
from aigc_pipeline.models.base import Arch, Family, Hparams
from aigc_pipeline.models.families import build_family
from aigc_pipeline.randomness import EPOCH_STREAM, SAMPLE_STREAM, STEP_STREAM, BatchRandom, seeded_generator
from aigc_pipeline.training import distributed
from aigc_pipeline.training.checkpoint import (
    capture_rng_state,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from aigc_pipeline.training.data import Batches, Placement
from aigc_pipeline.training.speed import Precision, Speed, Toggle, resolve_device, resolve_speed

__all__ = ["Callbacks", "TrainResult", "train", "sample_images", "resolve_device", "seeded_generator"]

# Default gradient-norm limit: far above what healthy training shows (on 32px digits: DCGAN
# under ~300, SNGAN under ~10, the VAE, whose loss sums over pixels, under ~1500), far below a
# diverging run's (DCGAN at lr=1e6: over 1e6 at the first step).
DEFAULT_MAX_GRAD_NORM = 1e5


@dataclass
class Callbacks:
    """Hooks the loop calls; every one is optional. Under data parallelism only rank 0 calls
    them (except ``should_abort`` and ``should_stop``, which every rank must answer alike)."""

    on_progress: Callable[[int, int, int], None] | None = None  # (step, total_steps, epoch)
    on_metrics: Callable[[int, dict[str, float]], None] | None = None  # (step, scalars), flushed in batches
    # (epoch, fixed-noise grid uint8 [every ``sample_every`` epochs and at the last; else None],
    #  stats: mean losses, images_per_s, lr_<optimizer>)
    on_epoch_end: Callable[[int, np.ndarray | None, dict[str, float]], None] | None = None
    # (epoch, generator in eval mode): e.g. a small FID over training; the mode is restored after.
    on_epoch_generator: Callable[[int, torch.nn.Module], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None  # (step, file) after a checkpoint is written
    on_start: Callable[[dict[str, Any]], None] | None = (
        None  # run facts: speed settings, placement, world, resumed_from
    )
    should_abort: Callable[[], bool] | None = None
    # (step) -> True: stop cleanly after this step: a checkpoint is written, the result returned;
    # training the same configuration again resumes there (e.g. a time budget, a cancellation).
    should_stop: Callable[[int], bool] | None = None
    # The caller's own state (JSON-able or tensors), saved in every checkpoint and handed back to
    # ``restore_state`` on resume: e.g. the FID-over-training points, so a resumed run's outputs
    # are those of an uninterrupted one.
    save_state: Callable[[], Any] | None = None
    restore_state: Callable[[Any], None] | None = None


@dataclass
class TrainResult:
    family: Family
    steps: int
    epochs: int
    resumed_from: int  # step of the checkpoint resumed from, 0 for a fresh start
    images_per_second: float  # over the steps this call ran (global images under data parallelism)
    history: list[dict[str, float]] = field(default_factory=list)  # one record per step
    epoch_log: list[dict[str, float]] = field(default_factory=list)  # one record per epoch (reproducible)
    speed: str = ""
    timing: list[dict[str, float]] = field(
        default_factory=list
    )  # per epoch this call ran: wall-clock seconds, images/s
    stopped: bool = False  # should_stop ended it before the last step (``steps`` is where)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images -> uint8 numpy [B, C, H, W]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


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
    sample_every: int = 1,
    log_every: int = 25,
    keep_checkpoints: int = 3,
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM,  # 0 = no gradient check (non-finite values always stop)
    precision: Precision = "auto",
    channels_last: Toggle = "auto",
    compile: bool = False,
    data_placement: Placement = "auto",
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """Train ``arch.family`` on uint8 ``images`` [N, C, H, W]; resume from ``checkpoint_dir`` if it holds one.

    ``labels`` (int [N], 0..num_classes-1) are required when ``arch.num_classes`` > 0.
    ``batch_size`` is the global batch: under torchrun (an initialised process group) each of
    the N ranks trains on ``batch_size / N`` images of it.

    Raises :class:`TrainingDiverged` naming the first step whose loss or gradient norm is not
    finite, or whose gradient norm exceeds ``max_grad_norm``.
    """
    cb = callbacks or Callbacks()
    dist_info = distributed.current()
    dev = resolve_device(device, dist_info.local_rank)
    speed = resolve_speed(dev, precision, channels_last, compile)
    if not dist_info.is_main:
        cb = Callbacks(should_abort=cb.should_abort, should_stop=cb.should_stop)
    n = images.shape[0]
    if batch_size % dist_info.world:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by train.devices={dist_info.world}")
    if n < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than the training set ({n} images)")
    steps_per_epoch = n // batch_size  # the last partial batch is dropped: batch norm wants full batches
    total = epochs * steps_per_epoch
    if arch.num_classes and (
        labels is None or len(labels) != n or labels.min() < 0 or labels.max() >= arch.num_classes
    ):
        raise ValueError(f"a conditional model needs a label in 0..{arch.num_classes - 1} for every image")

    # Every global random state starts from the seed; checkpoints carry them on from there.
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    family = build_family(arch, hparams)
    _prepare_modules(family, dev, speed, dist_info)
    batches = Batches(
        images, labels if arch.num_classes else None, dev, placement=data_placement, channels_last=speed.channels_last
    )
    latent_shape = cast(tuple[int, ...], family.generator.latent_shape)  # a plain attribute (Tensor | Module to torch)
    fixed_z = torch.randn(sample_grid, *latent_shape, generator=seeded_generator(seed, SAMPLE_STREAM, 0, "cpu")).to(dev)
    fixed_y = (torch.arange(sample_grid) % arch.num_classes).to(dev) if arch.num_classes else None
    fingerprint = {
        "arch": dict(arch.__dict__),
        "hparams": dict(hparams.__dict__),
        "total_steps": total,
        "batch_size": batch_size,
        "seed": seed,
        "images": n,
    }

    start, history, epoch_log, saved_order = 0, [], [], None
    state = load_latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if state is not None:
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint in {checkpoint_dir} was made with a different configuration "
                f"({_differences(state['fingerprint'], fingerprint)}); delete that folder to start over"
            )
        for name, m in family.modules.items():
            m.load_state_dict(state["modules"][name])
        for name, opt in family.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        start = state["step"]
        names = state["history"]["columns"]
        history = [{"step": float(row[0]), **dict(zip(names, row[1:].tolist()))} for row in state["history"]["values"]]
        epoch_log = list(state["epochs"])
        saved_order = state["data"]
        if cb.restore_state and state.get("caller") is not None:
            cb.restore_state(state["caller"])
    resumed_from = start
    _wrap_nets(family, dev, speed, dist_info)
    if state is not None:
        restore_rng_state(state["rng"])  # last: building the model above drew from the global state
    if cb.on_start:
        cb.on_start(
            {
                "speed": speed.describe(),
                "data_placement": batches.placement,
                "world_size": dist_info.world,
                "resumed_from": resumed_from,
                "total_steps": total,
            }
        )

    pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def flush() -> None:
        """Fetch pending losses in one transfer, average them over ranks, check for divergence."""
        if not pending:
            return
        names = list(pending[0][1])
        stacked = torch.stack([torch.stack([p[1][k].float() for k in names]) for p in pending])
        values = distributed.all_reduce_mean(stacked).cpu().numpy()
        for (step, _), row in zip(pending, values):
            problem = _divergence(names, row, max_grad_norm)
            if problem:
                raise TrainingDiverged(f"training diverged at step {step}: {problem}", step=step, history=history)
            history.append({"step": float(step), **{k: float(v) for k, v in zip(names, row)}})
        if cb.on_metrics:
            for rec in history[-len(pending) :]:
                cb.on_metrics(int(rec["step"]), {k: v for k, v in rec.items() if k != "step"})
        pending.clear()

    def save(step: int, epoch: int, order: torch.Tensor) -> None:
        flush()  # never checkpoint a diverged state
        if not dist_info.is_main:
            return
        state = {
            "fingerprint": fingerprint,
            "step": step,
            "modules": {k: m.state_dict() for k, m in family.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in family.optimizers.items()},
            "rng": capture_rng_state(),
            # The data order: this epoch's permutation and where in it we are.
            "data": {"epoch": epoch, "order": order, "position": step - epoch * steps_per_epoch},
            # Augmentation draws come from the (seed, step) generators; recorded for inspection.
            "augmentation": {"policy": hparams.diffaugment, "seed": seed, "next_step": step},
            "history": _history_table(history),
            "epochs": epoch_log,
            "caller": cb.save_state() if cb.save_state else None,
            "world_size": dist_info.world,
        }
        assert checkpoint_dir is not None  # save() is only called with a checkpoint folder
        written = save_checkpoint(checkpoint_dir, step, state, keep=keep_checkpoints)
        if cb.on_checkpoint:
            cb.on_checkpoint(step, written)

    t_run = time.perf_counter()
    step, stopped, timing = start, False, []
    while step < total and not stopped:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if saved_order is not None and saved_order["epoch"] == epoch and in_epoch:
            order = saved_order["order"]
        else:
            order = torch.randperm(n, generator=seeded_generator(seed, EPOCH_STREAM, epoch, "cpu"))
        saved_order = None
        t_epoch, epoch_first = time.perf_counter(), step
        batch_iter = batches.epoch(order, in_epoch, steps_per_epoch, batch_size, dist_info.rank, dist_info.world)
        for real, y in batch_iter:
            if cb.should_abort and cb.should_abort():
                raise KeyboardInterrupt("training aborted by the caller")
            rnd = BatchRandom(seeded_generator(seed, STEP_STREAM, step, dev), dist_info.rank, dist_info.world)
            with speed.autocast():
                losses = family.train_step(real, y, rnd)
            step += 1
            pending.append((step, losses))
            if len(pending) >= log_every:
                flush()
            if cb.on_progress:
                cb.on_progress(step, total, epoch + 1)
            if step % steps_per_epoch == 0:
                # The epoch's record and callbacks come before this step's checkpoint, which then
                # holds them: a run resumed from it starts the next epoch with nothing missing.
                flush()
                seconds = time.perf_counter() - t_epoch  # after flush: the device has finished the epoch
                rate = (step - epoch_first) * batch_size / seconds if seconds > 0 else float("nan")
                record = {
                    "epoch": float(epoch + 1),
                    "step": float(step),
                    **{f"lr_{k}": float(o.param_groups[0]["lr"]) for k, o in family.optimizers.items()},
                    **_mean_losses(history[-steps_per_epoch:]),
                }
                epoch_log.append(record)
                timing.append({"epoch": float(epoch + 1), "seconds": seconds, "images_per_s": rate})
                _epoch_callbacks(
                    cb,
                    family,
                    epoch + 1,
                    fixed_z,
                    fixed_y,
                    {**record, "images_per_s": rate},
                    grid=(epoch + 1) % sample_every == 0 or epoch + 1 == epochs,
                )
            stop = step < total and cb.should_stop is not None and cb.should_stop(step)
            if checkpoint_dir and (step % checkpoint_every == 0 or step == total or stop):
                save(step, epoch, order)
            if stop:
                stopped = True
                break
    flush()
    elapsed = time.perf_counter() - t_run
    done = (step - start) * batch_size
    return TrainResult(
        family=family,
        steps=step,
        epochs=epochs,
        resumed_from=resumed_from,
        images_per_second=done / elapsed if elapsed > 0 and done else float("nan"),
        history=history,
        epoch_log=epoch_log,
        speed=speed.describe(),
        timing=timing,
        stopped=stopped,
    )


def _prepare_modules(family: Family, dev: torch.device, speed: Speed, dist_info: distributed.DistInfo) -> None:
    for name, m in family.modules.items():
        m.to(dev).train()
        if speed.channels_last:
            m.to(memory_format=torch.channels_last)
        if dist_info.world > 1:
            family.modules[name] = distributed.sync_batchnorm(m, dev)
    family.nets.update(family.modules)


def _wrap_nets(family: Family, dev: torch.device, speed: Speed, dist_info: distributed.DistInfo) -> None:
    """Compile and/or wrap for data parallelism what train_step calls; ``modules`` stay plain
    (checkpoints and the exported generator use their state-dict keys)."""
    for name, m in family.modules.items():
        if not any(True for _ in m.parameters()):
            continue  # e.g. a counter module: nothing to run forward on
        net = distributed.wrap_ddp(m, dev) if dist_info.world > 1 else m
        if speed.compile:
            # Around DDP, as torch recommends, so DDP's hooks stay outside the graph. For a module torch.compile
            # returns an OptimizedModule (an nn.Module); its stub only says Callable.
            net = cast(torch.nn.Module, torch.compile(net))
        family.nets[name] = net


def _divergence(names: list[str], row: np.ndarray, max_grad_norm: float) -> str | None:
    bad = [k for k, v in zip(names, row) if not math.isfinite(v)]
    if bad:
        return f"non-finite {', '.join(bad)}; lower train.lr or check the data"
    if max_grad_norm > 0:
        over = [(k, v) for k, v in zip(names, row) if k.startswith("grad_norm") and v > max_grad_norm]
        if over:
            shown = ", ".join(f"{k}={v:.3g}" for k, v in over)
            return (
                f"exploding gradient ({shown}, over train.max_grad_norm={max_grad_norm:g}); "
                "lower train.lr (or raise train.max_grad_norm if such norms are expected)"
            )
    return None


def _history_table(history: list[dict[str, float]]) -> dict[str, Any]:
    """Per-step records as one float64 tensor (compact in a checkpoint; floats round-trip exactly)."""
    columns = [k for k in history[0] if k != "step"] if history else []
    values = torch.tensor([[h["step"], *(h[k] for k in columns)] for h in history], dtype=torch.float64)
    return {"columns": columns, "values": values.reshape(len(history), len(columns) + 1)}


def _mean_losses(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "step"}


def _epoch_callbacks(
    cb: Callbacks,
    family: Family,
    epoch: int,
    fixed_z: torch.Tensor,
    fixed_y: torch.Tensor | None,
    stats: dict[str, float],
    grid: bool,
) -> None:
    if cb.on_epoch_end:
        cb.on_epoch_end(
            epoch,
            sample_images(family.generator, fixed_z, fixed_y) if grid else None,
            {k: v for k, v in stats.items() if k not in ("epoch", "step")},
        )
    if cb.on_epoch_generator:
        was_training = family.generator.training
        family.generator.eval()
        try:
            with torch.no_grad():
                cb.on_epoch_generator(epoch, family.generator)
        finally:
            family.generator.train(was_training)


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in keys)


@torch.no_grad()
def sample_images(generator: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None) -> np.ndarray:
    """Images for latent ``z`` in eval mode (batch-norm running stats), restoring the mode after."""
    was_training = generator.training
    generator.eval()
    try:
        return to_uint8(generator(z, labels))
    finally:
        generator.train(was_training)
