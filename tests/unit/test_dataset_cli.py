"""`aigc ingest SOURCE` and `aigc dataset add`: exit codes, report contents, a failed ingest never
replacing a good dataset, params.yaml edits that keep comments."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from aigc_pipeline.cli import main
from aigc_pipeline.config import load_config
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _prefect_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI fills in PREFECT_HOME for the process; keep it from leaking into other tests.
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "project"
    p.mkdir()
    shutil.copy(REPO / "params.yaml", p / "params.yaml")
    return p


def noise(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_folder(root: Path, good: int = 6, bad: int = 0) -> Path:
    for i in range(good):
        cls = root / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        noise(i).save(cls / f"{i}.png")
    for i in range(bad):
        (root / "dog" / f"bad{i}.png").write_text("not an image")
    return root


def aigc(project: Path, *args: str) -> int:
    return main(["--project", str(project), *args])


# --- aigc ingest SOURCE ------------------------------------------------------------------------


def test_ingest_a_folder_writes_the_report(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_folder(tmp_path / "pets", good=6, bad=0)
    (src / "Thumbs.db").write_bytes(b"junk")
    params_before = (project / "params.yaml").read_text()
    assert (
        aigc(
            project,
            "ingest",
            str(src),
            "--out",
            "data/prepared/pets",
            "--size",
            "8",
            "--channels",
            "3",
            "--workers",
            "1",
        )
        == 0
    )
    assert "6 images accepted, 0 rejected" in capsys.readouterr().out
    out = project / "data" / "prepared" / "pets"
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 6 and report["rejected"] == [] and report["duplicates"] == []
    assert report["per_class"] == {"cat": 3, "dog": 3}  # class folders found without --labels
    assert report["size"] == 8 and report["channels"] == 3 and report["source"] == "image-folder"
    assert json.loads((out / "meta.json").read_text())["count"] == 6
    assert (project / "params.yaml").read_text() == params_before


def test_failed_ingest_keeps_the_good_dataset_and_reports_beside_it(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = make_folder(tmp_path / "good", good=6)
    bad = make_folder(tmp_path / "bad", good=6, bad=2)  # 25% rejected
    out = tmp_path / "prepared"
    assert aigc(project, "ingest", str(good), "--out", str(out), "--workers", "1") == 0
    meta = (out / "meta.json").read_text()

    assert aigc(project, "ingest", str(bad), "--out", str(out), "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "25.0% of images rejected" in err and "ingest.max_rejected_fraction=0.1" in err
    assert "dog/bad0.png" in err and "unchanged" in err
    assert (out / "meta.json").read_text() == meta  # the good dataset is untouched
    failed = json.loads((tmp_path / "prepared.failed-report.json").read_text())
    assert failed["status"] == "failed" and failed["accepted"] == 6
    assert [r["path"] for r in failed["rejected"]] == ["dog/bad0.png", "dog/bad1.png"]
    assert all("not a recognised image" in r["reason"] for r in failed["rejected"])

    # A looser threshold accepts it; the stale failure report goes away.
    assert aigc(project, "ingest", str(bad), "--out", str(out), "--max-rejected", "0.3", "--workers", "1") == 0
    assert not (tmp_path / "prepared.failed-report.json").exists()
    assert json.loads((out / "report.json").read_text())["accepted"] == 6


def test_nothing_usable_fails(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    assert aigc(project, "ingest", str(src), "--out", str(tmp_path / "out"), "--max-rejected", "1") == 2
    assert "no usable image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.failed-report.json").read_text())["rejected"][0]["path"] == "a.png"


def test_ingest_an_archive_and_a_manifest(project: Path, tmp_path: Path) -> None:
    arc = tmp_path / "pets.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for i in range(3):
            img = noise(i)
            path = tmp_path / f"{i}.png"
            img.save(path)
            zf.write(path, f"{'cat' if i else 'dog'}/{i}.png")
    assert aigc(project, "ingest", str(arc), "--out", str(tmp_path / "a"), "--labels", "folders") == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["per_class"] == {"cat": 2, "dog": 1}

    (tmp_path / "list.csv").write_text("path,species\n0.png,dog\n1.png,cat\n2.png,\n")
    assert (
        aigc(
            project,
            "ingest",
            str(tmp_path / "list.csv"),
            "--out",
            str(tmp_path / "m"),
            "--labels",
            "species",
            "--max-rejected",
            "0.5",
        )
        == 0
    )
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["per_class"] == {"cat": 1, "dog": 1}
    assert report["rejected"] == [{"path": "2.png", "reason": "empty label in column 'species' (row 3)"}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "--dataset", "digits", "--size", "8"], "--size: only with `aigc ingest SOURCE`"),
        (["ingest", "{src}", "--size", "12"], "--size: must be a power of two"),
        (["ingest", "{src}", "--labels", "species"], "--labels: must be folders or none"),
        (["ingest", "{src}", "--max-rejected", "2"], "--max-rejected: must be in [0, 1]"),
        (["ingest", "{tmp}/notes.txt"], "cannot tell the source type"),
        (["ingest", "{tmp}/nope"], "nope: not found"),
    ],
)
def test_ingest_user_errors_exit_2(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    make_folder(tmp_path / "src", good=2)
    (tmp_path / "notes.txt").write_text("x")
    args = [a.format(src=tmp_path / "src", tmp=tmp_path) for a in args]
    assert aigc(project, *args, "--out", str(tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- aigc dataset add --------------------------------------------------------------------------


def test_dataset_add_writes_the_entry_keeping_comments(project: Path, capsys: pytest.CaptureFixture) -> None:
    make_folder(project / "data" / "raw" / "pets", good=4)
    before = (project / "params.yaml").read_text().splitlines()
    assert aigc(project, "dataset", "add", "pets", "data/raw/pets", "--size", "16", "--channels", "3") == 0
    assert "aigc run --dataset pets" in capsys.readouterr().out
    text = (project / "params.yaml").read_text()
    # Every other line is as it was: `null` stays null (ruamel would write an empty value).
    assert [line for line in text.splitlines() if line not in before] == [
        "  pets:",
        "    source: image-folder",
        "    path: data/raw/pets",
        "    labels: folders",
        "    size: 16",
        "    channels: 3",
    ]
    assert sorted(set(before) - set(text.splitlines())) == []
    assert "# Which entry of `datasets` the train/evaluate/register stages use." in text  # comments kept
    assert "scikit-learn's bundled 8x8 digits" in text
    entry = yaml.safe_load(text)["datasets"]["pets"]
    assert entry == {"source": "image-folder", "path": "data/raw/pets", "labels": "folders", "size": 16, "channels": 3}
    cfg = load_config(project)
    assert cfg.dataset == "digits"  # the active dataset is unchanged
    assert cfg.datasets["pets"].path == "data/raw/pets"

    # The registered entry works through the stage command dvc.yaml runs (path relative to the project).
    assert aigc(project, "ingest", "--dataset", "pets", "--out", "data/prepared/pets", "--workers", "1") == 0
    report = json.loads((project / "data" / "prepared" / "pets" / "report.json").read_text())
    assert report["accepted"] == 4 and report["per_class"] == {"cat": 2, "dog": 2}


def test_dataset_add_refuses_existing_names_and_undecodable_sources(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_folder(tmp_path / "pets", good=2)
    assert aigc(project, "dataset", "add", "pets", str(tmp_path / "pets")) == 0
    before = (project / "params.yaml").read_text()
    assert yaml.safe_load(before)["datasets"]["pets"]["path"] == str((tmp_path / "pets").resolve())  # outside: absolute

    assert aigc(project, "dataset", "add", "pets", str(tmp_path / "pets"), "--size", "64") == 2
    assert "datasets.pets: already registered" in capsys.readouterr().err
    assert aigc(project, "dataset", "add", "digits", str(tmp_path / "pets")) == 2
    assert (project / "params.yaml").read_text() == before

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not an image")
    assert aigc(project, "dataset", "add", "junk", str(junk)) == 2
    assert "no decodable image" in capsys.readouterr().err
    assert aigc(project, "dataset", "add", "bad.name", str(tmp_path / "pets")) == 2
    assert (project / "params.yaml").read_text() == before

    assert aigc(project, "dataset", "add", "pets", str(tmp_path / "pets"), "--size", "64", "--force") == 0
    assert load_config(project).datasets["pets"].size == 64


def test_dataset_add_refuses_a_folder_dvc_cannot_hash(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import os

    src = make_folder(tmp_path / "pets", good=4)
    os.symlink(tmp_path / "gone.png", src / "dog" / "old.png")  # DVC fails on it
    os.mkfifo(src / "cat" / "pipe.png")  # DVC would block reading it
    before = (project / "params.yaml").read_text()
    assert aigc(project, "dataset", "add", "pets", str(src)) == 2
    err = capsys.readouterr().err
    assert "cat/pipe.png (FIFO, socket or device)" in err and "dog/old.png (broken symbolic link)" in err
    assert (project / "params.yaml").read_text() == before
    # `aigc ingest` reads such a folder anyway, rejecting both entries with their reasons.
    assert aigc(project, "ingest", str(src), "--out", str(tmp_path / "out"), "--max-rejected", "0.5") == 0
    rejected = {r["path"] for r in json.loads((tmp_path / "out" / "report.json").read_text())["rejected"]}
    assert rejected == {"cat/pipe.png", "dog/old.png"}


def test_aigc_run_needs_a_path_dvc_can_watch_for_every_dataset(project: Path, capsys: pytest.CaptureFixture) -> None:
    text = (project / "params.yaml").read_text()
    assert "    path: uv.lock" in text
    (project / "params.yaml").write_text(text.replace("    path: uv.lock", "", 1))
    assert aigc(project, "run") == 2  # before any flow starts
    err = capsys.readouterr().err
    assert "datasets.digits.path: required by dvc.yaml, whose ingest@digits stage depends on it" in err
    assert "uv.lock" in err
