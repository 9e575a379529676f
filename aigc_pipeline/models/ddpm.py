"""Denoising diffusion (DDPM, Ho et al. 2020) with Hugging Face diffusers: a ``UNet2DModel``
built from its config (never downloaded), trained to predict the noise that a ``DDPMScheduler``
adds at a random timestep; an EMA of its weights is exported, sampled by DDIM
(:class:`~aigc_pipeline.models.samplers.DDIMSampler`, ``train.sampling_steps`` steps by default;
the pyfunc takes a ``steps`` input). Class-conditional through the UNet's class embedding
(``num_class_embeds``).

The UNet goes down to 4x4: one level per 2x step from the image size, ``width`` channels at full
resolution and twice that below, two ResNet layers per level, self-attention in the 4x4 middle
block only (cheap there). AdamW with the recipe's learning rate, no decay; the loss is the
mean squared error of the predicted noise, in float32.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from aigc_pipeline.models.base import Arch, Hparams, Recipe, grad_norm
from aigc_pipeline.models.blocks import num_levels
from aigc_pipeline.models.ema import EmaCounter, ema_copy, update_ema
from aigc_pipeline.models.samplers import DDIMSampler
from aigc_pipeline.randomness import BatchRandom

TRAIN_TIMESTEPS = 1000
# The noise schedule of Ho et al. (linear betas 1e-4 .. 0.02 over 1000 steps).
SCHEDULER_CONFIG = {
    "num_train_timesteps": TRAIN_TIMESTEPS,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def unet_config(arch: Arch) -> dict[str, Any]:
    """The ``UNet2DModel`` config for ``arch`` (saved in model.json: the exported model is rebuilt from it)."""
    levels = num_levels(arch.size) + 1  # size -> 4x4
    channels = [arch.width] + [2 * arch.width] * (levels - 1)
    return {
        "sample_size": arch.size,
        "in_channels": arch.channels,
        "out_channels": arch.channels,
        "block_out_channels": channels,
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D"] * levels,
        "up_block_types": ["UpBlock2D"] * levels,
        "norm_num_groups": math.gcd(32, arch.width),
        "num_class_embeds": arch.num_classes or None,
    }


def build_unet(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        **{
            **config,
            "block_out_channels": tuple(config["block_out_channels"]),
            "down_block_types": tuple(config["down_block_types"]),
            "up_block_types": tuple(config["up_block_types"]),
        }
    )


class DDPM:
    recipe = Recipe(lr=1e-3, beta1=0.9, beta2=0.999)  # AdamW; measured on digits at 8 px (bench/quality.py)

    def __init__(self, arch: Arch, hp: Hparams) -> None:
        from diffusers import DDPMScheduler

        self.arch = arch
        self.unet_config = unet_config(arch)
        unet = build_unet(self.unet_config)
        self.noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
        self.ema_decay = hp.ema_decay
        self.sampling_steps = hp.sampling_steps
        self.modules = {"unet": unet, "unet_ema": ema_copy(unet), "ema_state": EmaCounter()}
        self.nets = dict(self.modules)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "unet": torch.optim.AdamW(unet.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=0.0)
        }

    @property
    def generator(self) -> nn.Module:
        return self._sampler(self.modules["unet_ema"], self.arch, self.generator_spec())

    def generator_spec(self) -> dict[str, Any]:
        return {
            "unet": self.unet_config,
            "scheduler": SCHEDULER_CONFIG,
            "sampler": {"kind": "ddim", "steps": self.sampling_steps, "eta": 0.0},
        }

    @classmethod
    def build_generator(cls, arch: Arch, spec: dict[str, Any]) -> nn.Module:
        return cls._sampler(build_unet(spec["unet"]), arch, spec)

    @staticmethod
    def _sampler(unet: nn.Module, arch: Arch, spec: dict[str, Any]) -> DDIMSampler:
        return DDIMSampler(
            unet,
            spec["scheduler"],
            sample_shape=(arch.channels, arch.size, arch.size),
            steps=int(spec["sampler"]["steps"]),
            num_classes=arch.num_classes,
        )

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, rnd: BatchRandom) -> dict[str, torch.Tensor]:
        unet, opt = self.nets["unet"], self.optimizers["unet"]
        noise = rnd.randn(tuple(real.shape), device=real.device)
        t = rnd.randint(0, TRAIN_TIMESTEPS, (real.shape[0],), device=real.device)
        noisy = self.noise_scheduler.add_noise(real, noise, t)
        pred = unet(noisy, t, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = grad_norm(self.modules["unet"].parameters())
        opt.step()
        counter = cast(EmaCounter, self.modules["ema_state"])  # modules is typed by its common base, nn.Module
        update_ema(self.modules["unet_ema"], self.modules["unet"], counter, self.ema_decay)
        return {"loss": loss.detach(), "grad_norm": norm}
