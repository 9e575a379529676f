"""The promotion gate's decisions on numbers (no MLflow): better, worse, within the noise, not
comparable, incomplete or non-finite evaluations, diverged training, the quality bar against the
data's floor."""

from __future__ import annotations

import math

import pytest

from aigc_pipeline.evaluation.gate import CHALLENGER, CHAMPION, REJECTED, Score, check_evaluation, decide, quality_bar
from aigc_pipeline.evaluation.results import Evaluation

PID = "incv3-abcd1234_n300_eval-01234567_32px"


def _decide(
    candidate: Score | None,
    champion: Score | None,
    *,
    version: str | None = "3",
    problems=(),
    margin: float = 0.5,
    sigmas: float = 2.0,
    below_bar=(),
):
    return decide(
        candidate,
        list(problems),
        champion=champion,
        champion_version=version,
        margin=margin,
        noise_sigmas=sigmas,
        protocol_id=PID,
        below_bar=list(below_bar),
    )


def _metrics(details: dict | None = None, **overrides) -> Evaluation:
    metrics = {
        "fid": 40.0,
        "fid_std": 1.0,
        "kid": 0.01,
        "precision": 0.6,
        "recall": 0.5,
        "floor_fid": 20.0,
        "floor_precision": 0.9,
        "floor_recall": 0.8,
    }
    metrics.update(overrides)
    return Evaluation(
        {k: v for k, v in metrics.items() if v is not None},
        {"protocol": {"id": PID}, "bootstrap": {"replicas": 100}, **(details or {})},
    )


def test_first_model_becomes_champion() -> None:
    v = _decide(Score(80.0, 2.0), None, version=None)
    assert v.decision == CHAMPION and v.promote and "first model" in v.reason


def test_clearly_better_is_promoted_with_the_numbers_in_the_reason() -> None:
    v = _decide(Score(40.0, 1.0), Score(50.0, 1.0))
    assert v.decision == CHAMPION
    # noise = 2 * sqrt(1 + 1) = 2.83 < 10 and margin 0.5 < 10
    assert math.isclose(v.details["noise"], 2 * math.sqrt(2)) and v.details["delta"] == 10.0
    assert "better by 10.000" in v.reason and "champion v3" in v.reason


def test_worse_keeps_the_champion() -> None:
    v = _decide(Score(55.0, 1.0), Score(50.0, 1.0))
    assert v.decision == CHALLENGER and not v.promote and "not better" in v.reason


def test_better_but_within_the_noise_keeps_the_champion() -> None:
    v = _decide(Score(48.0, 1.0), Score(50.0, 1.0))  # delta 2 < noise 2.83
    assert v.decision == CHALLENGER and "within the noise" in v.reason


def test_better_beyond_noise_but_not_the_margin_keeps_the_champion() -> None:
    v = _decide(Score(49.0, 0.01), Score(50.0, 0.01), margin=1.5)
    assert v.decision == CHALLENGER and "margin" in v.reason


def test_champion_spread_unknown_is_assumed_equal_to_the_candidates() -> None:
    v = _decide(Score(47.5, 1.0), Score(50.0, None))  # noise 2.83 > 2.5
    assert v.decision == CHALLENGER and "assumed equal" in v.reason
    assert _decide(Score(45.0, 1.0), Score(50.0, None)).decision == CHAMPION


def test_no_noise_estimate_never_promotes_over_a_champion() -> None:
    v = _decide(Score(10.0, None), Score(50.0, 1.0))
    assert v.decision == CHALLENGER and "bootstrap" in v.reason


def test_other_protocol_is_not_comparable() -> None:
    v = _decide(Score(10.0, 0.1), None, version="2")
    assert v.decision == CHALLENGER and "not comparable" in v.reason and "aigc promote" in v.reason


def test_problems_mean_rejected_even_with_a_great_score() -> None:
    v = _decide(Score(1.0, 0.1), Score(50.0, 1.0), problems=["fid is nan (not a finite number)"])
    assert v.decision == REJECTED and not v.promote and "fid is nan" in v.reason
    assert _decide(None, None, version=None, problems=["x"]).decision == REJECTED  # not even as a first model


def test_complete_evaluation_has_no_problems() -> None:
    assert check_evaluation(_metrics(), {"final_losses": {"loss_d": 1.2, "loss_g": 0.7}}) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"fid": float("nan")}, "fid is nan"),
        ({"kid": float("inf")}, "kid is inf"),
        ({"recall": None}, "recall under protocol"),
        ({"precision": None}, "precision under protocol"),
        ({"fid_std": float("nan")}, "fid_std is nan"),
        ({"fid_std": None}, "fid_std under protocol"),
        ({"details": {"protocol": {}}}, "no protocol id"),
        ({"fid": None}, "fid under protocol"),
    ],
)
def test_partial_or_non_finite_evaluations_are_problems(overrides: dict, expected: str) -> None:
    problems = check_evaluation(_metrics(**overrides))
    assert any(expected in p for p in problems), problems


def test_bootstrap_off_does_not_require_a_spread() -> None:
    assert check_evaluation(_metrics({"bootstrap": {"replicas": 0}}, fid_std=None)) == []


def test_diverged_training_is_a_problem() -> None:
    problems = check_evaluation(_metrics(), {"final_losses": {"loss_d": float("nan"), "loss_g": 0.7}})
    assert problems == ["training diverged: final loss_d not finite"]


def test_quality_bar_rejects_a_candidate_far_from_the_floor_with_its_numbers() -> None:
    below = quality_bar(_metrics(fid=268.0, floor_fid=19.1), max_fid_ratio=3.0)
    assert below == ["FID 268.00 is 14.03x the data's floor 19.10 (register.max_fid_ratio 3)"]
    v = _decide(Score(268.0, 2.0), None, version=None, below_bar=below)  # even with no champion yet
    assert v.decision == REJECTED and not v.promote and "14.03x the data's floor" in v.reason


def test_quality_bar_passes_within_the_ratio_and_can_be_off() -> None:
    assert quality_bar(_metrics(fid=57.0, floor_fid=19.1), max_fid_ratio=3.0) == []  # 2.98x
    assert quality_bar(_metrics(fid=500.0), max_fid_ratio=None) == []
    assert _decide(Score(57.0, 1.0), None, version=None, below_bar=[]).decision == CHAMPION


def test_quality_bar_precision_and_recall_minimums_name_the_real_data_figure() -> None:
    below = quality_bar(_metrics(precision=0.31, recall=0.2), max_fid_ratio=3.0, min_precision=0.5, min_recall=0.1)
    assert below == ["precision 0.310 < register.min_precision 0.5; real data: 0.900"]


def test_quality_bar_without_a_floor_cannot_pass() -> None:
    scored = _metrics({"floor": {"unavailable": "the train split is empty"}}, floor_fid=None)
    (why,) = quality_bar(scored, max_fid_ratio=3.0)
    assert "floor is unavailable (the train split is empty)" in why and "max_fid_ratio" in why
