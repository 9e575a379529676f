"""The served model's limits, against a real `mlflow models serve` on 127.0.0.1: a request or a row
over `register.max_images_per_request` / `max_images_per_row` gets HTTP 400 naming the limit,
before any image is generated, and the server keeps answering.

The model is logged by the register stage's own `_log_model` (pyfunc from code, model_config from
params.yaml) into a SQLite MLflow store; its generator is a tiny untrained one (the limits do not
depend on what it learned)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from aigc_pipeline.config import load_config
from aigc_pipeline.evaluation.results import Evaluation
from aigc_pipeline.models.base import Arch
from aigc_pipeline.models.blocks import Generator
from aigc_pipeline.models.export import read_model_meta, save_generator
from aigc_pipeline.tracking.store import use_store
from tests.conftest import REPO, invoke, served_model, server_alive

LIMITS = ["register.max_images_per_request=10", "register.max_images_per_row=4"]


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(tracking URI, runs:/ URI) of a pyfunc logged the way the register stage logs it."""
    import mlflow

    from aigc_pipeline.stages import register

    base = tmp_path_factory.mktemp("serving")
    folder = base / "model"
    torch.manual_seed(0)
    arch = Arch(family="dcgan", size=8, channels=1, latent_dim=8, width=4)
    save_generator(
        folder,
        Generator(arch.latent_dim, arch.size, arch.channels, arch.width).eval(),
        arch,
        {"model": "dcgan", "dataset": "tiny", "data_digest": "0" * 64, "steps": 0, "final_losses": {}},
    )
    rcfg = load_config(REPO, LIMITS).register
    project = base / "project"
    with use_store(project, "serving-limits"), mlflow.start_run() as run:
        uri = mlflow.get_tracking_uri()
        work = base / "work"
        work.mkdir()
        info, _ = register._log_model(
            work,
            folder,
            read_model_meta(folder),
            name="tiny-dcgan",
            evaluation=Evaluation({}, {}),
            params={},
            lineage={},
            problems=[],
            run_id=run.info.run_id,
            ui="http://127.0.0.1:5000",
            limits={
                "max_images_per_request": rcfg.max_images_per_request,
                "max_images_per_row": rcfg.max_images_per_row,
            },
        )
    return uri, info.model_uri


@pytest.fixture(scope="module")
def server(logged_model: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    uri, model_uri = logged_model
    with served_model(model_uri, uri, tmp_path_factory.mktemp("serve-log") / "serve.log") as base:
        yield base


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_requests_within_the_limits_are_served(server: str) -> None:
    status, body = invoke(server, [[4, 0], [4, 1], [2, 2]])  # 4 per row, 10 in all: both limits exactly
    assert status == 200
    assert np.array(body["predictions"]).shape == (10, 1, 8, 8)


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ([[5, 0]], "row 0: n=5 is over the limit of 4 images per row (max_images_per_row)"),
        (
            [[4, 0], [4, 1], [3, 2]],
            "at least 11 images (rows 0..2): over the limit of 10 images per request (max_images_per_request)",
        ),
        ([[1, s] for s in range(11)], "11 rows: over the limit of 10 images per request"),
        ([[10**12, 0]], "n=1000000000000 is over the limit of 4 images per row"),
        ([[0, 0]], "row 0: n must be >= 1"),
    ],
)
def test_requests_over_a_limit_get_400_naming_it(server: str, rows: list[list[int]], named: str) -> None:
    t0 = time.monotonic()
    status, body = invoke(server, rows)
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert named in body["message"], body["message"]
    assert "register.max_images_per_request" in body["message"] or "must be >= 1" in body["message"]
    assert time.monotonic() - t0 < 10, "refused before generating anything"
    assert server_alive(server)


def test_limits_apply_to_the_python_api_and_can_be_overridden(logged_model: tuple[str, str]) -> None:
    import mlflow
    import pandas as pd

    from aigc_pipeline.tracking.pyfunc import RequestRejected

    uri, model_uri = logged_model
    with use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(model_uri)
        assert model.model_config == {"max_images_per_request": 10, "max_images_per_row": 4}
        with pytest.raises(RequestRejected, match="max_images_per_row"):
            model.predict(pd.DataFrame({"n": [5], "seed": [0]}))
        with pytest.raises(ValueError, match="max_images_per_request"):  # RequestRejected is a ValueError too
            model.predict(pd.DataFrame({"n": [4, 4, 4], "seed": [0, 1, 2]}))
        wider = mlflow.pyfunc.load_model(model_uri, model_config={"max_images_per_row": 6, "max_images_per_request": 6})
        assert wider.predict(pd.DataFrame({"n": [6], "seed": [0]})).shape == (6, 1, 8, 8)
