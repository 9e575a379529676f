"""An archive cannot exhaust the memory of `aigc ingest`: members over the member limit are refused
from their header before they are read, and the members in flight to the decoders stay within a
byte budget however large they are.

The archive (a few MiB on disk) holds three 400 MiB members of zeros, named as images, and 24
valid 27 MB BMPs (650 MB in all, more than twice the in-flight budget). The peak is the summed RSS
of `aigc ingest` and every process it starts (forkserver, decoding workers), sampled every 20 ms.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from aigc_pipeline.data.validate import MAX_MEMBER_BYTES, MEMBER_BYTES_IN_FLIGHT
from tests.conftest import BIN
from tests.scale.servers import descendants

BIG = 400 * 2**20
PEAK_LIMIT = 2**30
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read (the test itself must not hold 400 MiB)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _bmp(i: int) -> bytes:
    """A 3000x3000 RGB BMP (27 MB): a flat colour per image plus a small noisy patch, so it
    compresses well in the archive and every image is distinct after resizing."""
    rng = np.random.default_rng(i)
    pixels = np.empty((3000, 3000, 3), dtype=np.uint8)
    pixels[:] = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
    pixels[:600, :600] = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="BMP")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, size: int, data) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    tf.addfile(info, data)


def _tree_rss(root: int) -> int:
    """Summed RSS of ``root`` and its live descendants (shared pages counted in each: an upper bound)."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except OSError:
            continue  # exited between listing and reading
    return total


def _run_measured(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        done.set()
        sampler.join()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), peak[0]


def test_big_archive_members_are_refused_unread_and_memory_stays_bounded(tmp_path: Path) -> None:
    assert MAX_MEMBER_BYTES < BIG and 2 * 27_000_000 < MEMBER_BYTES_IN_FLIGHT < 24 * 27_000_000
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        for i in range(24):
            if i % 8 == 3:
                _add(tf, f"photos/huge-{i // 8}.png", BIG, _Zeros(BIG))
            data = _bmp(i)
            _add(tf, f"photos/{i:03d}.bmp", len(data), io.BytesIO(data))
    assert archive.stat().st_size < 64 * 2**20

    out = tmp_path / "prepared"
    project = tmp_path / "project"
    project.mkdir()
    t0 = time.monotonic()
    proc, peak = _run_measured(
        [
            str(BIN / "aigc"),
            "--project",
            str(project),
            "ingest",
            str(archive),
            "--out",
            str(out),
            "--size",
            "32",
            "--channels",
            "3",
            "--workers",
            "2",
            "--max-rejected",
            "0.5",
        ],
        cwd=project,
    )
    seconds = time.monotonic() - t0
    print(f"archive ingest: peak RSS {peak / 2**20:.0f} MiB (process tree), {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 24
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"photos/huge-0.png", "photos/huge-1.png", "photos/huge-2.png"}
    for reason in reasons.values():
        assert reason.startswith(f"member too large: {BIG} bytes > {MAX_MEMBER_BYTES}"), reason
    assert peak < PEAK_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB of the ingest and its workers"


def test_zip_members_over_the_limit_are_refused_from_their_header(tmp_path: Path) -> None:
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        data = _bmp(0)
        zf.writestr("a.bmp", data)
        with zf.open("huge.png", "w", force_zip64=True) as member:
            zeros = _Zeros(MAX_MEMBER_BYTES + 1)
            while block := zeros.read(16 * 2**20):
                member.write(block)
    out = tmp_path / "prepared"
    proc, peak = _run_measured(
        [
            str(BIN / "aigc"),
            "--project",
            str(tmp_path),
            "ingest",
            str(archive),
            "--out",
            str(out),
            "--size",
            "16",
            "--max-rejected",
            "0.5",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rejected,) = json.loads((out / "report.json").read_text())["rejected"]
    assert rejected["path"] == "huge.png"
    assert rejected["reason"].startswith(f"member too large: {MAX_MEMBER_BYTES + 1} bytes > {MAX_MEMBER_BYTES}")
    assert peak < MAX_MEMBER_BYTES + 400 * 2**20, "the member was read although its header is over the limit"
