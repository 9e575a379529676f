"""A resumed training's MLflow run ends with every record exactly once, wherever the kill fell.

A process stopped between sending an epoch's losses and logging its grid (or between a step's
losses and the epoch's means) leaves a run that holds the step but not the rest of its records.
The resumed session must fill in what is missing, live or from the model folder, and log nothing
twice. Real SQLite MLflow store; the trainer's callbacks are driven in the order the trainer calls
them, the interruption is the ``Terminated`` the ``aigc`` command raises on SIGTERM.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import copy_project

STEPS_PER_EPOCH, EPOCHS = 10, 3


def _loss(step: int) -> float:
    return 1.0 / step


def _grid(epoch: int) -> np.ndarray:
    return np.full((4, 1, 8, 8), 40 * epoch, dtype=np.uint8)


def _write_model_folder(model: Path) -> None:
    """What the train stage writes at the end: the per-step, per-epoch records and the epoch grids."""
    from PIL import Image

    from aigc_pipeline.images import make_grid
    from aigc_pipeline.models.export import WEIGHTS_FILE

    (model / "samples").mkdir(parents=True)
    (model / WEIGHTS_FILE).write_bytes(b"weights")
    total = STEPS_PER_EPOCH * EPOCHS
    with open(model / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_d"])
        w.writerows([s, _loss(s)] for s in range(1, total + 1))
    with open(model / "epochs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "loss_d"])
        w.writerows([e, e * STEPS_PER_EPOCH, _loss(e * STEPS_PER_EPOCH)] for e in range(1, EPOCHS + 1))
    for e in range(1, EPOCHS + 1):
        Image.fromarray(make_grid(_grid(e))).save(model / "samples" / f"epoch-{e:03d}.png")


def _session(run, *, first_epoch: int, kill_at: tuple[int, str] | None = None) -> None:
    """The trainer's callbacks from ``first_epoch`` to the end; ``kill_at=(epoch, where)`` raises
    Terminated at that epoch's end, after its last step's losses were sent and before its means
    (``"means"``) or inside the grid's upload (``"grid"``)."""
    from aigc_pipeline.errors import Terminated
    from aigc_pipeline.tracking import runs

    total = STEPS_PER_EPOCH * EPOCHS
    for epoch in range(first_epoch, EPOCHS + 1):
        for step in range((epoch - 1) * STEPS_PER_EPOCH + 1, epoch * STEPS_PER_EPOCH + 1):
            run.progress(step, total, epoch)
            run.metrics(step, {"loss_d": _loss(step)})
        if kill_at == (epoch, "means"):
            run.send()
            raise Terminated("terminated by signal 15")
        log_grid = runs.log_grid
        if kill_at == (epoch, "grid"):
            runs.log_grid = _interrupted
        try:
            run.epoch(epoch, _grid(epoch), {"loss_d": _loss(epoch * STEPS_PER_EPOCH)})
        finally:
            runs.log_grid = log_grid


def _interrupted(*args, **kwargs) -> None:
    from aigc_pipeline.errors import Terminated

    raise Terminated("terminated by signal 15")


@pytest.mark.parametrize("epoch", [1, 2], ids=["at-the-checkpoint", "after-the-checkpoint"])
@pytest.mark.parametrize("where", ["grid", "means"])
def test_a_resumed_run_holds_every_record_once(tmp_path: Path, epoch: int, where: str) -> None:
    from mlflow import MlflowClient

    from aigc_pipeline.config import load_config
    from aigc_pipeline.errors import Terminated
    from aigc_pipeline.tracking import runs
    from aigc_pipeline.tracking.live import TrainingRun
    from aigc_pipeline.tracking.store import tracking_uri

    project = copy_project(tmp_path / "project")
    cfg = load_config(project)
    model = tmp_path / "model"
    _write_model_folder(model)

    # The first process is stopped at the end of `epoch`; its checkpoint is the end of epoch 1.
    with pytest.raises(Terminated):
        with TrainingRun(project, cfg, key="k" * 16, hparams={}) as run:
            run.start({"resumed_from": 0})
            _session(run, first_epoch=1, kill_at=(epoch, where))
    client = MlflowClient(tracking_uri(project))
    held = client.get_run(run.run_id)
    assert held.info.status == "KILLED"
    assert STEPS_PER_EPOCH * epoch in {m.step for m in client.get_metric_history(run.run_id, "train/loss_d")}

    # The resumed process continues the same run from the checkpoint and finishes it.
    with TrainingRun(project, cfg, key="k" * 16, hparams={}) as resumed:
        resumed.start({"resumed_from": STEPS_PER_EPOCH})
        _session(resumed, first_epoch=2)
        resumed.finish(model=model, steps=STEPS_PER_EPOCH * EPOCHS, stopped=False)
    assert resumed.run_id == run.run_id
    final = client.get_run(run.run_id)
    assert final.info.status == "FINISHED"
    every_epoch = [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    assert [m.step for m in client.get_metric_history(run.run_id, "train/loss_d")] == list(
        range(1, STEPS_PER_EPOCH * EPOCHS + 1)
    )
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "train_epoch/loss_d")) == every_epoch
    grids = [a.path for a in client.list_artifacts(run.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+")[2]) for p in grids) == every_epoch
    assert sorted(runs.logged_image_steps(client, run.run_id, runs.SAMPLES_KEY)) == every_epoch


def test_a_sigterm_during_a_write_to_the_store_lets_the_write_finish_then_ends_the_run_killed(tmp_path: Path) -> None:
    """SIGTERM lands while a batch of losses is being written to the SQLite store (its handler
    would raise between two statements of the store's transaction): the batch is written whole,
    then the training stops, and its run ends KILLED with every loss it was given."""
    import signal

    from mlflow import MlflowClient
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from aigc_pipeline.__main__ import _terminate
    from aigc_pipeline.config import load_config
    from aigc_pipeline.errors import Terminated
    from aigc_pipeline.tracking.live import TrainingRun
    from aigc_pipeline.tracking.store import tracking_uri

    project = copy_project(tmp_path / "project")
    cfg = load_config(project)
    sent: list[str] = []
    handed: list[int] = []  # the steps the trainer gave the run before it was stopped

    def signal_mid_write(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and not sent:
            sent.append(statement)
            signal.raise_signal(signal.SIGTERM)  # its handler raises Terminated, mid-transaction unless held

    handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        with pytest.raises(Terminated):
            with TrainingRun(project, cfg, key="t" * 16, hparams={}) as run:
                run.start({"resumed_from": 0})
                event.listen(Engine, "after_cursor_execute", signal_mid_write)
                try:
                    for step in range(1, STEPS_PER_EPOCH + 1):
                        run.progress(step, STEPS_PER_EPOCH, 1)
                        handed.append(step)
                        run.metrics(step, {"loss_d": _loss(step)})
                    run.send()
                finally:
                    event.remove(Engine, "after_cursor_execute", signal_mid_write)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert sent, "the store was never written to: the test did not interrupt anything"
    client = MlflowClient(tracking_uri(project))
    assert client.get_run(run.run_id).info.status == "KILLED"
    assert handed and [m.step for m in client.get_metric_history(run.run_id, "train/loss_d")] == handed
