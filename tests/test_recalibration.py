"""Temperature scaling, variance scaling and isotonic recalibration."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mcdrop import metrics
from mcdrop.errors import InvalidInputError, McdropError, McdropWarning
from mcdrop.recalibration import IsotonicRecalibration, NotFittedError, TemperatureScaling, VarianceScaling


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _tempered_data(n: int, k: int, true_t: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): true_t is the right temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 4.0
    p = _softmax(logits / true_t)
    labels = np.minimum((np.cumsum(p, 1) < rng.random((n, 1))).sum(1), k - 1)
    return logits, labels


def _nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    z = logits / t
    log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    return float(-log_p[np.arange(len(labels)), labels].mean())


# ----------------------------------------------------------------------------------------------
# temperature scaling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_temperature_recovers_the_true_temperature(true_t: float) -> None:
    logits, labels = _tempered_data(20000, 5, true_t, seed=int(true_t * 10))
    ts = TemperatureScaling().fit(logits, labels)
    assert ts.temperature_ == pytest.approx(true_t, rel=0.05)
    assert ts.nll_after_ <= ts.nll_before_


def test_temperature_is_the_minimiser_of_the_nll() -> None:
    logits, labels = _tempered_data(2000, 4, 1.7, seed=1)
    ts = TemperatureScaling().fit(logits, labels)
    grid = np.exp(np.linspace(np.log(0.5), np.log(5.0), 401))  # steps of 0.6%
    best = grid[np.argmin([_nll(logits, labels, t) for t in grid])]
    assert ts.temperature_ == pytest.approx(best, rel=4e-3)
    assert ts.nll_after_ == pytest.approx(_nll(logits, labels, ts.temperature_), abs=1e-10)
    assert ts.nll_after_ <= min(_nll(logits, labels, t) for t in grid) + 1e-9


def test_transform_and_scale() -> None:
    logits, labels = _tempered_data(500, 3, 2.0, seed=2)
    ts = TemperatureScaling().fit(logits, labels)
    probs = ts.transform(logits)
    assert isinstance(probs, np.ndarray)
    np.testing.assert_allclose(probs, _softmax(logits / ts.temperature_), atol=1e-12)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))  # accuracy unchanged
    np.testing.assert_allclose(ts.scale(logits), logits / ts.temperature_)
    tensor = torch.from_numpy(logits).float()
    out = ts.transform(tensor)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (500, 3)
    # improves the calibration metrics on held-out data from the same model
    test_logits, test_labels = _tempered_data(5000, 3, 2.0, seed=3)
    before = metrics.expected_calibration_error(_softmax(test_logits), test_labels)
    after = metrics.expected_calibration_error(ts.transform(test_logits), test_labels)
    assert after < before / 2


def test_monte_carlo_logits_are_scaled_before_averaging() -> None:
    rng = np.random.default_rng(4)
    base, labels = _tempered_data(1000, 4, 2.0, seed=4)
    samples = base[None] + rng.normal(scale=1.0, size=(8, 1000, 4))
    ts = TemperatureScaling().fit(samples, labels)
    t = ts.temperature_
    expected = _softmax(samples / t).mean(0)
    np.testing.assert_allclose(ts.transform(samples), expected, atol=1e-12)
    # the fitted objective is the NLL of the averaged probabilities
    nll = -np.log(expected[np.arange(1000), labels]).mean()
    assert ts.nll_after_ == pytest.approx(nll, abs=1e-10)
    for other in (0.8 * t, 1.25 * t):
        assert nll <= -np.log(_softmax(samples / other).mean(0)[np.arange(1000), labels]).mean()


def test_all_correct_predictions_push_the_temperature_down() -> None:
    # the NLL decreases towards 0 as T -> 0; below T ~ 0.06 it is 0 in float64
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    with pytest.warns(McdropWarning, match="lower bound.*classifies all right"):  # a degenerate set
        ts = TemperatureScaling(bounds=(0.05, 20.0)).fit(logits, np.array([0, 1, 0]))
    assert 0.05 <= ts.temperature_ < 0.1
    assert ts.nll_after_ < 1e-12 < ts.nll_before_


def test_temperature_one_is_kept_if_nothing_is_better() -> None:
    logits = np.zeros((4, 3))  # constant logits: every temperature gives the same NLL
    ts = TemperatureScaling().fit(logits, np.array([0, 1, 2, 0]))
    assert ts.temperature_ == 1.0 and ts.nll_after_ == ts.nll_before_ == pytest.approx(math.log(3))


def test_bounds_that_exclude_one_can_raise_the_nll_and_fit_warns() -> None:
    logits, labels = _tempered_data(400, 3, true_t=1.0, seed=3)  # calibrated: T = 1 is best
    with pytest.warns(McdropWarning, match=r"bounds exclude T = 1"):
        ts = TemperatureScaling(bounds=(3.0, 10.0)).fit(logits, labels)
    assert ts.temperature_ == pytest.approx(3.0, rel=1e-3)  # the bound nearest the optimum
    assert ts.nll_after_ > ts.nll_before_
    assert ts.nll_after_ == pytest.approx(_nll(logits, labels, ts.temperature_), rel=1e-6)
    # bounds that contain 1: no warning, and the NLL does not rise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TemperatureScaling().fit(logits, labels).nll_after_ <= ts.nll_before_


def _probabilities(n: int = 200, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of a model that is always right, with a probability of 0.15 on the true class."""
    labels = torch.arange(n) % k
    probs = torch.full((n, k), 0.85 / (k - 1))
    probs[torch.arange(n), labels] = 0.15
    return probs, labels


def test_a_temperature_at_the_lower_bound_warns_of_probabilities_given_as_logits() -> None:
    probs, labels = _probabilities()
    with pytest.warns(McdropWarning, match=r"0\.01 lies at the lower bound.*probabilities passed as logits"):
        ts = TemperatureScaling().fit(probs, labels)
    assert ts.temperature_ == pytest.approx(0.01, rel=1e-4)
    with pytest.warns(McdropWarning, match="lower bound"):  # MC samples of probabilities too
        TemperatureScaling().fit(torch.stack([probs, probs]), labels)
    logits, labels = _tempered_data(400, 3, true_t=0.5, seed=1)  # over-confident, not degenerate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0.01 * 1.5 < TemperatureScaling().fit(logits, labels).temperature_ < 1.0


def test_a_temperature_at_the_upper_bound_warns_of_labels_that_do_not_match() -> None:
    probs, labels = _probabilities()
    with pytest.warns(McdropWarning, match=r"upper bound of bounds=\(0\.01, 100\).*labels that do not match"):
        ts = TemperatureScaling().fit(probs.log(), (labels + 1) % 10)
    assert ts.temperature_ > 90


def test_temperature_scaling_errors() -> None:
    with pytest.raises(NotFittedError, match="fit"):
        TemperatureScaling().transform(np.zeros((2, 2)))
    assert issubclass(NotFittedError, McdropError)
    with pytest.raises(InvalidInputError, match="K >= 2"):
        TemperatureScaling().fit(np.zeros(5), np.zeros(5, dtype=int))
    with pytest.raises(InvalidInputError, match="labels must be class indices"):
        TemperatureScaling().fit(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(InvalidInputError, match="T_min < T_max"):
        TemperatureScaling(bounds=(2.0, 1.0))
    with pytest.raises(McdropError, match="NaN"):
        TemperatureScaling().fit(np.array([[np.nan, 0.0]]), np.array([0]))


# ----------------------------------------------------------------------------------------------
# variance scaling
# ----------------------------------------------------------------------------------------------
def _regression(n: int, seed: int, std_factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=n)
    true_std = rng.uniform(0.3, 2.0, size=n)
    targets = mean + true_std * rng.normal(size=n)
    return mean, true_std * std_factor, targets


@pytest.mark.parametrize("std_factor", [0.25, 1.0, 3.0])
def test_variance_scaling_recovers_the_factor_and_minimises_the_nll(std_factor: float) -> None:
    mean, std, targets = _regression(20000, seed=5, std_factor=std_factor)
    vs = VarianceScaling().fit(mean, std, targets)
    assert vs.factor_ == pytest.approx(1 / std_factor, rel=0.03)
    assert vs.nll_before_ == pytest.approx(metrics.gaussian_nll(mean, std, targets), abs=1e-10)
    assert vs.nll_after_ == pytest.approx(metrics.gaussian_nll(mean, vs.transform(std), targets), abs=1e-10)
    for other in (0.9, 1.1):
        assert vs.nll_after_ <= metrics.gaussian_nll(mean, std * vs.factor_ * other, targets)
    assert vs.nll_after_ <= vs.nll_before_


def test_variance_scaling_improves_held_out_calibration() -> None:
    vs = VarianceScaling().fit(*_regression(5000, seed=6, std_factor=0.5))
    mean, std, targets = _regression(5000, seed=7, std_factor=0.5)
    assert metrics.mean_absolute_calibration_error(mean, vs.transform(std), targets) < 0.02
    assert metrics.mean_absolute_calibration_error(mean, std, targets) > 0.1
    out = vs.transform(torch.from_numpy(std).float())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


def test_variance_scaling_errors() -> None:
    with pytest.raises(NotFittedError):
        VarianceScaling().transform([1.0])
    with pytest.raises(InvalidInputError, match="residual is zero"):
        VarianceScaling().fit([1.0, 2.0], [1.0, 1.0], [1.0, 2.0])
    with pytest.raises(InvalidInputError, match="strictly positive"):
        VarianceScaling().fit([1.0], [0.0], [1.0])


# ----------------------------------------------------------------------------------------------
# isotonic recalibration
# ----------------------------------------------------------------------------------------------
def _skewed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian predictions of a biased, over-confident model with heavy-tailed errors."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=n)
    std = rng.uniform(0.5, 1.5, size=n)
    targets = mean + 0.4 * std + 2.0 * std * rng.standard_t(df=5, size=n)
    return mean, std, targets


def test_isotonic_recalibration_gives_calibrated_quantiles_on_new_data() -> None:
    iso = IsotonicRecalibration().fit(*_skewed(5000, seed=8))
    assert iso.n_fit_ == 5000
    mean, std, targets = _skewed(20000, seed=9)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        raw = np.mean(
            targets <= mean + std * float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))
        )
        recal = np.mean(targets <= iso.quantile(mean, std, q))
        assert abs(recal - q) < 0.015
        assert abs(raw - q) > abs(recal - q)
    for level in (0.5, 0.9):
        lower, upper = iso.interval(mean, std, level)
        assert np.mean((targets >= lower) & (targets <= upper)) == pytest.approx(level, abs=0.02)


def test_isotonic_maps_are_monotone_and_consistent() -> None:
    iso = IsotonicRecalibration().fit(*_skewed(2000, seed=10))
    levels = np.linspace(0, 1, 101)
    model_levels = iso.recalibrated_level(levels)
    assert np.all(np.diff(model_levels) >= 0) and model_levels[0] == 0.0 and model_levels[-1] == 1.0
    mean, std = np.zeros(5), np.ones(5)
    quantiles = [iso.quantile(mean, std, q)[0] for q in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert np.all(np.diff(quantiles) > 0)
    # R(F(Q(q))) = q up to the resolution of the fitted maps
    for q in (0.1, 0.5, 0.9):
        values = iso.quantile(mean, std, q)
        np.testing.assert_allclose(iso.cdf(mean, std, values), q, atol=2e-3)


def test_isotonic_is_close_to_identity_for_a_calibrated_model() -> None:
    rng = np.random.default_rng(11)
    mean, std = rng.normal(size=20000), rng.uniform(0.5, 2, size=20000)
    targets = mean + std * rng.normal(size=20000)
    iso = IsotonicRecalibration().fit(mean, std, targets)
    levels = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(iso.recalibrated_level(levels), levels, atol=0.015)


def test_isotonic_tensor_outputs_and_errors() -> None:
    mean, std, targets = _skewed(500, seed=12)
    iso = IsotonicRecalibration().fit(
        torch.from_numpy(mean), torch.from_numpy(std), torch.from_numpy(targets)
    )
    out = iso.quantile(torch.from_numpy(mean).reshape(50, 10), torch.from_numpy(std).reshape(50, 10), 0.9)
    assert isinstance(out, torch.Tensor) and out.shape == (50, 10)
    with pytest.raises(NotFittedError):
        IsotonicRecalibration().quantile(mean, std, 0.5)
    with pytest.raises(InvalidInputError, match="level"):
        iso.quantile(mean, std, 1.5)
    with pytest.raises(InvalidInputError, match="level"):
        iso.interval(mean, std, 1.0)
    with pytest.raises(InvalidInputError, match="same shape"):
        iso.cdf(mean, std, targets[:10])
