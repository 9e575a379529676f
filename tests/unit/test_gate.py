"""The promotion gate's decisions on numbers (no MLflow): better, worse, within the noise, not
comparable, incomplete or non-finite evaluations, diverged training."""

from __future__ import annotations

import math

import pytest

from aigc_pipeline.evaluation.gate import CHALLENGER, CHAMPION, REJECTED, Score, check_evaluation, decide

PID = "incv3-abcd1234_n300_eval-01234567_32px"


def _decide(candidate: Score | None, champion: Score | None, *, version: str | None = "3", problems=(),
            margin: float = 0.5, sigmas: float = 2.0):
    return decide(candidate, list(problems), champion=champion, champion_version=version, margin=margin,
                  noise_sigmas=sigmas, protocol_id=PID)


def _metrics(**overrides) -> dict:
    doc = {"protocol": {"id": PID}, "fid": {PID: 40.0}, "fid_std": {PID: 1.0}, "kid": {PID: 0.01},
           "precision": {PID: 0.6}, "recall": {PID: 0.5}, "bootstrap": {"replicas": 100}}
    doc.update(overrides)
    return doc


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
        ({"fid": {PID: float("nan")}}, "fid is nan"),
        ({"kid": {PID: float("inf")}}, "kid is inf"),
        ({"recall": {}}, "recall under protocol"),
        ({"precision": None}, "precision under protocol"),
        ({"fid_std": {PID: float("nan")}}, "fid_std is nan"),
        ({"fid_std": {}}, "fid_std under protocol"),
        ({"protocol": {}}, "no protocol id"),
        ({"fid": {"another-protocol": 10.0}}, "fid under protocol"),
    ],
)
def test_partial_or_non_finite_evaluations_are_problems(overrides: dict, expected: str) -> None:
    problems = check_evaluation(_metrics(**overrides))
    assert any(expected in p for p in problems), problems


def test_bootstrap_off_does_not_require_a_spread() -> None:
    doc = _metrics(bootstrap={"replicas": 0})
    del doc["fid_std"]
    assert check_evaluation(doc) == []


def test_diverged_training_is_a_problem() -> None:
    problems = check_evaluation(_metrics(), {"final_losses": {"loss_d": float("nan"), "loss_g": 0.7}})
    assert problems == ["training diverged: final loss_d not finite"]
