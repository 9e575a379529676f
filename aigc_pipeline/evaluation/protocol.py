"""Metric protocols: everything that makes two numbers comparable, folded into the metric's name."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

# Everything about the Inception feature pass (aigc_pipeline.evaluation.features) that changes the
# numbers, besides the weights and the images. Not in it: the device and the torch version (a
# float32 pass without TF32 agrees to ~1e-6 between them). Read without importing torch-fidelity,
# so that naming metrics stays cheap.
FEATURE_PASS = {
    "torch_fidelity": metadata.version("torch-fidelity"),  # its network, resize and metric code
    "precision": "fp32-notf32",  # float32 weights and activations, no autocast, no TF32 (features._float32_pass)
    "resize": "tf1-bilinear-299",  # torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x to 299x299
    "input": "uint8-rgb",  # grayscale repeated to 3 channels, then (x - 128) / 128 inside the network
}

# The fields of the feature pass: in the id as one short digest (``fx...``), spelled out in to_dict().
_FEATURE_PASS_FIELDS = ("torch_fidelity", "precision", "resize", "input_format")


@dataclass(frozen=True)
class Protocol:
    """How an Inception-based metric (FID, KID, precision/recall, IS) was measured: every input
    that changes the number. Two values are comparable only under the same :attr:`id`."""

    extractor: str  # torch-fidelity feature extractor name
    weights_sha256: str  # the extractor's weights (InceptionWeights.sha256)
    num_samples: int  # generated images
    reference_split: str  # eval | train | all (or "dir" for `aigc fid` on folders)
    reference_digest: str  # content hash of the reference images
    num_reference: int
    size: int  # image side fed to the extractor (before its own resize to 299)
    # The feature pass (aigc_pipeline.evaluation.features.FEATURE_PASS): torch-fidelity's version
    # (network, resize and metric code), the arithmetic, the resize, the input format.
    torch_fidelity: str = FEATURE_PASS["torch_fidelity"]
    precision: str = FEATURE_PASS["precision"]
    resize: str = FEATURE_PASS["resize"]
    input_format: str = FEATURE_PASS["input"]

    @property
    def feature_pass_digest(self) -> str:
        """Six hex digits of a sha256 over the feature-pass fields."""
        fields = {name: getattr(self, name) for name in _FEATURE_PASS_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:6]

    @property
    def id(self) -> str:
        """Short, stable name: ``incv3-<weights8>_fx<pass6>_n500_eval-<ref8>_32px``."""
        short = "incv3" if self.extractor == "inception-v3-compat" else self.extractor
        return (
            f"{short}-{self.weights_sha256[:8]}_fx{self.feature_pass_digest}_n{self.num_samples}_"
            f"{self.reference_split}-{self.reference_digest[:8]}_{self.size}px"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "feature_pass_digest": self.feature_pass_digest, "id": self.id}


def protocol_differences(candidate: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """What differs between two protocols (``Protocol.to_dict()``, or MLflow tags read back as
    strings), as ``"name: other -> candidate"``; ``(not recorded)`` for a field one of them lacks
    (an evaluation made before the field existed)."""
    skip = {"id", "feature_pass_digest"}
    out = []
    for key in [k for k in candidate if k not in skip] + [k for k in other if k not in candidate and k not in skip]:
        mine, theirs = candidate.get(key), other.get(key)
        if mine is None and theirs is None or str(mine) == str(theirs):
            continue
        out.append(
            f"{key}: {'(not recorded)' if theirs is None else theirs} -> {'(not recorded)' if mine is None else mine}"
        )
    return out


@dataclass(frozen=True)
class ClassifierProtocol:
    """How a classifier-based score was measured: which classifier (its id hashes the real data it
    was trained on), how many generated images, at what size."""

    classifier: str  # e.g. logreg-1a2b3c4d
    accuracy: float  # the classifier's accuracy on the real eval split (not part of the id)
    num_samples: int
    size: int

    @property
    def id(self) -> str:
        """``logreg-<key8>_n300_32px``."""
        return f"{self.classifier}_n{self.num_samples}_{self.size}px"

    def to_dict(self) -> dict:
        return {**asdict(self), "id": self.id}


def metric_key(metric: str, protocol_id: str) -> str:
    """The MLflow key of ``metric`` measured under a protocol, e.g. ``fid_incv3-…_32px``: values
    under different protocols get different keys, so they are never compared or plotted together."""
    return f"{metric}_{protocol_id}"
