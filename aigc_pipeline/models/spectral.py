"""Spectral normalisation that stays in float32 under autocast, for GAN discriminators."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm


class _FP32SpectralNorm(_SpectralNorm):
    """Spectral norm whose power iteration stays in float32 under autocast (a bf16 estimate of
    sigma would make the discriminator's Lipschitz bound noisy)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight.float())


def spectral_norm_all(module: nn.Module) -> nn.Module:
    """Spectral norm (one power iteration per forward, in float32) on every conv and linear layer of
    ``module``: bounds each layer's Lipschitz constant (Miyato et al., 2018)."""
    for child in module.children():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(child, "weight", _FP32SpectralNorm(child.weight, 1, 0, 1e-12))
        else:
            spectral_norm_all(child)
    return module
