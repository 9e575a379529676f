"""An exponential moving average (EMA) of a network's weights: what the GAN and diffusion
families export instead of the last raw weights, which are noisier after short training.

The decay warms up as in StyleGAN2's ``ema_rampup``: after ``t`` updates it is
``min(decay, (1 + t) / (EMA_RAMPUP + t))``, so an early average is not dominated by the random
initial weights. The update counter is a buffer of a small module, so it is saved in
checkpoints with the weights and stays on the device (no host sync to read it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

EMA_RAMPUP = 10.0


class EmaCounter(nn.Module):
    """Number of EMA updates so far, as a float32 buffer."""

    updates: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("updates", torch.zeros((), dtype=torch.float32))


def ema_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` to hold its moving average."""
    return copy.deepcopy(net).requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, live: nn.Module, counter: EmaCounter, decay: float) -> None:
    """One EMA step of ``ema`` towards ``live``'s parameters; buffers (batch-norm statistics) are
    copied, not averaged: the average uses the live network's statistics."""
    t = counter.updates
    keep = torch.clamp((1.0 + t) / (EMA_RAMPUP + t), max=decay)
    # torch's stub wants list[Tensor] (lists are invariant: not list[Parameter]) and a Python number as the weight;
    # torch also takes the 0-dim tensor used here.
    torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1.0 - keep)  # type: ignore[call-overload]
    t.add_(1.0)
    for b_ema, b in zip(ema.buffers(), live.buffers()):
        b_ema.copy_(b)
