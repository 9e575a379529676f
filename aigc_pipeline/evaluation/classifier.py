"""A classifier-based score for labelled datasets: the usual stand-in for Inception Score on
digit-like data, computed with a small classifier trained on the *real* training split.

The classifier is multinomial logistic regression on pixels (scaled to [0, 1]); its accuracy on
the real eval split is recorded beside every score, so a reader can tell how much the score
means (about 0.9 on the bundled digits; much less on natural images). It is trained once per
(training split content, eval split content, settings, scikit-learn version) and cached as plain
arrays (``.npz``, no pickle), written atomically.

Scores, for generated images x with class probabilities p(y|x):

- **classifier score**: exp(E_x KL(p(y|x) || p(y))), p(y) the mean over the set; 1 (no class
  structure) to the number of classes (confident and balanced). Not an Inception Score.
- **label accuracy** (class-conditional models only): the share of images the classifier
  assigns to the class they were generated for.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from aigc_pipeline.data.prepared import PreparedData, load_prepared
from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.io import atomic_write_bytes

__all__ = ["PixelClassifier", "classifier_score", "label_accuracy", "load_or_train_classifier"]

KIND = "logreg"
_VERSION = 1
_MAX_ITER = 2000
_MAX_TRAIN = 10_000  # first images of the train split; keeps training to seconds on big sets


@dataclass(frozen=True)
class PixelClassifier:
    """Multinomial logistic regression over flattened pixels in [0, 1]."""

    coef: np.ndarray  # float64 [K, C*H*W]
    intercept: np.ndarray  # float64 [K]
    shape: tuple[int, int, int]  # (C, H, W) of the images it reads
    classes: tuple[str, ...]
    accuracy: float  # on the real eval split
    key: str  # content hash of what it was trained on and how
    from_cache: bool

    @property
    def id(self) -> str:
        """``logreg-<key8>``: names the classifier (and so its training data) in metric keys."""
        return f"{KIND}-{self.key[:8]}"

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities [N, K] of uint8 images [N, C, H, W]."""
        if tuple(images.shape[1:]) != self.shape:
            raise EvaluationError(
                f"classifier {self.id} reads images of shape {self.shape}, got {tuple(images.shape[1:])}"
            )
        logits = _flat(images) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def load_or_train_classifier(prepared: Path, *, cache_dir: Path | None = None) -> PixelClassifier | None:
    """The classifier for the prepared dataset at ``prepared``, from the cache or trained now.

    Returns None when the dataset has no labels (or a single class), so there is nothing to score.
    """
    train = load_prepared(prepared, "train")
    if train.num_classes < 2 or (train.labels < 0).any():
        return None
    evaluation = load_prepared(prepared, "eval")
    settings = {
        "kind": KIND,
        "version": _VERSION,
        "max_iter": _MAX_ITER,
        "max_train": _MAX_TRAIN,
        "sklearn": _sklearn_version(),
    }
    key = hashlib.sha256(
        json.dumps({"train": train.digest, "eval": evaluation.digest, **settings}, sort_keys=True).encode()
    ).hexdigest()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "classifier" / f"{KIND}-{key}.npz"
    if path.is_file():
        return _load(path, key)
    clf = _train(train, evaluation, key)
    buf = io.BytesIO()
    np.savez(
        buf,
        coef=clf.coef,
        intercept=clf.intercept,
        shape=np.array(clf.shape),
        accuracy=np.array(clf.accuracy),
        classes=np.array(json.dumps(list(clf.classes))),
    )
    atomic_write_bytes(path, buf.getvalue())
    return clf


def classifier_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over the set; in [1, number of classes]."""
    eps = 1e-12
    marginal = probs.mean(axis=0, keepdims=True)
    kl = (probs * (np.log(probs + eps) - np.log(marginal + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose most likely class is the one they were generated for."""
    return float((probs.argmax(axis=1) == labels).mean())


def _train(train: PreparedData, evaluation: PreparedData, key: str) -> PixelClassifier:
    from sklearn.linear_model import LogisticRegression

    x, y = _flat(train.images[:_MAX_TRAIN]), train.labels[:_MAX_TRAIN]
    if len(np.unique(y)) < 2:
        raise EvaluationError(
            f"{train.root}: the first {_MAX_TRAIN} training images hold a single class; "
            "the classifier score needs at least two"
        )
    model = LogisticRegression(max_iter=_MAX_ITER).fit(x, y)
    # Rows for every class id 0..K-1, in order, even if a class is missing from the train split.
    k = train.num_classes
    coef = np.full((k, x.shape[1]), 0.0)
    intercept = np.full(k, -1e9)
    if len(model.classes_) == 2:
        # Binary: sigmoid(w.x + b) is a softmax over logits (0, w.x + b).
        first, second = (int(c) for c in model.classes_)
        intercept[first] = 0.0
        coef[second], intercept[second] = model.coef_[0], model.intercept_[0]
    else:
        for row, cls in enumerate(model.classes_):
            coef[int(cls)] = model.coef_[row]
            intercept[int(cls)] = model.intercept_[row]
    probe = PixelClassifier(coef, intercept, tuple(train.images.shape[1:]), train.classes, 0.0, key, False)
    accuracy = label_accuracy(probe.predict_proba(evaluation.images), evaluation.labels)
    return PixelClassifier(coef, intercept, probe.shape, train.classes, accuracy, key, from_cache=False)


def _load(path: Path, key: str) -> PixelClassifier:
    try:
        with np.load(path, allow_pickle=False) as d:
            return PixelClassifier(
                d["coef"],
                d["intercept"],
                # saved from clf.shape, a (C, H, W) triple
                cast(tuple[int, int, int], tuple(int(s) for s in d["shape"])),
                tuple(json.loads(str(d["classes"]))),
                float(d["accuracy"]),
                key,
                from_cache=True,
            )
    except (OSError, ValueError, KeyError) as exc:
        raise EvaluationError(
            f"cached classifier {path} cannot be read ({exc}); delete the file to retrain it"
        ) from exc


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def _sklearn_version() -> str:
    from importlib import metadata

    return metadata.version("scikit-learn")
