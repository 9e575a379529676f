"""The pipeline benchmark: stage commands run directly vs. the Prefect flow vs. a no-op ``dvc repro``.

Order of work, each measured run in its own fresh copy of the project (bench/.work/...):

1. ``cold``: every stage command in-process via ``cli.run_command``, with an empty evaluation
   cache (FID reference statistics, converted Inception weights) -- what a first run costs;
2. ``direct``: the same again in a new copy, caches warm -- the baseline for the flow;
3. ``cli``: ``aigc run`` in a subprocess (imports + embedded Prefect server + flow), what a user sees;
4. ``flow``: ``retrain(project_dir)`` in-process, embedded Prefect server start included;
   then, in that copy, ``dvc status`` must be clean and ``dvc repro`` must skip every stage,
   timed against ``dvc status`` and ``dvc version``.

The subprocess run comes before the in-process flow because the flow's embedded server stays
up until this process exits and would otherwise share the CPUs with later measurements.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import COMMAND, BenchError
from bench.report import SCHEMA_VERSION, row
from bench.workspace import (
    BIN,
    Timed,
    copy_project,
    cpu_snapshot,
    cpu_span,
    fresh_dir,
    isolate_environment,
    load_average,
    machine_info,
    run_timed,
    snapshot_source,
    use_source,
    utc_now,
    wait_for_quiet,
)

NAME = "pipeline"
TITLE = "Pipeline: stage commands vs. Prefect flow vs. no-op `dvc repro`"

# The test suite's quick profile: a 200-image slice of digits at 16 px, one short epoch.
QUICK_OVERRIDES = (
    "datasets.digits.limit=200",
    "datasets.digits.size=16",
    "train.epochs=1",
    "train.batch_size=32",
    "train.width=16",
    "train.latent_dim=16",
    "train.sample_grid=16",
    "evaluate.num_samples=24",
    # One epoch at 16 px draws no digits: the smoke test times the plumbing, so the quality bar is off
    # (with it the flow rightly ends with "no champion").
    "register.max_fid_ratio=null",
)

# Imported before any timing so that the first measured stage does not pay for them.
HEAVY_MODULES = (
    "torch",
    "torch_fidelity",
    "mlflow",
    "dvc.repo",
    "aigc_pipeline.commands",
    "aigc_pipeline.stages.ingest",
    "aigc_pipeline.stages.augment",
    "aigc_pipeline.stages.train",
    "aigc_pipeline.stages.evaluate",
    "aigc_pipeline.stages.register",
)


# Exported by mlflow.set_tracking_uri / set_registry_uri in this process; never meant for another copy.
MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


# Average cores used by other processes above which a measurement is flagged in the notes.
CONTENDED_CORES = 0.25


@dataclass(frozen=True)
class Profile:
    """Which params the copies run with: params.yaml as committed plus ``overrides``."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass
class Options:
    """What one invocation measures."""

    profile: Profile
    work: Path  # this benchmark's folder under bench/.work (wiped first)
    dvc_repeats: int = 3
    cli_run: bool = True  # also time `aigc run` in a subprocess
    wait_idle: float = 0.0  # before each phase, wait up to this long for other processes to go quiet
    log: Callable[[str], None] = field(default=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))


def _stage_commands(project: Path) -> dict[str, list[str]]:
    """Each dvc.yaml stage's resolved command, without the leading ``aigc``, in DAG order."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        names = [s.name for s in repo.index.stages]
        commands = {}
        for name in names:
            # An absolute target: DVC resolves a bare stage name against the cwd's dvc.yaml.
            (stage,) = repo.stage.collect(f"{project / 'dvc.yaml'}:{name}")
            argv = shlex.split(stage.cmd)
            if not argv or argv[0] != "aigc":
                raise BenchError(f"{project}/dvc.yaml: stage {name!r} runs {stage.cmd!r}, not an `aigc` command")
            commands[name] = argv[1:]
    if not commands:
        raise BenchError(f"{project}/dvc.yaml declares no stages")
    return commands


def _arg(project: Path, argv: list[str], flag: str) -> Path:
    value = Path(argv[argv.index(flag) + 1])
    return value if value.is_absolute() else project / value


def _check_outputs(project: Path, commands: dict[str, list[str]]) -> float:
    """Check the run registered into its own copy's MLflow store; return the FID it scored.

    The FID is a sanity figure: with the same seeds every run should give (nearly) the same value.
    """
    receipt = json.loads(_arg(project, commands["register"], "--receipt").read_text())
    if str(project.resolve()) not in receipt["tracking_uri"]:
        raise BenchError(f"{project} registered into another store: {receipt['tracking_uri']}")
    from aigc_pipeline.evaluation.results import read_evaluation

    return float(read_evaluation(_arg(project, commands["evaluate"], "--out")).metrics["fid"])


@contextlib.contextmanager
def in_project(project: Path) -> Iterator[None]:
    """Work in ``project`` as a user would after ``cd project``, with no MLflow store from an earlier copy.

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI`` (and the registry URI) to the
    environment, and the project's store lookup honours that variable, so without this a second
    in-process run would register into the first copy's store. The cwd matters because DVC
    resolves stage names against the cwd's dvc.yaml (see ``aigc_pipeline.pipeline.run_stage``).
    """
    for var in MLFLOW_URI_VARS:
        os.environ.pop(var, None)
    previous = Path.cwd()
    os.chdir(project)
    try:
        yield
    finally:
        os.chdir(previous)
        for var in MLFLOW_URI_VARS:
            os.environ.pop(var, None)


def run_direct(project: Path, opts: Options, label: str) -> dict[str, Any]:
    """Time each stage command in-process through ``cli.run_command``, as dvc.yaml gives it."""
    from aigc_pipeline import cli

    commands = _stage_commands(project)
    stages: dict[str, float] = {}
    cpu: dict[str, dict] = {}
    with in_project(project):
        for name, argv in commands.items():
            opts.log(f"{label}: {name}: aigc {' '.join(argv)}")
            before = cpu_snapshot()
            cli.run_command(["--project", str(project), *argv])
            cpu[name] = cpu_span(before, cpu_snapshot())
            stages[name] = cpu[name]["wall_s"]
            opts.log(f"{label}: {name}: {stages[name]:.2f} s{_contention(cpu[name])}")
    return {
        "project": str(project),
        "stages": stages,
        "total": sum(stages.values()),
        "fid": _check_outputs(project, commands),
        "cpu": cpu,
    }


def _contention(span: dict) -> str:
    if span.get("other_cores") is None:
        return ""
    sub = max(0.0, span["own_cpu_s"] - span["process_cpu_s"])  # rounding can dip below zero
    return (
        f" (CPU-s: this process {span['process_cpu_s']:.1f}, its subprocesses {sub:.1f}; "
        f"other processes kept {span['other_cores']:.2f} cores busy)"
    )


@contextlib.contextmanager
def _patched(obj: Any, attr: str, wrapper_factory: Callable[[Callable], Callable]) -> Iterator[None]:
    original = getattr(obj, attr)
    setattr(obj, attr, wrapper_factory(original))
    try:
        yield
    finally:
        setattr(obj, attr, original)


def run_flow(project: Path, opts: Options) -> dict[str, Any]:
    """Time ``retrain(project_dir)`` in-process, embedded Prefect server start included.

    ``run_stage`` (as the flow module sees it) and ``pipeline._call`` (the stage function's call) are
    wrapped with timers so the flow's extra time can be split into: server start until the first stage, DVC's own work
    per stage (status check + ``dvc commit``), and Prefect's orchestration between stages.
    """
    if "prefect" in sys.modules:
        # Prefect reads PREFECT_HOME once, at import: a late import would use another copy's database.
        raise BenchError("prefect was imported before the flow benchmark set PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(project / ".prefect")
    started = time.perf_counter()
    retrain_module = importlib.import_module("flows.retrain")
    import_seconds = time.perf_counter() - started
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).resolve()
    if home != (project / ".prefect").resolve():
        raise BenchError(f"Prefect uses PREFECT_HOME={home}, expected {project / '.prefect'}")

    from aigc_pipeline import pipeline

    commands = _stage_commands(project)
    spans: list[dict[str, Any]] = []  # one per run_stage call, in call order
    current: dict[str, Any] = {}

    def time_run_stage(run_stage: Callable) -> Callable:
        def wrapper(project_dir: Any, name: str, **kwargs: Any) -> Any:
            before = cpu_snapshot()
            span = {"stage": name, "start": before.wall, "before": before, "command_seconds": 0.0}
            current["span"] = span
            try:
                outcome = run_stage(project_dir, name, **kwargs)
            finally:
                current.pop("span", None)
            span["cpu"] = cpu_span(before, cpu_snapshot())
            span["end"] = span["start"] + span["cpu"]["wall_s"]
            span["ran"] = bool(outcome.ran)
            spans.append(span)
            return outcome

        return wrapper

    def time_run_command(run_command: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return run_command(*args, **kwargs)
            finally:
                if "span" in current:
                    current["span"]["command_seconds"] += time.perf_counter() - t0

        return wrapper

    opts.log(f"flow: retrain(project_dir={project}) with the embedded Prefect server")
    with (
        in_project(project),
        _patched(retrain_module, "run_stage", time_run_stage),
        _patched(pipeline, "_call", time_run_command),
    ):
        call = cpu_snapshot()
        summary = retrain_module.retrain(project_dir=str(project))
        flow_cpu = cpu_span(call, cpu_snapshot())
    started, total = call.wall, flow_cpu["wall_s"]
    opts.log(f"flow: {total:.2f} s; {summary['line']}")

    names = list(commands)
    if [s["stage"] for s in spans] != names:
        raise BenchError(
            f"flow ran stages {[s['stage'] for s in spans]}, expected {names} "
            "(did flows/retrain.py stop calling run_stage?)"
        )
    if not all(s["ran"] for s in spans):
        skipped = [s["stage"] for s in spans if not s["ran"]]
        raise BenchError(f"flow skipped {skipped} in a fresh copy; its time is not comparable to the direct run")
    startup_cpu = cpu_span(call, spans[0]["before"])
    for span in spans:
        del span["before"]  # a snapshot object, not part of the record
    stages = {s["stage"]: s["end"] - s["start"] for s in spans}
    command_seconds = {s["stage"]: s["command_seconds"] for s in spans}
    return {
        "project": str(project),
        "import_seconds": import_seconds,
        "total": total,
        "startup": spans[0]["start"] - started,  # server start + flow/task run creation
        "stages": stages,  # run_stage: DVC status + the command + dvc commit
        "stage_commands": command_seconds,
        "dvc_bookkeeping": sum(stages.values()) - sum(command_seconds.values()),
        "orchestration": total - (spans[0]["start"] - started) - sum(stages.values()),
        "fid": _check_outputs(project, commands),
        "summary_line": summary["line"],
        "cpu": {s["stage"]: s["cpu"] for s in spans},
        "startup_cpu": startup_cpu,
        "flow_cpu": flow_cpu,
    }


def _subprocess_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_URI_VARS}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PREFECT_HOME": str(project / ".prefect")}


def run_cli(project: Path, opts: Options) -> dict[str, Any]:
    """Time ``aigc run`` in a subprocess: interpreter, imports, embedded server and the flow."""
    opts.log(f"cli: aigc run in {project}")
    timed = run_timed(
        [str(BIN / "aigc"), "run"], project, env=_subprocess_env(project), log=opts.work / "logs" / "aigc-run.log"
    )
    opts.log(f"cli: {timed.seconds:.2f} s")
    commands = _stage_commands(project)
    _assert_dvc_clean(project, opts, "after `aigc run`")
    return {
        "project": str(project),
        "total": timed.seconds,
        "fid": _check_outputs(project, commands),
        "last_line": timed.output.strip().splitlines()[-1] if timed.output.strip() else "",
    }


def _dvc(project: Path, opts: Options, *args: str, log_name: str) -> Timed:
    return run_timed(
        [str(BIN / "dvc"), *args],
        project,
        env=_subprocess_env(project),
        log=opts.work / "logs" / f"{log_name}.log",
        timeout=300,
    )


def _assert_dvc_clean(project: Path, opts: Options, when: str) -> None:
    """Fail the benchmark unless ``dvc status`` reports every stage and output up to date."""
    out = _dvc(project, opts, "status", "--json", log_name="dvc-status-json").output.strip()
    try:
        status = json.loads(out.splitlines()[-1]) if out else None
    except json.JSONDecodeError as e:
        raise BenchError(f"`dvc status --json` {when} printed no JSON:\n{out}") from e
    if status != {}:
        raise BenchError(f"`dvc status` {when} is not clean in {project}:\n{json.dumps(status, indent=2)}")


def run_dvc(project: Path, opts: Options) -> dict[str, Any]:
    """In the flow's copy: assert a clean ``dvc status``, then time no-op ``dvc repro`` against
    ``dvc status`` and ``dvc version`` (interleaved, so drifting load hits all three alike)."""
    _assert_dvc_clean(project, opts, "after the flow")
    stages = list(_stage_commands(project))
    samples: dict[str, list[float]] = {"repro": [], "status": [], "version": []}
    for i in range(opts.dvc_repeats):
        samples["version"].append(_dvc(project, opts, "version", log_name=f"dvc-version-{i}").seconds)
        status = _dvc(project, opts, "status", log_name=f"dvc-status-{i}")
        if "up to date" not in status.output:
            raise BenchError(f"`dvc status` after the flow does not say up to date:\n{status.output}")
        samples["status"].append(status.seconds)
        repro = _dvc(project, opts, "repro", log_name=f"dvc-repro-{i}")
        unchanged = [s for s in stages if f"'{s}' didn't change" in repro.output]
        if unchanged != stages:
            missing = sorted(set(stages) - set(unchanged))
            raise BenchError(f"`dvc repro` after the flow did not skip {missing}:\n{repro.output}")
        samples["repro"].append(repro.seconds)
        opts.log(
            f"dvc #{i + 1}: repro {repro.seconds:.2f} s, status {status.seconds:.2f} s, "
            f"version {samples['version'][-1]:.2f} s"
        )
    _assert_dvc_clean(project, opts, "after the no-op `dvc repro` runs")
    return {
        "project": str(project),
        "samples": samples,
        "median": {k: statistics.median(v) for k, v in samples.items()},
    }


def _import_heavy_modules() -> float:
    started = time.perf_counter()
    for module in HEAVY_MODULES:
        importlib.import_module(module)
    return time.perf_counter() - started


def _params(project: Path) -> dict[str, Any]:
    from aigc_pipeline.config import read_params

    return read_params(project / "params.yaml")


def measure(opts: Options) -> dict[str, Any]:
    """Run every measurement and return the result document (nothing is written here)."""
    work = fresh_dir(opts.work)
    isolated = isolate_environment(work)
    source = work / "source"
    revision = snapshot_source(source)
    use_source(source)
    opts.log(
        f"source snapshot of {revision['git_commit'][:12]}"
        f"{' + uncommitted changes' if revision['dirty'] else ''} in {source}"
    )
    load_before = load_average()
    began = time.perf_counter()
    imports = _import_heavy_modules()
    opts.log(f"imports (torch, torch-fidelity, mlflow, dvc, stages): {imports:.2f} s; load {load_before}")

    overrides = opts.profile.overrides
    phases: dict[str, dict] = {}  # CPU use per phase: was anything else competing for the 2 cores?
    waits: dict[str, dict] = {}

    def phase(label: str, fn: Callable[..., Any], *args: Any) -> Any:
        if opts.wait_idle > 0:
            waits[label] = wait_for_quiet(opts.wait_idle, CONTENDED_CORES, log=opts.log)
        before = cpu_snapshot()
        result = fn(*args)
        phases[label] = cpu_span(before, cpu_snapshot())
        opts.log(f"phase {label}: {phases[label]['wall_s']:.1f} s{_contention(phases[label])}")
        return result

    def copy(label: str) -> Path:
        return copy_project(work / label / "project", source, overrides)

    cold = phase("cold", run_direct, copy("cold"), opts, "cold")
    direct = phase("direct", run_direct, copy("direct"), opts, "direct")
    cli_run = None
    if opts.cli_run:
        cli_run = phase("cli", run_cli, copy("cli"), opts)
    flow_project = copy("flow")
    flow = phase("flow", run_flow, flow_project, opts)
    dvc = phase("dvc", run_dvc, flow_project, opts)
    load_after = load_average()
    opts.log(f"done in {time.perf_counter() - began:.0f} s; load {load_after}")

    timings = {
        "imports_in_process": imports,
        "cold": cold,
        "direct": direct,
        "flow": flow,
        "cli": cli_run,
        "dvc": dvc,
        "phases_cpu": phases,
        "waits_for_quiet": waits,
        "bench_wall_seconds": time.perf_counter() - began,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "name": NAME if opts.profile.name == "default" else f"{NAME}-{opts.profile.name}",
        "title": TITLE if opts.profile.name == "default" else f"{TITLE} ({opts.profile.name} profile)",
        "command": COMMAND if opts.profile.name == "default" else f"python -m bench --{opts.profile.name}",
        "date": utc_now(),
        "machine": machine_info(),
        "project": revision,
        "profile": {"name": opts.profile.name, "overrides": list(overrides), "params": _params(flow_project)},
        "environment": {
            "set": {k: v for k, v in isolated.items() if not k.startswith("GIT_")},
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "rows": _rows(timings),
        "notes": _notes(timings, load_before, load_after),
        "timings": timings,
    }


def _rows(t: dict[str, Any]) -> list[dict[str, Any]]:
    cold, direct, flow, dvc, cli_run = t["cold"], t["direct"], t["flow"], t["dvc"], t["cli"]
    g1 = "Stage commands, in-process (`cli.run_command`, arguments from dvc.yaml)"
    rows = [row(g1, f"{name}, warm cache", secs, "s") for name, secs in direct["stages"].items()]
    rows.append(row(g1, "total, warm cache", direct["total"], "s"))
    rows.append(
        row(
            g1,
            "evaluate, cold cache (first run)",
            cold["stages"]["evaluate"],
            "s",
            baseline=direct["stages"]["evaluate"],
            baseline_label="evaluate, warm",
        )
    )
    rows.append(
        row(
            g1,
            "total, cold cache (first run)",
            cold["total"],
            "s",
            baseline=direct["total"],
            baseline_label="total, warm",
        )
    )

    g2 = "Prefect flow `retrain(project_dir)`, in-process, embedded server (warm cache)"
    overhead = flow["total"] - direct["total"]
    rows.append(
        row(
            g2,
            "flow total (server start included)",
            flow["total"],
            "s",
            baseline=direct["total"],
            baseline_label="stage commands, warm",
        )
    )
    rows.append(row(g2, "Prefect flow overhead (flow − direct)", overhead, "s"))
    rows.append(row(g2, "… start: flow call → first stage (server start, runs created)", flow["startup"], "s"))
    rows.append(row(g2, "… DVC per stage: status check + `dvc commit` (Σ)", flow["dvc_bookkeeping"], "s"))
    rows.append(row(g2, "… Prefect between/after stages (task runs, teardown)", flow["orchestration"], "s"))
    rows.append(
        row(
            g2,
            "… stage commands inside the flow − the same commands direct",
            sum(flow["stage_commands"].values()) - direct["total"],
            "s",
        )
    )
    for name, secs in flow["stages"].items():
        rows.append(
            row(
                g2,
                f"task `{name}` (DVC check + command + commit)",
                secs,
                "s",
                baseline=direct["stages"][name],
                baseline_label="direct",
            )
        )
    if cli_run is not None:
        rows.append(
            row(
                g2,
                "`aigc run` subprocess, end to end (imports included)",
                cli_run["total"],
                "s",
                baseline=direct["total"],
                baseline_label="stage commands, warm",
            )
        )

    g3 = "No-op `dvc repro` after the flow (median of repeats, subprocess)"
    m = dvc["median"]
    rows.append(
        row(
            g3,
            "`dvc repro` (every stage unchanged)",
            m["repro"],
            "s",
            baseline=m["status"],
            baseline_label="`dvc status`",
        )
    )
    rows.append(
        row(g3, "`dvc repro` vs. DVC start-up", m["repro"], "s", baseline=m["version"], baseline_label="`dvc version`")
    )
    rows.append(row(g3, "`dvc status`", m["status"], "s", baseline=m["version"], baseline_label="`dvc version`"))
    return rows


def _server_note(flow: dict[str, Any]) -> str:
    start, whole = flow["startup_cpu"], flow["flow_cpu"]
    server_start = start["own_cpu_s"] - start["process_cpu_s"]
    server_all = whole["own_cpu_s"] - whole["process_cpu_s"]
    return (
        f"CPU during the flow: before the first stage ({start['wall_s']:.1f} s wall) Prefect's server "
        f"subprocess used {server_start:.1f} CPU-s and this process {start['process_cpu_s']:.1f} CPU-s; over "
        f"the whole flow the server used {server_all:.1f} CPU-s of {whole['own_cpu_s']:.1f} CPU-s in all."
    )


def _notes(t: dict[str, Any], load_before: list[float], load_after: list[float]) -> list[str]:
    cold, direct, flow, dvc, cli_run = t["cold"], t["direct"], t["flow"], t["dvc"], t["cli"]
    notes = [
        "Single runs (no repeats) for the stage, flow and `aigc run` timings; expect a few seconds of "
        "run-to-run noise on this machine.",
        "The project's files (tracked + untracked-not-ignored) are snapshotted once at the start; the code "
        "runs from that snapshot (in-process and, via PYTHONPATH, in subprocesses), so edits made while "
        "the benchmark runs do not leak in. Each measured run uses a fresh copy of the snapshot "
        "(committed to a new git repo) under bench/.work/, with AIGC_CACHE_DIR and TORCH_HOME inside "
        "bench/.work/, emptied at the start: the cold run pays for the Inception weight conversion and "
        "the FID reference statistics (and for first-use imports inside the stages, e.g. scikit-learn's "
        "dataset loader and MLflow's model logging, as a user's first run does); later runs find them cached.",
        f"Imports (torch, torch-fidelity, mlflow, dvc, the stages) were done before timing, "
        f"{t['imports_in_process']:.1f} s; importing `flows.retrain` (Prefect) took "
        f"{flow['import_seconds']:.1f} s, also outside the flow total. The `aigc run` row includes all imports.",
        "The flow breakdown comes from timers wrapped around `run_stage` and the stage function's call "
        "(`pipeline._call`) during the flow run; the parts add up to the overhead. The last part is the "
        "same commands' time inside the flow minus the direct run: run-to-run noise plus any slowdown "
        "from sharing the CPUs with Prefect's server.",
        _server_note(flow),
        f"FID check (same seeds): cold {cold['fid']:.3f}, direct {direct['fid']:.3f}, flow {flow['fid']:.3f}"
        + (f", `aigc run` {cli_run['fid']:.3f}" if cli_run else "")
        + ".",
        f"`dvc status --json` was asserted `{{}}` after the flow and after the no-op repros; every "
        f"`dvc repro` said each stage didn't change ({len(dvc['samples']['repro'])} repeats, interleaved with "
        f"`dvc status` and `dvc version`).",
        f"Load average (1/5/15 min) before {load_before}, after {load_after} on "
        f"{os.cpu_count()} CPUs; another process sharing the CPUs inflates every figure.",
    ]
    busy = [
        f"{label} {span['other_cores']:.2f}"
        for label, span in t["phases_cpu"].items()
        if span.get("other_cores") is not None
    ]
    if busy:
        notes.append(
            "CPU used by other processes (not this benchmark or its subprocesses, from /proc/stat), "
            "average cores busy per phase: " + ", ".join(busy) + f" (of {os.cpu_count()})."
        )
    contended = [
        f"{run} {stage} ({span['other_cores']:.2f} cores)"
        for run in ("cold", "direct", "flow")
        for stage, span in t[run]["cpu"].items()
        if span.get("other_cores") is not None and span["other_cores"] >= CONTENDED_CORES and span["wall_s"] >= 1.0
    ]
    if contended:
        notes.append(
            f"Other processes kept >= {CONTENDED_CORES} cores busy during: "
            + ", ".join(contended)
            + "; those figures are inflated (torch's threads slow down sharply when a core is taken)."
        )
    if cli_run is None:
        notes.append("`aigc run` in a subprocess was not measured (--no-cli-run).")
    if t["waits_for_quiet"]:
        waited = ", ".join(
            f"{label} {w['waited_s']:.0f} s{'' if w['quiet'] else ' (gave up: still busy)'}"
            for label, w in t["waits_for_quiet"].items()
        )
        notes.append(
            f"Before each phase the benchmark waited for other processes to use < {CONTENDED_CORES} cores: {waited}."
        )
    return notes


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench pipeline`` (see :mod:`bench.registry`)."""
    overrides = (QUICK_OVERRIDES if ctx.quick else ()) + tuple(ctx.overrides)
    opts = Options(
        profile=Profile(ctx.profile, overrides),
        work=ctx.work,
        dvc_repeats=ctx.dvc_repeats,
        cli_run=ctx.cli_run,
        wait_idle=ctx.wait_idle,
    )
    return measure(opts)
