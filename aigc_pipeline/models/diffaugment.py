"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to both real and fake
images before the discriminator, so a GAN can be trained on little data without the
augmentations leaking into the generator.

Every random draw comes from the generator passed in (the training step's, wrapped in a
:class:`~aigc_pipeline.randomness.BatchRandom`), so a step's augmentation is
reproducible, a resumed run augments exactly as an uninterrupted one, and under data
parallelism each rank augments its rows of the global batch as a single device would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from aigc_pipeline.models.policies import POLICY_NAMES
from aigc_pipeline.randomness import BatchRandom, as_batch_random

AugmentFn = Callable[[torch.Tensor, BatchRandom], torch.Tensor]


def _rand(shape: tuple[int, ...], x: torch.Tensor, gen: BatchRandom) -> torch.Tensor:
    return gen.rand(shape, device=x.device, dtype=x.dtype)


def color(x: torch.Tensor, gen: BatchRandom) -> torch.Tensor:
    """Random brightness, saturation (no-op on one channel) and contrast per image."""
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), x, gen) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((b, 1, 1, 1), x, gen) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((b, 1, 1, 1), x, gen) + 0.5) + mean


def translation(x: torch.Tensor, gen: BatchRandom, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size, filling with zeros."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = gen.randint(-sh, sh + 1, (b,), device=x.device)
    ty = gen.randint(-sw, sw + 1, (b,), device=x.device)
    gy = torch.arange(h, device=x.device).view(1, h, 1) + tx.view(b, 1, 1) + 1
    gx = torch.arange(w, device=x.device).view(1, 1, w) + ty.view(b, 1, 1) + 1
    gy, gx = gy.clamp(0, h + 1).expand(b, h, w), gx.clamp(0, w + 1).expand(b, h, w)
    padded = F.pad(x, [1, 1, 1, 1])
    idx = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[idx, gy, gx].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, gen: BatchRandom, ratio: float = 0.5) -> torch.Tensor:
    """Zero a random square of ``ratio`` times the image size in each image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = gen.randint(0, h + (1 - ch % 2), (b,), device=x.device)
    ox = gen.randint(0, w + (1 - cw % 2), (b,), device=x.device)
    ys = torch.arange(ch, device=x.device).view(1, ch, 1) + oy.view(b, 1, 1) - ch // 2
    xs = torch.arange(cw, device=x.device).view(1, 1, cw) + ox.view(b, 1, 1) - cw // 2
    ys, xs = ys.clamp(0, h - 1).expand(b, ch, cw), xs.clamp(0, w - 1).expand(b, ch, cw)
    mask = torch.ones(b, h, w, device=x.device, dtype=x.dtype)
    mask[torch.arange(b, device=x.device).view(b, 1, 1), ys, xs] = 0
    return x * mask.unsqueeze(1)


# Each policy is the function of its name above.
POLICIES: dict[str, AugmentFn] = {name: globals()[name] for name in POLICY_NAMES}


def diff_augment(x: torch.Tensor, policy: str, gen: torch.Generator | BatchRandom) -> torch.Tensor:
    """Apply the comma-separated ``policy`` (e.g. ``"color,translation,cutout"``; ``""`` = none)."""
    gen = as_batch_random(gen)
    for name in filter(None, policy.split(",")):
        x = POLICIES[name](x, gen)
    return x
