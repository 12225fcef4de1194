"""Regression metrics: cross-checked against uncertainty-toolbox and direct formulas."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mcdrop.errors import InvalidInputError
from mcdrop.metrics import (
    CalibrationCurve,
    calibration_curve,
    check_score,
    crps_gaussian,
    gaussian_nll,
    interval_score,
    mae,
    mc_log_likelihood,
    mean_absolute_calibration_error,
    miscalibration_area,
    mpiw,
    picp,
    predictive_moments,
    rmse,
    root_mean_squared_calibration_error,
    sharpness,
)


@pytest.fixture(scope="module")
def uct():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("uncertainty_toolbox")


def _gaussian_data(n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heteroscedastic predictions whose std is off by ``scale`` (1: calibrated)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=n)
    true_std = rng.uniform(0.2, 2.0, size=n)
    targets = mean + true_std * rng.normal(size=n) + 0.1
    return mean, true_std * scale, targets


# ----------------------------------------------------------------------------------------------
# uncertainty-toolbox
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_scoring_rules_match_uncertainty_toolbox(uct, scale: float) -> None:
    mean, std, targets = _gaussian_data(800, seed=int(scale * 10), scale=scale)
    assert gaussian_nll(mean, std, targets) == pytest.approx(uct.nll_gaussian(mean, std, targets), abs=1e-10)
    assert crps_gaussian(mean, std, targets) == pytest.approx(
        uct.crps_gaussian(mean, std, targets), abs=1e-10
    )
    assert check_score(mean, std, targets) == pytest.approx(uct.check_score(mean, std, targets), abs=1e-10)
    assert interval_score(mean, std, targets) == pytest.approx(
        uct.interval_score(mean, std, targets), abs=1e-10
    )
    assert sharpness(std) == pytest.approx(uct.sharpness(std), abs=1e-12)
    accuracy = uct.metrics_accuracy.prediction_error_metrics(mean, targets)
    assert rmse(mean, targets) == pytest.approx(accuracy["rmse"], abs=1e-12)
    assert mae(mean, targets) == pytest.approx(accuracy["mae"], abs=1e-12)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_interval_calibration_matches_uncertainty_toolbox(uct, scale: float) -> None:
    mean, std, targets = _gaussian_data(600, seed=3, scale=scale)
    exp, obs = uct.get_proportion_lists_vectorized(mean, std, targets, prop_type="interval")
    curve = calibration_curve(mean, std, targets)
    np.testing.assert_array_equal(curve.expected, exp)
    np.testing.assert_allclose(curve.observed, obs, atol=1e-12)
    for ours, theirs in [
        (mean_absolute_calibration_error, uct.mean_absolute_calibration_error),
        (root_mean_squared_calibration_error, uct.root_mean_squared_calibration_error),
        (miscalibration_area, uct.miscalibration_area),
    ]:
        assert ours(mean, std, targets) == pytest.approx(
            theirs(mean, std, targets, prop_type="interval"), abs=1e-10
        )


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_quantile_calibration_scalars_match_and_curve_is_the_reflection(uct, scale: float) -> None:
    mean, std, targets = _gaussian_data(600, seed=4, scale=scale)
    mean = mean + 0.3  # biased, so that the curve is asymmetric
    for ours, theirs in [
        (mean_absolute_calibration_error, uct.mean_absolute_calibration_error),
        (root_mean_squared_calibration_error, uct.root_mean_squared_calibration_error),
        (miscalibration_area, uct.miscalibration_area),
    ]:
        got = ours(mean, std, targets, kind="quantile")
        assert got == pytest.approx(theirs(mean, std, targets, prop_type="quantile"), abs=1e-10)
    _, theirs_obs = uct.get_proportion_lists_vectorized(mean, std, targets, prop_type="quantile")
    curve = calibration_curve(mean, std, targets, kind="quantile")
    # theirs(p) = fraction of (mean - y)/std <= z_p = 1 - ours(1 - p)
    np.testing.assert_allclose(curve.observed, 1 - theirs_obs[::-1], atol=1e-12)
    # ours is the textbook definition: fraction of targets at or below the predicted p-quantile
    z = (targets - mean) / std
    from scipy.stats import norm

    direct = [np.mean(z <= norm.ppf(p)) for p in curve.expected]
    np.testing.assert_allclose(curve.observed, direct, atol=1e-12)


def test_picp_matches_uncertainty_toolbox(uct) -> None:
    mean, std, targets = _gaussian_data(500, seed=5, scale=0.8)
    for level in (0.5, 0.9, 0.95):
        expected = uct.metrics_calibration.get_proportion_in_interval(mean, std, targets, level)
        assert picp(mean, std, targets, level=level) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# direct formulas and hand-computed values
# ----------------------------------------------------------------------------------------------
def _gal_log_likelihood(samples: np.ndarray, targets: np.ndarray, tau: float) -> float:
    """The formula of Gal & Ghahramani's DropoutUncertaintyExps code (numpy/scipy)."""
    from scipy.special import logsumexp

    t = samples.shape[0]
    ll = logsumexp(-0.5 * tau * (targets[None] - samples) ** 2, axis=0) - np.log(t) - 0.5 * np.log(2 * np.pi)
    return float(np.mean(ll + 0.5 * np.log(tau)))


@pytest.mark.parametrize("shape", [(50, 200), (20, 100, 3)])
def test_mc_log_likelihood_matches_the_papers_formula(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(6)
    samples = rng.normal(size=shape)
    targets = rng.normal(size=shape[1:])
    for tau in (0.1, 1.0, 25.0):
        expected = _gal_log_likelihood(samples, targets, tau)
        assert mc_log_likelihood(samples, targets, tau) == pytest.approx(expected, abs=1e-10)
        got_torch = mc_log_likelihood(
            torch.from_numpy(samples).float(), torch.from_numpy(targets).float(), tau
        )
        assert got_torch == pytest.approx(expected, abs=1e-5)


def test_mc_log_likelihood_single_sample_is_a_gaussian_log_density() -> None:
    samples = np.array([[0.3, -1.0]])
    targets = np.array([1.0, 0.0])
    tau = 4.0
    expected = -gaussian_nll(samples[0], np.full(2, 1 / math.sqrt(tau)), targets)
    assert mc_log_likelihood(samples, targets, tau) == pytest.approx(expected, abs=1e-12)


def test_mc_log_likelihood_is_stable_for_far_targets() -> None:
    ll = mc_log_likelihood(np.zeros((10, 3)), np.full(3, 1e3), tau=100.0)
    assert math.isfinite(ll)
    assert ll == pytest.approx(-0.5 * 100.0 * 1e6 - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(100.0))


def test_gaussian_nll_matches_torch_full_loss() -> None:
    mean, std, targets = _gaussian_data(300, seed=7)
    loss = torch.nn.GaussianNLLLoss(full=True, eps=1e-12)
    expected = loss(torch.from_numpy(mean), torch.from_numpy(targets), torch.from_numpy(std**2))
    assert gaussian_nll(mean, std, targets) == pytest.approx(float(expected), abs=1e-10)


def test_crps_limits() -> None:
    # a point forecast (tiny std) has CRPS equal to the absolute error
    assert crps_gaussian([0.0], [1e-9], [2.0]) == pytest.approx(2.0, abs=1e-8)
    assert crps_gaussian([0.0], [1.0], [0.0]) == pytest.approx((math.sqrt(2) - 1) / math.sqrt(math.pi))


def test_picp_and_mpiw_by_hand() -> None:
    assert picp([0.0] * 4, [1.0] * 4, [0.5, -1.5, 1.9, 2.5]) == 0.75
    assert picp([0.0], [1.0], [1.959963984540054]) == 1.0  # closed interval
    assert mpiw([1.0, 3.0], level=0.95) == pytest.approx(2 * 1.959963984540054 * 2.0)
    assert mpiw([1.0], level=0.6827) == pytest.approx(2.0, abs=1e-3)


def test_calibrated_predictions_have_small_calibration_errors() -> None:
    mean, std, targets = _gaussian_data(20000, seed=8)
    targets = targets - 0.1
    for kind in ("interval", "quantile"):
        assert mean_absolute_calibration_error(mean, std, targets, kind=kind) < 0.01
        assert miscalibration_area(mean, std, targets, kind=kind) < 0.01
    assert picp(mean, std, targets, level=0.9) == pytest.approx(0.9, abs=0.01)
    # halving the std (over-confident) or doubling it (under-confident) is clearly detected
    assert mean_absolute_calibration_error(mean, std * 0.5, targets) > 0.1
    assert mean_absolute_calibration_error(mean, std * 2.0, targets) > 0.1


def test_miscalibration_area_by_hand_with_crossing() -> None:
    # one target at the mean: observed interval proportions are 1 at every level
    curve = calibration_curve([0.0], [1.0], [0.0], n_levels=3)
    np.testing.assert_array_equal(curve.observed, [1.0, 1.0, 1.0])
    assert miscalibration_area([0.0], [1.0], [0.0], n_levels=3) == pytest.approx(0.5)
    # quantile kind, target just above the mean: observed (0, 0, 1) vs (0, .5, 1)
    assert miscalibration_area([0.0], [1.0], [0.01], kind="quantile", n_levels=3) == pytest.approx(0.25)
    # a crossing segment: gaps -0.5 then +0.5 over width 0.5 -> two triangles of area 1/16
    mean, std, targets = [0.0, 0.0], [1.0, 1.0], [-5.0, 0.2]
    curve = calibration_curve(mean, std, targets, kind="quantile", n_levels=3)
    np.testing.assert_array_equal(curve.observed, [0.0, 0.5, 1.0])
    curve = calibration_curve(mean, std, targets, kind="quantile", n_levels=5)
    gaps = curve.observed - curve.expected
    widths = np.diff(curve.expected)
    area = 0.0
    for w, left, right in zip(widths, gaps[:-1], gaps[1:], strict=True):
        if left * right < 0:
            area += w * (left**2 + right**2) / (2 * (abs(left) + abs(right)))
        else:
            area += w * abs(left + right) / 2
    assert miscalibration_area(mean, std, targets, kind="quantile", n_levels=5) == pytest.approx(area)


def test_check_and_interval_scores_by_hand() -> None:
    assert check_score([0.0, 0.0], [1.0, 1.0], [1.0, -1.0], levels=0.5) == pytest.approx(0.5)
    # q = 0.9 quantile at 1.2816: target 3 above -> 0.9 * 1.7184; target -1 below -> 0.1 * 2.2816
    z = 1.2815515655446004
    expected = (0.9 * (3 - z) + 0.1 * (z + 1)) / 2
    assert check_score([0.0, 0.0], [1.0, 1.0], [3.0, -1.0], levels=[0.9]) == pytest.approx(expected)
    # interval score at 90%: width 2 * 1.6449 plus 2 / 0.1 times the miss distance
    z = 1.6448536269514722
    assert interval_score([0.0], [1.0], [2.0], levels=0.9) == pytest.approx(2 * z + 20 * (2 - z))


def test_predictive_moments() -> None:
    rng = np.random.default_rng(9)
    samples = rng.normal(size=(30, 40, 2))
    mean, std = predictive_moments(samples, tau=2.0)
    assert isinstance(mean, np.ndarray) and mean.shape == (40, 2)
    np.testing.assert_allclose(mean, samples.mean(0))
    np.testing.assert_allclose(std, np.sqrt(samples.var(0) + 0.5))
    t_mean, t_std = predictive_moments(torch.from_numpy(samples).float())
    assert isinstance(t_mean, torch.Tensor) and t_std.dtype == torch.float32
    np.testing.assert_allclose(t_std.numpy(), samples.std(0), rtol=1e-5)


def test_multi_output_arrays_are_scored_elementwise() -> None:
    mean, std, targets = _gaussian_data(300, seed=10)
    shaped = [a.reshape(100, 3) for a in (mean, std, targets)]
    assert gaussian_nll(*shaped) == pytest.approx(gaussian_nll(mean, std, targets), abs=1e-12)
    assert mean_absolute_calibration_error(*shaped) == pytest.approx(
        mean_absolute_calibration_error(mean, std, targets), abs=1e-12
    )


def test_curve_type_and_float_results() -> None:
    mean, std, targets = _gaussian_data(100, seed=11)
    curve = calibration_curve(
        torch.from_numpy(mean), torch.from_numpy(std), torch.from_numpy(targets), n_levels=7
    )
    assert isinstance(curve, CalibrationCurve) and curve.expected.shape == (7,)
    for fn in (gaussian_nll, crps_gaussian, check_score, interval_score, picp, miscalibration_area):
        assert type(
            fn(torch.from_numpy(mean).float(), torch.from_numpy(std).float(), targets.astype(np.float32))
        ) is (float)


def test_regression_input_errors() -> None:
    with pytest.raises(InvalidInputError, match="strictly positive"):
        gaussian_nll([0.0, 1.0], [1.0, 0.0], [0.0, 1.0])
    with pytest.raises(InvalidInputError, match="strictly positive"):
        sharpness([1.0, -1.0])
    with pytest.raises(InvalidInputError, match="same shape"):
        crps_gaussian([0.0, 1.0], [1.0, 1.0], [[0.0, 1.0]])
    with pytest.raises(InvalidInputError, match="'interval', 'quantile'"):
        calibration_curve([0.0], [1.0], [0.0], kind="cdf")
    with pytest.raises(InvalidInputError, match="n_levels"):
        calibration_curve([0.0], [1.0], [0.0], n_levels=1)
    with pytest.raises(InvalidInputError, match="level"):
        picp([0.0], [1.0], [0.0], level=1.0)
    with pytest.raises(InvalidInputError, match="between 0 and 1"):
        check_score([0.0], [1.0], [0.0], levels=[0.5, 1.0])
    with pytest.raises(InvalidInputError, match="samples-first"):
        mc_log_likelihood(np.zeros(5), np.zeros(5), tau=1.0)
    with pytest.raises(InvalidInputError, match="tau"):
        mc_log_likelihood(np.zeros((2, 5)), np.zeros(5), tau=0.0)
    with pytest.raises(InvalidInputError, match="samples-first"):
        predictive_moments(np.zeros(5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_predictive_moments_of_half_precision_samples_are_rounded_once(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    samples = (3 * torch.randn(50, 40, generator=g) + 10).to(dtype)
    mean, std = predictive_moments(samples, tau=3.0)
    var, exact_mean = torch.var_mean(samples.double(), 0, correction=0)  # the same values, in float64
    assert mean.dtype == std.dtype == dtype
    assert torch.equal(mean, exact_mean.to(dtype)) and torch.equal(std, (var + 1 / 3).sqrt().to(dtype))
