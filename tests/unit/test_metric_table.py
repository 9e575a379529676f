"""The metric table is the one place a metric is named: every reader selects from it when it runs."""

from __future__ import annotations

import pytest

from aigc_pipeline.evaluation import metrics as table
from aigc_pipeline.evaluation.results import Evaluation, read_evaluation, write_evaluation
from aigc_pipeline.tracking.card import model_card

SCORES = {
    "fid": 30.0,
    "fid_std": 0.5,
    "floor_fid": 20.0,
    "fid_ratio": 1.5,
    "kid": 0.01,
    "precision": 0.6,
    "recall": 0.5,
    "floor_precision": 0.7,
    "floor_recall": 0.7,
    "copy_share": 0.04,
    "floor_copy_share": 0.05,
    "copy_ct": 0.8,
    "floor_copy_ct": -0.2,
    "exact_copies": 0.0,
}


def _summary(metrics: dict) -> dict:
    receipt = {
        "name": "digits",
        "version": "3",
        "fid": metrics["fid"],
        "fid_std": metrics.get("fid_std"),
        "champion": True,
        "decision": "champion",
        "reason": "first model",
        "run_id": "r1",
        "tracking_uri": "sqlite:///mlflow.db",
    }
    return {"receipt": receipt, "metrics": metrics, "details": {"protocol": {"id": "incv3-x"}}, "champion_version": "3"}


def _card(scores: dict) -> str:
    return model_card(
        name="digits",
        meta={"model": "resgan", "arch": {}},
        params={},
        lineage={},
        problems=[],
        evaluation=Evaluation(scores, {"protocol": {"id": "incv3-x"}}),
    )


def test_the_table_names_each_metric_once_and_every_floor_is_a_metric() -> None:
    assert len(set(table.names())) == len(table.METRICS)
    assert all(table.metric(m.floor) for m in table.METRICS if m.floor)
    assert {"fid", "copy_share", "floor_copy_share"} <= set(table.names("summary"))
    with pytest.raises(KeyError, match="unknown metric 'fidd'.*knows: fid, "):
        table.metric("fidd")


def test_card_run_summary_and_prefect_table_show_the_copying_metrics_with_their_floor() -> None:
    from aigc_pipeline.pipeline import summary_markdown
    from flows.artifacts import metrics_table

    assert f"| {table.metric('copy_share').label} | 0.0400 | 0.0500 |" in _card(SCORES)
    rows = {r["metric"]: r for r in metrics_table(_summary(SCORES))}
    assert rows["copying share"]["floor (real data)"] == 0.05 and rows["copying share"]["better"] == "lower is better"
    assert rows["FID"]["model / floor"] == 1.5 and rows["KID"]["model / floor"] is None
    assert "| copying C_T | 0.8000 | -0.2000 |" in summary_markdown(_summary(SCORES))


def test_a_new_metric_is_one_entry(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """What adding a metric takes: one entry (here a made-up ``sharpness`` and its floor); the
    writer accepts it, the MLflow name carries the protocol, the card, the run summary and the
    Prefect table show it beside its floor. Without the entry the writer refuses it."""
    from aigc_pipeline.pipeline import summary_markdown
    from flows.artifacts import metrics_table

    scores = {**SCORES, "sharpness": 0.25, "floor_sharpness": 0.5}
    with pytest.raises(ValueError, match="sharpness"):
        write_evaluation(tmp_path, scores, {"protocol": {"id": "incv3-x"}})
    monkeypatch.setattr(
        table,
        "METRICS",
        table.METRICS
        + (
            table.Metric(
                "sharpness", "sharpness (made up for this test)", floor="floor_sharpness", better="higher", table=True
            ),
            table.Metric("floor_sharpness", "sharpness of real data", card=False),
        ),
    )
    write_evaluation(tmp_path, scores, {"protocol": {"id": "incv3-x"}})
    written = read_evaluation(tmp_path)
    assert written.metrics["sharpness"] == 0.25 and "sharpness_incv3-x" in written.protocol_keys()
    assert "| sharpness (made up for this test) | 0.2500 | 0.5000 |" in _card(scores)
    assert "| sharpness | 0.2500 | 0.5000 |" in summary_markdown(_summary(scores))
    assert {
        "metric": "sharpness",
        "model": 0.25,
        "floor (real data)": 0.5,
        "model / floor": 0.5,
        "better": "higher is better",
    } in metrics_table(_summary(scores))
