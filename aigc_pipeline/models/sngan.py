"""A stronger GAN for small data: spectral-norm discriminator, hinge loss, an exponential moving
average (EMA) of the generator's weights (the exported generator), and DiffAugment on every
image the discriminator sees."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from aigc_pipeline.models.base import Arch, Hparams
from aigc_pipeline.models.blocks import Critic, Generator, dcgan_init
from aigc_pipeline.training.diffaugment import diff_augment


def _spectral_norm_all(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(module, name, nn.utils.parametrizations.spectral_norm(child))
        else:
            _spectral_norm_all(child)
    return module


class SNGAN:
    def __init__(self, arch: Arch, hp: Hparams) -> None:
        g = Generator(arch.latent_dim, arch.size, arch.channels, arch.width, arch.num_classes)
        g.apply(dcgan_init)
        # Spectral norm replaces batch norm in D: it bounds D's Lipschitz constant per layer.
        d = _spectral_norm_all(
            Critic(arch.size, arch.channels, arch.width, out_dim=1, batchnorm=False, num_classes=arch.num_classes)
        )
        ema = copy.deepcopy(g).requires_grad_(False)
        self.latent_dim = arch.latent_dim
        self.ema_decay = hp.ema_decay
        self.policy = hp.diffaugment
        self.modules = {"generator": g, "discriminator": d, "generator_ema": ema}
        betas = (hp.beta1, hp.beta2)
        self.optimizers = {
            "generator": torch.optim.Adam(g.parameters(), lr=hp.lr, betas=betas),
            "discriminator": torch.optim.Adam(d.parameters(), lr=hp.lr, betas=betas),
        }

    @property
    def generator(self) -> nn.Module:
        return self.modules["generator_ema"]

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator) -> dict[str, torch.Tensor]:
        g, d = self.modules["generator"], self.modules["discriminator"]
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        z = torch.randn(real.shape[0], self.latent_dim, generator=gen, device=real.device)
        fake = g(z, labels)

        opt_d.zero_grad(set_to_none=True)
        loss_d = (
            F.relu(1.0 - d(diff_augment(real, self.policy, gen), labels)).mean()
            + F.relu(1.0 + d(diff_augment(fake.detach(), self.policy, gen), labels)).mean()
        )
        loss_d.backward()
        opt_d.step()

        opt_g.zero_grad(set_to_none=True)
        loss_g = -d(diff_augment(fake, self.policy, gen), labels).mean()
        loss_g.backward()
        opt_g.step()
        self._update_ema()
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        g, ema = self.modules["generator"], self.modules["generator_ema"]
        for p_ema, p in zip(ema.parameters(), g.parameters()):
            p_ema.lerp_(p, 1.0 - self.ema_decay)
        # Batch-norm statistics are not averaged: the EMA generator uses the live ones.
        for b_ema, b in zip(ema.buffers(), g.buffers()):
            b_ema.copy_(b)
