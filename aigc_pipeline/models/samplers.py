"""Samplers: turn a trained noise-prediction network into an image generator.

As in diffusers, the network (:mod:`.ddpm`'s ``UNet2DModel``) and the sampling schedule are
separate objects: the network knows nothing of how it is sampled, and :class:`DDIMSampler` runs
any epsilon-predicting denoiser ``denoiser(x_t, t, class_labels=y, return_dict=False)[0]`` through
a diffusers ``DDIMScheduler`` built from the training noise schedule's config. With ``eta = 0``
DDIM is deterministic, so the initial noise plays the part of a GAN's latent vector: the same
noise, steps and weights give the same images (what ``generate()``, the fixed-noise grids and the
pyfunc's ``seed`` rely on).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

MAX_STEPS = 1000  # at most the training schedule's number of timesteps


class DDIMSampler(nn.Module):
    """noise [B, C, H, W] (+ labels [B]) -> images [B, C, H, W] in [-1, 1] by ``steps`` DDIM steps.

    ``scheduler_config`` is the training scheduler's config (a ``DDPMScheduler``'s); sampling uses
    "trailing" timestep spacing, so the first step starts from pure noise at the last training
    timestep (Lin et al., 2024: the default "leading" spacing never sees t = T - 1).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler_config: Mapping[str, Any],
        *,
        sample_shape: tuple[int, ...],
        steps: int,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scheduler_config = dict(scheduler_config)
        self.latent_shape = tuple(sample_shape)  # what generate() draws per image: the initial noise
        self.num_classes = num_classes
        self.steps = check_steps(steps, int(self.scheduler_config.get("num_train_timesteps", MAX_STEPS)))

    def with_steps(self, steps: int) -> DDIMSampler:
        """The same sampler (sharing the denoiser's weights) with another number of steps."""
        other = copy.copy(self)
        other.steps = check_steps(steps, int(self.scheduler_config.get("num_train_timesteps", MAX_STEPS)))
        return other

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers import DDIMScheduler

        if self.num_classes and labels is None:
            raise ValueError("this model is class-conditional: pass a class label for every image")
        scheduler = DDIMScheduler.from_config(
            self.scheduler_config, timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=False
        )
        scheduler.set_timesteps(self.steps, device=noise.device)
        x = noise
        for t in scheduler.timesteps:
            eps = self.denoiser(x, t, class_labels=labels if self.num_classes else None, return_dict=False)[0]
            x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
        return x.clamp(-1.0, 1.0)


def check_steps(steps: Any, limit: int = MAX_STEPS) -> int:
    """``steps`` as an int in 1..limit, or a ValueError saying what is allowed."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise ValueError(f"sampling steps must be an integer from 1 to {limit}, got {steps!r}")
    return steps
