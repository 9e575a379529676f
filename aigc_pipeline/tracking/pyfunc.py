"""The MLflow pyfunc that serves a generator: rows of (n, seed[, label][, steps]) in, uint8 images out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import mlflow.pyfunc

WEIGHTS_ARTIFACT = "generator"  # folder holding generator.safetensors + model.json
CARD_ARTIFACT = "model_card"  # model_card.md


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Generates images from the exported generator weights (safetensors). Logged from code
    (``pyfunc_model.py``), so the model holds no pickle at all."""

    def load_context(self, context):
        from aigc_pipeline.models.export import load_generator

        self.generator, self.arch = load_generator(context.artifacts[WEIGHTS_ARTIFACT], "cpu")

    # The pandas hint tells MLflow there is nothing to infer from it (the signature is explicit).
    def predict(self, context, model_input: pd.DataFrame, params=None):
        """One row per request: ``n`` images from ``seed`` (of class ``label`` for a conditional
        model; classes cycle when it is missing or -1; ``steps`` sampling steps for a diffusion
        model, its exported default when missing or -1). Returns uint8 [sum(n), C, H, W]."""
        from aigc_pipeline.models.export import generate

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"n", "seed"} - set(frame.columns)
        if missing:
            raise ValueError(f"model input needs columns n and seed; missing {sorted(missing)}")
        out = []
        for r in frame.itertuples():
            label, steps = _optional(r, "label"), _optional(r, "steps")
            out.append(generate(self.generator, self.arch, int(r.n), seed=int(r.seed), label=label, steps=steps))
        return np.concatenate(out) if out else np.empty((0, self.arch.channels, self.arch.size, self.arch.size), np.uint8)


def _optional(row, column: str) -> int | None:
    """An optional integer column of a request row: None when absent, empty or negative."""
    value = getattr(row, column, None)
    return None if value is None or pd.isna(value) or int(value) < 0 else int(value)


def signature_for(channels: int, size: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed"), ColSpec("long", "label", required=False),
                       ColSpec("long", "steps", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, size, size))]),
    )


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"n": [2], "seed": [0]})
