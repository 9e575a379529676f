"""The MLflow pyfunc that serves a generator: rows of (n, seed[, label]) in, uint8 images out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import mlflow.pyfunc

WEIGHTS_ARTIFACT = "generator"  # folder holding generator.safetensors + model.json


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Generates images from the exported generator weights (safetensors; nothing pickled but
    this class reference)."""

    def load_context(self, context):
        from aigc_pipeline.models.export import load_generator

        self.generator, self.arch = load_generator(context.artifacts[WEIGHTS_ARTIFACT], "cpu")

    def predict(self, context, model_input, params=None):
        """One row per request: ``n`` images from ``seed``. Returns uint8 [sum(n), C, H, W]."""
        from aigc_pipeline.models.export import generate

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"n", "seed"} - set(frame.columns)
        if missing:
            raise ValueError(f"model input needs columns n and seed; missing {sorted(missing)}")
        out = [generate(self.generator, self.arch, int(r.n), seed=int(r.seed)) for r in frame.itertuples()]
        return np.concatenate(out) if out else np.empty((0, self.arch.channels, self.arch.size, self.arch.size), np.uint8)


def signature_for(channels: int, size: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, size, size))]),
    )


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"n": [2], "seed": [0]})
