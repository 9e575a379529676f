"""The interface every model family implements, so the trainer stays family-agnostic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


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
class Hparams:
    """Optimisation settings a family needs to build its optimizers and losses."""

    lr: float
    beta1: float
    beta2: float
    vae_beta: float = 1.0
    ema_decay: float = 0.999  # generator EMA (sngan)
    diffaugment: str = "color,translation,cutout"  # DiffAugment policy (sngan); "" = off


class Family(Protocol):
    """A trainable model family (one instance per training run)."""

    modules: dict[str, nn.Module]  # everything saved in a checkpoint, by name
    optimizers: dict[str, torch.optim.Optimizer]

    def train_step(
        self, real: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch in [-1, 1] (with its class labels when the
        architecture is conditional); returns detached scalar losses.

        ``gen`` is the only source of randomness (noise, reparameterisation), so a step
        is reproducible from its generator state.
        """
        ...

    @property
    def generator(self) -> nn.Module:
        """The :class:`Generator` mapping latent [B, latent_dim] (+ labels) to images in [-1, 1] (exported)."""
        ...
