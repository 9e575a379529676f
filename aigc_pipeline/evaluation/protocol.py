"""Metric protocols: everything that makes two numbers comparable, folded into the metric's name."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Protocol:
    """How an Inception-based metric (FID, KID, precision/recall, IS) was measured."""

    extractor: str  # torch-fidelity feature extractor name
    weights_sha256: str  # checksum of the extractor's weights file
    num_samples: int  # generated images
    reference_split: str  # eval | train | all (or "dir" for `aigc fid` on folders)
    reference_digest: str  # content hash of the reference images
    num_reference: int
    size: int  # image side fed to the extractor (before its own resize to 299)

    @property
    def id(self) -> str:
        """Short, stable name: ``incv3-<w8>_n500_eval-<ref8>_32px``."""
        short = "incv3" if self.extractor == "inception-v3-compat" else self.extractor
        return (
            f"{short}-{self.weights_sha256[:8]}_n{self.num_samples}_"
            f"{self.reference_split}-{self.reference_digest[:8]}_{self.size}px"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "id": self.id}


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
