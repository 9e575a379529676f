"""Inception features of uint8 image arrays, through torch-fidelity's network and feature loop.

Everything downstream (FID, KID, precision/recall, IS, the bootstrap) works on these features,
so each image goes through Inception once per evaluation, whatever the number of metrics.

The network is torch-fidelity's (:class:`~aigc_pipeline.evaluation.inception.VerifiedInceptionV3`)
with weights read and checked by :mod:`aigc_pipeline.evaluation.inception`: torch-fidelity is
never given a file to unpickle. The pass always runs in float32: no autocast, and on CUDA no
TF32 (cuDNN convolutions default to TF32, which moves FID in the 4th digit). What it does is
:data:`~aigc_pipeline.evaluation.protocol.FEATURE_PASS`, part of every metric's protocol.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.utils import get_featuresdict_from_dataset

from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.inception import FEATURE_EXTRACTOR, InceptionWeights, build_extractor
from aigc_pipeline.evaluation.protocol import FEATURE_PASS  # what _float32_pass and the network do

__all__ = ["FEATURE_EXTRACTOR", "FEATURE_LAYER", "FEATURE_PASS", "LOGITS_LAYER", "extract_features", "parse_device"]

FEATURE_LAYER = "2048"  # pool3: torch-fidelity's default layer for FID, KID and precision/recall
LOGITS_LAYER = "logits_unbiased"  # torch-fidelity's default layer for Inception Score


class UInt8Images(Dataset):
    """Serves uint8 [3, H, W] tensors (1 channel repeated), the only input torch-fidelity accepts."""

    def __init__(self, images: np.ndarray) -> None:
        self._images = images

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        # Copy one image: the array may be read-only or a memmap, which torch.from_numpy rejects/warns on.
        image = torch.from_numpy(np.array(self._images[index], dtype=np.uint8, copy=True))
        if image.shape[0] == 1:
            image = image.repeat(3, 1, 1)
        return image


def extract_features(
    images: np.ndarray,
    weights: InceptionWeights,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    logits: bool = False,
    verbose: bool = False,
) -> dict[str, torch.Tensor]:
    """Pool3 features (``FEATURE_LAYER``, float32 [N, 2048]) of uint8 ``images`` [N, C, H, W], and
    the unbiased logits (``LOGITS_LAYER``) when ``logits`` is set (refused unless
    ``weights.has_logits``). The network resizes to 299x299 itself.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
    use_cuda, index = parse_device(device)
    layers = (FEATURE_LAYER, LOGITS_LAYER) if logits else (FEATURE_LAYER,)
    extractor = _extractor(weights, layers, use_cuda, index)
    with _cuda_device(index), _float32_pass(use_cuda):
        # save_cpu_ram: no DataLoader worker processes (they would pickle the arrays).
        return get_featuresdict_from_dataset(UInt8Images(images), extractor, batch_size, use_cuda, True, verbose)


@functools.lru_cache(maxsize=2)
def _extractor(weights: InceptionWeights, layers: tuple[str, ...], use_cuda: bool, index: int | None):
    """One extractor per (weights, layers, device) per process: loading 95 MB of weights costs ~1 s.

    ``weights`` carries the file's digest, so a file replaced in place (and resolved again) is
    never served from memory; the file is read and checked once, here.
    """
    extractor = build_extractor(weights, list(layers))
    if use_cuda:
        with _cuda_device(index):
            extractor = extractor.cuda()
    else:
        # oneDNN's convolutions run faster on channels-last tensors (bench/evaluation.py measures
        # it); the sums are the same float32 ones in another order, as on any other CPU's kernels.
        extractor = extractor.to(memory_format=torch.channels_last)
    return extractor


@contextlib.contextmanager
def _float32_pass(use_cuda: bool) -> Iterator[None]:
    """No autocast and no TF32 for the pass (the flags are process-wide: restored afterwards)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if not use_cuda:
            yield
            return
        stack.enter_context(torch.autocast("cuda", enabled=False))
        # cudnn.conv is set on torch's module-replacing class but not declared among the module's annotations
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv  # type: ignore[attr-defined]
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved


def parse_device(device: str) -> tuple[bool, int | None]:
    """Map a torch device string onto torch-fidelity's ``cuda`` flag (+ CUDA index to select)."""
    if device == "cpu":
        return False, None
    match = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if match is None:
        raise EvaluationError(f"device must be 'cpu', 'cuda' or 'cuda:<index>' for torch-fidelity, got {device!r}")
    if not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    index = int(match.group(1)) if match.group(1) is not None else None
    if index is not None and index >= torch.cuda.device_count():
        raise EvaluationError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return True, index


@contextlib.contextmanager
def _cuda_device(index: int | None) -> Iterator[None]:
    # torch-fidelity calls .cuda() without an index, i.e. on the current device.
    if index is None:
        yield
        return
    with torch.cuda.device(index):
        yield
