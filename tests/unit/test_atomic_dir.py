"""`atomic_dir` under SIGKILL at every point of its swap: the name always resolves to a whole
version, and the next run restores or removes whatever the killed one left.

Each kill happens in a child process that patches one step of the swap to SIGKILL itself right
after that step, so the kill lands exactly there (no timing involved)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigc_pipeline import io
from aigc_pipeline.io import atomic_dir, recover_dir
from tests.conftest import BIN, REPO

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from aigc_pipeline import io

    target, point = Path(sys.argv[1]), sys.argv[2]
    via_ingest = point.startswith("ingest:")
    point = point.removeprefix("ingest:")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point.startswith("fallback"):
        io._RENAMEAT2 = None  # as on a system without renameat2
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if point == "fallback-between" and Path(dst).name.startswith(f".{target.name}.old-"):
                die()  # the old version moved aside, the new one not yet in place
            if point == "fallback-after" and Path(dst) == target:
                die()  # the new version in place, the old one not yet removed
        os.replace = replace
    elif point == "exchange-after":
        real_exchange = io._rename_exchange
        def exchange(a, b):
            assert real_exchange(a, b), "renameat2(RENAME_EXCHANGE) is not available here"
            die()  # names swapped, the previous version (now under the temp name) not yet removed
        io._rename_exchange = exchange

    if via_ingest:
        from aigc_pipeline import cli
        sys.exit(cli.main(sys.argv[3:]))
    with io.atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.bin").write_bytes(b"new version " * 1000)
        (tmp / "meta.json").write_text('{"version": 2}')
        if point == "body":
            die()
    """
)


def _kill_at(target: Path, point: str, *extra: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(target), point, *extra], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, f"child was not killed at {point}: {proc.returncode}\n{proc.stderr}"
    return proc.returncode


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.fixture
def previous(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    target = tmp_path / "dataset"
    with atomic_dir(target) as tmp:
        (tmp / "meta.json").write_text('{"version": 1}')
        (tmp / "shards").mkdir()
        (tmp / "shards" / "000.bin").write_bytes(bytes(range(256)) * 400)
    return target, _contents(target)


@pytest.mark.parametrize("point", ["body", "exchange-after", "fallback-between", "fallback-after"])
def test_kill_during_the_swap_then_next_run_sees_the_previous_version(
    previous: tuple[Path, dict[str, bytes]], point: str
) -> None:
    target, before = previous
    _kill_at(target, point)

    if point == "fallback-between":
        # The kill landed between the fallback's two renames: the name is empty right now.
        assert not target.exists() and any(n.startswith(".dataset.old-") for n in _leftovers(target))
    elif point in ("exchange-after", "fallback-after"):
        assert _contents(target)["meta.json"] == b'{"version": 2}'  # the new version was already in place
    else:
        assert _contents(target) == before
    assert _leftovers(target), "the kill should have left something for the next run to repair"

    # The next run: before its body runs, the folder is whole again and nothing is left over.
    seen: dict[str, bytes] = {}
    with pytest.raises(RuntimeError, match="stop"):
        with atomic_dir(target) as tmp:
            seen = _contents(target)
            assert _leftovers(target) == [tmp.name]  # only its own temp folder
            raise RuntimeError("stop")
    expected = (
        before
        if point in ("body", "fallback-between")
        else {"meta.json": b'{"version": 2}', "sub/new.bin": b"new version " * 1000}
    )
    assert seen == expected
    assert _contents(target) == expected, "byte-identical"
    assert _leftovers(target) == []


def test_exchange_keeps_the_name_resolvable_and_is_used_on_linux(previous: tuple[Path, dict[str, bytes]]) -> None:
    target, _ = previous
    if sys.platform == "linux":
        assert io._RENAMEAT2 is not None, "glibc's renameat2 should be found on Linux"
    inode = target.stat().st_ino
    with atomic_dir(target) as tmp:
        (tmp / "meta.json").write_text('{"version": 3}')
    assert (target / "meta.json").read_text() == '{"version": 3}' and target.stat().st_ino != inode
    assert _leftovers(target) == []


def test_leftovers_of_a_live_process_are_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "ds"
    target.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".ds.tmp-{sleeper.pid}-abcd"
        live.mkdir()
        dead = tmp_path / ".ds.tmp-999999999-abcd"
        dead.mkdir()
        recover_dir(target)
        assert live.is_dir() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def _images(folder: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_killed_ingest_swap_then_failing_ingest_leaves_the_previous_dataset(tmp_path: Path) -> None:
    """End to end with `aigc ingest`: killed between the fallback's renames, then a run that fails."""
    project = tmp_path / "project"
    project.mkdir()
    out = tmp_path / "prepared"
    args = ["--project", str(project), "ingest", "--out", str(out), "--size", "16", "--channels", "3", "--workers", "1"]
    first = _images(tmp_path / "first", 12, seed=0)
    subprocess.run([str(BIN / "aigc"), *args, str(first)], check=True, capture_output=True, timeout=300)
    good = _contents(out)

    second = _images(tmp_path / "second", 12, seed=1)
    _kill_at(out, "ingest:fallback-between", *args, str(second))
    assert not out.exists(), "the kill should have landed between the two renames"

    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"not a png")
    failed = subprocess.run([str(BIN / "aigc"), *args, str(broken)], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "no usable image" in failed.stderr
    assert f"the previous dataset at {out} is unchanged" in failed.stderr
    assert _contents(out) == good
    assert _leftovers(out) == []
