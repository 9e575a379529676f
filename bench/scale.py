"""The scale benchmark: what distributing the pipeline costs.

On the scale set-up of ``tests/scale`` (PostgreSQL, MLflow server, Prefect server, a bare git
repository with a local DVC remote, process workers for the ``cpu`` and ``gpu`` pools, all on
127.0.0.1), it times **``prefect deployment run retrain-at-scale/retrain`` to a registered
model**: from launching the CLI until the MLflow model version tagged with that flow run exists.
The baseline is the same stages run by **``aigc run``** (embedded Prefect server, local MLflow
store) in a fresh copy of the same source, in the same process tree, interleaved.

Both sides share one warm evaluation cache (Inception weights, FID reference statistics), warmed
by an untimed ``aigc run`` first, so the difference is the distribution: worker polling, a flow
run process and a clone per run on each pool, DVC pushes and pulls, git records, HTTP to the
MLflow server. Starting the servers and workers is not timed (reported in the notes).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.report import SCHEMA_VERSION, row
from bench.workspace import (
    BIN,
    copy_project,
    fresh_dir,
    isolate_environment,
    load_average,
    machine_info,
    run_timed,
    snapshot_source,
    use_source,
    utc_now,
)

NAME = "scale"
TITLE = "Scale-out: `prefect deployment run` (cpu + gpu pools, MLflow server, DVC remote) vs. `aigc run`"
COMMAND = "python -m bench scale"
RETRAIN = "retrain-at-scale/retrain"
REPEATS = 2  # interleaved pairs (distributed, direct); medians reported
TARGET_OVERHEAD_S = 60.0
RUN_TIMEOUT_S = 1800.0
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "1"}  # as in tests/scale: a worker picks a run up within 1 s


def _log(msg: str) -> None:
    print(f"[bench scale] {msg}", file=sys.stderr, flush=True)


def _deploy(cluster: Any) -> float:
    admin = cluster.clone("admin")
    started = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "aigc"), "deploy"],
        cwd=admin,
        env=cluster.client_env(cluster.base / "admin-home"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise BenchError(f"aigc deploy failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - started


def _registered(cluster: Any, flow_run_id: str) -> Any | None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cluster.mlflow_url, registry_uri=cluster.mlflow_url)
    found = [v for v in client.search_model_versions() if v.tags.get("prefect.flow_run_id") == flow_run_id]
    return found[0] if found else None


def _flow_runs(cluster: Any, run_id: str) -> dict[str, Any]:
    """The retrain run and its remote train run, from the Prefect API."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: cluster.prefect_api}):
        with get_client(sync_client=True) as client:
            parent = client.read_flow_run(uuid.UUID(run_id))
            trains = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"]))
            )
    children = [r for r in trains if r.parameters.get("lineage_flow_run_id") == run_id]
    return {"parent": parent, "children": children}


def run_distributed(cluster: Any, overrides: tuple[str, ...], label: str) -> dict[str, Any]:
    """``prefect deployment run`` -> registered model version; returns the timings."""
    env = cluster.client_env(cluster.base / "admin-home")
    argv = [str(BIN / "prefect"), "deployment", "run", RETRAIN, "--param", f"overrides={json.dumps(list(overrides))}"]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cluster.base, env=env, capture_output=True, text=True, timeout=300)
    launched = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"prefect deployment run failed:\n{proc.stdout}\n{proc.stderr}")
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    if not match:
        raise BenchError(f"no flow run id in the output of prefect deployment run:\n{proc.stdout}")
    run_id = match.group(1)
    version = None
    while version is None:
        if time.perf_counter() - started > RUN_TIMEOUT_S:
            raise BenchError(f"{label}: no model registered by flow run {run_id} after {RUN_TIMEOUT_S:.0f} s")
        runs = _flow_runs(cluster, run_id)
        state = runs["parent"].state
        version = _registered(cluster, run_id)
        if version is None and state is not None and state.is_final():
            raise BenchError(
                f"{label}: flow run {run_id} ended {state.type.value} without a registered model: "
                f"{state.message}\nlogs: {cluster.logs}"
            )
        time.sleep(0.5)
    to_registered = time.perf_counter() - started
    while not (runs := _flow_runs(cluster, run_id))["parent"].state.is_final():
        time.sleep(0.5)
    to_completed = time.perf_counter() - started
    parent = runs["parent"]
    if not parent.state.is_completed():
        raise BenchError(f"{label}: flow run {run_id} ended {parent.state.type.value}: {parent.state.message}")
    (child,) = runs["children"]
    _log(f"{label}: registered after {to_registered:.1f} s, flow completed after {to_completed:.1f} s")
    return {
        "flow_run_id": run_id,
        "launch_cli_s": launched,
        "to_registered_s": to_registered,
        "to_completed_s": to_completed,
        "cpu_run_pickup_s": (parent.start_time - parent.created).total_seconds(),
        "cpu_run_s": (parent.end_time - parent.start_time).total_seconds(),
        "gpu_run_pickup_s": (child.start_time - child.created).total_seconds(),
        "gpu_run_s": (child.end_time - child.start_time).total_seconds(),
        "fid": _fid(cluster, version),
        "version": str(version.version),
    }


def _fid(cluster: Any, version: Any) -> float:
    from mlflow import MlflowClient

    from aigc_pipeline.evaluation.protocol import metric_key

    metrics = MlflowClient(tracking_uri=cluster.mlflow_url).get_run(version.run_id).data.metrics
    return metrics[metric_key("fid", version.tags["aigc.protocol"])]  # the evaluation's, not fid_std_/fid_progress_


def run_direct(source: Path, work: Path, overrides: tuple[str, ...], label: str) -> dict[str, Any]:
    """``aigc run --set ...`` in a fresh copy (embedded Prefect server, local MLflow store)."""
    project = copy_project(work / label / "project", source)
    sets = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    timed = run_timed([str(BIN / "aigc"), "run", *sets], project, env=env, log=work / "logs" / f"{label}.log")
    match = re.search(r"FID ([\d.]+)", timed.output)
    _log(f"{label}: aigc run {timed.seconds:.1f} s")
    return {"seconds": timed.seconds, "fid": float(match.group(1)) if match else float("nan")}


def measure(ctx: Any) -> dict[str, Any]:
    from bench.pipeline import QUICK_OVERRIDES

    overrides = (QUICK_OVERRIDES if ctx.quick else ()) + tuple(ctx.overrides)
    work = fresh_dir(ctx.work)
    isolated = isolate_environment(work)  # shared, warm evaluation cache for both sides (below)
    source = work / "source"
    revision = snapshot_source(source)
    # Its own git repository, so the cluster publishes exactly the snapshot's files (the snapshot
    # lies inside this checkout, whose git would see them as ignored).
    subprocess.run(["git", "init", "-q"], cwd=source, check=True)
    use_source(source)
    sys.path.insert(0, str(source))  # tests.scale.servers from the snapshot too
    from tests.scale.servers import Cluster

    load_before = load_average()
    began = time.perf_counter()
    warm = run_direct(source, work, overrides, "warm-up")  # untimed: fills AIGC_CACHE_DIR, page cache
    started = time.perf_counter()
    cluster = Cluster.start(
        work / "cluster",
        source,
        worker_env={**WORKER_ENV, "AIGC_CACHE_DIR": isolated["AIGC_CACHE_DIR"], "TORCH_HOME": isolated["TORCH_HOME"]},
    )
    try:
        servers_s = time.perf_counter() - started
        deploy_s = _deploy(cluster)
        cluster.start_worker("cpu", "cpu-1")
        cluster.start_worker("gpu", "gpu-1")
        _log(f"servers up in {servers_s:.0f} s, aigc deploy {deploy_s:.0f} s; logs in {cluster.logs}")
        distributed, direct = [], []
        for i in range(REPEATS):
            # A new training seed per repeat: the same model and evaluation again would be found
            # already registered (registration is idempotent) and make no new version to time.
            seeded = (*overrides, f"train.seed={100 + i}")
            distributed.append(run_distributed(cluster, seeded, f"distributed-{i + 1}"))
            direct.append(run_direct(source, work, seeded, f"direct-{i + 1}"))
    finally:
        cluster.stop()
    load_after = load_average()
    timings = {
        "warm_up": warm,
        "distributed": distributed,
        "direct": direct,
        "servers_start_s": servers_s,
        "deploy_s": deploy_s,
        "bench_wall_s": time.perf_counter() - began,
    }
    profile = "default" if ctx.profile == "default" else ctx.profile
    return {
        "schema_version": SCHEMA_VERSION,
        "name": NAME if profile == "default" else f"{NAME}-{profile}",
        "title": TITLE if profile == "default" else f"{TITLE} ({profile} profile)",
        "command": COMMAND if profile == "default" else f"{COMMAND} --{profile}",
        "date": utc_now(),
        "machine": machine_info(),
        "project": revision,
        "profile": {"name": profile, "overrides": list(overrides)},
        "environment": {"load_average_before": load_before, "load_average_after": load_after},
        "rows": _rows(timings, profile),
        "notes": _notes(timings, load_before, load_after),
        "timings": timings,
    }


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _rows(t: dict[str, Any], profile: str) -> list[dict[str, Any]]:
    dist, direct = t["distributed"], t["direct"]
    base = _median(direct, "seconds")
    reg = _median(dist, "to_registered_s")
    g1 = f"{profile.capitalize()} profile, warm caches, median of {len(dist)} interleaved pairs"
    rows = [
        row(
            g1,
            "`prefect deployment run` → registered model version",
            reg,
            "s",
            baseline=base,
            baseline_label="`aigc run` (same stages, embedded)",
        ),
        row(
            g1,
            "… → flow run completed (artifacts published)",
            _median(dist, "to_completed_s"),
            "s",
            baseline=base,
            baseline_label="`aigc run`",
        ),
        row(
            g1,
            "distribution overhead (registered − `aigc run`)",
            reg - base,
            "s",
            baseline=TARGET_OVERHEAD_S,
            baseline_label="target",
        ),
        row(g1, "`aigc run`, end to end", base, "s"),
    ]
    g2 = "Where the distributed run spends its time (medians, from the Prefect API)"
    rows += [
        row(
            g2,
            "cpu pool: created → flow running (poll, process, clone, imports)",
            _median(dist, "cpu_run_pickup_s"),
            "s",
        ),
        row(g2, "cpu pool: retrain flow run, running", _median(dist, "cpu_run_s"), "s"),
        row(
            g2,
            "gpu pool: created → flow running (poll, process, clone, imports)",
            _median(dist, "gpu_run_pickup_s"),
            "s",
        ),
        row(g2, "gpu pool: train flow run, running (pull, train, push, record)", _median(dist, "gpu_run_s"), "s"),
        row(g2, "`prefect deployment run` CLI itself", _median(dist, "launch_cli_s"), "s"),
    ]
    return rows


def _notes(t: dict[str, Any], before: list[float], after: list[float]) -> list[str]:
    dist, direct = t["distributed"], t["direct"]
    overhead = _median(dist, "to_registered_s") - _median(direct, "seconds")
    fids = sorted({round(r["fid"], 4) for r in dist + direct})
    return [
        f"Overhead {overhead:.1f} s against a target of < {TARGET_OVERHEAD_S:.0f} s: "
        f"{'met' if overhead < TARGET_OVERHEAD_S else 'NOT met'}.",
        f"Not timed: starting PostgreSQL, the MLflow and Prefect servers ({t['servers_start_s']:.0f} s), "
        f"`aigc deploy` ({t['deploy_s']:.0f} s), an untimed warm-up `aigc run` ({t['warm_up']['seconds']:.0f} s, "
        "which fills the evaluation cache both sides then share).",
        "The distributed side runs three flow-run processes per run on one machine (retrain on the cpu worker, "
        "train on the gpu worker), each with its own fresh git clone and imports; on separate machines the "
        "imports overlap with nothing else, here they compete with each other for the same cores.",
        f"Same seeds on both sides: FID {', '.join(str(f) for f in fids)} (one value = identical models).",
        f"Load average (1/5/15 min) before {before}, after {after}; another process sharing the CPUs inflates "
        "every figure.",
    ]


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench scale`` (see :mod:`bench.registry`)."""
    return measure(ctx)
