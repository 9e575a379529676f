"""Throwaway project copies, an isolated environment, subprocess timing and machine facts."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import REPO, WORK_DIR, BenchError

BIN = Path(sys.executable).parent  # the venv's bin: aigc, dvc

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    # The embedded server can take ~17 s on this machine; Prefect's default wait is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PYTHONUNBUFFERED": "1",
}

# A caller's real servers would turn the embedded set-up we measure into a network benchmark.
CALLER_VARS = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "aigc bench",
    "GIT_AUTHOR_EMAIL": "bench@aigc.invalid",
    "GIT_COMMITTER_NAME": "aigc bench",
    "GIT_COMMITTER_EMAIL": "bench@aigc.invalid",
}


def fresh_dir(path: Path) -> Path:
    """Empty ``path`` (which must lie inside ``bench/.work``) and return it."""
    path = path.resolve()
    if WORK_DIR.resolve() not in path.parents:
        raise BenchError(f"refusing to wipe {path}: not inside {WORK_DIR}")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def isolate_environment(work: Path) -> dict[str, str]:
    """Point every cache this benchmark touches inside ``work`` and turn telemetry off.

    Returns the variables set, for the record. ``PREFECT_HOME`` is set per project copy
    by the caller, since each copy gets its own embedded Prefect database.
    """
    for var in CALLER_VARS:
        os.environ.pop(var, None)
    values = {
        **TELEMETRY_OFF,
        **GIT_IDENTITY,
        # FID reference statistics and the converted Inception weights: cold on every invocation.
        "AIGC_CACHE_DIR": str(work / "aigc-cache"),
        # Keeps a torch-fidelity weights file in the user's torch hub from changing what evaluate loads.
        "TORCH_HOME": str(work / "torch-home"),
    }
    os.environ.update(values)
    return values


def project_files() -> list[str]:
    """Files a clone of this repository would hold (tracked + untracked-but-not-ignored), minus bench/."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    return [f for f in out if f and not f.startswith("bench/") and (REPO / f).is_file()]


def _git_head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def snapshot_source(dest: Path) -> dict:
    """Copy the project's files into ``dest`` once; every measured run uses this snapshot.

    The project is edited while a ~10-minute benchmark runs; without a snapshot, later copies (and
    code imported late) would mix two versions of the source. Returns what was snapshotted: the git
    commit, the files that differed from it, and a digest of the copied files.
    """
    head = _git_head()
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    changed = [line[3:] for line in status.splitlines() if not line[3:].startswith("bench/")]
    digest = hashlib.sha256()
    for rel in sorted(project_files()):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
        digest.update(rel.encode() + b"\0" + target.read_bytes() + b"\0")
    if _git_head() != head:
        raise BenchError("the project got a new commit while it was being snapshotted; run the benchmark again")
    return {"git_commit": head, "dirty": bool(changed), "changed_files": changed, "source_sha256": digest.hexdigest()}


def use_source(snapshot: Path) -> None:
    """Import ``aigc_pipeline`` and ``flows`` from ``snapshot`` in this process (ahead of the
    editable install, whose finder comes after ``sys.path``), and in subprocesses via PYTHONPATH."""
    for module in ("aigc_pipeline", "flows"):
        if module in sys.modules:
            raise BenchError(f"{module} was imported before the source snapshot was put on sys.path")
    sys.path.insert(0, str(snapshot))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(snapshot), os.environ.get("PYTHONPATH")) if p)
    import aigc_pipeline

    if Path(aigc_pipeline.__file__).resolve().parent.parent != snapshot.resolve():
        raise BenchError(f"aigc_pipeline imports from {aigc_pipeline.__file__}, not the snapshot {snapshot}")


def import_from_snapshot(dest: Path) -> dict:
    """Snapshot the source into ``dest`` and import the project from there (:func:`use_source`);
    when an earlier benchmark of this invocation already did, keep its import. Returns the record."""
    if "aigc_pipeline" not in sys.modules:
        project = snapshot_source(dest)
        use_source(dest)
        return project
    import aigc_pipeline

    return {"git_commit": None, "note": f"aigc_pipeline from {Path(aigc_pipeline.__file__).parent}"}


def copy_project(dest: Path, source: Path, overrides: Sequence[str] = ()) -> Path:
    """A fresh git + DVC checkout of ``source`` in ``dest``, with ``overrides`` written to params.yaml.

    Overrides go into params.yaml (as ``aigc run --set`` does) so that dvc.yaml, the direct
    commands and the flow all see the same profile, and dvc.lock records it.
    """
    from aigc_pipeline.config import write_overrides_to_params

    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    write_overrides_to_params(dest, list(overrides))
    git = ["git", "-C", str(dest)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "bench copy"], check=True)
    return dest


@dataclass(frozen=True)
class Timed:
    """A finished subprocess: wall seconds, exit status and its output."""

    seconds: float
    returncode: int
    output: str


def run_timed(
    argv: Sequence[str], cwd: Path, *, env: dict[str, str] | None = None, log: Path | None = None, timeout: float = 1200
) -> Timed:
    """Run ``argv`` in ``cwd`` and time it (wall clock, process start to exit).

    Raises :class:`BenchError` on a non-zero exit or a timeout, with the output's tail; the
    full output goes to ``log`` when given.
    """
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(argv)} in {cwd} ran past {timeout:.0f} s") from e
    seconds = time.perf_counter() - started
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise BenchError(f"{' '.join(argv)} in {cwd} exited with {proc.returncode}:\n{tail}")
    return Timed(seconds, proc.returncode, proc.stdout)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass  # not Linux: fall through to what the platform module knows
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    """Total memory in GiB from /proc/meminfo, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except FileNotFoundError:
        return None
    return None


def machine_info() -> dict:
    """What the numbers depend on: CPU, memory, OS, interpreter and the libraries that do the work."""
    import torch

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "libraries": {d: version(d) for d in ("prefect", "dvc", "mlflow", "torch-fidelity", "torchvision")},
    }


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def result_doc(
    ctx: Any,
    *,
    schema_version: int,
    name: str,
    title: str,
    command: str,
    rows: list,
    notes: list,
    project: object,
    overrides: Sequence[str],
    **extra: object,
) -> dict:
    """The document a snapshot benchmark returns (``--quick`` marked in the command), with the
    machine and its load at the end; ``extra`` adds the benchmark's own raw figures."""
    return {
        "schema_version": schema_version,
        "name": name,
        "title": title,
        "command": command + (" --quick" if ctx.quick else ""),
        "date": utc_now(),
        "machine": {**machine_info(), "load_average_at_end": load_average()},
        "rows": rows,
        "notes": notes,
        "project": project,
        "profile": {"name": ctx.profile, "overrides": list(overrides)},
        **extra,
    }


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock plus CPU seconds used so far: by this process tree, and by the whole machine."""

    wall: float
    process: float  # this process alone
    own: float  # this process + waited-for children + live descendants (e.g. Prefect's server)
    machine: float | None  # all CPUs' busy time from /proc/stat; None off Linux


def _proc_stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # the process exited (or is not ours to read) between listing and reading
    return text[text.rindex(")") + 2 :].split()  # fields from `state` on; comm may contain spaces


def _descendants_cpu(root: int) -> float:
    """utime + stime + their waited children of every live descendant of ``root``, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat_fields(entry)
        if fields is None:
            continue
        # After `state`: ppid is field 1; utime, stime, cutime, cstime are fields 11-14.
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(x) for x in fields[11:15]) / tick
    total = 0.0
    for pid in parent:
        p = parent[pid]
        while p and p != root and p in parent:
            p = parent[p]
        if p == root and pid != root:
            total += cpu[pid]
    return total


def _machine_busy() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except FileNotFoundError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> CpuSnapshot:
    """Take a :class:`CpuSnapshot` now."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    if os.path.isdir("/proc"):
        own += _descendants_cpu(os.getpid())
    return CpuSnapshot(time.perf_counter(), t.user + t.system, own, _machine_busy())


def cpu_span(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float | None]:
    """Wall seconds between two snapshots, CPU seconds this process tree used, and CPU seconds the
    rest of the machine used (``other_cores``: on average, how many CPUs others kept busy)."""
    wall = end.wall - start.wall
    own = end.own - start.own
    span: dict[str, float | None] = {
        "wall_s": wall,
        "process_cpu_s": end.process - start.process,
        "own_cpu_s": own,
        "other_cpu_s": None,
        "other_cores": None,
    }
    if start.machine is not None and end.machine is not None and wall > 0:
        other = max(0.0, (end.machine - start.machine) - own)
        span.update(other_cpu_s=other, other_cores=other / wall)
    return span


def wait_for_quiet(
    max_wait: float, threshold: float, *, window: float = 3.0, log: Callable[[str], None] | None = None
) -> dict[str, float | bool | None]:
    """Wait (up to ``max_wait`` s) until other processes use fewer than ``threshold`` cores over ``window`` s.

    On a shared 2-core machine one busy neighbour more than doubles torch's times, so a phase is
    better started in a quiet moment. Never fails: returns how long it waited, the last reading,
    and whether the machine was quiet when it gave up or went on.
    """
    started = time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(window)
        other = cpu_span(before, cpu_snapshot())["other_cores"]
        waited = time.perf_counter() - started
        if other is None or other < threshold or waited >= max_wait:
            return {"waited_s": waited, "other_cores": other, "quiet": other is None or other < threshold}
        if log is not None:
            log(
                f"other processes keep {other:.2f} cores busy; waiting for a quiet moment "
                f"({waited:.0f}/{max_wait:.0f} s)"
            )


class Phases:
    """Runs named phases of a benchmark, each after waiting (up to ``wait_idle`` s) for a quiet
    machine, recording its wall time and how many cores other processes kept busy meanwhile."""

    def __init__(self, wait_idle: float, threshold: float, log: Callable[[str], None]) -> None:
        self.wait_idle, self.threshold, self.log = wait_idle, threshold, log
        self.record: dict[str, dict] = {}

    def __call__(self, name: str, fn: Callable[[], object]) -> object:
        quiet = wait_for_quiet(self.wait_idle, self.threshold, log=self.log) if self.wait_idle > 0 else None
        self.log(f"{name} ...")
        start = cpu_snapshot()
        result = fn()
        span = cpu_span(start, cpu_snapshot())
        self.record[name] = {"cpu": span, "waited": quiet}
        self.log(f"{name}: {span['wall_s']:.1f} s")
        return result

    def contended(self) -> list[str]:
        """The phases during which others used more than ``threshold`` cores, with the figure."""
        return [
            f"{k} (others used {v['cpu']['other_cores']:.2f} cores)"
            for k, v in self.record.items()
            if (v["cpu"].get("other_cores") or 0) > self.threshold
        ]
