"""Two ``aigc register`` at the same moment against one MLflow server on PostgreSQL, once per lock.

PostgreSQL (Debian's package), ``mlflow server`` on it and a Prefect server on the same
PostgreSQL, all on 127.0.0.1, shared by the two rounds. Each round starts two ``aigc register``
processes at once, of the same QUICK model under two evaluations (``metrics.json`` variants): a
good one and a better one, both better than the champion the round starts with (none in the
first). The first round takes the lock a worker of docs/scaling.md takes (a tracking server and
``PREFECT_API_URL``: a Prefect global concurrency limit), the second the server's backend
database (``AIGC_REGISTRY_LOCK=postgresql://...``: ``pg_advisory_lock``). After every round:

- the champion is the better candidate, whichever process got there first;
- the two decisions were made one after the other: the first against the round's starting
  champion, the second against the champion the first left (the ``aigc.gate.champion_version``
  tag of each version), and the decision history records both in that order;
- the champion history gained exactly the promotions made, and no alias is lost (the challenger
  alias, when the round did not move it, still points where it did);
- each version has a run of its own holding its own FID.

Without the lock both processes read the same champion: both are promoted and the last one to
move the alias wins, often the worse one, and one of the two history entries is lost.

A second test holds each of the two server-side locks from another process: a second taker
times out naming the holder, and a SIGKILLed holder frees it (the Prefect slot after its lease).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aigc_pipeline.tracking import registry
from tests.conftest import MODEL_DIR, REGISTERED, evaluated_project
from tests.scale import servers

pytestmark = [pytest.mark.slow, pytest.mark.scale]

ROUNDS = 2  # one for each lock; without a lock every round shows the race (see above)
START_FID = 1000.0  # the round's candidates: START_FID - 40 r (good) and START_FID - 40 r - 20 (better)
ROUND_TIMEOUT = 600.0


@dataclass
class Servers:
    postgres: servers.Postgres
    mlflow_url: str
    mlflow_db: str
    prefect_api: str
    logs: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """PostgreSQL, then ``mlflow server`` and ``prefect server`` on it, started side by side."""
    base = tmp_path_factory.mktemp("concurrent-register")
    logs = base / "logs"
    started = time.monotonic()
    pg = servers.Postgres(logs).start()
    procs: list[servers.Proc] = []
    try:
        mlflow_db = pg.create_database("mlflow")
        prefect_db = pg.create_database("prefect").replace("postgresql://", "postgresql+asyncpg://", 1)
        ml_port, pf_port = servers.free_port(), servers.free_port()
        (base / "artifacts").mkdir()
        (base / "prefect-server").mkdir()
        procs.append(
            servers.start(
                "mlflow-server",
                [
                    str(servers.BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    mlflow_db,
                    "--artifacts-destination",
                    str(base / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ml_port),
                    "--workers",
                    "1",
                ],
                cwd=base,
                env=servers.clean_env(),
                log_dir=logs,
            )
        )
        procs.append(
            servers.start(
                "prefect-server",
                [
                    str(servers.BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(pf_port),
                    "--log-level",
                    "WARNING",
                    "--no-ui",
                ],
                cwd=base / "prefect-server",
                log_dir=logs,
                env=servers.clean_env(
                    PREFECT_HOME=str(base / "prefect-server"), PREFECT_API_DATABASE_CONNECTION_URL=prefect_db
                ),
            )
        )
        mlflow_url, prefect_api = f"http://127.0.0.1:{ml_port}", f"http://127.0.0.1:{pf_port}/api"
        servers.wait_http(f"{mlflow_url}/health", procs[0], 240)
        servers.wait_http(f"{prefect_api}/health", procs[1], 240)
        print(f"servers up in {time.monotonic() - started:.0f} s")
        yield Servers(pg, mlflow_url, mlflow_db, prefect_api, logs)
    finally:
        for p in reversed(procs):
            p.stop()
        pg.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy with a QUICK model trained and evaluated, as ``dvc repro evaluate`` leaves it."""
    return evaluated_project(tmp_path_factory.mktemp("race") / "project")


def _variant(project: Path, dest: Path, **changes: float) -> Path:
    """A copy of the QUICK evaluation with some metrics changed (a different candidate to the gate)."""
    shutil.copytree(project / "eval" / "digits", dest)  # eval/<dataset>: one per dataset, not per family
    doc = json.loads((dest / "metrics.json").read_text())
    doc.update(changes)
    (dest / "metrics.json").write_text(json.dumps(doc))
    return dest


def _state(client: Any) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(REGISTERED)
    except MlflowException:
        return {"aliases": {}, "history": [], "decisions": []}
    # Read from the tags themselves: (version, decision, compared with) entries, oldest first.
    raw = (model.tags or {}).get("aigc.decision_history", "")
    decisions = [tuple(None if x == "-" else x for x in entry.split(":")) for entry in raw.split(",") if entry]
    return {
        "aliases": {a: str(v) for a, v in (model.aliases or {}).items()},
        "history": registry.champion_history(client, REGISTERED),
        "decisions": decisions,
    }


def test_two_registrations_at_once_are_decided_one_after_the_other(
    shared: Servers, project: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=shared.mlflow_url, registry_uri=shared.mlflow_url)
    lock_envs = {
        "prefect": {"PREFECT_API_URL": shared.prefect_api},
        "postgres": {"AIGC_REGISTRY_LOCK": shared.mlflow_db},
    }
    walls, firsts, report = [], [], []
    for r in range(ROUNDS):
        kind = "prefect" if r % 2 == 0 else "postgres"
        before = _state(client)
        champion_before = before["aliases"].get("champion")
        good = _variant(project, tmp_path / f"ev-{r}-good", fid=START_FID - 40 * r, fid_std=0.5)
        better = _variant(project, tmp_path / f"ev-{r}-better", fid=START_FID - 40 * r - 20, fid_std=0.5)
        env = servers.clean_env(
            MLFLOW_TRACKING_URI=shared.mlflow_url,
            PREFECT_HOME=str(tmp_path / "prefect-home"),
            AIGC_CACHE_DIR=os.environ["AIGC_CACHE_DIR"],
            **lock_envs[kind],
        )
        started = time.monotonic()
        procs = {
            label: subprocess.Popen(
                [
                    str(servers.BIN / "aigc"),
                    "register",
                    "--model",
                    f"models/{MODEL_DIR}",
                    "--evaluation",
                    str(ev),
                    "--receipt",
                    str(tmp_path / f"{r}-{label}.json"),
                ],
                cwd=project,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for label, ev in (("good", good), ("better", better))
        }
        outputs = {label: p.communicate(timeout=ROUND_TIMEOUT)[0] for label, p in procs.items()}
        walls.append(time.monotonic() - started)
        for label, p in procs.items():
            assert p.returncode == 0, (
                f"round {r} ({kind}): `aigc register` of the {label} candidate failed:\n{outputs[label][-6000:]}"
            )
        receipt = {label: json.loads((tmp_path / f"{r}-{label}.json").read_text()) for label in procs}
        v = {label: receipt[label]["version"] for label in procs}
        after = _state(client)
        where = f"round {r} ({kind} lock): good v{v['good']}, better v{v['better']}, before {before}, after {after}"

        # Each version is judged by its own run, holding its own evaluation (one shared run held
        # both FIDs once, and the better candidate was compared with its own FID: round 7, 2026-12-01).
        assert receipt["good"]["run_id"] != receipt["better"]["run_id"], where
        for label, ev in (("good", good), ("better", better)):
            held = client.get_run(receipt[label]["run_id"]).data.metrics["fid"]
            assert held == json.loads((ev / "metrics.json").read_text())["fid"], (label, held, where)
        # The better candidate is champion, whichever came first.
        assert after["aliases"].get("champion") == v["better"], where
        # One decision after the other: the first against the round's champion, the second
        # against the champion the first left.
        compared = {
            label: client.get_model_version(REGISTERED, v[label]).tags.get("aigc.gate.champion_version")
            for label in procs
        }
        first = [label for label in procs if compared[label] == champion_before]
        assert len(first) == 1, f"both decided against champion v{champion_before}: {where}"
        first = first[0]
        second = "good" if first == "better" else "better"
        assert compared[second] == v[first], where
        assert receipt[first]["decision"] == "champion"
        assert receipt[second]["decision"] == ("champion" if second == "better" else "challenger"), where
        assert after["decisions"] == before["decisions"] + [
            (v[first], "champion", champion_before),
            (v[second], receipt[second]["decision"], v[first]),
        ], where
        # The champion history gained every promotion, in order; no alias was lost.
        promoted = [v["good"], v["better"]] if first == "good" else [v["better"]]
        assert after["history"] == [h for h in before["history"] if h] + promoted, where
        challenger = v["good"] if first == "better" else before["aliases"].get("challenger")
        assert after["aliases"].get("challenger") == challenger, where
        assert set(after["aliases"]) == {"champion"} | ({"challenger"} if challenger else set()), where
        firsts.append(first)
        report.append(f"round {r} ({kind}): {walls[-1]:.1f} s, {first} first")

    print("\n".join(report))
    print(
        f"{ROUNDS} rounds: wall per round median {statistics.median(walls):.1f} s (max {max(walls):.1f} s); "
        f"better first in {firsts.count('better')}, good first in {firsts.count('good')}"
    )
    assert _state(client)["aliases"]["champion"] == v["better"]


# Holds registered model sys.argv[2]'s lock for store sys.argv[1] (kind from the environment), says so, sleeps.
HOLDER = """
import sys, time
from aigc_pipeline.tracking.locks import registry_lock
with registry_lock(sys.argv[1], sys.argv[2]) as plan:
    print("held", plan.kind, flush=True)
    time.sleep(600)
"""


def test_a_held_lock_times_out_naming_its_holder_and_a_killed_holder_frees_it(shared: Servers) -> None:
    """The PostgreSQL and Prefect locks across processes: a second taker times out with a message
    naming the holder or the limit; once the holder is SIGKILLed, the advisory lock is free at
    once and the Prefect slot after its lease; a limit edited to 2 slots is refused."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from aigc_pipeline.tracking.locks import LOCK_ENV, RegistryLockError, RegistryLockTimeout, registry_lock

    name, store = "lock-probe", shared.mlflow_url
    for kind, env in (("postgres", {LOCK_ENV: shared.mlflow_db}), ("prefect", {"PREFECT_API_URL": shared.prefect_api})):
        holder = subprocess.Popen(
            [str(servers.BIN / "python"), "-c", HOLDER, store, name],
            stdout=subprocess.PIPE,
            text=True,
            env=servers.clean_env(**env),
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().split() == ["held", kind]
            with temporary_settings({PREFECT_API_URL: shared.prefect_api}):
                expected = (
                    r"by backend pid \d+ \('aigc registry lock lock-probe' from 127.0.0.1"
                    if kind == "postgres"
                    else r"aigc-registry-lock-probe on http://127.0.0.1:\d+/api is still held after 2 s"
                )
                with pytest.raises(RegistryLockTimeout, match=expected):
                    with registry_lock(store, name, timeout=2, env=env):
                        pytest.fail(f"entered the {kind} lock another process holds")
        finally:
            holder.kill()
            holder.wait()
        started = time.monotonic()
        with temporary_settings({PREFECT_API_URL: shared.prefect_api}):
            with registry_lock(store, name, timeout=180, env=env):
                freed = time.monotonic() - started
        print(f"{kind} lock: free {freed:.1f} s after its holder was SIGKILLed")
        assert freed < (2 if kind == "postgres" else 120)

    with temporary_settings({PREFECT_API_URL: shared.prefect_api}):
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit("aigc-registry-lock-probe", GlobalConcurrencyLimitUpdate(limit=2))
        with pytest.raises(RegistryLockError, match="must be active with limit 1 .* limit 2"):
            with registry_lock(store, name, timeout=5, env={"PREFECT_API_URL": shared.prefect_api}):
                pytest.fail("entered a two-slot limit")
