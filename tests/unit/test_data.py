"""Prepared-dataset format, normalisation, deterministic split and augmentation."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from aigc_pipeline.config import AugmentConfig
from aigc_pipeline.data.augment import augment_image, color_jitter, image_rng, rotate
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
        meta = write_prepared(
            tmp, ((im, _row(im, i, lab)) for i, (im, lab) in enumerate(zip(imgs, labels))), size=8, channels=1
        )
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
        meta2 = write_prepared(
            tmp, ((im, _row(im, i, lab)) for i, (im, lab) in enumerate(zip(imgs2, labels))), size=8, channels=1
        )
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

    def __init__(self, shift: tuple[int, int] = (0, 0), uniform: list[float] | None = None) -> None:
        self.shift = shift
        self.draws = list(uniform or [])

    def random(self) -> float:
        return 0.0

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        return np.array(self.shift)

    def uniform(self, low: float, high: float) -> float:
        value = self.draws.pop(0)
        assert low <= value <= high, (low, value, high)
        return value


def _rgb(seed: int = 0, size: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(3, size, size), dtype=np.uint8)


@pytest.mark.parametrize("size", [8, 9])
def test_rotation_by_quarter_turns_is_exact_and_counter_clockwise(size: int) -> None:
    img = _rgb(size=size)
    assert (rotate(img, 0) == img).all()
    assert (rotate(img, 90) == np.rot90(img, 1, axes=(1, 2))).all()  # counter-clockwise as displayed
    assert (rotate(img, -90) == np.rot90(img, -1, axes=(1, 2))).all()
    assert (rotate(img, 180) == img[:, ::-1, ::-1]).all()


def test_small_rotation_repeats_edges_instead_of_black_corners() -> None:
    flat = np.full((1, 16, 16), 180, dtype=np.uint8)
    assert (rotate(flat, 13.0) == 180).all()  # no invented border
    bar = np.zeros((1, 15, 15), dtype=np.uint8)
    bar[0, 7, :] = 255  # a horizontal line through the centre
    turned = rotate(bar, 10.0)
    assert turned[0, 7, 7] == 255  # the centre stays
    assert turned[0, 7, 0] < 255 and turned[0, 7 + 1, 0] > 0  # the left end moved down (counter-clockwise)


def test_color_jitter_factors_do_what_they_say() -> None:
    img = np.zeros((3, 4, 4), dtype=np.uint8)
    img[:, :2] = np.array([100, 50, 20], dtype=np.uint8)[:, None, None]
    img[:, 2:] = np.array([10, 200, 60], dtype=np.uint8)[:, None, None]
    assert (color_jitter(img, 1.5, 1.0, 1.0)[:, 0, 0] == [150, 75, 30]).all()
    assert color_jitter(img, 3.0, 1.0, 1.0)[1, 3, 0] == 255  # clipped, not wrapped
    gray = color_jitter(img, 1.0, 1.0, 0.0)  # saturation 0: each pixel becomes its own luma
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert gray[0, 0, 0] == round(0.299 * 100 + 0.587 * 50 + 0.114 * 20)
    flat = color_jitter(img, 1.0, 0.0, 1.0)  # contrast 0: every value becomes the mean luma
    assert len(np.unique(flat)) == 1
    assert (color_jitter(img, 1.0, 1.0, 1.0) == img).all()
    with pytest.raises(ValueError, match="RGB"):
        color_jitter(img[:1], 1.2, 1.0, 1.0)


def test_rotation_and_jitter_draws_and_grayscale_left_alone() -> None:
    cfg = AugmentConfig(hflip=False, max_shift=0, max_rotation=90, brightness=0.5, contrast=0.5, saturation=0.5)
    img = _rgb(seed=2)
    out = augment_image(img, cfg, _AlwaysRng(uniform=[90.0, 1.5, 1.0, 1.0]))
    assert (out == color_jitter(np.rot90(img, 1, axes=(1, 2)), 1.5, 1.0, 1.0)).all()
    # Colour jitter is for RGB only: a grayscale image is only rotated (one draw, no jitter draws).
    gray = img[:1]
    rng = _AlwaysRng(uniform=[-90.0])
    assert (augment_image(gray, cfg, rng) == np.rot90(gray, -1, axes=(1, 2))).all() and rng.draws == []


def test_new_operations_leave_the_old_draws_alone() -> None:
    img = _rgb(seed=3, size=16)
    old = AugmentConfig(seed=5, hflip=True, max_shift=2)
    new = AugmentConfig(seed=5, hflip=True, max_shift=2, max_rotation=0, brightness=0.0)
    assert all(
        (augment_image(img, old, image_rng(5, i, 0)) == augment_image(img, new, image_rng(5, i, 0))).all()
        for i in range(10)
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("augment.max_rotation=200", "augment.max_rotation: must be in [0, 180]"),
        ("augment.brightness=1.5", "augment.brightness: must be in [0, 1]"),
        ("augment.saturation=-0.1", "augment.saturation: must be in [0, 1]"),
    ],
)
def test_augment_options_are_validated(override: str, message: str) -> None:
    from aigc_pipeline.config import load_config
    from aigc_pipeline.errors import ConfigError
    from tests.conftest import REPO

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO, [override])


def test_augment_stage_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    """The whole stage, every operation on, on an RGB dataset: same seed -> the same bytes."""
    from aigc_pipeline.config import load_config
    from aigc_pipeline.stages import augment
    from tests.conftest import REPO

    imgs = np.random.default_rng(0).integers(0, 256, size=(40, 3, 16, 16), dtype=np.uint8)
    with atomic_dir(tmp_path / "prepared") as tmp:
        write_prepared(tmp, ((im, _row(im, i, None)) for i, im in enumerate(imgs)), size=16, channels=3)
    on = [
        "augment.copies=2",
        "augment.hflip=true",
        "augment.max_rotation=15",
        "augment.brightness=0.3",
        "augment.contrast=0.3",
        "augment.saturation=0.3",
    ]
    runs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["augment.seed=1"])):
        augment.run(load_config(REPO, on + extra), tmp_path / "prepared", tmp_path / name)
        runs[name] = {f.name: f.read_bytes() for f in sorted((tmp_path / name).iterdir())}
    assert runs["a"] == runs["b"]
    assert runs["a"]["shard-00000.npy"] != runs["c"]["shard-00000.npy"]
    report = json.loads(runs["a"]["report.json"])
    assert report["augment"]["max_rotation"] == 15 and report["color_jitter_applied"] is True
    data = load_prepared(tmp_path / "a")
    originals = data.images[::3]
    assert (originals == load_prepared(tmp_path / "prepared", "train").images).all()  # originals kept as they were
    assert sum(not (a == o).all() for a, o in zip(data.images[1::3], originals)) == len(originals)
