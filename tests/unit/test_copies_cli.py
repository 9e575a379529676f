"""`aigc copies GENERATED TRAIN --heldout HELDOUT --json` on real digits (tests/data/mnist-small):
training images with slight noise are nearly all copies; unseen real digits about the share the
threshold allows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigc_pipeline import cli
from aigc_pipeline.evaluation.errors import EvaluationError

pytestmark = pytest.mark.slow
MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist-small"


def _flat(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def test_copies_finds_noisy_training_images_and_not_unseen_ones(tmp_path: Path, capsys) -> None:
    files = sorted(MNIST.glob("*/*.png"))
    order = np.random.default_rng(0).permutation(len(files))
    digits = [np.asarray(Image.open(files[i]).convert("L")) for i in order[:270]]
    train = _flat(tmp_path / "train", digits[:150])
    heldout = _flat(tmp_path / "heldout", digits[150:230])
    unseen = _flat(tmp_path / "unseen", digits[230:270])
    rng = np.random.default_rng(1)
    noisy = [np.clip(d.astype(int) + rng.integers(-6, 7, d.shape), 0, 255).astype(np.uint8) for d in digits[:40]]
    copies = _flat(tmp_path / "copies", noisy)

    def run(generated: Path) -> dict:
        cli.main(["copies", str(generated), str(train), "--heldout", str(heldout), "--json"])
        return json.loads(capsys.readouterr().out)

    copied = run(copies)
    assert copied["copy_share"] >= 0.9, copied
    assert copied["copy_ct"] < -3, copied
    assert copied["exact_copies"] == 0  # noise changed every image's pixels
    # Why the check looks at pixels too: in Inception space alone faint noise hides the copies.
    spaces = copied["spaces"]
    assert spaces["pixels"]["copy_share"] >= 0.9 and spaces["inception"]["copy_share"] <= 0.3, spaces
    top = copied["most_copied"][0]
    assert int(Path(top["generated"]).stem) == int(Path(top["train"]).stem)  # noisy copy i ~ training image i

    fresh = run(unseen)
    assert fresh["copy_share"] <= 0.2, fresh
    assert abs(fresh["copy_ct"]) < 3, fresh
    assert fresh["floor_copy_share"] <= 0.2 and fresh["quantile"] == 0.05
    # Training images as the samples: each is its own exact copy.
    assert run(_flat(tmp_path / "exact", digits[:20]))["exact_copies"] == 20

    with pytest.raises(EvaluationError, match="--size"):
        small = _flat(tmp_path / "small", [d[:14, :14] for d in digits[:5]])
        cli.run_command(["copies", str(small), str(train)])
