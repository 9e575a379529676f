"""A stronger GAN for small data: spectral-norm discriminator, hinge loss, an exponential moving
average (EMA) of the generator's weights (the exported generator), and DiffAugment on every
image the discriminator sees."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from aigc_pipeline.models.base import Arch, Hparams, Recipe, grad_norm
from aigc_pipeline.models.blocks import Critic, Generator, dcgan_init
from aigc_pipeline.training.diffaugment import diff_augment
from aigc_pipeline.training.randomness import BatchRandom

# EMA warm-up (as in StyleGAN2's ema_rampup): the decay after t updates is
# min(ema_decay, (1 + t) / (EMA_RAMPUP + t)), so early averages are not dominated by the
# random initial weights when training is short.
EMA_RAMPUP = 10.0


class _FP32SpectralNorm(_SpectralNorm):
    """Spectral norm whose power iteration stays in float32 under autocast (a bf16 estimate of
    sigma would make the discriminator's Lipschitz bound noisy)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight.float())


def _spectral_norm_all(module: nn.Module) -> nn.Module:
    for child in module.children():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(child, "weight", _FP32SpectralNorm(child.weight, 1, 0, 1e-12))
        else:
            _spectral_norm_all(child)
    return module


class _Counter(nn.Module):
    """Number of EMA updates so far, as a buffer: saved in checkpoints, kept on the device."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("updates", torch.zeros((), dtype=torch.float32))


class SNGAN:
    # Adam betas (0, 0.9) as in Miyato et al. / BigGAN; lr 4e-4 measured best at the default
    # budget on digits (bench/training.py; 2e-4 and the DCGAN betas gave a worse FID).
    recipe = Recipe(lr=4e-4, beta1=0.0, beta2=0.9)

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
        self.modules = {"generator": g, "discriminator": d, "generator_ema": ema, "ema_state": _Counter()}
        self.nets = dict(self.modules)
        self.optimizers = {
            "generator": torch.optim.Adam(g.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2)),
            "discriminator": torch.optim.Adam(d.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2)),
        }

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

    @torch.no_grad()
    def _update_ema(self) -> None:
        g, ema = self.modules["generator"], self.modules["generator_ema"]
        t = self.modules["ema_state"].updates
        # On the device: no host sync to read the counter.
        keep = torch.clamp((1.0 + t) / (EMA_RAMPUP + t), max=self.ema_decay)
        torch._foreach_lerp_(list(ema.parameters()), list(g.parameters()), 1.0 - keep)
        t.add_(1.0)
        # Batch-norm statistics are not averaged: the EMA generator uses the live ones.
        for b_ema, b in zip(ema.buffers(), g.buffers()):
            b_ema.copy_(b)
