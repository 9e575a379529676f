"""Scheduled retraining at scale, end to end on real servers bound to 127.0.0.1.

PostgreSQL (Debian's package; installed when missing), ``mlflow server`` on it with proxied
artifacts, ``prefect server`` (on the same PostgreSQL), a bare git repository holding the
project with a local folder as its DVC remote, and two Prefect process workers (pools ``cpu``
and ``gpu``) started in clones of their own, every flow run cloning afresh. ``aigc deploy``
creates the pools and deployments. The test then:

- starts two ``retrain`` runs at once, one of them with a training that diverges, and a dataset
  event while they run; checks they ran one after the other, the event's run was queued behind
  them with the event's parameters, the registered model's lineage tags, the Prefect artifacts,
  that training ran on the gpu pool, and that the diverging run failed with its cause, without a
  retry, leaving the champion and the registry untouched;
- kills the ``gpu`` worker (and the flow run it executes) once training has mirrored a
  checkpoint, starts a fresh one, and checks the retry resumed from that checkpoint;
- clones the repository at the registered model's ``git.commit``, ``dvc pull``s, checks DVC holds
  it as up to date and that ``dvc repro --force train`` rebuilds the same generator weights;
- makes training fail by itself and checks the flow fails with the cause, without a retry,
  with the champion and the registry untouched.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aigc_pipeline.training.checkpoint import CHECKPOINT_GLOB
from tests.conftest import MODEL_DIR, QUICK, REGISTERED, REPO
from tests.scale import servers
from tests.scale.servers import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.scale]

MODEL = REGISTERED
RETRAIN = "retrain-at-scale/retrain"
TRAIN = "remote-stage/train"
# Training long enough to be killed in the middle (120 steps), with a checkpoint every 4 steps.
KILL_RUN = ["train.epochs=12", "train.checkpoint_every=4"]
DIVERGING = ["train.lr=1e30"]  # non-finite losses at the first step: the train stage fails by itself
RUN_TIMEOUT = 900.0
WORKER_ENV = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick up flow runs within a second (default 10)
    "AIGC_RETRY_BACKOFF_SECONDS": "1",
}


@contextlib.contextmanager
def prefect_client(api: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            yield client


def mlflow_client(cluster: Cluster):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cluster.mlflow_url, registry_uri=cluster.mlflow_url)


def logs(cluster: Cluster, lines: int = 60) -> str:
    """Tails of every log, for assertion messages."""
    out = []
    for log in sorted(cluster.logs.glob("*.log")):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        out.append(f"----- {log.name}\n{tail}")
    return "\n".join(out)


def start_run(cluster: Cluster, *overrides: str) -> str:
    """Create a ``retrain`` flow run (as ``prefect deployment run`` does) and return its id."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: cluster.prefect_api}):
        run = run_deployment(RETRAIN, parameters={"overrides": [*QUICK, *overrides]}, timeout=0, as_subflow=False)
    return str(run.id)


def wait_final(cluster: Cluster, run_id: str, timeout: float = RUN_TIMEOUT) -> Any:
    """Wait for flow run ``run_id`` to reach a final state; returns the flow run."""
    deadline = time.monotonic() + timeout
    with prefect_client(cluster.prefect_api) as client:
        while True:
            run = client.read_flow_run(uuid.UUID(run_id))
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {run_id} still {run.state_name} after {timeout:.0f} s\n{logs(cluster)}")
            time.sleep(2)


def children(cluster: Cluster, parent_id: str) -> list[Any]:
    """Flow runs of the ``train`` deployment started by ``parent_id``, oldest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client(cluster.prefect_api) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"])))
    mine = [r for r in runs if r.parameters.get("lineage_flow_run_id") == parent_id]
    return sorted(mine, key=lambda r: r.created)


def artifacts(cluster: Cluster, run_id: str) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_client(cluster.prefect_api) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(run_id)]))
        )
    return {a.key: a for a in found}


def versions_of(cluster: Cluster, run_id: str) -> list[Any]:
    return [
        v
        for v in mlflow_client(cluster).search_model_versions(f"name='{MODEL}'")
        if v.tags.get("prefect.flow_run_id") == run_id
    ]


def dvc(cwd: Path, env: dict[str, str], *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [str(servers.BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = time.monotonic()
    base = tmp_path_factory.mktemp("scale")
    c = Cluster.start(base, REPO, worker_env=WORKER_ENV)
    try:
        admin = c.clone("admin")
        # The default window (three 30 s heartbeats): with 60 s, a parent run on a loaded 2-core CI
        # host once went that long without one and was marked Crashed beside its killed child.
        proc = subprocess.run(
            [str(servers.BIN / "aigc"), "deploy", "--crash-after", "90"],
            cwd=admin,
            env=c.client_env(base / "admin-home"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"aigc deploy failed:\n{proc.stdout}\n{proc.stderr}\n{logs(c)}"
        c.deploy_output = proc.stdout  # type: ignore[attr-defined]
        # The cpu worker keeps its evaluation cache (Inception weights, FID reference statistics:
        # content-keyed, machine-local in production too) in this session's, warm when the flow
        # tests ran first; the gpu worker, which never evaluates, has its own.
        c.start_worker("cpu", "cpu-1", AIGC_CACHE_DIR=os.environ["AIGC_CACHE_DIR"])
        c.start_worker("gpu", "gpu-1")
        print(f"scale cluster up in {time.monotonic() - started:.0f} s: {c.prefect_api}, {c.mlflow_url}")
        yield c
    finally:
        c.stop()
        print(f"scale cluster down after {time.monotonic() - started:.0f} s; logs in {c.logs}")


@pytest.fixture(scope="module")
def two_runs(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two retrain runs started at once (the second one's training diverges), plus a dataset
    event emitted while they run. The registry is snapshotted when the first one ends."""
    good, bad = start_run(cluster), start_run(cluster, *DIVERGING)
    # The data team registers a dataset: `aigc dataset add` with a Prefect API emits the event.
    images = tmp_path_factory.mktemp("tiny-dataset")
    from PIL import Image
    from sklearn.datasets import load_digits

    for i, img in enumerate(load_digits().images[:40]):
        Image.fromarray((img * 15).astype("uint8")).save(images / f"{i:03d}.png")
    team = cluster.clone("data-team")
    added = subprocess.run(
        [str(servers.BIN / "aigc"), "dataset", "add", "tiny", str(images), "--size", "16"],
        cwd=team,
        env=cluster.client_env(tmp_path_factory.mktemp("team-home")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    triggered = _wait_triggered(cluster, {good, bad})
    # Whichever got the slot first, the registry as it was when the other one started.
    first_done = None
    while first_done is None:
        for rid in (good, bad):
            if wait_done(cluster, rid):
                first_done = rid
                break
        else:
            time.sleep(1)
    registry_between = _registry(cluster)
    finals = {rid: wait_final(cluster, rid) for rid in (good, bad)}
    return {
        "good": good,
        "bad": bad,
        "runs": finals,
        "triggered": triggered,
        "event_output": added.stdout,
        "first_done": first_done,
        "registry_between": registry_between,
    }


def _registry(cluster: Cluster) -> dict[str, Any]:
    """The registered model's versions and aliases now (empty when it does not exist yet)."""
    from aigc_pipeline.tracking.undo import snapshot

    client = mlflow_client(cluster)
    snap = snapshot(client, MODEL)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) if snap.exists else []
    return {"aliases": snap.aliases, "versions": versions}


def _wait_triggered(cluster: Cluster, known: set[str], timeout: float = 60) -> dict[str, Any]:
    """The retrain run the dataset event created; cancelled before it runs (its dataset is tiny)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.states import Cancelled

    deadline = time.monotonic() + timeout
    with prefect_client(cluster.prefect_api) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"]))
            )
            new = [r for r in runs if str(r.id) not in known and not r.auto_scheduled]
            if new:
                (run,) = new
                state_before = run.state_name
                client.set_flow_run_state(
                    run.id, Cancelled(message="scale test: only the trigger is under test"), force=True
                )
                return {"id": str(run.id), "parameters": run.parameters, "state_before_cancel": state_before}
            time.sleep(1)
    pytest.fail(f"no retrain run was triggered by the dataset event within {timeout:.0f} s\n{logs(cluster)}")


def test_deploy_creates_pools_schedule_limit_and_trigger(cluster: Cluster) -> None:
    with prefect_client(cluster.prefect_api) as client:
        retrain = client.read_deployment_by_name(RETRAIN)
        train = client.read_deployment_by_name(TRAIN)
        pools = {p.name: p.type for p in client.read_work_pools()}
        automations = {a.name: a for a in client.read_automations()}
    assert pools == {"cpu": "process", "gpu": "process"}
    assert (retrain.work_pool_name, train.work_pool_name) == ("cpu", "gpu")
    assert [s.schedule.cron for s in retrain.schedules] == ["0 3 * * 1"]
    assert retrain.global_concurrency_limit is not None and retrain.global_concurrency_limit.limit == 1
    assert retrain.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert any("aigc.dataset.updated" in str(a.trigger) for a in automations.values()), automations
    assert "aigc: crash flow runs whose heartbeats stopped" in automations
    assert "deployed remote-stage/train, retrain-at-scale/retrain" in cluster.deploy_output  # type: ignore[attr-defined]


def test_two_runs_at_once_run_one_after_the_other(cluster: Cluster, two_runs: dict[str, Any]) -> None:
    runs = two_runs["runs"]
    good, bad = runs[two_runs["good"]], runs[two_runs["bad"]]
    assert good.state.is_completed(), f"{good.state}\n{logs(cluster)}"
    assert bad.state.is_failed(), f"{bad.state}\n{logs(cluster)}"
    a, b = sorted(runs.values(), key=lambda r: r.start_time)
    assert a.end_time <= b.start_time, f"runs overlapped: {a.start_time}-{a.end_time} and {b.start_time}-{b.end_time}"
    with prefect_client(cluster.prefect_api) as client:
        names = [s.name for s in client.read_flow_run_states(b.id)]
    assert "AwaitingConcurrencySlot" in names, names
    # Training ran on the gpu pool, everything else on the cpu pool.
    assert good.work_pool_name == bad.work_pool_name == "cpu"
    for run in (good, bad):
        assert [c.work_pool_name for c in children(cluster, str(run.id))] == ["gpu"]


def test_a_training_that_fails_fails_the_flow_cleanly(cluster: Cluster, two_runs: dict[str, Any]) -> None:
    bad_id = two_runs["bad"]
    bad = two_runs["runs"][bad_id]
    message = bad.state.message or ""
    assert "RemoteStageFailed" in message and "'train'" in message and "diverged" in message, message
    (child,) = children(cluster, bad_id)  # failed by itself: never retried
    assert child.state.is_failed()
    # Nothing registered, nothing left half-registered, the champion untouched.
    assert versions_of(cluster, bad_id) == []
    from aigc_pipeline.tracking.undo import flow_run_mlflow_runs

    # Its only MLflow run is the diverged training's, marked FAILED (the trainer's record of it).
    client = mlflow_client(cluster)
    runs = [client.get_run(r) for r in flow_run_mlflow_runs(client, "aigc-pipeline", bad_id)]
    assert [(r.info.status, r.data.tags.get("aigc.stage")) for r in runs] == [("FAILED", "train")]
    assert "diverged" in runs[0].data.tags["aigc.error"]
    if two_runs["first_done"] == two_runs["good"]:  # the failing run started after the good one
        assert _registry(cluster) == two_runs["registry_between"]
    else:  # it ran first: the registry was still empty when the good run started
        assert two_runs["registry_between"] == {"aliases": {}, "versions": []}


def test_dataset_event_triggers_a_retrain_with_its_dataset(two_runs: dict[str, Any]) -> None:
    assert "Prefect event aigc.dataset.updated emitted for aigc.dataset.tiny" in two_runs["event_output"]
    triggered = two_runs["triggered"]
    assert triggered["parameters"]["dataset"] == "tiny"
    (override,) = triggered["parameters"]["overrides"]
    assert override.startswith("datasets.tiny=") and '"source": "image-folder"' in override
    # Queued behind the two runs by the deployment's concurrency limit (ENQUEUE).
    assert triggered["state_before_cancel"] in ("AwaitingConcurrencySlot", "Scheduled", "Pending")


def test_registered_model_carries_lineage_and_artifacts(cluster: Cluster, two_runs: dict[str, Any]) -> None:
    first = two_runs["runs"][two_runs["good"]]
    client = mlflow_client(cluster)
    (v1,) = versions_of(cluster, str(first.id))
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1.version
    run = client.get_run(v1.run_id)
    for tags in (v1.tags, run.data.tags):
        assert tags["prefect.flow_run_id"] == str(first.id)
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"]) and tags["git.dirty"] == "false"
        assert tags["aigc.run_ref"] == f"refs/aigc/runs/{first.id}"
        assert re.fullmatch(r"[0-9a-f]{32}\.dir", tags["dvc.lock.train"])
        assert re.fullmatch(r"[0-9a-f]{64}", tags["aigc.data_digest"])
        assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{first.id}")
    # The tagged commit is on the run's ref in the shared repository.
    refs = servers.git(cluster.base, "ls-remote", cluster.repo_url, f"refs/aigc/runs/{first.id}")
    assert refs, f"no ref refs/aigc/runs/{first.id} in {cluster.repo_url}"
    found = artifacts(cluster, str(first.id))
    summary = found[f"{MODEL}-summary"].data
    assert "**decision**: champion" in summary and "_n24_eval-" in summary
    assert f"content digest `{v1.tags['aigc.data_digest']}`" in summary
    assert f"/runs/{v1.run_id}" in found[f"{MODEL}-mlflow-run"].data
    # The sample grid is inline: it renders with no MLflow server reachable from the browser.
    (grid,) = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", found[f"{MODEL}-samples"].data)
    assert base64.b64decode(grid)[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["metric"] for r in json.loads(found[f"{MODEL}-metrics"].data)}
    # The copying rows too (C_T when a k-means cell holds 20 samples: here, with 24, one cell does).
    assert {"FID", "KID", "precision", "recall", "copying share", "exact copies"} <= rows
    assert rows <= {"FID", "KID", "precision", "recall", "copying share", "copying C_T", "exact copies"}


def test_flow_runs_say_what_they_train(cluster: Cluster, two_runs: dict[str, Any]) -> None:
    """Names, tags and parameters of both flows; the remote training's lines in its run's log and
    its progress artifact; stable task run names."""
    first = two_runs["runs"][two_runs["good"]]
    (child,) = children(cluster, str(first.id))
    assert re.fullmatch(r"digits-resgan-\d{8}-\d{6}", first.name), first.name
    assert re.fullmatch(r"digits-resgan-train-\d{8}-\d{6}", child.name), child.name
    for run in (first, child):
        assert {"dataset:digits", "model:resgan"} <= set(run.tags), run.tags
    assert first.parameters["overrides"] == QUICK
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    with prefect_client(cluster.prefect_api) as client:
        tasks = {
            t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])))
        }
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[child.id])))
    assert {
        "prepare-clone",
        "ingest@digits",
        "evaluate",
        "register",
        "publish-artifacts",
        "require-champion",
        "train on remote-stage/train",
    } <= tasks, tasks
    assert not [t for t in tasks if re.search(r"-[0-9a-f]{3}$", t)], tasks  # no random suffixes
    assert any(
        log.name == "aigc.stage.train" and log.message.startswith("train epoch 1/1  step 10/10") for log in logs
    ), [log.message for log in logs][-20:]
    progress = artifacts(cluster, str(child.id))[f"{MODEL}-training"]
    assert progress.type == "progress" and float(progress.data) == 100.0


@pytest.fixture(scope="module")
def killed_run(cluster: Cluster, two_runs: dict[str, Any]) -> dict[str, Any]:  # after the first runs
    """A retrain whose gpu worker is killed once training has mirrored a checkpoint."""
    run_id = start_run(cluster, *KILL_RUN)
    mirror = cluster.dvc_remote / "aigc" / "checkpoints"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not list(mirror.rglob(CHECKPOINT_GLOB)):
        if time.monotonic() > deadline or wait_done(cluster, run_id):
            pytest.fail(f"no checkpoint was mirrored to {mirror} while training\n{logs(cluster)}")
        time.sleep(0.2)
    mirrored = sorted(p.name for p in mirror.rglob(CHECKPOINT_GLOB))
    victim = children(cluster, run_id)
    cluster.procs["gpu-1"].kill()  # the worker and the flow run it executes, as a lost machine
    killed_at = time.monotonic()
    cluster.start_worker("gpu", "gpu-2")
    final = wait_final(cluster, run_id)
    return {
        "id": run_id,
        "run": final,
        "mirrored_at_kill": mirrored,
        "children_at_kill": victim,
        "recovered_after": time.monotonic() - killed_at,
    }


def wait_done(cluster: Cluster, run_id: str) -> bool:
    with prefect_client(cluster.prefect_api) as client:
        state = client.read_flow_run(uuid.UUID(run_id)).state
    return state is not None and state.is_final()


def test_killed_gpu_worker_training_resumes_from_its_checkpoint(cluster: Cluster, killed_run: dict[str, Any]) -> None:
    run = killed_run["run"]
    assert run.state.is_completed(), f"{run.state}\n{logs(cluster)}"
    assert len(killed_run["children_at_kill"]) == 1, "the kill must happen during the first training attempt"
    lost, retry = children(cluster, killed_run["id"])
    assert lost.state.is_crashed() and "no heartbeat" in (lost.state.message or ""), lost.state
    assert retry.state.is_completed()
    from aigc_pipeline.remote import record_path

    record = json.loads((cluster.dvc_remote / "aigc" / record_path(str(retry.id))).read_text())
    steps_at_kill = [int(re.search(r"\d+", n).group()) for n in killed_run["mirrored_at_kill"]]
    assert record["resumed_from"] >= max(steps_at_kill) > 0, (record, killed_run["mirrored_at_kill"])
    assert record["result"]["steps"] == 120
    # Its checkpoints were removed from the remote once the outputs were pushed.
    assert not list((cluster.dvc_remote / "aigc" / "checkpoints").rglob(CHECKPOINT_GLOB))
    (version,) = versions_of(cluster, killed_run["id"])
    assert version.tags["aigc.run_ref"] == f"refs/aigc/runs/{killed_run['id']}"


def test_fresh_clone_at_the_tagged_commit_rebuilds_the_same_weights(
    cluster: Cluster, killed_run: dict[str, Any], tmp_path: Path
) -> None:
    (version,) = versions_of(cluster, killed_run["id"])
    commit = version.tags["git.commit"]
    clone = servers.clone(cluster.repo_url, tmp_path / "reproduce")
    servers.git(clone, "fetch", "--quiet", "origin", commit)
    servers.git(clone, "checkout", "--quiet", commit)
    # The run's ref ends with the complete record (register included), descending from that commit.
    ref = version.tags["aigc.run_ref"]
    servers.git(clone, "fetch", "--quiet", "origin", f"{ref}:{ref}")
    servers.git(clone, "merge-base", "--is-ancestor", commit, ref)
    final_lock = servers.git(clone, "show", f"{ref}:dvc.lock")
    assert all(f"\n  {s}:" in final_lock for s in ("ingest@digits", "augment@digits", "train", "evaluate", "register"))
    env = servers.clean_env(AIGC_CACHE_DIR=os.environ.get("AIGC_CACHE_DIR", str(tmp_path / "cache")))
    dvc(clone, env, "pull")
    lock = dvc_lock(clone)
    assert version.tags["dvc.lock.train"] == ",".join(o["md5"] for o in lock["stages"]["train"]["outs"])
    model_dir = clone / f"models/{MODEL_DIR}"
    assert json.loads((model_dir / "model.json").read_text())["data_digest"] == version.tags["aigc.data_digest"]
    # Everything up to the registered model is as recorded (register itself re-registers on repro).
    status = json.loads(dvc(clone, env, "status", "--json", "--with-deps", "evaluate"))
    assert status == {}, status
    pulled = (model_dir / "generator.safetensors").read_bytes()
    dvc(clone, env, "repro", "--force", "--single-item", "train")
    assert (model_dir / "generator.safetensors").read_bytes() == pulled, (
        "an uninterrupted training on CPU does not reproduce the resumed run's weights"
    )


def dvc_lock(project: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((project / "dvc.lock").read_text())
