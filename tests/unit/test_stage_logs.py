"""flows/stage_logs.py without a server: how a stage's output is cut into log lines, and the
artifact names and keys a flow run describes itself with (flows/describe.py)."""

from __future__ import annotations

import io
import re
import threading
from datetime import UTC, datetime

from aigc_pipeline.stages.train import Progress
from flows.describe import RunInfo, artifact_key, resolve, run_name, settings
from flows.stage_logs import LineTee, clean_line
from tests.conftest import REPO


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_are_what_a_terminal_shows() -> None:
    assert (
        clean_line("\r  train [####----] 3/8 epoch 1/2\r\x1b[K  train epoch 1/2  step 4/8  loss 1.0")
        == "train epoch 1/2  step 4/8  loss 1.0"
    )
    assert clean_line("  evaluate: FID 3.1 [incv3-x]  ") == "evaluate: FID 3.1 [incv3-x]"
    assert clean_line("\x1b[1;31mred\x1b[0m") == "red"


def test_tee_writes_through_and_hands_over_complete_lines_only() -> None:
    target, lines = io.StringIO(), []
    tee = LineTee(target, lines.append)
    tee.write("ingest: 200 images")
    assert lines == []
    tee.write(" accepted\n\nsecond\nthi")
    assert lines == ["ingest: 200 images accepted", "second"]
    tee.close_pending()
    assert lines[-1] == "thi"
    assert target.getvalue() == "ingest: 200 images accepted\n\nsecond\nthi"


def test_tee_ignores_other_threads_and_its_own_output() -> None:
    target, lines = io.StringIO(), []
    tee = LineTee(target, lambda line: (lines.append(line), tee.write(f"echo {line}\n")))
    worker = threading.Thread(target=tee.write, args=("from another thread\n",))
    worker.start()
    worker.join()
    tee.write("mine\n")
    assert lines == ["mine"]  # the echo written by on_line is not fed back
    assert target.getvalue() == "from another thread\nmine\necho mine\n"


def test_the_train_stages_progress_on_a_terminal_gives_one_line_per_epoch() -> None:
    """The real train.Progress, drawing its bar on a terminal: the bar's redraws never become
    lines; one line per epoch."""
    terminal, lines = _Terminal(), []
    tee = LineTee(terminal, lines.append)
    progress = Progress(2, stream=tee)
    progress.start({"resumed_from": 0, "total_steps": 6, "speed": "cpu", "data_placement": "device", "world_size": 1})
    for step in range(1, 7):
        progress.last_draw = 0.0  # draw every step
        progress.step(step, 6, 1 + (step - 1) // 3)
        if step % 3 == 0:
            progress.epoch(step // 3, {"loss_d": 0.5, "loss_g": 1.5, "images_per_s": 100.0, "lr_g": 2e-4})
    progress.close()
    tee.close_pending()
    assert "train [" in terminal.getvalue()  # the terminal still got its bar
    assert lines[0] == "train: cpu, data on device"
    epochs = [re.match(r"train epoch (\d+)/(\d+)\s+step (\d+)/(\d+).*\seta (.+)$", line) for line in lines[1:]]
    assert [m.groups()[:4] for m in epochs if m] == [("1", "2", "3", "6"), ("2", "2", "6", "6")], lines
    assert [m.group(5) for m in epochs if m][-1] == "0 s", lines  # the time left, at the last step none
    assert all("train [" not in line for line in lines), lines


def test_run_names_tags_and_artifact_keys() -> None:
    info = resolve(REPO, settings("digits", "ddpm", ["train.epochs=3"]))
    assert (info.dataset, info.model, info.model_name, info.registered_model) == (
        "digits",
        "ddpm",
        "digits-ddpm",
        "digits",
    )
    assert info.tags == ["dataset:digits", "model:ddpm"]
    when = datetime(2026, 12, 1, 11, 53, 0, tzinfo=UTC).astimezone()
    assert run_name(info, when) == "digits-ddpm-20261201-" + when.strftime("%H%M%S")
    assert re.fullmatch(r"digits-ddpm-train-\d{8}-\d{6}", run_name(info, when, suffix="train"))
    assert artifact_key("digits", "summary") == "digits-summary"
    assert artifact_key("My_Pets.v2", "training") == "my-pets-v2-training"
    assert artifact_key(RunInfo("d", "m", "d-m", "__").registered_model, "x") == "model-x"
