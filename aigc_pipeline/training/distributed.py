"""Data parallelism: the same loop on N processes started by ``torchrun``.

Each rank trains on its share of every global batch (``train.batch_size`` / N images), with:

- gradients averaged by :class:`~torch.nn.parallel.DistributedDataParallel`;
- batch norm over the *global* batch: ``torch.nn.SyncBatchNorm`` on CUDA; on the CPU (gloo),
  where torch's SyncBatchNorm refuses to run ("expected input tensor to be on GPU"),
  :class:`GlooSyncBatchNorm2d`, which all-reduces the per-channel sums with autograd support;
- the global batch's random draws on every rank (see :mod:`aigc_pipeline.randomness`).

So N processes compute what one device computes on the same global batch, up to
floating-point order. Only rank 0 writes checkpoints and calls the caller's callbacks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """True in a process started by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, ...)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (nccl on CUDA, gloo on the CPU); idempotent.

    Outside torchrun this returns rank 0 of 1 without touching torch.distributed.
    """
    if not under_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    return current()


def current() -> DistInfo:
    """Rank and world size of the initialised default process group, or rank 0 of 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    )


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch, on any backend.

    One all-reduce per call of [sum, sum of squares, count] per channel; the all-reduce is
    differentiable, so gradients flow through the global statistics
    exactly as through one device's batch norm. Running statistics are updated with the
    unbiased global variance, as ``nn.BatchNorm2d`` does. Same parameters, buffers and
    state-dict keys as ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x32 = x.float()
        count = torch.full((1,), x.shape[0] * x.shape[2] * x.shape[3], dtype=torch.float32, device=x.device)
        local = torch.cat([x32.sum(dim=(0, 2, 3)), x32.pow(2).sum(dim=(0, 2, 3)), count])
        total = _AllReduceSum.apply(local)
        c = self.num_features
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean.pow(2)).clamp_min(0.0)
        if self.track_running_stats:
            # Registered as tensors (not None) when tracking running statistics.
            assert self.num_batches_tracked is not None
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        y = (x32 - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` with a global-batch one sharing its parameters and
    buffers (the same tensor objects, so optimizers built before keep updating them)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = GlooSyncBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats, device=device
            )
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            if child.track_running_stats:
                bn.running_mean, bn.running_var = child.running_mean, child.running_var
                bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, device)
    return module


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around a module with trainable parameters (others as they are).

    No buffer sync in forward: batch-norm statistics are global already, and a broadcast
    between a GAN's several forward passes would modify buffers autograd still needs.
    """
    if not any(p.requires_grad for p in module.parameters()):
        return module
    import inspect

    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.15 renamed the option (the old name warns); older releases only know the old one.
    no_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(module, device_ids=ids, **no_sync)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself when not distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()
