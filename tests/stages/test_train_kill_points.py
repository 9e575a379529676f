"""A training killed anywhere, then re-run, writes every output byte-identical to an uninterrupted
one: weights, per-step history, per-epoch records, FID over training, every sample grid.

One chain of 20 SIGKILLs over a short train stage (4 epochs of 10 steps, a checkpoint every 6
steps, FID over training every 2 epochs, a grid every epoch): each run of the chain is killed at
the next point, the run after it resumes from whatever the killed one left, and a last run
finishes. The points are exact, not timed: the child process patches one function of the stage
or the trainer to SIGKILL itself right there (mid-epoch after a step, at an epoch's last step
before its record, after an epoch's callbacks, in the middle of writing a checkpoint, a grid or
the model folder, right after a checkpoint, during FID over training, after the last checkpoint).
Only ``timing.csv`` and ``compute.json`` (wall-clock and CPU seconds) may differ, by design.

Each run is a process of its own, forked from one that imported the stage once and runs no torch
operation itself (no thread pool to lose in the fork): a fresh interpreter would spend several
seconds importing torch, MLflow and torch-fidelity for each of the 22 runs."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aigc_pipeline.config import load_config
from aigc_pipeline.stages import augment, ingest
from tests.conftest import QUICK, REPO

pytestmark = pytest.mark.slow

SETTINGS = [
    *QUICK,
    "train.epochs=4",
    "train.checkpoint_every=6",
    "train.keep_checkpoints=2",
    "evaluate.progress_every=2",
    "train.sample_every=1",
]
STEPS_PER_EPOCH = 10  # 320 augmented images (160 train originals + copies), batch 32

# Where each run of the chain dies: (what is patched, the step or epoch it dies at). Each run resumes
# from the last checkpoint the chain has written so far (6, 12, 18, ...), so the points are in the
# order a run resumed from there reaches them.
KILLS = [
    ("after_step", 1),
    ("after_step", 5),  # before any checkpoint
    ("checkpoint_write", 6),
    ("after_checkpoint", 6),
    ("after_step", 10),  # an epoch's last step, before its record and callbacks
    ("after_epoch", 1),  # after the epoch's record, grid and callbacks, before anything is checkpointed
    ("checkpoint_write", 12),
    ("after_step", 13),
    ("grid_write", 2),
    ("fid", 2),
    ("after_step", 20),
    ("after_epoch", 2),
    ("after_checkpoint", 24),
    ("after_step", 25),
    ("after_epoch", 3),
    ("after_checkpoint", 30),
    ("fid", 4),
    ("checkpoint_write", 40),
    ("after_checkpoint", 40),  # the last epoch, the last checkpoint
    ("model_write", 0),  # inside the model folder's atomic write
]
assert len(KILLS) == 20


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from aigc_pipeline.config import load_config
    from aigc_pipeline.evaluation import progress
    from aigc_pipeline.stages import train
    from aigc_pipeline.training import checkpoint, loop

    data, reference, out, ckpt, point, at = sys.argv[1:7]
    at = int(at)
    cfg = load_config(sys.argv[7], sys.argv[8:])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "after_step":
        real_step = train.Progress.step
        def step(self, s, total, epoch):
            real_step(self, s, total, epoch)
            if s == at:
                die()
        train.Progress.step = step
    elif point == "after_epoch":
        real_epoch = loop._epoch_callbacks
        def epoch_callbacks(cb, family, epoch, *args, **kwargs):
            real_epoch(cb, family, epoch, *args, **kwargs)
            if epoch == at:
                die()
        loop._epoch_callbacks = epoch_callbacks
    elif point in ("checkpoint_write", "after_checkpoint"):
        real_save = checkpoint.save_checkpoint
        def save(folder, s, state, keep=3):
            if s == at and point == "checkpoint_write":
                data = checkpoint.encode_state(state)
                Path(folder).mkdir(parents=True, exist_ok=True)
                tmp = Path(folder) / f".step-{s:09d}.safetensors.partial.tmp"
                tmp.write_bytes(data[: len(data) // 2])  # half a file, as a kill mid-write leaves it
                die()
            written = real_save(folder, s, state, keep=keep)
            if s == at:
                die()
            return written
        loop.save_checkpoint = save
    elif point == "grid_write":
        real_write = train.atomic_write_bytes
        def write(path, data):
            if Path(path).name == f"epoch-{at:03d}.png":
                Path(path).with_name(f".{Path(path).name}.partial.tmp").write_bytes(data[:10])
                die()
            return real_write(path, data)
        train.atomic_write_bytes = write
    elif point == "fid":
        real_call = progress.FidProgress.__call__
        def call(self, epoch, generator):
            if epoch == at:
                real_frechet = progress.frechet_distance
                def frechet(*a, **k):
                    die()
                progress.frechet_distance = frechet  # features extracted, the point not yet recorded
            return real_call(self, epoch, generator)
        progress.FidProgress.__call__ = call
    elif point == "model_write":
        real_save_generator = train.save_generator
        def save_generator(folder, *a, **k):
            real_save_generator(folder, *a, **k)
            die()  # inside the model folder's atomic_dir: weights written, the rest not yet
        train.save_generator = save_generator
    elif point != "none":
        raise SystemExit(f"unknown kill point {point}")
    train.run(cfg, Path(data), Path(out), Path(ckpt), reference=Path(reference), quiet=True,
              project_dir=Path(out).parent)
    """
)


# Forks one process per run from a parent that has the stage imported. Reads a JSON line
# [argv, log] per run from stdin, answers with the run's exit code (-9: SIGKILL) on stdout.
PARENT = textwrap.dedent(
    """
    import json, os, sys, traceback
    import mlflow, torch_fidelity  # imported by a run's live tracking and FID over training
    from aigc_pipeline.config import load_config
    from aigc_pipeline.evaluation import features, progress
    from aigc_pipeline.stages import train
    from aigc_pipeline.tracking import live
    from aigc_pipeline.training import checkpoint, loop

    child = compile(sys.argv[1], "<run>", "exec")
    print("ready", flush=True)
    for line in sys.stdin:
        argv, log = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["run", *argv]
            code = 0
            try:
                exec(child, {"__name__": "__main__"})
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    """
)


@dataclass
class Run:
    returncode: int
    stderr: str


class Runs:
    """The forking parent: ``train(...)`` is one run of the train stage in a process of its own."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = 0
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PARENT, CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._answer(timeout=300) == "ready"

    def _answer(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer from the forking parent in {timeout:.0f} s"
        return self.proc.stdout.readline().strip()

    def train(self, name: str, point: str = "none", at: int = 0) -> Run:
        w = self.work
        argv = [
            *(str(p) for p in (w / "augmented", w / "prepared", w / name / "model", w / name / "checkpoints")),
            point,
            str(at),
            str(REPO),
            *SETTINGS,
        ]
        self.count += 1
        log = w / f"run-{self.count:02d}.log"
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.proc.stdin.flush()
        code = int(self._answer(timeout=600))
        return Run(code, log.read_text(errors="replace"))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    forking = Runs(tmp_path)
    try:
        yield forking
    finally:
        forking.close()


def _outputs(model: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(model)): p.read_bytes()
        for p in sorted(model.rglob("*"))
        if p.is_file() and p.name not in ("timing.csv", "compute.json")
    }


def test_twenty_kills_then_a_rerun_write_what_an_uninterrupted_training_writes(tmp_path: Path, runs: Runs) -> None:
    cfg = load_config(REPO, SETTINGS)
    ingest.run(cfg, tmp_path / "prepared")
    augmented = augment.run(cfg, tmp_path / "prepared", tmp_path / "augmented")
    assert augmented.count // cfg.train.batch_size == STEPS_PER_EPOCH  # the kill points assume it

    reference = runs.train("reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _outputs(tmp_path / "reference" / "model")
    assert {
        "generator.safetensors",
        "history.csv",
        "epochs.csv",
        "fid_progress.csv",
        "samples.png",
        "samples/epoch-004.png",
    } <= set(expected)
    assert len(expected["fid_progress.csv"].splitlines()) == 3  # header + epochs 2 and 4
    assert len(expected["epochs.csv"].splitlines()) == 5  # header + 4 epochs

    for point, at in KILLS:
        killed = runs.train("chain", point, at)
        assert killed.returncode == -signal.SIGKILL, (
            f"not killed at {point} {at}: {killed.returncode}\n{killed.stderr[-3000:]}"
        )
    finished = runs.train("chain")
    assert finished.returncode == 0, finished.stderr[-3000:]
    got = _outputs(tmp_path / "chain" / "model")
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if got[name] != expected[name]]
    assert not different, f"outputs differ after 20 kills and re-runs: {different}"
