"""Where every random number of a training step comes from.

Each (seed, stream, index) triple gets its own ``torch.Generator``, so nothing random carries
state from one step to the next: the data order of epoch ``e`` comes from (seed, EPOCH, e), the
noise and augmentation of step ``s`` from (seed, STEP, s). A resumed run therefore draws exactly
what an uninterrupted one would have drawn.

Per-sample draws go through :class:`BatchRandom`. Under data parallelism every rank draws the
values of the *global* batch from the step's generator and keeps its own rows, so no two ranks
share noise and the samples are the ones a single device would draw for the same global batch:
the result matches one device up to floating-point order.
"""

from __future__ import annotations

import torch

EPOCH_STREAM, STEP_STREAM, SAMPLE_STREAM = 1, 2, 3


def seeded_generator(seed: int, stream: int, index: int, device: torch.device | str) -> torch.Generator:
    """A generator for one (stream, index) pair, independent of every other pair."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + stream) * 1_000_000_007 + index & 0x7FFF_FFFF_FFFF_FFFF)
    return g


class BatchRandom:
    """Per-sample random draws for this rank's share of a global batch.

    ``shape[0]`` of every request is the local batch size; the generator draws ``world`` times
    as many rows and this rank keeps rows ``[rank * b, (rank + 1) * b)``. With ``world == 1``
    this is exactly a plain draw from ``generator``.
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world: int = 1) -> None:
        self.generator, self.rank, self.world = generator, rank, world

    def _rows(self, x: torch.Tensor, b: int) -> torch.Tensor:
        return x if self.world == 1 else x[self.rank * b : (self.rank + 1) * b]

    def randn(
        self, shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        b = shape[0]
        x = torch.randn((b * self.world, *shape[1:]), generator=self.generator, device=device, dtype=dtype)
        return self._rows(x, b)

    def rand(self, shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b = shape[0]
        x = torch.rand((b * self.world, *shape[1:]), generator=self.generator, device=device, dtype=dtype)
        return self._rows(x, b)

    def randint(self, low: int, high: int, shape: tuple[int, ...], *, device: torch.device) -> torch.Tensor:
        b = shape[0]
        x = torch.randint(low, high, (b * self.world, *shape[1:]), generator=self.generator, device=device)
        return self._rows(x, b)


def as_batch_random(gen: torch.Generator | BatchRandom) -> BatchRandom:
    """Accept a plain generator wherever a :class:`BatchRandom` is expected (single device)."""
    return gen if isinstance(gen, BatchRandom) else BatchRandom(gen)
