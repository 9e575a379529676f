"""Batches from the prepared uint8 images, without a DataLoader or per-step decoding.

Two placements (``train.data_placement``):

- ``device``: the whole uint8 array is copied to the device once; each batch is an index
  select and a scale to [-1, 1] on the device. No host work or transfer per step.
- ``stream``: the array stays in host memory; each batch is gathered into one of two pinned
  staging buffers and copied asynchronously on a side CUDA stream while the previous step
  computes (on the CPU it is a plain gather). For datasets that do not fit on the GPU.

``auto`` keeps the data on the device when it takes at most :data:`DEVICE_FRACTION` of the
device's free memory (always on the CPU, where host memory is the device's).
Both placements give the same batches, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

Placement = Literal["auto", "device", "stream"]
DEVICE_FRACTION = 0.4  # of free device memory; the rest is left for activations and optimizer states


def choose_placement(nbytes: int, device: torch.device, placement: Placement = "auto") -> Literal["device", "stream"]:
    """Where the images live during training (see the module docstring)."""
    if placement in ("device", "stream"):
        return placement
    if placement != "auto":
        raise ValueError(f"unknown data placement {placement!r} (auto | device | stream)")
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= DEVICE_FRACTION * free else "stream"


class Batches:
    """The training batches of one rank: ``epoch()`` yields (images in [-1, 1], labels or None)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        device: torch.device,
        *,
        placement: Placement = "auto",
        channels_last: bool = False,
    ) -> None:
        self.device = device
        self.placement = choose_placement(images.nbytes, device, placement)
        self.channels_last = channels_last
        host = torch.from_numpy(np.ascontiguousarray(images))
        # Labels are 8 bytes an image: always on the device.
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64)).to(device) if labels is not None else None
        if self.placement == "device":
            self.data = host.to(device)
        else:
            self.data = host  # pageable host memory; batches go through pinned staging buffers
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" and self.placement == "stream" else None

    def _finish(self, raw: torch.Tensor) -> torch.Tensor:
        real = raw.float().div_(127.5).sub_(1.0)
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        return real

    def epoch(
        self, order: torch.Tensor, start: int, steps: int, global_batch: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches ``start .. steps-1`` of the epoch whose image order is ``order`` (CPU int64).

        Batch ``i`` of rank ``r`` holds images ``order[i*B + r*b : i*B + (r+1)*b]`` with
        ``B = global_batch`` and ``b = B / world``: the ranks split each global batch.
        """
        b = global_batch // world
        slices = [(i * global_batch + rank * b, i * global_batch + (rank + 1) * b) for i in range(start, steps)]
        if self.placement == "device":
            dev_order = order.to(self.device)
            for lo, hi in slices:
                idx = dev_order[lo:hi]
                yield self._finish(self.data.index_select(0, idx)), self._labels(idx)
        else:
            yield from self._streamed(order, slices, b)

    def _labels(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.labels.index_select(0, idx) if self.labels is not None else None

    def _streamed(
        self, order: torch.Tensor, slices: list[tuple[int, int]], b: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Gather batch k+1 into a staging buffer (pinned on CUDA) and start its copy (on a side
        CUDA stream) before batch k is handed out; a buffer is refilled only once the copy out of
        it has finished, so the host never waits for the model's compute. On the CPU the same
        double buffering runs with plain buffers and no copy."""
        cuda = self._stream is not None
        bufs = [torch.empty((b, *self.data.shape[1:]), dtype=self.data.dtype) for _ in range(2)]
        if cuda:
            bufs = [buf.pin_memory() for buf in bufs]
        done: list[Any] = [None, None]  # per buffer: the CUDA event of the copy out of it

        def stage(k: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
            slot = k % 2
            if done[slot] is not None:
                done[slot].synchronize()
            lo, hi = slices[k]
            idx = order[lo:hi]
            torch.index_select(self.data, 0, idx, out=bufs[slot])
            if not cuda:
                return bufs[slot], idx, None
            with torch.cuda.stream(self._stream):
                dev = bufs[slot].to(self.device, non_blocking=True)
                idx_dev = idx.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            done[slot] = event
            return dev, idx_dev, event

        pending = stage(0) if slices else None
        for k in range(len(slices)):
            assert pending is not None  # slices is not empty
            raw, idx, event = pending
            if event is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(event)
                raw.record_stream(main)
                idx.record_stream(main)
            batch = (self._finish(raw), self._labels(idx))  # a new tensor: the buffer may be refilled
            if k + 1 < len(slices):
                pending = stage(k + 1)
            yield batch
