"""The interface every model family implements, so the trainer stays family-agnostic."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from aigc_pipeline.randomness import BatchRandom


@dataclass(frozen=True)
class Arch:
    """Shape of a model; saved beside the weights so a model can be rebuilt from its folder."""

    family: str
    size: int
    channels: int
    latent_dim: int
    width: int
    num_classes: int = 0  # > 0: class-conditional (generator and discriminator/encoder see labels)


@dataclass(frozen=True)
class Recipe:
    """A family's known-good optimiser settings, used where ``train.lr``/``beta1``/``beta2`` are ``auto``."""

    lr: float
    beta1: float
    beta2: float


@dataclass(frozen=True)
class Hparams:
    """Optimisation settings a family needs to build its optimizers and losses."""

    lr: float
    beta1: float
    beta2: float
    vae_beta: float = 1.0
    ema_decay: float = 0.999  # generator EMA (sngan)
    diffaugment: str = "color,translation,cutout"  # DiffAugment policy (sngan, resgan); "" = off
    sampling_steps: int = 50  # ddpm: DDIM steps of the exported sampler (and the epoch grids)


class Family(Protocol):
    """A trainable model family (one instance per training run)."""

    modules: dict[str, nn.Module]  # everything saved in a checkpoint, by name
    optimizers: dict[str, torch.optim.Optimizer]
    # What train_step calls forward on: ``modules`` by default; the loop may replace entries
    # with wrapped versions (DistributedDataParallel, compiled) that share the same parameters.
    nets: dict[str, nn.Module]

    def __init__(self, arch: Arch, hp: Hparams) -> None: ...

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, rnd: BatchRandom) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch in [-1, 1] (with its class labels when the
        architecture is conditional); returns detached float32 scalars: the losses, and
        ``grad_norm*`` entries (the gradient norm before each optimizer step), which the
        loop checks against ``train.max_grad_norm``.

        ``rnd`` is the only source of randomness (noise, reparameterisation, augmentation),
        so a step is reproducible from its generator state. May run under autocast: compute
        losses in float32.
        """
        ...

    @property
    def generator(self) -> nn.Module:
        """The exported generator: latent [B, *latent_shape] (+ labels) -> images in [-1, 1]. It has a
        ``latent_shape`` attribute (``(latent_dim,)`` for a GAN, the image shape for a diffusion
        sampler, whose latent is the initial noise)."""
        ...

    @staticmethod
    def build_generator(arch: Arch, spec: dict[str, Any]) -> nn.Module:
        """A fresh (untrained) exported generator for ``arch``; ``spec`` is what
        ``generator_spec()`` returned at training time (saved in model.json), ``{}`` if the family
        has no such method. Loading the saved weights into it restores the trained generator."""
        ...


def grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients, as a device tensor (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().detach()
