"""Exact resume across a hard kill: SIGKILL a training process at a random moment (mid-step or
mid-checkpoint-write), re-run it, and compare the final weights bitwise with an uninterrupted run,
for every model family."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from aigc_pipeline.models.families import MODELS
from aigc_pipeline.training.checkpoint import list_checkpoints
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Runs the real trainer on fixed random data and saves every module's weights at the end.
WORKER = """
import sys
import numpy as np
from pathlib import Path
from safetensors.torch import save_file
from aigc_pipeline.models.base import Arch, Hparams
from aigc_pipeline.training.loop import train

ckpt, out, family = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
epochs, every = int(sys.argv[4]), int(sys.argv[5])
images = np.random.default_rng(0).integers(0, 256, size=(96, 1, 32, 32), dtype=np.uint8)
res = train(images, arch=Arch(family, 32, 1, 16, 16), hparams=Hparams(2e-4, 0.5, 0.999, sampling_steps=2),
            epochs=epochs, batch_size=16, seed=3, checkpoint_dir=ckpt, checkpoint_every=every, sample_grid=8)
state = {f"{m}.{k}": v.contiguous() for m, mod in res.family.modules.items() for k, v in mod.state_dict().items()}
save_file(state, str(out))
print("resumed_from", res.resumed_from)
"""


# Epochs of 6 steps, checkpoints every 7 steps. The kill waits for the second checkpoint (step 14),
# then a random delay of up to two checkpoint intervals as measured on this run (whatever the CPU
# and its load): it lands between steps 14 and about 28, mid-step or mid-write, well before step 60.
EPOCHS = 10
CHECKPOINT_EVERY = 7


def _worker(ckpt: Path, out: Path, family: str) -> subprocess.Popen:
    # One thread each: the reference and the victim (then the resumed run) train side by side, and
    # two processes with a thread per core each slowed the ddpm case past its timeout on 2 cores.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(ckpt), str(out), family, str(EPOCHS), str(CHECKPOINT_EVERY)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _checkpoint_reached(victim: subprocess.Popen, folder: Path, step: int) -> float:
    """When (``time.monotonic()``) a checkpoint of ``step`` or later was first seen in ``folder``."""
    deadline = time.monotonic() + 120
    while not any(s >= step for s, _ in list_checkpoints(folder)):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, f"no checkpoint of step {step} written in time"
        time.sleep(0.01)
    return time.monotonic()


@pytest.mark.parametrize("family", list(MODELS))
def test_sigkill_then_rerun_gives_bitwise_identical_weights(tmp_path: Path, family: str) -> None:
    reference = _worker(tmp_path / "ref-ckpt", tmp_path / "ref.safetensors", family)

    victim = _worker(tmp_path / "ckpt", tmp_path / "out.safetensors", family)
    first = _checkpoint_reached(victim, tmp_path / "ckpt", CHECKPOINT_EVERY)
    interval = _checkpoint_reached(victim, tmp_path / "ckpt", 2 * CHECKPOINT_EVERY) - first
    time.sleep(random.Random().uniform(0.0, 2 * interval))  # a random moment: mid-step or mid-write
    assert victim.poll() is None, "training finished before it could be killed; make it longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = [s for s, _ in list_checkpoints(tmp_path / "ckpt")]

    resumed = _worker(tmp_path / "ckpt", tmp_path / "out.safetensors", family)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed_from {killed_at[-1]}" in out, (out, killed_at)
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err

    a, b = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "out.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"weights differ after resume from step {killed_at[-1]}: {different[:5]}"
