"""A clone's view of the DAG, dvc.lock entries from other clones, and the DVC remote as the only
channel between workers (stage outputs, records, mirrored checkpoints): real DVC, a local remote."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from aigc_pipeline import remote, workspace
from aigc_pipeline.config import load_config
from tests.conftest import BIN, QUICK, copy_project

pytestmark = pytest.mark.slow  # real DVC repositories and commands


def _dvc(project: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with a local default DVC remote, committed."""
    p = copy_project(tmp_path / "project")
    _dvc(p, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    workspace.git(p, "commit", "-qam", "remote")
    return p


def test_plan_inputs_and_outputs_come_from_dvc_yaml(project: Path) -> None:
    assert workspace.stage_plan(project, "register") == [
        "ingest@digits",
        "augment@digits",
        "train",
        "evaluate",
        "register",
    ]
    assert workspace.stage_plan(project, "train") == ["ingest@digits", "augment@digits", "train"]
    assert workspace.stage_inputs(project, "train") == ["data/augmented/digits", "data/prepared/digits"]
    # The project's own params.yaml (not QUICK) names the model folder: models/${dataset}-${train.model}.
    model_dir = load_config(project).model_name
    assert workspace.stage_inputs(project, "evaluate") == ["data/prepared/digits", f"models/{model_dir}"]
    # The evaluation is per dataset (one metrics file whatever the family: dvc metrics diff compares them).
    assert workspace.stage_outputs(project, "evaluate") == [
        "eval/digits/samples.png",
        "eval/digits/copies.png",
        "eval/digits/evaluation.json",
        "eval/digits/metrics.json",
    ]
    with pytest.raises(
        workspace.WorkspaceError,
        match="no stage 'nope' \\(stages: ingest@digits, augment@digits, train, evaluate, register\\)",
    ):
        workspace.stage_plan(project, "nope")


def test_outputs_travel_between_clones_only_through_the_remote(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aigc_pipeline.config import write_overrides_to_params
    from aigc_pipeline.pipeline import run_stage

    monkeypatch.chdir(project)  # `dvc commit` in run_stage wants the cwd in the repo, as a worker's clone is
    write_overrides_to_params(project, QUICK)
    assert run_stage(project, "ingest@digits").ran
    remote.push_stage_outputs(project, "ingest@digits")
    commit = workspace.commit_run(project, "ingest ran")
    # A second clone at that commit: ingest's outputs come from the remote, then DVC holds it as done.
    other = tmp_path / "other"
    workspace.git(tmp_path, "clone", "-q", str(project), str(other))
    workspace.checkout(other, commit)
    monkeypatch.chdir(other)
    assert workspace.stale_stages(other, "ingest@digits")  # outputs missing in the fresh clone
    assert remote.restore_recorded_outputs(other, "ingest@digits")
    assert workspace.stale_stages(other, "ingest@digits") == {}
    assert not run_stage(other, "ingest@digits").ran
    # augment runs there; its dvc.lock entry, recorded back in the first clone, lets it pull the outputs.
    assert run_stage(other, "augment@digits").ran
    remote.push_stage_outputs(other, "augment@digits")
    entry = workspace.lock_entry(other, "augment@digits")
    remote.write_record(other, "run-1", {"lock": entry})
    monkeypatch.chdir(project)
    workspace.record_lock_entry(project, "augment@digits", remote.read_record(project, "run-1")["lock"])
    assert list(workspace.read_lock(project)["stages"]) == ["ingest@digits", "augment@digits"]
    remote.pull_stage_outputs(project, "augment@digits")
    assert workspace.stale_stages(project, "augment@digits") == {}
    assert json.loads(_dvc(project, "status", "--json", "--with-deps", "augment@digits")) == {}


def test_missing_remote_and_record_are_clear_errors(tmp_path: Path) -> None:
    bare = copy_project(tmp_path / "bare")
    with pytest.raises(remote.RemoteError, match="no default DVC remote"):
        remote.push_stage_outputs(bare, "ingest")


def test_checkpoint_mirror_round_trip(project: Path, tmp_path: Path) -> None:
    from aigc_pipeline.training.checkpoint import save_checkpoint

    folder = project / "checkpoints" / "digits-dcgan" / "abc123"
    mirror = remote.CheckpointMirror(project, "key-1", interval=0.05)
    with mirror:
        for step in (5, 10, 15):
            save_checkpoint(folder, step, {"step": step})
    # Only the newest is kept remotely, named by a LATEST marker.
    area = remote.RemoteArea(project)
    names = area.find("checkpoints/key-1")
    assert names == [
        "checkpoints/key-1/digits-dcgan/abc123/LATEST",
        "checkpoints/key-1/digits-dcgan/abc123/step-000000015.safetensors",
    ]
    with pytest.raises(remote.RemoteError, match="not found on the DVC remote"):
        remote.read_record(project, "never-written")
    # A fresh clone restores it where the trainer looks for it.
    other = tmp_path / "other"
    workspace.git(tmp_path, "clone", "-q", str(project), str(other))
    restored = remote.CheckpointMirror(other, "key-1").restore()
    assert restored == {"digits-dcgan/abc123": 15}
    got = other / "checkpoints" / "digits-dcgan" / "abc123" / "step-000000015.safetensors"
    assert got.read_bytes() == (folder / "step-000000015.safetensors").read_bytes()
    assert remote.CheckpointMirror(other, "another-key").restore() == {}
    remote.CheckpointMirror(other, "key-1").discard()
    assert area.find("checkpoints/key-1") == []


def test_run_record_is_committed_and_pushed_to_its_own_ref(project: Path, tmp_path: Path) -> None:
    bare = tmp_path / "origin.git"
    workspace.git(tmp_path, "init", "-q", "--bare", str(bare))
    workspace.git(project, "remote", "add", "origin", str(bare))
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\n# changed\n")
    commit = workspace.commit_run(project, "a run")
    assert workspace.commit_run(project, "nothing new") == commit  # nothing to commit: HEAD as is
    workspace.push_run(project, workspace.run_ref("abc"))
    assert workspace.git(project, "ls-remote", str(bare), "refs/aigc/runs/abc").split()[0] == commit
