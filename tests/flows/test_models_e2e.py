"""The other model families through the whole pipeline (`aigc run`: Prefect flow, DVC, MLflow):
the VAE and a class-conditional GAN register and their registered pyfunc samples images (of a
requested label for the conditional one); a diverging training fails the flow before register."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aigc_pipeline.models.export import generate, load_generator
from tests.conftest import QUICK, copy_project, run_cli

pytestmark = pytest.mark.slow


def _sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def _ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tmp_path_factory.mktemp("models") / "project")


def _client(project: Path):
    import mlflow

    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_vae_registers_and_its_pyfunc_samples_images(project: Path) -> None:
    import mlflow
    import pandas as pd

    out = _ok(run_cli(project, "aigc", "run", *_sets([*QUICK, "train.model=vae"])))
    assert "digits-vae v1: FID" in out and "champion" in out, out[-2000:]
    _client(project)
    model = mlflow.pyfunc.load_model("models:/digits-vae@champion")
    images = model.predict(pd.DataFrame({"n": [4], "seed": [7]}))
    assert images.shape == (4, 1, 16, 16) and images.dtype == np.uint8 and images.std() > 0
    generator, arch = load_generator(project / "models" / "digits-vae")
    assert arch.family == "vae"
    assert (images == generate(generator, arch, 4, seed=7)).all()  # the registered weights are the trained ones
    assert (project / "models" / "digits-vae" / "epochs.csv").read_text().startswith("epoch,step,images_per_s")


def test_conditional_gan_registers_and_samples_the_requested_label(project: Path) -> None:
    import mlflow
    import pandas as pd

    _ok(run_cli(project, "aigc", "run", *_sets([*QUICK, "train.model=sngan", "train.conditional=true"])))
    meta = json.loads((project / "models" / "digits-sngan" / "model.json").read_text())
    assert meta["arch"]["num_classes"] == 10 and meta["classes"] == [str(d) for d in range(10)]
    _client(project)
    model = mlflow.pyfunc.load_model("models:/digits-sngan@champion")
    generator, arch = load_generator(project / "models" / "digits-sngan")
    by_label = {}
    for label in (3, 7):
        images = model.predict(pd.DataFrame({"n": [6], "seed": [1], "label": [label]}))
        assert images.shape == (6, 1, 16, 16) and images.dtype == np.uint8
        # Exactly the trained conditional generator's images for that label...
        assert (images == generate(generator, arch, 6, seed=1, label=label)).all()
        by_label[label] = images
    # ...and the label changes them (same latent vectors). Whether they look like the digit is
    # checked with a classifier on a longer training in tests/stages/test_conditional.py.
    assert not (by_label[3] == by_label[7]).all()


def test_diverging_training_fails_the_flow_before_register(project: Path) -> None:
    proc = run_cli(project, "aigc", "run", *_sets([*QUICK, "train.model=dcgan", "train.lr=1e6"]))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "training diverged at step" in output and "FAILED MLflow run" in output
    client = _client(project)
    assert "digits-dcgan" not in {m.name for m in client.search_registered_models()}
    assert not (project / "registry" / "digits-dcgan.json").exists()
    runs = client.search_runs([client.get_experiment_by_name("aigc-pipeline").experiment_id],
                              filter_string="tags.`aigc.model` = 'dcgan'")
    (failed,) = runs
    assert failed.info.status == "FAILED" and "exploding gradient" in failed.data.tags["aigc.error"]
    assert failed.data.tags["prefect.flow_run_id"]  # recorded from inside the flow's train task
