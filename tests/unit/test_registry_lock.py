"""The registered model's lock: which one each deployment gets, that it excludes other processes
and threads, that a dead holder does not block, and that ``aigc promote`` / ``aigc rollback``
wait for it (a real MLflow SQLite store; the PostgreSQL and Prefect locks are exercised against
real servers in tests/scale/test_concurrent_register.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from aigc_pipeline.tracking import locks
from aigc_pipeline.tracking.locks import RegistryLockError, RegistryLockTimeout, plan_lock, registry_lock
from tests.conftest import REPO

NAME = "digits"

# Holds the lock of registered model sys.argv[2] in store sys.argv[1], says so, then sleeps.
HOLDER = textwrap.dedent("""
    import sys, time
    from aigc_pipeline.tracking.locks import registry_lock
    with registry_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
""")


def _hold(store: str, name: str = NAME) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store, name],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_each_deployment_gets_the_lock_its_writers_share(tmp_path: Path) -> None:
    sqlite = plan_lock(f"sqlite:///{tmp_path}/mlflow/mlflow.db", NAME, {})
    assert sqlite.kind == locks.FILE and sqlite.where == f"{tmp_path}/mlflow/mlflow.db.aigc-locks/digits.lock"
    assert plan_lock(f"file://{tmp_path}/mlruns", "a/b c", {}).where.startswith(f"{tmp_path}/mlruns/.aigc-locks/a_b_c-")
    pg = plan_lock("postgresql+psycopg2://mlflow:secret@db:5433/mlflow", NAME, {})
    assert pg.kind == locks.POSTGRES and pg.where.endswith("@db:5433/mlflow")
    assert "secret" not in pg.where + pg.identity + repr(pg) + pg.describe()
    assert pg.dsn == "postgresql://mlflow:secret@db:5433/mlflow"
    # A tracking server: its backend store is out of reach, so the lock is the Prefect server's...
    served = plan_lock("http://mlflow:5000", NAME, {"PREFECT_API_URL": "http://prefect:4200/api"})
    assert served.kind == locks.PREFECT and served.describe() == (
        "Prefect global concurrency limit aigc-registry-digits on http://prefect:4200/api"
    )
    # ...or the backend database, when named; or none, and then nothing moves unlocked.
    named = plan_lock(
        "https://mlflow:5000",
        NAME,
        {locks.LOCK_ENV: "postgresql://mlflow@db/mlflow", "PREFECT_API_URL": "http://prefect:4200/api"},
    )
    assert named.kind == locks.POSTGRES
    with pytest.raises(RegistryLockError, match="set PREFECT_API_URL .* or AIGC_REGISTRY_LOCK=postgresql://"):
        plan_lock("http://mlflow:5000", NAME, {})
    with pytest.raises(RegistryLockError, match="AIGC_REGISTRY_LOCK='redis': expected auto, file, prefect"):
        plan_lock("http://mlflow:5000", NAME, {locks.LOCK_ENV: "redis"})
    with pytest.raises(RegistryLockError, match="no Prefect API is configured"):
        plan_lock(f"sqlite:///{tmp_path}/m.db", NAME, {locks.LOCK_ENV: "prefect"})
    with pytest.raises(RegistryLockError, match="AIGC_REGISTRY_LOCK_TIMEOUT='soon'"):
        locks.lock_timeout({locks.TIMEOUT_ENV: "soon"})


def test_the_file_lock_excludes_another_process_and_is_freed_by_its_death(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    holder = _hold(store)
    try:
        started = time.monotonic()
        with pytest.raises(RegistryLockTimeout, match=rf"still held after 0.5 s \(by pid {holder.pid} on "):
            with registry_lock(store, NAME, timeout=0.5):
                pytest.fail("entered a lock another process holds")
        assert 0.5 <= time.monotonic() - started < 5
        with registry_lock(store, "another-model", timeout=0.5):  # one lock per registered model
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder that dies without releasing: the kernel releases it
        holder.wait()
    started = time.monotonic()
    with registry_lock(store, NAME, timeout=5):
        assert time.monotonic() - started < 1


def test_the_lock_is_reentrant_in_a_thread_and_excludes_other_threads(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/mlflow.db"
    inside, order = threading.Event(), []

    def other() -> None:
        inside.wait()
        with registry_lock(store, NAME, timeout=30):
            order.append("other")

    thread = threading.Thread(target=other)
    thread.start()
    with registry_lock(store, NAME, timeout=5):
        with registry_lock(store, NAME, timeout=0.1):  # the same thread again: no wait for itself
            inside.set()
            time.sleep(0.5)
            order.append("nested")
        time.sleep(0.3)
        order.append("outer")
    thread.join(timeout=30)
    assert order == ["nested", "outer", "other"]


def test_promote_and_rollback_wait_for_the_registered_models_lock(tmp_path: Path, monkeypatch) -> None:
    """``aigc promote`` and ``aigc rollback`` decide under the lock registrations take: while another
    process holds it they wait (here: time out), and change nothing."""
    from mlflow import MlflowClient

    from aigc_pipeline import cli

    project = tmp_path / "project"
    (project / "mlflow").mkdir(parents=True)
    store = f"sqlite:///{project}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model(NAME)
    for i in range(2):
        run = client.create_run(client.create_experiment(f"e{i}", artifact_location=(tmp_path / f"a{i}").as_uri()))
        (tmp_path / run.info.run_id).mkdir()
        client.create_model_version(NAME, (tmp_path / run.info.run_id).as_uri(), run_id=run.info.run_id)
    client.set_registered_model_alias(NAME, "champion", "1")
    monkeypatch.setenv(locks.TIMEOUT_ENV, "1")
    holder = _hold(store)
    try:
        with pytest.raises(RegistryLockTimeout, match="digits.lock is still held after 1 s"):
            cli.run_command(["--project", str(project), "promote", NAME, "2", "--reason", "by hand"])
        with pytest.raises(RegistryLockTimeout):
            cli.run_command(["--project", str(project), "rollback", NAME])
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
        assert "aigc.promoted_by" not in client.get_model_version(NAME, "2").tags  # decided nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    change = cli.run_command(["--project", str(project), "promote", NAME, "2", "--reason", "by hand"])
    assert (change.previous, change.version) == ("1", "2")
    assert str(cli.run_command(["--project", str(project), "rollback", NAME]).version) == "1"
