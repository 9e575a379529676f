"""Residual generator and discriminator of SNGAN's CIFAR-10 model (Miyato et al., 2018, appendix
B.4; BigGAN's blocks without attention), adapted to any power-of-two image size >= 8.

- Generator: latent (+ one-hot class) -> linear -> 4x4 x ``width`` -> one up-sampling residual
  block per 2x step (BN, ReLU, nearest 2x, 3x3 conv, BN, ReLU, 3x3 conv; 1x1 conv shortcut) ->
  BN, ReLU, 3x3 conv, tanh.
- Discriminator: an "optimised" first block (no pre-activation) and residual blocks down to 4x4,
  then two more residual blocks at 4x4 as in the CIFAR model, ReLU, global sum pooling, a linear
  output; class-conditional through a projection (Miyato & Koyama, 2018). The caller applies
  spectral norm to every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aigc_pipeline.models.blocks import num_levels, onehot, with_onehot

EXTRA_DISCRIMINATOR_BLOCKS = 2  # residual blocks at 4x4 after the last down-sampling, as in the CIFAR model


class _UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2.0, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, *, down: bool, first: bool = False) -> None:
        super().__init__()
        self.down, self.first = down, first
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)  # the first block sees the image itself: no activation before it
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.shortcut is None:
            return h + x
        if self.first:  # pool before the 1x1 conv: cheaper, and what the CIFAR model does
            return h + self.shortcut(F.avg_pool2d(x, 2) if self.down else x)
        s = self.shortcut(x)
        return h + (F.avg_pool2d(s, 2) if self.down else s)


class ResGenerator(nn.Module):
    """latent [B, Z] (+ labels [B]) -> images [B, C, S, S] in [-1, 1]."""

    def __init__(self, latent_dim: int, size: int, channels: int, width: int, num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes, self.width = num_classes, width
        self.latent_shape = (latent_dim,)
        self.linear = nn.Linear(latent_dim + num_classes, 4 * 4 * width)
        self.blocks = nn.Sequential(*[_UpBlock(width, width) for _ in range(num_levels(size))])
        self.bn = nn.BatchNorm2d(width)
        self.out = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.linear(with_onehot(z, labels, self.num_classes)).view(-1, self.width, 4, 4)
        return torch.tanh(self.out(F.relu(self.bn(self.blocks(h)))))


class ResDiscriminator(nn.Module):
    """images [B, C, S, S] (+ labels [B]) -> [B, 1] logits (unnormalised: hinge loss)."""

    def __init__(self, size: int, channels: int, width: int, num_classes: int = 0) -> None:
        super().__init__()
        n = num_levels(size)
        blocks = [_DownBlock(channels, width, down=True, first=True)]
        blocks += [_DownBlock(width, width, down=True) for _ in range(n - 1)]
        blocks += [_DownBlock(width, width, down=False) for _ in range(EXTRA_DISCRIMINATOR_BLOCKS)]
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(width, 1)
        self.num_classes = num_classes
        self.embed = nn.Linear(num_classes, width, bias=False) if num_classes else None  # projection

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        out = self.linear(h)
        if self.embed is not None:
            out = out + (self.embed(onehot(labels, self.num_classes, h.dtype)) * h).sum(dim=1, keepdim=True)
        return out
