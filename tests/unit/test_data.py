"""Prepared-dataset format, normalisation, deterministic split and augmentation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from aigc_pipeline.config import AugmentConfig
from aigc_pipeline.data.augment import augment_image, image_rng
from aigc_pipeline.data.normalize import normalize
from aigc_pipeline.data.prepared import load_prepared, split_for, write_prepared
from aigc_pipeline.errors import DataError
from aigc_pipeline.io import atomic_dir


def _row(img: np.ndarray, i: int, label: str | None) -> dict:
    sha = hashlib.sha256(img.tobytes()).hexdigest()
    return {"key": f"img{i}", "sha256": sha, "label": label, "split": split_for(sha, 0.3)}


def test_normalize_channels_and_size() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = normalize(gray, size=32, channels=3)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()  # gray -> RGB repeats the channel
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    out = normalize(rgb, size=16, channels=1)
    assert out.shape == (1, 16, 16)
    assert abs(int(out[0, 8, 8]) - 76) <= 1  # ITU-R 601 luma of pure red: 0.299 * 255


def test_split_is_a_function_of_content() -> None:
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    splits = [split_for(s, 0.2) for s in shas]
    assert splits == [split_for(s, 0.2) for s in shas]
    share = splits.count("eval") / len(splits)
    assert 0.17 < share < 0.23


def test_prepared_round_trip_and_digest(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(50, 1, 8, 8), dtype=np.uint8)
    labels = [str(i % 3) if i % 5 else None for i in range(50)]
    with atomic_dir(tmp_path / "ds") as tmp:
        meta = write_prepared(tmp, ((im, _row(im, i, lab)) for i, (im, lab) in enumerate(zip(imgs, labels))),
                              size=8, channels=1)
    data = load_prepared(tmp_path / "ds")
    assert meta["count"] == 50 and data.classes == ("0", "1", "2")
    assert (data.images == imgs).all()
    expected = [-1 if lab is None else int(lab) for lab in labels]
    assert data.labels.tolist() == expected
    train, evals = load_prepared(tmp_path / "ds", "train"), load_prepared(tmp_path / "ds", "eval")
    assert len(train.images) + len(evals.images) == 50
    assert len({data.digest, train.digest, evals.digest}) == 3

    # The digest follows the content: one changed pixel changes it.
    imgs2 = imgs.copy()
    imgs2[7, 0, 0, 0] ^= 1
    with atomic_dir(tmp_path / "ds2") as tmp:
        meta2 = write_prepared(tmp, ((im, _row(im, i, lab)) for i, (im, lab) in enumerate(zip(imgs2, labels))),
                               size=8, channels=1)
    assert meta2["digest"] != meta["digest"]


def test_failed_write_keeps_previous_dataset(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("previous good version")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ds") as tmp:
            (tmp / "partial").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "ds" / "keep.txt").read_text() == "previous good version"
    assert not list(tmp_path.glob(".ds.tmp-*"))


def test_missing_prepared_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_prepared(tmp_path / "nope")


def test_augmentation_is_seeded_and_changes_images() -> None:
    img = np.random.default_rng(1).integers(0, 256, size=(1, 16, 16), dtype=np.uint8)
    cfg = AugmentConfig(seed=3, copies=1, hflip=True, max_shift=2)
    a = [augment_image(img, cfg, image_rng(3, i, 0)) for i in range(20)]
    b = [augment_image(img, cfg, image_rng(3, i, 0)) for i in range(20)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert all(x.shape == img.shape for x in a)
    assert sum(not (x == img).all() for x in a) >= 15
    c = [augment_image(img, cfg, image_rng(4, i, 0)) for i in range(20)]
    assert any(not (x == y).all() for x, y in zip(a, c))


def test_flip_and_shift_do_what_they_say() -> None:
    img = np.zeros((1, 8, 8), dtype=np.uint8)
    img[0, 2, 1] = 200
    flipped = augment_image(img, AugmentConfig(hflip=True, max_shift=0), _AlwaysRng())
    assert flipped[0, 2, 6] == 200 and flipped.sum() == 200
    shifted = augment_image(img, AugmentConfig(hflip=False, max_shift=1), _AlwaysRng(shift=(2, 0)))
    assert shifted[0, 1, 2] == 200  # padded by 1, cropped at (dy=2, dx=0): moves up 1, right 1


class _AlwaysRng:
    """A stand-in generator with fixed draws, to check the geometry exactly."""

    def __init__(self, shift: tuple[int, int] = (0, 0)) -> None:
        self.shift = shift

    def random(self) -> float:
        return 0.0

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        return np.array(self.shift)
