"""DCGAN-style convolutional stacks that adapt to any power-of-two image size >= 8."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_CHANNELS = 512


def num_levels(size: int) -> int:
    """Number of 2x resolution steps between 4x4 and ``size`` x ``size``."""
    if size < 8 or size & (size - 1):
        raise ValueError(f"image size must be a power of two >= 8, got {size}")
    return int(math.log2(size)) - 2


def level_channels(width: int, level: int) -> int:
    """Channels at ``level`` (0 = full resolution): doubling per downsampling, capped."""
    return min(width * 2**level, MAX_CHANNELS)


class ConvGenerator(nn.Sequential):
    """latent [B, Z] -> image [B, C, S, S] in [-1, 1]: transposed convs + BN + ReLU, tanh out."""

    def __init__(self, latent_dim: int, size: int, channels: int, width: int) -> None:
        n = num_levels(size)
        layers: list[nn.Module] = [nn.Unflatten(1, (latent_dim, 1, 1))]
        c_in = latent_dim
        for level in range(n - 1, -1, -1):
            c_out = level_channels(width, level)
            if level == n - 1:
                layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 1, 0, bias=False))  # 1 -> 4
            else:
                layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False))
            layers += [nn.BatchNorm2d(c_out), nn.ReLU(True)]
            c_in = c_out
        layers += [nn.ConvTranspose2d(c_in, channels, 4, 2, 1, bias=False), nn.Tanh()]
        super().__init__(*layers)


class ConvEncoder(nn.Sequential):
    """image [B, C, S, S] -> [B, out_dim]: strided convs + (BN) + LeakyReLU(0.2), as DCGAN's D."""

    def __init__(self, size: int, channels: int, width: int, out_dim: int, batchnorm: bool = True) -> None:
        n = num_levels(size)
        layers: list[nn.Module] = []
        c_in = channels
        for level in range(n):
            c_out = level_channels(width, level)
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False))
            # DCGAN recipe: no batch norm on the discriminator's input layer.
            if batchnorm and level > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        layers += [nn.Conv2d(c_in, out_dim, 4, 1, 0), nn.Flatten()]  # 4x4 -> 1x1
        super().__init__(*layers)


class Generator(nn.Module):
    """latent [B, Z] (and class labels [B] when conditional) -> images [B, C, S, S] in [-1, 1].

    A conditional generator reads the one-hot label concatenated to the latent vector.
    """

    def __init__(self, latent_dim: int, size: int, channels: int, width: int, num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.latent_shape = (latent_dim,)  # what generate() draws per image
        self.net = ConvGenerator(latent_dim + num_classes, size, channels, width)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(with_onehot(z, labels, self.num_classes))


class Critic(nn.Module):
    """images [B, C, S, S] (and labels when conditional) -> [B, out_dim]; a discriminator or an
    encoder. A conditional one reads one-hot label planes stacked onto the image channels."""

    def __init__(
        self, size: int, channels: int, width: int, out_dim: int, *, batchnorm: bool = True, num_classes: int = 0
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = ConvEncoder(size, channels + num_classes, width, out_dim, batchnorm)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            planes = onehot(labels, self.num_classes, x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
        return self.net(x)


def onehot(labels: torch.Tensor | None, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows of ``labels``; a clear error when a conditional model is called without them."""
    if labels is None:
        raise ValueError("this model is class-conditional: pass a class label for every image")
    return F.one_hot(labels, num_classes).to(dtype)


def with_onehot(z: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """``z`` with the one-hot label appended (``z`` itself when unconditional)."""
    return torch.cat([z, onehot(labels, num_classes, z.dtype)], dim=1) if num_classes else z


def conv_generator(arch: Any, spec: Mapping[str, Any] | None = None) -> Generator:
    """The exported generator of the DCGAN-shaped families, rebuilt from their :class:`Arch`."""
    return Generator(arch.latent_dim, arch.size, arch.channels, arch.width, arch.num_classes)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN weight init: conv N(0, 0.02), batch norm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
