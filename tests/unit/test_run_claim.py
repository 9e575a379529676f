"""Two stages that pick the same MLflow run for different evaluations at the same moment: one claim
wins, on a real SQLite store, across processes. (The race behind two ``aigc register`` of one
model at once judging a version by the other one's FID; the scale test runs it end to end.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aigc_pipeline.tracking import runs
from aigc_pipeline.tracking.store import tracking_uri
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a real MLflow SQLite store and four processes: a few seconds

WEIGHTS = "ab" * 32
# Finds the run that trained WEIGHTS (it holds no evaluation yet), says so, waits for the go file, claims it.
CLAIMER = """
import json, sys, time
from pathlib import Path
from mlflow import MlflowClient
from aigc_pipeline.tracking import runs
uri, experiment, weights, digest, go = sys.argv[1:6]
client = MlflowClient(tracking_uri=uri)
params = {runs.EVALUATION_PARAM: digest}
found = runs.find_run(client, experiment, weights, params, digest)
print("found", flush=True)
while not Path(go).exists():
    time.sleep(0.001)
won = runs.claim_run(client, found.info.run_id, digest)
again = runs.find_run(client, experiment, weights, params, digest)
print(json.dumps({"run": found.info.run_id, "won": won, "again": again and again.info.run_id}))
"""


def test_of_two_stages_claiming_one_run_at_once_exactly_one_gets_it(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = tracking_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("claims", artifact_location=(tmp_path / "artifacts").as_uri())
    trained = client.create_run(experiment, tags={runs.WEIGHTS_TAG: WEIGHTS}).info.run_id
    client.set_terminated(trained)

    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    digests = [f"{i}" * 64 for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, uri, experiment, WEIGHTS, d, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in digests
    ]
    for p in procs:  # every process has picked its run before any claims it
        assert p.stdout.readline() == "found\n", p.communicate()
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))

    assert all(r["run"] == trained for r in results), results  # all four picked the same run ...
    winners = [d for d, r in zip(digests, results) if r["won"]]
    assert len(winners) == 1, results  # ... and only one could claim it
    assert client.get_run(trained).data.params[runs.EVALUATION_PARAM] == winners[0]
    for d, r in zip(digests, results):  # the run is the winner's; the others find no run to take
        assert r["again"] == (trained if d == winners[0] else None), (d, r)
    # Claiming again for the same evaluation is no conflict (a retry).
    assert runs.claim_run(client, trained, winners[0])
