import numpy as np
import pytest

from lmforge.scaling.fit import fit_chinchilla, fit_isoflop
from lmforge.scaling.laws import ChinchillaLaw

TRUE = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def grid(k: int = 7):
    n, d = np.meshgrid(np.logspace(6, 9, k), np.logspace(7, 10, k))
    return n.ravel(), d.ravel()


def test_fit_recovers_constants_without_noise():
    n, d = grid()
    fit = fit_chinchilla(n, d, TRUE.loss(n, d), n_bootstrap=0)
    assert abs(fit.law.E / TRUE.E - 1) < 1e-3
    for name in ["A", "B", "alpha", "beta"]:
        assert getattr(fit.law, name) == pytest.approx(getattr(TRUE, name), rel=1e-2)
    assert fit.n_runs == 49 and fit.excluded == []
    assert np.abs(fit.residuals).max() < 1e-4


def test_fit_with_noise_covers_true_constants():
    n, d = grid()
    rng = np.random.default_rng(1)
    loss = TRUE.loss(n, d) * np.exp(rng.normal(0, 0.005, n.shape))  # 0.5% multiplicative noise
    fit = fit_chinchilla(n, d, loss, n_bootstrap=50)
    for name in ["E", "A", "B", "alpha", "beta"]:
        lo, hi = fit.intervals[name]
        assert lo <= getattr(TRUE, name) <= hi, name
    a = TRUE.beta / (TRUE.alpha + TRUE.beta)
    assert fit.intervals["a"][0] <= a <= fit.intervals["a"][1]
    assert np.abs(fit.predict(n, d) / TRUE.loss(n, d) - 1).max() < 0.01
    opt = fit.compute_optimal(1e21)
    lo, hi = opt["N_opt_interval"]
    assert lo <= opt["N_opt"] <= hi
    assert 6 * opt["N_opt"] * opt["D_opt"] == pytest.approx(1e21)


def test_nan_losses_are_excluded_and_listed():
    n, d = grid(3)
    loss = TRUE.loss(n, d)
    loss[[2, 5]] = [np.nan, np.inf]
    fit = fit_chinchilla(n, d, loss, n_bootstrap=0)
    assert fit.excluded == [2, 5]
    assert fit.n_runs == 7


def test_too_few_runs():
    n, d = grid(2)
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_chinchilla(n, d, TRUE.loss(n, d))
    n, d = grid(3)
    loss = TRUE.loss(n, d)
    loss[:5] = np.nan
    with pytest.raises(ValueError, match=r"got 4 \(5 excluded"):
        fit_chinchilla(n, d, loss)


def test_non_positive_sizes_rejected():
    n, d = grid(3)
    n[0] = -1.0
    with pytest.raises(ValueError, match="positive"):
        fit_chinchilla(n, d, TRUE.loss(np.abs(n), d))
    with pytest.raises(ValueError, match="positive"):
        fit_isoflop([-1e6, 1e7, 1e8], [3.0, 2.5, 2.8])


def test_isoflop_finds_parabola_minimum():
    n = np.logspace(7, 9, 9)
    x = np.log(n)
    loss = 0.05 * (x - np.log(2e8)) ** 2 + 2.3
    n_opt, coeffs = fit_isoflop(n, loss)
    assert n_opt == pytest.approx(2e8, rel=1e-6)
    np.testing.assert_allclose(coeffs[0], 0.05, rtol=1e-6)


def test_isoflop_rejects_concave_and_short_curves():
    with pytest.raises(ValueError, match="no minimum"):
        fit_isoflop([1e6, 1e7, 1e8], [2.5, 3.0, 2.5])
    with pytest.raises(ValueError, match="at least 3"):
        fit_isoflop([1e6, 1e7], [3.0, 2.5])
