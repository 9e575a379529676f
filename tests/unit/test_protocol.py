"""Protocol ids cover everything that changes the number: the weights, the samples, the reference,
the size, and the feature pass (torch-fidelity's version, the precision of the pass, the resize,
the input format); the gate, given two protocols, says what differs."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch_fidelity

from aigc_pipeline.evaluation.features import FEATURE_PASS
from aigc_pipeline.evaluation.gate import CHALLENGER, Score, decide
from aigc_pipeline.evaluation.protocol import Protocol, protocol_differences
from aigc_pipeline.evaluation.reference import feature_pass_digest

BASE = Protocol(
    extractor="inception-v3-compat",
    weights_sha256="6726825d" + "0" * 56,
    num_samples=300,
    reference_split="eval",
    reference_digest="ab" * 32,
    num_reference=361,
    size=32,
)


def test_the_id_is_short_readable_and_names_the_feature_pass() -> None:
    assert re.fullmatch(r"incv3-6726825d_fx[0-9a-f]{6}_n300_eval-abababab_32px", BASE.id), BASE.id
    assert (BASE.torch_fidelity, BASE.precision, BASE.resize, BASE.input_format) == (
        torch_fidelity.__version__,
        FEATURE_PASS["precision"],
        FEATURE_PASS["resize"],
        FEATURE_PASS["input"],
    )
    d = BASE.to_dict()
    assert d["id"] == BASE.id and d["torch_fidelity"] == torch_fidelity.__version__
    assert d["feature_pass_digest"] in BASE.id


@pytest.mark.parametrize(
    "change",
    [
        {"torch_fidelity": "0.5.0"},
        {"precision": "tf32"},
        {"precision": "bf16-autocast"},
        {"resize": "pil-bilinear-299"},
        {"input_format": "float-rgb"},
        {"weights_sha256": "1" * 64},
        {"num_samples": 500},
        {"reference_split": "train"},
        {"reference_digest": "cd" * 32},
        {"size": 64},
    ],
)
def test_anything_that_changes_the_number_changes_the_id(change: dict) -> None:
    other = dataclasses.replace(BASE, **change)
    assert other.id != BASE.id
    (difference,) = protocol_differences(other.to_dict(), BASE.to_dict())
    ((key, value),) = change.items()
    assert difference.startswith(f"{key}: ") and difference.endswith(f" -> {value}")


def test_reference_cache_entries_are_keyed_by_the_feature_pass() -> None:
    assert re.fullmatch(r"[0-9a-f]{8}", feature_pass_digest())


def test_gate_reason_names_what_differs_from_the_champions_protocol() -> None:
    upgraded = dataclasses.replace(BASE, torch_fidelity="0.5.0")
    # As read back from MLflow tags: strings, and an old evaluation lacking the newer fields.
    champion = {k: str(v) for k, v in BASE.to_dict().items() if k not in ("precision", "input_format")}
    v = decide(
        Score(10.0, 1.0),
        [],
        champion=None,
        champion_version="3",
        margin=0.5,
        noise_sigmas=2.0,
        protocol_id=upgraded.id,
        candidate_protocol=upgraded.to_dict(),
        champion_protocol=champion,
    )
    assert v.decision == CHALLENGER and "not comparable" in v.reason
    assert f"measured under {BASE.id}" in v.reason
    assert f"torch_fidelity: {torch_fidelity.__version__} -> 0.5.0" in v.reason
    assert "precision: (not recorded) -> fp32-notf32" in v.reason
    assert "torch_fidelity" in v.details["protocol_differences"]


def test_the_feature_pass_runs_without_tf32_or_autocast_and_restores_the_flags() -> None:
    """What FEATURE_PASS["precision"] claims. The flags are process-wide (the trainer turns TF32
    on for CUDA; cuDNN convolutions default to it): set during the pass, restored after it."""
    import torch

    from aigc_pipeline.evaluation.features import _float32_pass

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), _float32_pass(use_cuda=True):
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
            assert not torch.is_autocast_enabled("cpu")
            x = torch.ones(2, 2)
            assert (x @ x).dtype == torch.float32
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
