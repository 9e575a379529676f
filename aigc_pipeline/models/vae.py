"""Convolutional (beta-, optionally class-conditional) VAE: DCGAN-shaped encoder and decoder,
Gaussian decoder (sum of squared errors), KL weighted by ``train.vae_beta``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aigc_pipeline.models.base import Arch, Hparams, Recipe, grad_norm
from aigc_pipeline.models.blocks import Critic, Generator, conv_generator, dcgan_init
from aigc_pipeline.randomness import BatchRandom


class VAE:
    recipe = Recipe(lr=2e-4, beta1=0.5, beta2=0.999)  # the DCGAN settings; not tuned for the VAE

    @staticmethod
    def build_generator(arch: Arch, spec: dict[str, Any]) -> nn.Module:
        # A def, not ``staticmethod(conv_generator)``: type checkers see it as the static method Family asks for.
        return conv_generator(arch, spec)

    def __init__(self, arch: Arch, hp: Hparams) -> None:
        enc = Critic(arch.size, arch.channels, arch.width, out_dim=2 * arch.latent_dim, num_classes=arch.num_classes)
        dec = Generator(arch.latent_dim, arch.size, arch.channels, arch.width, arch.num_classes)
        enc.apply(dcgan_init)
        dec.apply(dcgan_init)
        self.beta = hp.vae_beta
        self.modules: dict[str, nn.Module] = {"encoder": enc, "generator": dec}
        self.nets = dict(self.modules)
        params = list(enc.parameters()) + list(dec.parameters())
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "vae": torch.optim.Adam(params, lr=hp.lr, betas=(hp.beta1, hp.beta2))
        }

    @property
    def generator(self) -> nn.Module:
        return self.modules["generator"]

    def train_step(self, real: torch.Tensor, labels: torch.Tensor | None, rnd: BatchRandom) -> dict[str, torch.Tensor]:
        enc, dec = self.nets["encoder"], self.nets["generator"]
        opt = self.optimizers["vae"]
        mu, logvar = enc(real, labels).float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training
        eps = rnd.randn(tuple(mu.shape), device=mu.device, dtype=mu.dtype)
        recon = dec(mu + eps * torch.exp(0.5 * logvar), labels).float()
        n = real.shape[0]
        rec = (recon - real).pow(2).sum() / n
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / n
        loss = rec + self.beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = grad_norm(p for m in self.modules.values() for p in m.parameters())
        opt.step()
        return {"loss": loss.detach(), "recon": rec.detach(), "kl": kl.detach(), "grad_norm": norm}
