"""The issue's done-when, end to end on real components: a dataset added with `aigc dataset add`
trains and registers its own model with `aigc run --dataset NAME` (embedded Prefect, DVC, MLflow
SQLite store) in a fresh git + DVC copy of the project, leaves `dvc status` clean, and DVC picks up
a changed file in its folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from aigc_pipeline.config import load_config
from tests.conftest import QUICK, copy_project, run_cli

pytestmark = pytest.mark.slow
NAME = "shapes"
AUGMENT = ["augment.max_rotation=10", "augment.brightness=0.2", "augment.saturation=0.2"]


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc.stdout + proc.stderr


def _shape(i: int) -> tuple[Image.Image, str]:
    """Image ``i``: a circle or a square of a random colour on a random background, 20-40 px."""
    rng = np.random.default_rng(i)
    side = int(rng.integers(20, 41))
    img = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
    cls = "circles" if i % 2 else "squares"
    box = tuple(
        int(v) for v in (rng.integers(1, 5), rng.integers(1, 5), side - rng.integers(1, 5), side - rng.integers(1, 5))
    )
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (ImageDraw.Draw(img).ellipse if cls == "circles" else ImageDraw.Draw(img).rectangle)(box, fill=fill)
    return img, cls


@pytest.fixture(scope="module")
def added(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    project = copy_project(tmp_path_factory.mktemp("newdata") / "project")
    folder = project / "data" / "raw" / NAME
    for i in range(90):
        img, cls = _shape(i)
        (folder / cls).mkdir(parents=True, exist_ok=True)
        img.save(folder / cls / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
    (folder / ".DS_Store").write_bytes(b"Bud1")  # junk a data team's folder comes with
    _ok(run_cli(project, "aigc", "dataset", "add", NAME, f"data/raw/{NAME}", "--size", "16", "--channels", "3"))
    # Synthetic shapes are so alike that unseen ones count as copies of training ones (copy_share
    # 0.2 for real data), and a one-epoch model's blurs all do: the copying bar is not this test's.
    sets = [a for s in [*QUICK, *AUGMENT, "register.max_copy_share=null"] for a in ("--set", s)]
    out = _ok(run_cli(project, "aigc", "run", "--dataset", NAME, *sets))
    return project, out


def test_dataset_add_then_aigc_run_registers_its_own_model(added: tuple[Path, str]) -> None:
    project, out = added
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["dataset"] == NAME
    assert params["datasets"][NAME] == {
        "source": "image-folder",
        "path": f"data/raw/{NAME}",
        "labels": "folders",
        "size": 16,
        "channels": 3,
    }
    family = load_config(project).train.model
    assert re.search(
        rf"{NAME} v1 \({family}\): FID [\d.]+ ± [\d.]+, floor [\d.]+ = [\d.]+x "
        rf"\[incv3-\w+_n24_eval-\w+_16px\], champion",
        out,
    ), out[-3000:]
    status = json.loads(_ok(run_cli(project, "aigc", "status", "--json")))
    (model,) = [m for m in status["models"] if m["name"] == NAME]  # the dataset's registered model
    assert model["aliases"] == {"champion": "1"}
    assert [m["name"] for m in status["models"]] == [NAME]  # only the active dataset trains
    receipt = json.loads((project / "registry" / f"{NAME}-{family}.json").read_text())
    assert receipt["name"] == NAME and receipt["champion"] is True and receipt["family"] == family

    # The registered run names its input: the prepared dataset, digest = the hash DVC recorded.
    from mlflow import MlflowClient

    from aigc_pipeline.tracking.datasets import EVALUATION, PREPARED, TRAINING

    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    inputs = {
        ({t.key: t.value for t in i.tags}["mlflow.data.context"]): i.dataset
        for i in MlflowClient(tracking_uri=uri).get_run(receipt["run_id"]).inputs.dataset_inputs
    }
    assert sorted(inputs) == sorted([TRAINING, PREPARED, EVALUATION])
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    prepared = inputs[PREPARED]
    assert prepared.name == NAME and prepared.digest == lock[f"ingest@{NAME}"]["outs"][0]["md5"]
    assert json.loads(prepared.profile)["per_class"] == {"circles": 45, "squares": 45}


def test_dvc_records_every_dataset_and_is_clean_after_the_run(added: tuple[Path, str]) -> None:
    project, _ = added
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    stages = [f"ingest@{NAME}", f"augment@{NAME}", "ingest@digits", "augment@digits", "train", "evaluate", "register"]
    assert sorted(lock) == sorted(stages)
    # The dataset's folder is a dependency of its ingest stage; the digits' is the lock file pinning scikit-learn.
    assert {d["path"] for d in lock[f"ingest@{NAME}"]["deps"]} >= {f"data/raw/{NAME}"}
    assert {d["path"] for d in lock["ingest@digits"]["deps"]} >= {"uv.lock"}
    # The augmentation options are recorded, as DVC params of each augment stage.
    recorded = lock[f"augment@{NAME}"]["params"]["params.yaml"]["augment"]
    assert (recorded["max_rotation"], recorded["brightness"], recorded["saturation"]) == (10, 0.2, 0.2)
    assert f"data/augmented/{NAME}" in {d["path"] for d in lock["train"]["deps"]}
    assert json.loads(_ok(run_cli(project, "dvc", "status", "--json"))) == {}
    out = _ok(run_cli(project, "dvc", "repro"))
    assert all(f"Stage '{s}' didn't change, skipping" in out for s in stages), out


def test_a_changed_file_in_the_folder_makes_dvc_rerun_its_ingest(added: tuple[Path, str]) -> None:
    project, _ = added
    folder = project / "data" / "raw" / NAME
    img, _ = _shape(1000)
    img.save(folder / "squares" / "000.png")  # replace one image with another picture
    status = json.loads(_ok(run_cli(project, "dvc", "status", "--json")))
    assert list(status) == [f"ingest@{NAME}"], status
    assert {"changed deps": {f"data/raw/{NAME}": "modified"}} in status[f"ingest@{NAME}"]
    out = _ok(run_cli(project, "dvc", "repro", f"ingest@{NAME}"))
    assert f"Running stage 'ingest@{NAME}'" in out
    status = json.loads(_ok(run_cli(project, "dvc", "status", "--json")))
    assert f"ingest@{NAME}" not in status and f"augment@{NAME}" in status  # the change flows downstream
