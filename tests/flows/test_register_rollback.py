"""The distributed flow's register step on a real MLflow store: a registration that fails after
the model version exists is retried with backoff, each failed attempt rolled back, and the flow
finally fails leaving nothing registered; a good attempt registers exactly one version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import BIN, REGISTERED, evaluated_project, prefect_home

pytestmark = pytest.mark.slow

# Two flow runs in one process (one embedded server start): tags for each on the command line.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from prefect import flow
    from flows.distributed import register_stage, registry_snapshot

    @flow(name="register-only")
    def register_only(project: str, tags: dict) -> str:
        before = registry_snapshot(Path(project))
        outcome = register_stage(Path(project), "register", before, tags)
        return json.loads((Path(project) / outcome.outputs[0]).read_text())["version"]

    for tags in sys.argv[2:]:
        state = register_only(sys.argv[1], json.loads(tags), return_state=True)
        print("STATE", state.type.value, flush=True)
        print("STATE", state.type.value, file=sys.stderr, flush=True)  # splits the log by flow run
""")


def _register(project: Path, *tags: dict[str, str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(prefect_home(project)),
        "AIGC_RETRY_BACKOFF_SECONDS": "0.1",
        "AIGC_IO_RETRIES": "1",
        "AIGC_FLOW_RUN_ID": "",
    }
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(project), *map(json.dumps, tags)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_failed_registration_is_rolled_back_then_a_good_one_registers(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project = evaluated_project(tmp_path / "project")
    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # First an MLflow call that fails after the version exists (an invalid tag key), then a good one.
    proc = _register(project, {"bad key!": "x"}, {"aigc.extra": "yes"})
    states = [line for line in proc.stdout.splitlines() if line.startswith("STATE ")]
    assert states == ["STATE FAILED", "STATE COMPLETED"], proc.stdout + proc.stderr[-5000:]
    failed = proc.stderr[: proc.stderr.index("STATE FAILED")]
    assert "Retry 1/1" in failed, failed[-3000:]
    assert failed.count("register failed; rolled back: deleted model version(s)") == 2  # each attempt
    # The failed flow run left nothing: the good one's version is the model's first and only version.
    (version,) = client.search_model_versions(f"name='{REGISTERED}'")
    exp = client.get_experiment_by_name("aigc-pipeline")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [version.run_id]
    assert version.tags["aigc.extra"] == "yes"
    assert client.get_model_version_by_alias(REGISTERED, "champion").version == version.version
