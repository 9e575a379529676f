"""flows/stage_logs.py on a real (embedded, temporary) Prefect server: a stage's lines land in its
task run's log without being printed twice, and the progress artifact moves while training runs."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _progress_of(artifact_id: Any) -> tuple[float, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        (artifact,) = [a for a in client.read_artifacts() if a.id == artifact_id]
    return float(artifact.data), artifact.description


def test_stage_lines_reach_the_run_log_and_progress_moves_while_training(
    harness: None, capfd: pytest.CaptureFixture[str]
) -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.runtime import task_run

    from aigc_pipeline.stages.train import Progress
    from aigc_pipeline.training.budget import resolve_budget
    from flows.stage_logs import TrainingProgress, stage_output

    @task(task_run_name="train")
    def fake_train() -> dict[str, Any]:
        # The train stage's real progress printer, as the stage drives it (stderr, one line per
        # epoch), with the flow's observer handed to it as run_stage hands it over.
        tracker = TrainingProgress("digits-training", "digits-resgan", every=0.0)
        seen, ids = [], []
        with stage_output("train"):
            budget = resolve_budget(family="resgan", size=8, train_images=16, batch_size=8, epochs=4, kimg="auto")
            progress = Progress(4, budget=budget, observer=tracker)
            progress.start(
                {"resumed_from": 0, "total_steps": 8, "speed": "cpu", "data_placement": "device", "world_size": 1}
            )
            plan = (_progress_of(tracker.artifact_id), tracker.artifact_id)  # the plan, before the first step
            for epoch in range(1, 5):
                progress.step(2 * epoch, 8, epoch)
                progress.epoch(epoch, {"loss_d": 0.25 * epoch, "images_per_s": 50.0})
                seen.append(_progress_of(tracker.artifact_id))  # what the UI shows at this point
                ids.append(tracker.artifact_id)
            logging.getLogger("aigc_pipeline.evaluation.fidelity").warning("FID from 24 generated: biased")
            print("evaluate: FID 3.100 [incv3-test]")  # stdout too
            assert sys.stderr.__class__.__name__ == "LineTee"
        assert sys.stderr.__class__.__name__ != "LineTee"  # restored
        return {"seen": seen, "ids": ids, "plan": plan, "task_run_id": str(task_run.id)}

    @flow(name="stage-logs-test")
    def f() -> dict[str, Any]:
        return fake_train()

    state = f(return_state=True)
    result = state.result()
    assert [p for p, _ in result["seen"]] == [25.0, 50.0, 75.0, 100.0]
    # The epoch line's time left reaches the artifact (this fake epoch takes no time: 0 s).
    assert re.fullmatch(r"Training digits-resgan: epoch 2/4, step 4/8, about \d+ s left", result["seen"][1][1])
    # The artifact exists from the plan on, before the first step, and is the one the epochs update.
    assert result["plan"][0] == (
        0.0,
        "Training digits-resgan: 0.064 kimg (train.epochs) = 8 steps = 4 epochs of "
        "2 batches of 8; measuring a warm-up for the time estimate",
    )
    assert len(set(result["ids"]) | {result["plan"][1]}) == 1  # one artifact, updated in place

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what is still queued
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    mine = [(log.name, log.message, str(log.task_run_id)) for log in logs if log.name.startswith("aigc")]
    messages = [m for _, m, _ in mine]
    assert "train: cpu, data on device" in messages
    assert any(m.startswith("train epoch 3/4  step 6/8  loss_d 0.7500") for m in messages), messages
    assert "evaluate: FID 3.100 [incv3-test]" in messages
    assert "FID from 24 generated: biased" in messages  # the package's logging records too
    assert {name for name, _, _ in mine} == {"aigc.stage.train", "aigc_pipeline.evaluation.fidelity"}
    assert {t for _, _, t in mine} == {result["task_run_id"]}
    # The terminal saw each line once, as the stage printed it (not again through Prefect's console).
    err = capfd.readouterr().err
    assert err.count("train epoch 3/4") == 1, err
