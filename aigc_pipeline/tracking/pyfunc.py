"""The MLflow pyfunc that serves a generator: rows of (n, seed[, label][, steps]) in, uint8 images out.

Every request is checked against two limits before any image is generated: at most
``max_images_per_row`` images in one row and ``max_images_per_request`` in the whole request
(``register.max_images_per_row`` / ``register.max_images_per_request`` in params.yaml, stored in
the logged model's ``model_config``). Without them one request (``n = 10**9``) would exhaust the
memory of ``mlflow models serve``. A request over a limit is refused with an
:class:`~mlflow.exceptions.MlflowException` of code ``INVALID_PARAMETER_VALUE``, which MLflow's
scoring server answers with HTTP 400 and the message naming the limit. The limits can be changed
without re-registering: ``mlflow.pyfunc.load_model(uri, model_config={...})``, or for
``mlflow models serve`` the environment variable ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` (JSON).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

WEIGHTS_ARTIFACT = "generator"  # folder holding generator.safetensors + model.json
CARD_ARTIFACT = "model_card"  # model_card.md

# Models logged before the limits existed (no model_config) get these. A 32 px grayscale image is
# 1 KiB of uint8 but ~4 KiB of JSON in a response, a 128 px RGB one 48 KiB and ~200 KiB.
DEFAULT_MAX_IMAGES_PER_REQUEST = 1024
DEFAULT_MAX_IMAGES_PER_ROW = 256
_LIMIT_KEYS = ("max_images_per_request", "max_images_per_row")


class RequestRejected(MlflowException, ValueError):
    """A request the model refuses (over a limit, malformed); HTTP 400 from the scoring server.

    A ``ValueError`` too, so callers of ``predict`` (``aigc sample``) handle it like any bad input.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def model_config(*, max_images_per_request: int, max_images_per_row: int) -> dict[str, int]:
    """The ``model_config`` to log with the model: its serving limits."""
    return {"max_images_per_request": int(max_images_per_request), "max_images_per_row": int(max_images_per_row)}


def serving_limits(config: Mapping[str, Any] | None) -> tuple[int, int]:
    """``(max_images_per_request, max_images_per_row)`` from a model's ``model_config``."""
    config = dict(config or {})
    values = []
    for key, default in zip(_LIMIT_KEYS, (DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_IMAGES_PER_ROW)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MlflowException(
                f"model_config {key} must be a positive integer, got {value!r}", error_code=INVALID_PARAMETER_VALUE
            )
        values.append(value)
    return values[0], values[1]


class GeneratorModel(PythonModel):
    """Generates images from the exported generator weights (safetensors). Logged from code
    (``pyfunc_model.py``), so the model holds no pickle at all."""

    def load_context(self, context):
        from aigc_pipeline.models.export import load_generator

        self.generator, self.arch = load_generator(context.artifacts[WEIGHTS_ARTIFACT], "cpu")
        self.max_images_per_request, self.max_images_per_row = serving_limits(context.model_config)

    # The pandas hint tells MLflow there is nothing to infer from it (the signature is explicit).
    def predict(self, context, model_input: pd.DataFrame, params=None):
        """One row per request: ``n`` images from ``seed`` (of class ``label`` for a conditional
        model; classes cycle when it is missing or -1; ``steps`` sampling steps for a diffusion
        model, its exported default when missing or -1). Returns uint8 [sum(n), C, H, W].

        Raises :class:`RequestRejected` (HTTP 400 when served) for a request over
        ``max_images_per_row`` / ``max_images_per_request`` or with a malformed row, before any
        image is generated.
        """
        from aigc_pipeline.models.export import generate

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        rows = self._rows(frame)
        out = []
        for n, seed, label, steps in rows:
            try:
                out.append(generate(self.generator, self.arch, n, seed=seed, label=label, steps=steps))
            except ValueError as e:  # a label the model does not know, steps for a GAN or out of range
                raise RequestRejected(str(e)) from e
        return (
            np.concatenate(out) if out else np.empty((0, self.arch.channels, self.arch.size, self.arch.size), np.uint8)
        )

    def _rows(self, frame: pd.DataFrame) -> list[tuple[int, int, int | None, int | None]]:
        """``(n, seed, label, steps)`` per row, every row and the total checked against the limits."""
        missing = {"n", "seed"} - set(frame.columns)
        if missing:
            raise RequestRejected(f"model input needs columns n and seed; missing {sorted(missing)}")
        if len(frame) > self.max_images_per_request:  # each row asks for at least one image
            raise RequestRejected(
                f"{len(frame)} rows: over the limit of {self.max_images_per_request} images per "
                f"request (max_images_per_request){_HOW_TO_RAISE}"
            )
        rows, total = [], 0
        for i, r in enumerate(frame.itertuples()):
            n, seed = _integer(r.n, f"row {i}: n"), _integer(r.seed, f"row {i}: seed")
            if n < 1:
                raise RequestRejected(f"row {i}: n must be >= 1, got {n}")
            if n > self.max_images_per_row:
                raise RequestRejected(
                    f"row {i}: n={n} is over the limit of {self.max_images_per_row} images per row "
                    f"(max_images_per_row){_HOW_TO_RAISE}"
                )
            total += n
            if total > self.max_images_per_request:
                raise RequestRejected(
                    f"the request asks for at least {total} images (rows 0..{i}): over the limit "
                    f"of {self.max_images_per_request} images per request "
                    f"(max_images_per_request){_HOW_TO_RAISE}"
                )
            rows.append((n, seed, _optional(r, "label", i), _optional(r, "steps", i)))
        return rows


_HOW_TO_RAISE = (
    "; split it into smaller requests, or raise the limit: register.max_images_per_request / "
    "register.max_images_per_row in params.yaml when registering, model_config=... in "
    "mlflow.pyfunc.load_model, or MLFLOW_PYFUNC_INFERENCE_CONFIG for mlflow models serve"
)


def _integer(value: Any, what: str) -> int:
    """``value`` as an int, refusing NaN, fractions and non-numbers (a float n would be truncated)."""
    if isinstance(value, (bool, np.bool_)):
        raise RequestRejected(f"{what} must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise RequestRejected(f"{what} must be an integer, got {value!r}")


def _optional(row: Any, column: str, i: int) -> int | None:
    """An optional integer column of a request row: None when absent, empty or negative."""
    value = getattr(row, column, None)
    value = None if value is None or pd.isna(value) else _integer(value, f"row {i}: {column}")
    return None if value is None or value < 0 else value


def signature_for(channels: int, size: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("long", "n"),
                ColSpec("long", "seed"),
                ColSpec("long", "label", required=False),
                ColSpec("long", "steps", required=False),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, size, size))]),
    )


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"n": [2], "seed": [0]})
