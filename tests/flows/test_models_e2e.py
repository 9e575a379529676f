"""The other model families through the whole pipeline (`aigc run`: Prefect flow, DVC, MLflow),
all registering into the dataset's one registered model (`digits`), where they compete for its
champion: the VAE and a class-conditional GAN register and their registered pyfunc samples images
(of a requested label for the conditional one); the diffusion model trains, evaluates, registers
and is served by `mlflow models serve` with a `steps` input; a diverging training fails the flow
before register."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aigc_pipeline.models.export import generate, load_generator
from tests.conftest import QUICK, REGISTERED, copy_project, invoke, run_cli, served_model

pytestmark = pytest.mark.slow


def _sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
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
    assert f"{REGISTERED} v1 (vae): FID" in out and "champion: v1" in out, out[-2000:]
    client = _client(project)
    assert client.get_model_version(REGISTERED, "1").tags["aigc.family"] == "vae"
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@champion")
    images = model.predict(pd.DataFrame({"n": [4], "seed": [7]}))
    assert images.shape == (4, 1, 16, 16) and images.dtype == np.uint8 and images.std() > 0
    generator, arch = load_generator(project / "models" / "digits-vae")
    assert arch.family == "vae"
    assert (images == generate(generator, arch, 4, seed=7)).all()  # the registered weights are the trained ones
    assert (project / "models" / "digits-vae" / "epochs.csv").read_text().startswith("epoch,step,lr_vae,loss,")


def test_conditional_gan_registers_and_samples_the_requested_label(project: Path) -> None:
    import mlflow
    import pandas as pd

    _ok(run_cli(project, "aigc", "run", *_sets([*QUICK, "train.model=sngan", "train.conditional=true"])))
    meta = json.loads((project / "models" / "digits-sngan" / "model.json").read_text())
    assert meta["arch"]["num_classes"] == 10 and meta["classes"] == [str(d) for d in range(10)]
    receipt = json.loads((project / "registry" / "digits-sngan.json").read_text())
    # v2 of the same registered model: the gate compared it with the VAE's v1 under one protocol.
    assert receipt["name"] == REGISTERED and receipt["version"] == "2" and receipt["family"] == "sngan"
    assert receipt["decision"] in ("champion", "challenger") and "v1" in receipt["reason"]
    _client(project)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/2")
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


def test_diffusion_model_trains_registers_and_is_served_with_a_steps_input(project: Path) -> None:
    import mlflow
    import pandas as pd

    _ok(run_cli(project, "aigc", "run", *_sets([*QUICK, "train.model=ddpm", "train.sampling_steps=6"])))
    receipt = json.loads((project / "registry" / "digits-ddpm.json").read_text())
    assert receipt["name"] == REGISTERED and receipt["family"] == "ddpm" and receipt["version"] == "3"
    metrics = json.loads((project / "eval" / "digits" / "metrics.json").read_text())
    assert metrics["fid"] > metrics["floor_fid"] > 0
    meta = json.loads((project / "models" / "digits-ddpm" / "model.json").read_text())
    assert meta["generator"]["sampler"] == {"kind": "ddim", "steps": 6, "eta": 0.0}
    assert meta["generator"]["unet"]["sample_size"] == 16  # built from this config, nothing downloaded
    client = _client(project)
    version = client.get_model_version(REGISTERED, "3")
    assert version.tags["aigc.family"] == "ddpm"
    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    with served_model(f"models:/{REGISTERED}/3", uri, project / "serve-ddpm.log", cwd=project) as base:
        ok, default = invoke(base, [[3, 7]])
        ok2, fewer = invoke(base, [[3, 7, 2]], columns=("n", "seed", "steps"))
        bad, refused = invoke(base, [[3, 7, 0]], columns=("n", "seed", "steps"))
    assert (ok, ok2) == (200, 200), (default, fewer)
    default, fewer = np.array(default["predictions"]), np.array(fewer["predictions"])
    assert default.shape == fewer.shape == (3, 1, 16, 16) and not np.array_equal(default, fewer)
    assert bad == 400 and "sampling steps must be an integer from 1 to 1000, got 0" in refused["message"]
    # The served images are the registered sampler's, at its exported 6 steps and at 2.
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/3")
    generator, arch = load_generator(project / "models" / "digits-ddpm")
    assert np.array_equal(default, generate(generator, arch, 3, seed=7))
    assert np.array_equal(fewer, model.predict(pd.DataFrame({"n": [3], "seed": [7], "steps": [2]})))


def test_diverging_training_fails_the_flow_before_register(project: Path) -> None:
    client = _client(project)
    before = len(client.search_model_versions(f"name='{REGISTERED}'"))
    proc = run_cli(project, "aigc", "run", *_sets([*QUICK, "train.model=dcgan", "train.lr=1e6"]))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "training diverged at step" in output and "FAILED MLflow run" in output
    assert len(client.search_model_versions(f"name='{REGISTERED}'")) == before  # no new version
    assert not (project / "registry" / "digits-dcgan.json").exists()
    runs = client.search_runs(
        [client.get_experiment_by_name("aigc-pipeline").experiment_id], filter_string="tags.`aigc.model` = 'dcgan'"
    )
    (failed,) = runs
    assert failed.info.status == "FAILED" and "exploding gradient" in failed.data.tags["aigc.error"]
    assert failed.data.tags["prefect.flow_run_id"]  # recorded from inside the flow's train task
