"""A stronger GAN for small data: spectral-norm discriminator, hinge loss, an exponential moving
average (EMA) of the generator's weights (the exported generator), and DiffAugment on every
image the discriminator sees."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from aigc_pipeline.models.base import Arch, Hparams, Recipe, grad_norm
from aigc_pipeline.models.blocks import Critic, conv_generator, dcgan_init
from aigc_pipeline.models.diffaugment import diff_augment
from aigc_pipeline.models.ema import EmaCounter, ema_copy, update_ema
from aigc_pipeline.models.spectral import spectral_norm_all
from aigc_pipeline.randomness import BatchRandom


class SNGAN:
    # Adam betas (0, 0.9) as in Miyato et al. / BigGAN; lr 4e-4 measured best at the default
    # budget on digits (bench/training.py; 2e-4 and the DCGAN betas gave a worse FID).
    recipe = Recipe(lr=4e-4, beta1=0.0, beta2=0.9)

    def __init__(self, arch: Arch, hp: Hparams) -> None:
        g, d = self.networks(arch)
        ema = ema_copy(g)
        self.latent_dim = arch.latent_dim
        self.ema_decay = hp.ema_decay
        self.policy = hp.diffaugment
        self.modules = {"generator": g, "discriminator": d, "generator_ema": ema, "ema_state": EmaCounter()}
        self.nets = dict(self.modules)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "generator": torch.optim.Adam(g.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2)),
            "discriminator": torch.optim.Adam(d.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2)),
        }

    @classmethod
    def networks(cls, arch: Arch) -> tuple[nn.Module, nn.Module]:
        """The generator and the (spectral-norm) discriminator, freshly initialised."""
        g = cls.build_generator(arch, {})
        g.apply(dcgan_init)
        # Spectral norm replaces batch norm in D: it bounds D's Lipschitz constant per layer.
        d = spectral_norm_all(
            Critic(arch.size, arch.channels, arch.width, out_dim=1, batchnorm=False, num_classes=arch.num_classes)
        )
        return g, d

    @staticmethod
    def build_generator(arch: Arch, spec: dict[str, Any]) -> nn.Module:
        # A def, not ``staticmethod(conv_generator)``: type checkers see it as the static method Family asks for,
        # returning any nn.Module (ResGAN's generator is another class).
        return conv_generator(arch, spec)

    @property
    def generator(self) -> nn.Module:
        return self.modules["generator_ema"]

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, rnd: BatchRandom) -> dict[str, torch.Tensor]:
        g, d = self.nets["generator"], self.nets["discriminator"]
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        z = rnd.randn((real.shape[0], self.latent_dim), device=real.device)
        fake = g(z, labels)

        opt_d.zero_grad(set_to_none=True)
        loss_d = (
            F.relu(1.0 - d(diff_augment(real, self.policy, rnd), labels).float()).mean()
            + F.relu(1.0 + d(diff_augment(fake.detach(), self.policy, rnd), labels).float()).mean()
        )
        loss_d.backward()
        norm_d = grad_norm(self.modules["discriminator"].parameters())
        opt_d.step()

        opt_g.zero_grad(set_to_none=True)
        loss_g = -d(diff_augment(fake, self.policy, rnd), labels).float().mean()
        loss_g.backward()
        norm_g = grad_norm(self.modules["generator"].parameters())
        opt_g.step()
        self._update_ema()
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "grad_norm_d": norm_d, "grad_norm_g": norm_g}

    def _update_ema(self) -> None:
        counter = cast(EmaCounter, self.modules["ema_state"])  # modules is typed by its common base, nn.Module
        update_ema(self.modules["generator_ema"], self.modules["generator"], counter, self.ema_decay)
