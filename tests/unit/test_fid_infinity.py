"""FID-infinity (Chong and Forsyth 2020): the extrapolation to infinitely many generated samples
removes the FID's bias from the generated sample count."""

from __future__ import annotations

import numpy as np
import pytest

from aigc_pipeline.evaluation.frechet import fid_infinity, frechet_distance

DIM = 64


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_fid_infinity_is_near_the_true_distance_where_fid_at_n_is_biased(shift: float) -> None:
    """Gaussian features against the exact statistics of another Gaussian: the true Fréchet distance
    is DIM * shift^2. FID of 1000 samples overshoots it by about one point (the sample's own
    mean and covariance noise); the intercept lands far closer."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, DIM)) + shift
    mu, sigma = np.zeros(DIM), np.eye(DIM)
    true = DIM * shift**2
    fid = frechet_distance(x, mu, sigma)
    inf = fid_infinity(x, mu, sigma, seed=0)
    assert fid - true > 0.9  # the bias FID-infinity removes
    assert abs(inf.value - true) < 0.3 * (fid - true)
    assert inf.sizes == (300, 475, 650, 825, 1000) and len(inf.means) == 5
    assert inf.means[0] > inf.means[-1]  # fewer samples, more bias
    assert inf.slope > 0 and inf.std > 0


def test_fid_infinity_is_reproducible_and_needs_two_sizes() -> None:
    x = np.random.default_rng(1).standard_normal((40, 8))
    a = fid_infinity(x, np.zeros(8), np.eye(8), seed=3)
    assert a == fid_infinity(x, np.zeros(8), np.eye(8), seed=3)
    with pytest.raises(ValueError, match="at least two sample sizes"):
        fid_infinity(x[:2], np.zeros(8), np.eye(8), seed=0)
