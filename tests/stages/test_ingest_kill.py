"""A kill -9 in the middle of `aigc ingest` leaves the previous prepared dataset exactly as it was;
the next run cleans up the killed run's temporary folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import BIN


def _folder(root: Path, n: int, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"{i:04d}.jpg", quality=90)
    return root


def _ingest(source: Path, out: Path, project: Path) -> list[str]:
    return [
        str(BIN / "aigc"),
        "--project",
        str(project),
        "ingest",
        str(source),
        "--out",
        str(out),
        "--size",
        "16",
        "--channels",
        "3",
        "--workers",
        "1",
    ]


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_killed_ingest_leaves_the_previous_dataset_untouched(tmp_path: Path) -> None:
    project = tmp_path / "project"  # no params.yaml: ad-hoc ingest with the default settings
    project.mkdir()
    out = tmp_path / "prepared"
    small = _folder(tmp_path / "small", 20, 32, seed=0)
    subprocess.run(_ingest(small, out, project), check=True, capture_output=True)
    good = _contents(out)

    big = _folder(tmp_path / "big", 400, 384, seed=1)  # a second or more of decoding
    proc = subprocess.Popen(
        _ingest(big, out, project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".prepared.tmp-*")):  # the new version is being written
            assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "ingest ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    assert _contents(out) == good  # the previous good dataset, byte for byte
    leftovers = list(tmp_path.glob(".prepared.tmp-*"))
    assert leftovers and not (tmp_path / "prepared.failed-report.json").exists()

    subprocess.run(_ingest(small, out, project), check=True, capture_output=True)
    assert not list(tmp_path.glob(".prepared.tmp-*"))  # the killed run's half-written folder is gone
    assert _contents(out)["meta.json"] == good["meta.json"]
