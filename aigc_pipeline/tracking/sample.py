"""``aigc sample``: images from a registered (or logged) model, through its MLflow pyfunc."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aigc_pipeline.errors import AigcError


class SampleError(AigcError, ValueError):
    """The model URI or the sampling request is unusable; the message says why."""


def sample_grid(
    project_dir: Path | str,
    model_uri: str,
    n: int,
    out: Path,
    *,
    seed: int = 0,
    label: int | None = None,
    steps: int | None = None,
) -> tuple[Path, np.ndarray]:
    """Load ``model_uri`` from the project's MLflow store, generate ``n`` images, write a PNG grid."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from aigc_pipeline.images import save_grid
    from aigc_pipeline.tracking.store import use_tracking

    if n < 1:
        raise SampleError(f"-n must be >= 1, got {n}")
    with use_tracking(project_dir):
        try:
            model = mlflow.pyfunc.load_model(model_uri)
        except MlflowException as exc:
            raise SampleError(
                f"{model_uri}: cannot be loaded ({exc.message}); see `aigc status` for registered models and aliases"
            ) from exc
    request = {"n": [n], "seed": [seed]}
    if label is not None:
        request["label"] = [label]
    if steps is not None:
        request["steps"] = [steps]
    try:
        images = model.predict(pd.DataFrame(request))
    except ValueError as exc:  # e.g. a label for an unconditional model, steps for a GAN, out of range
        raise SampleError(f"{model_uri}: {exc}") from exc
    return save_grid(np.asarray(images, dtype=np.uint8), out), images
