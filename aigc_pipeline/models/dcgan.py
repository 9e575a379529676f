"""DCGAN (Radford et al. 2015) with the known-good recipe: transposed convs, batch norm,
Adam(2e-4, betas 0.5/0.999), non-saturating BCE loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from aigc_pipeline.models.base import Arch, Hparams, Recipe, grad_norm
from aigc_pipeline.models.blocks import Critic, Generator, conv_generator, dcgan_init
from aigc_pipeline.randomness import BatchRandom


class DCGAN:
    recipe = Recipe(lr=2e-4, beta1=0.5, beta2=0.999)  # Radford et al.

    @staticmethod
    def build_generator(arch: Arch, spec: dict[str, Any]) -> torch.nn.Module:
        # A def, not ``staticmethod(conv_generator)``: type checkers see it as the static method Family asks for.
        return conv_generator(arch, spec)

    def __init__(self, arch: Arch, hp: Hparams) -> None:
        g = Generator(arch.latent_dim, arch.size, arch.channels, arch.width, arch.num_classes)
        d = Critic(arch.size, arch.channels, arch.width, out_dim=1, num_classes=arch.num_classes)
        g.apply(dcgan_init)
        d.apply(dcgan_init)
        self.latent_dim = arch.latent_dim
        self.modules = {"generator": g, "discriminator": d}
        self.nets = dict(self.modules)
        betas = (hp.beta1, hp.beta2)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "generator": torch.optim.Adam(g.parameters(), lr=hp.lr, betas=betas),
            "discriminator": torch.optim.Adam(d.parameters(), lr=hp.lr, betas=betas),
        }

    @property
    def generator(self) -> torch.nn.Module:
        return self.modules["generator"]

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, rnd: BatchRandom) -> dict[str, torch.Tensor]:
        g, d = self.nets["generator"], self.nets["discriminator"]
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        z = rnd.randn((real.shape[0], self.latent_dim), device=real.device)
        fake = g(z, labels)

        opt_d.zero_grad(set_to_none=True)
        logits_real, logits_fake = d(real, labels).float(), d(fake.detach(), labels).float()
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, torch.ones_like(logits_real)
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        loss_d.backward()
        norm_d = grad_norm(self.modules["discriminator"].parameters())
        opt_d.step()

        opt_g.zero_grad(set_to_none=True)
        logits = d(fake, labels).float()
        loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        loss_g.backward()
        norm_g = grad_norm(self.modules["generator"].parameters())
        opt_g.step()
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "grad_norm_d": norm_d, "grad_norm_g": norm_g}
