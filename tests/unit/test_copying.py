"""The data-copying check: copies are found, unseen data is not, and the gate refuses a copier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc_pipeline.evaluation.copying import COPY_QUANTILE, copying_report, mann_whitney_z, nearest_neighbours
from aigc_pipeline.evaluation.gate import quality_bar
from aigc_pipeline.evaluation.metrics import copying_text, names
from aigc_pipeline.evaluation.results import Evaluation, write_evaluation


def _data(seed: int = 0, n_train: int = 600, n_heldout: int = 400, dim: int = 32):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (6, dim))  # a clustered distribution, as real features are

    def draw(n: int) -> torch.Tensor:
        return torch.from_numpy(centres[rng.integers(0, len(centres), n)] + rng.normal(0, 1, (n, dim))).float()

    pixels = fresh_pixels(n_train, rng)
    return draw, draw(n_train), pixels, draw(n_heldout), fresh_pixels(n_heldout, rng)


def fresh_pixels(n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Images unrelated to any other (uniform noise): never a copy in pixel space."""
    return (rng or np.random.default_rng(n)).integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)


def test_a_model_that_replays_its_training_images_is_reported_as_copying() -> None:
    draw, train, pixels, heldout, hpix = _data()
    pick = np.random.default_rng(1).integers(0, len(train), 300)
    copies = train[torch.from_numpy(pick)] + 0.01 * torch.randn(300, train.shape[1])  # "slight noise"
    report = copying_report(copies, pixels[pick], train, pixels, heldout, hpix, seed=0)
    assert report.copy_share > 0.95
    assert report.copy_ct is not None and report.copy_ct < -3
    assert report.exact_copies == 300  # their pixels are the training images'
    assert report.floor_copy_ct is not None and abs(report.floor_copy_ct) < 3
    assert (report.nearest == pick).mean() > 0.95


def test_unseen_data_copies_about_the_share_the_threshold_allows() -> None:
    draw, train, pixels, heldout, hpix = _data()
    fresh = draw(400)
    report = copying_report(fresh, fresh_pixels(400), train, pixels, heldout, hpix, seed=0)
    assert report.copy_share == pytest.approx(COPY_QUANTILE, abs=0.04)
    assert report.floor_copy_share == pytest.approx(COPY_QUANTILE, abs=0.04)
    assert report.copy_ct is not None and abs(report.copy_ct) < 3
    assert report.exact_copies == 0


def test_without_held_out_images_the_training_images_calibrate_left_out_one_at_a_time() -> None:
    draw, train, pixels, _, _ = _data()
    fresh = draw(300)
    unseen = copying_report(fresh, fresh_pixels(300), train, pixels, None, None, seed=0)
    assert unseen.copy_share == pytest.approx(COPY_QUANTILE, abs=0.05)
    assert unseen.copy_ct is not None and abs(unseen.copy_ct) < 3
    # Without leaving each one out, every training image would be its own neighbour at distance 0.
    assert unseen.spaces["inception"]["threshold"] > 0.5
    pick = np.arange(300)
    copied = copying_report(train[:300] + 0.01, pixels[pick], train, pixels, None, None, seed=0)
    assert copied.copy_share > 0.95 and copied.copy_ct < -3


def test_nearest_neighbours_can_leave_a_row_out() -> None:
    keys = torch.tensor([[0.0], [1.0], [5.0]])
    dist, idx = nearest_neighbours(keys, keys, np.array([0, 1, -1]))
    assert idx.tolist() == [1, 0, 2] and dist.tolist() == [1.0, 1.0, 0.0]


def test_mann_whitney_z_matches_scipy() -> None:
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, 40), np.round(rng.normal(0.3, 1, 55), 1)  # ties in y
    u = mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=False).statistic
    n1, n2 = len(x), len(y)
    expected = (u - n1 * n2 / 2) / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)  # no tie correction, as Meehan et al.
    assert mann_whitney_z(x, y) == pytest.approx(expected, rel=1e-12)
    assert mann_whitney_z(x - 10, y) < -7


def _evaluation(**metrics: float) -> Evaluation:
    return Evaluation(metrics, {"protocol": {"id": "incv3-test"}})


def test_the_gate_refuses_a_copier_naming_its_figures() -> None:
    copier = _evaluation(
        fid=20.0,
        floor_fid=19.0,
        copy_share=0.9,
        floor_copy_share=0.05,
        copy_ct=-12.5,
        floor_copy_ct=0.3,
        exact_copies=270,
    )
    (share,) = quality_bar(copier, max_fid_ratio=3.0, max_copy_share=0.2)
    assert "copy_share 0.900 (real data 0.050)" in share and "C_T -12.50 (real data 0.30)" in share
    assert "270 exact copies" in share and "register.max_copy_share 0.2" in share
    (ct,) = quality_bar(copier, max_fid_ratio=3.0, min_copy_ct=-3.0)
    assert "register.min_copy_ct -3" in ct
    honest = _evaluation(fid=20.0, floor_fid=19.0, copy_share=0.04, floor_copy_share=0.05, copy_ct=1.2)
    assert quality_bar(honest, max_fid_ratio=3.0, max_copy_share=0.2, min_copy_ct=-3.0) == []
    # Asked for but not measured: refused, saying why.
    unmeasured = Evaluation(
        {"fid": 20.0, "floor_fid": 19.0},
        {"protocol": {"id": "x"}, "copying": {"unavailable": "the eval split holds 1 image"}},
    )
    (why,) = quality_bar(unmeasured, max_fid_ratio=3.0, max_copy_share=0.2)
    assert "the eval split holds 1 image" in why and "cannot be checked" in why
    assert quality_bar(unmeasured, max_fid_ratio=3.0) == []  # no copying bar set: not needed


def test_every_copying_metric_is_in_the_metric_table_and_one_outside_it_is_refused(tmp_path) -> None:
    assert {"copy_share", "copy_ct", "exact_copies", "floor_copy_share", "floor_copy_ct"} <= set(names())
    with pytest.raises(ValueError, match="copy_ratio.*metrics.py"):
        write_evaluation(tmp_path, {"fid": 1.0, "copy_ratio": 0.5}, {})
    assert not (tmp_path / "metrics.json").exists()
    assert copying_text({"copy_share": 0.1}) == "copy_share 0.100, C_T n/a"


def test_nearest_neighbours_is_exact_across_chunks_and_reads_uint8_pixels_as_unit_values() -> None:
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(2500, 7, generator=g), torch.randn(3000, 7, generator=g)  # > 2 chunks each
    dist, idx = nearest_neighbours(queries, keys)
    full = torch.cdist(queries.double(), keys.double())
    assert np.allclose(dist, full.min(1).values.numpy(), rtol=0, atol=1e-12) and (idx == full.argmin(1).numpy()).all()
    own = np.arange(2500)  # each of the first 2500 keys may not pick itself, wherever its chunk
    dist, idx = nearest_neighbours(keys[:2500], keys, own)
    full = torch.cdist(keys[:2500].double(), keys.double())
    full[torch.arange(2500), torch.arange(2500)] = torch.inf
    assert np.allclose(dist, full.min(1).values.numpy(), rtol=0, atol=1e-12) and (idx == full.argmin(1).numpy()).all()
    pixels = torch.tensor([[0, 255], [255, 255]], dtype=torch.uint8)
    assert nearest_neighbours(pixels[:1], pixels[1:])[0].tolist() == [1.0]
