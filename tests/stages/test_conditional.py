"""Class-conditional models generate the class they are asked for, judged by a classifier
trained on the real digits (not on anything the model produced)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from aigc_pipeline.config import load_config
from aigc_pipeline.data.prepared import PreparedData, load_prepared
from aigc_pipeline.models.base import Arch, Hparams
from aigc_pipeline.models.export import generate
from aigc_pipeline.stages import ingest
from aigc_pipeline.training.loop import train
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, LogisticRegression]:
    out = tmp_path_factory.mktemp("cond") / "prepared"
    ingest.run(load_config(REPO, ["datasets.digits.size=16"]), out)
    train_split, eval_split = load_prepared(out, "train"), load_prepared(out, "eval")
    clf = LogisticRegression(max_iter=2000).fit(_flat(train_split.images), train_split.labels)
    assert clf.score(_flat(eval_split.images), eval_split.labels) > 0.9  # the judge itself is good
    return train_split, clf


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1) / 255.0


@pytest.mark.parametrize(("family", "min_mean", "min_class"), [("dcgan", 0.6, 0.4), ("vae", 0.5, 0.3)])
def test_conditional_samples_are_the_requested_digit(
    digits: tuple[PreparedData, LogisticRegression], family: str, min_mean: float, min_class: float
) -> None:
    data, clf = digits
    arch = Arch(family=family, size=16, channels=1, latent_dim=32, width=32, num_classes=10)
    res = train(
        data.images,
        labels=data.labels,
        arch=arch,
        hparams=Hparams(2e-4, 0.5, 0.999, 1.0),
        epochs=12,
        batch_size=64,
        seed=0,
        checkpoint_dir=None,
        checkpoint_every=10_000,
    )
    g = res.family.generator.eval()
    accuracy = [float((clf.predict(_flat(generate(g, arch, 40, seed=k, label=k))) == k).mean()) for k in range(10)]
    # Chance is 0.1: a model ignoring its label cannot pass.
    assert np.mean(accuracy) > min_mean, accuracy
    assert min(accuracy) > min_class, accuracy
