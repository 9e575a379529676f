"""Where the test suite's CPU goes: a pytest plugin, and a report of what it recorded.

    PYTHONPATH=. make test PYTEST_ARGS="-p tools.suite_cpu"   # records into .pytest-cpu/, a file per xdist worker
    python -m tools.suite_cpu .pytest-cpu   # per file and per test: wall, CPU of the worker, of its children

The suite is bound by CPU on a 2-core machine (three workers share two cores), so a test's wall
time says little about what it costs: this counts, per test (its fixtures' setup and teardown
included), the CPU seconds of the worker process and of the child processes it waited for
(``RUSAGE_CHILDREN``: a server stopped at a module's teardown is counted in that module's last test).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

OUT_ENV = "AIGC_TEST_CPU_DIR"


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    own0, children0 = _cpu()
    started = time.monotonic()
    yield
    own1, children1 = _cpu()
    folder = Path(os.environ.get(OUT_ENV, ".pytest-cpu"))
    folder.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(folder / f"{worker}.tsv", "a") as f:
        f.write(f"{item.nodeid}\t{time.monotonic() - started:.1f}\t{own1 - own0:.1f}\t{children1 - children0:.1f}\n")


def report(folder: Path, top: int = 25) -> str:
    """Per-file and per-test totals (wall, own CPU, children's CPU), most CPU first."""
    rows = [line.rstrip("\n").split("\t") for f in sorted(folder.glob("*.tsv")) for line in f.open()]
    tests = [(node, float(wall), float(own), float(children)) for node, wall, own, children in rows]
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for node, wall, own, children in tests:
        total = files[node.split("::")[0]]
        total[0], total[1], total[2] = total[0] + wall, total[1] + own, total[2] + children
    lines = [
        f"{len(tests)} tests: {sum(t[2] for t in tests):.0f} CPU-s in the workers, "
        f"{sum(t[3] for t in tests):.0f} in their children",
        "",
        "  wall    own  child  file",
    ]
    for name, (wall, own, children) in sorted(files.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))[:top]:
        lines.append(f"{wall:6.0f} {own:6.0f} {children:6.0f}  {name}")
    lines += ["", "  wall    own  child  test"]
    for node, wall, own, children in sorted(tests, key=lambda t: -(t[2] + t[3]))[:top]:
        lines.append(f"{wall:6.0f} {own:6.0f} {children:6.0f}  {node}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path(".pytest-cpu"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(report(args.folder, args.top))


if __name__ == "__main__":
    main()
