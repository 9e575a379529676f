"""What a user sees in DVC, on a real repository (QUICK settings): the default family run and
committed as a baseline (through the flow's door, in this process: it leaves the dvc.lock `dvc repro`
leaves, tests/flows/test_retrain_flow.py), then `dvc exp run -S train.model=sngan`, which trains,
evaluates and registers end to end.

- `dvc metrics show`, `dvc metrics diff` and `dvc exp show --only-changed --drop 'Created|.*/'` print
  tables that fit a 120-column terminal, with FID, KID, precision, recall, the floor ratio and the
  changed param: the evaluation is at eval/<dataset> whatever the family, so the two experiments
  compare the same metric file (with a path per family they were two files: no diff at all).
- The experiment registered into the project's MLflow store (a second version of the dataset's
  registered model, challenger or champion), its run holding the training; git holds no MLflow
  file; `dvc status` is clean.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import QUICK, REGISTERED, evaluated_project, run_cli

pytestmark = pytest.mark.slow
WIDTH = 120
# docs/tracking.md: deps columns hold 32-character hashes; the creation time gives way to the scores
EXP_SHOW = ["dvc", "exp", "show", "--only-changed", "--drop", "Created|.*/"]


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True, text=True).stdout


def _fits(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    too_wide = [line for line in lines if len(line.rstrip()) > WIDTH]
    assert not too_wide, f"{len(too_wide)} lines over {WIDTH} columns:\n{text}"
    return lines


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = evaluated_project(tmp_path_factory.mktemp("dvc-view") / "project", QUICK, until="register")
    assert json.loads(_ok(run_cli(project, "dvc", "status", "--json"))) == {}
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "baseline: QUICK resgan")
    out = _ok(run_cli(project, "dvc", "exp", "run", "-S", "train.model=sngan"))
    assert "Running stage 'register'" in out and "Ran experiment(s)" in out, out[-3000:]
    return project


def test_metrics_show_and_diff_fit_and_compare_the_families(experiments: Path) -> None:
    # DVC prints these tables at their natural width (it never wraps them): that is what must fit.
    show = _fits(_ok(run_cli(experiments, "dvc", "metrics", "show")))
    changed = _fits(_ok(run_cli(experiments, "dvc", "metrics", "diff")))  # HEAD (resgan) vs workspace (sngan)
    diff = _fits(_ok(run_cli(experiments, "dvc", "metrics", "diff", "--all")))  # unchanged ones too
    header, row = show
    assert header.split() == [
        "Path",
        "fid",
        "fid_inf",
        "fid_ratio",
        "fid_std",
        "floor_fid",
        "kid",
        "precision",
        "recall",
    ]
    assert row.split()[0] == "eval/digits/metrics.json" and all(float(v) == float(v) for v in row.split()[1:])
    assert diff[0].split() == ["Path", "Metric", "HEAD", "workspace", "Change"]
    rows = {line.split()[1]: line.split()[2:] for line in diff[1:]}
    assert {"fid", "kid", "precision", "recall", "fid_ratio"} <= set(rows)
    head, now, change = rows["fid"]
    assert float(now) - float(head) == pytest.approx(float(change), abs=1e-4) and float(change) != 0
    assert "fid" in {line.split()[1] for line in changed[1:]} and len(changed) <= len(diff)


def test_exp_show_only_changed_fits_with_the_scores_and_the_changed_param(experiments: Path) -> None:
    # Without a terminal DVC sizes the table to its content (as it does for its pager): the natural width.
    lines = _fits(_ok(run_cli(experiments, *EXP_SHOW)))
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[0] == "Experiment" and "Created" not in header
    for column in ("fid", "fid_inf", "fid_ratio", "fid_std", "kid", "train.model"):
        assert column in header, (column, header)
    assert not any("/" in column for column in header)  # one metric file: plain names, no path prefixes
    assert "floor_fid" not in header  # the same data's floor for both: unchanged, so not shown
    # After one QUICK epoch precision and recall are 0 for both families, so --only-changed hides them;
    # in real runs they differ: with them kept the table still fits.
    lines = _fits(_ok(run_cli(experiments, *EXP_SHOW, "--keep", "^(precision|recall)$")))
    header = next(line for line in lines if "Experiment" in line).split()
    assert {"fid", "fid_inf", "fid_ratio", "fid_std", "kid", "precision", "recall", "train.model"} <= set(header), (
        header
    )
    # What --drop leaves out: a column of 32-character hashes per changed dependency.
    wide = _ok(run_cli(experiments, "dvc", "exp", "show", "--only-changed"))
    assert "models/digits-sngan" in wide and max(len(line) for line in wide.splitlines()) > WIDTH
    # Same table as JSON: the baseline is resgan, the experiment sngan, each with its own FID.
    rows = json.loads(_ok(run_cli(experiments, "dvc", "exp", "show", "--json")))
    (baseline,) = [r for r in rows if r["rev"] != "workspace"]
    (experiment,) = baseline["experiments"]
    scores = {}
    for rev in (baseline, experiment["revs"][0]):
        data = rev["data"]
        model = data["params"]["params.yaml"]["data"]["train"]["model"]
        scores[model] = data["metrics"]["eval/digits/metrics.json"]["data"]["fid"]
    assert set(scores) == {"resgan", "sngan"} and scores["resgan"] != scores["sngan"]


def test_the_experiment_registered_into_the_project_store_and_git_holds_no_mlflow_file(experiments: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{experiments}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = sorted(client.search_model_versions(f"name='{REGISTERED}'"), key=lambda v: int(v.version))
    assert [v.tags["aigc.family"] for v in versions] == ["resgan", "sngan"]
    assert versions[1].tags["aigc.decision"] in ("champion", "challenger")
    experiment = client.get_experiment_by_name("aigc-pipeline")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {v.run_id for v in versions}  # one run per pipeline run, each holding its training
    assert all(r.info.status == "FINISHED" and r.data.tags["aigc.training"] == "live" for r in runs.values())
    receipt = json.loads((experiments / "registry" / "digits-sngan.json").read_text())
    assert receipt["version"] == str(versions[1].version) and receipt["tracking_uri"] == uri
    # The experiment's changes are in the workspace (DVC applied them), nothing of MLflow in git.
    changed = {line[3:] for line in _git(experiments, "status", "--porcelain").splitlines()}
    assert changed == {"params.yaml", "dvc.lock", "eval/digits/metrics.json", "eval/digits/evaluation.json"}, changed
    assert not [f for f in _git(experiments, "ls-files").split() if f.startswith("mlflow/")]
    assert json.loads(_ok(run_cli(experiments, "dvc", "status", "--json"))) == {}


def test_a_temporary_experiment_registers_into_the_project_store(experiments: Path) -> None:
    """`dvc exp run --temp` works in a copy under .dvc/tmp/exps/ (deleted afterwards): its
    registration goes to the project's store all the same."""
    from mlflow import MlflowClient

    out = _ok(run_cli(experiments, "dvc", "exp", "run", "--temp", "-S", "train.model=dcgan"))
    assert "Ran experiment(s)" in out, out[-3000:]
    uri = f"sqlite:///{experiments}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    families = [
        v.tags["aigc.family"]
        for v in sorted(client.search_model_versions(f"name='{REGISTERED}'"), key=lambda v: int(v.version))
    ]
    assert families == ["resgan", "sngan", "dcgan"]
    assert not list((experiments / ".dvc" / "tmp").rglob("mlflow.db"))  # no store left in a copy
