"""The percentile bootstrap of :mod:`mcdrop.metrics.bootstrap`.

* every resample's value of the vectorised paths is the metric of :mod:`mcdrop.metrics` on the
  resampled inputs (checked against :func:`bootstrap_interval`, which calls the metric per resample);
* the resamples are reproducible from the seed;
* the intervals cover the true value of a synthetic population at about the nominal level.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcdrop import metrics
from mcdrop.errors import InvalidInputError
from mcdrop.metrics import bootstrap_indices, bootstrap_interval, percentile_interval

B = 25  # resamples of the equality tests


def _classification(n: int = 160, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(n, k, generator=g), 1)
    labels = torch.randint(0, k, (n,), generator=g)
    entropy = -(probs * probs.log()).sum(1)
    rounded = torch.round(entropy * 5) / 5  # many ties
    return probs, labels, entropy, rounded


def _per_resample(statistic, *arrays, seed: int = 3) -> np.ndarray:
    return bootstrap_interval(statistic, *arrays, n_resamples=B, seed=seed).values


def test_classification_resamples_equal_the_metrics():
    probs, labels, entropy, rounded = _classification()
    errors = (probs.argmax(1) != labels).long()
    out = metrics.bootstrap_classification(
        probs, labels, {"h": entropy, "r": rounded}, {"h": entropy}, n_bins=10, n_resamples=B, seed=3
    )
    m = metrics
    expected = {
        "accuracy": lambda p, y: m.accuracy(p, y),
        "NLL": lambda p, y: m.negative_log_likelihood(p, y),
        "Brier": lambda p, y: m.brier_score(p, y),
        "ECE": lambda p, y: m.expected_calibration_error(p, y, n_bins=10),
        "MCE": lambda p, y: m.expected_calibration_error(p, y, n_bins=10, norm="max"),
        "adaptive ECE": lambda p, y: m.expected_calibration_error(p, y, n_bins=10, binning="quantile"),
        "classwise ECE": lambda p, y: m.classwise_calibration_error(p, y, n_bins=10),
    }
    for key, statistic in expected.items():
        np.testing.assert_allclose(out[key], _per_resample(statistic, probs, labels), rtol=0, atol=1e-12)
    for name, u in (("h", entropy), ("r", rounded)):
        for key, statistic in (
            ("AURC", m.aurc),
            ("E-AURC", m.e_aurc),
            ("misclassification AUROC", m.misclassification_auroc),
        ):
            ref = _per_resample(statistic, u, errors)
            np.testing.assert_allclose(out[f"{key} ({name})"], ref, rtol=0, atol=1e-12)
    ref = _per_resample(lambda u: float(u.double().mean()), entropy)
    np.testing.assert_allclose(out["mean (h)"], ref, rtol=0, atol=1e-12)


def test_binary_and_float64_inputs():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(90, generator=g, dtype=torch.float64)
    y = (torch.rand(90, generator=g, dtype=torch.float64) < p).long()
    out = metrics.bootstrap_classification(p, y, n_bins=5, n_resamples=B, seed=3)
    for key, statistic in (
        ("Brier", metrics.brier_score),
        ("NLL", metrics.negative_log_likelihood),
        ("ECE", lambda a, b: metrics.expected_calibration_error(a, b, n_bins=5)),
        ("classwise ECE", lambda a, b: metrics.classwise_calibration_error(a, b, n_bins=5)),
        ("adaptive ECE", lambda a, b: metrics.expected_calibration_error(a, b, n_bins=5, binning="quantile")),
    ):
        np.testing.assert_allclose(out[key], _per_resample(statistic, p, y), rtol=0, atol=1e-12)


def test_regression_resamples_equal_the_metrics():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(150, generator=g, dtype=torch.float64)
    sd = torch.rand(150, generator=g, dtype=torch.float64) + 0.3
    y = mu + 0.8 * torch.randn(150, generator=g, dtype=torch.float64)
    out = metrics.bootstrap_regression(mu, sd, y, {"s": sd}, level=0.9, n_resamples=B, seed=3)
    m = metrics
    expected = {
        "RMSE": lambda a, b, c: m.rmse(a, c),
        "MAE": lambda a, b, c: m.mae(a, c),
        "Gaussian NLL": m.gaussian_nll,
        "CRPS": m.crps_gaussian,
        "PICP": lambda a, b, c: m.picp(a, b, c, level=0.9),
        "MPIW": lambda a, b, c: m.mpiw(b, level=0.9),
        "miscalibration area": m.miscalibration_area,
        "MACE": m.mean_absolute_calibration_error,
        "RMSCE": m.root_mean_squared_calibration_error,
        "sharpness": lambda a, b, c: m.sharpness(b),
        "mean (s)": lambda a, b, c: float(b.mean()),
    }
    for key, statistic in expected.items():
        np.testing.assert_allclose(out[key], _per_resample(statistic, mu, sd, y), rtol=0, atol=1e-12)
    no_std = metrics.bootstrap_regression(mu, None, y, n_resamples=B, seed=3)
    assert sorted(no_std) == ["MAE", "RMSE"]
    np.testing.assert_array_equal(no_std["RMSE"], out["RMSE"])


def test_ood_resamples_equal_the_metrics():
    g = torch.Generator().manual_seed(4)
    s_in = torch.round(torch.randn(120, generator=g) * 4) / 4  # ties within and across the groups
    s_out = torch.round((torch.randn(50, generator=g) + 1) * 4) / 4
    out = metrics.bootstrap_ood(s_in, s_out, tpr=0.9, n_resamples=B, seed=3)
    rows_in = bootstrap_indices(120, B, seed=3, stream=0)
    rows_out = bootstrap_indices(50, B, seed=3, stream=1)
    for key, statistic in (
        ("AUROC", metrics.ood_auroc),
        ("AUPR-In", lambda a, b: metrics.ood_aupr(a, b, positive="in")),
        ("FPR@TPR", lambda a, b: metrics.fpr_at_tpr(a, b, tpr=0.9, positive="in")),
    ):
        ref = [statistic(s_in[i], s_out[j]) for i, j in zip(rows_in, rows_out, strict=True)]
        np.testing.assert_allclose(out[key], ref, rtol=0, atol=1e-12)


def test_undefined_resamples_are_nan_and_left_out():
    probs = torch.tensor([[0.9, 0.1]] * 19 + [[0.2, 0.8]])
    labels = torch.zeros(20, dtype=torch.long)  # one wrong prediction: many resamples miss it
    values = metrics.bootstrap_classification(probs, labels, {"u": probs[:, 1]}, n_resamples=200)
    auroc = values["misclassification AUROC (u)"]
    assert np.isnan(auroc).any() and not np.isnan(auroc).all()
    low, high = percentile_interval(auroc)
    assert math.isfinite(low) and math.isfinite(high)
    assert all(math.isnan(v) for v in percentile_interval([math.nan, math.nan]))


def test_reproducible_from_the_seed():
    probs, labels, entropy, _ = _classification()
    a = metrics.bootstrap_classification(probs, labels, {"h": entropy}, n_resamples=70, seed=5)
    b = metrics.bootstrap_classification(probs, labels, {"h": entropy}, n_resamples=70, seed=5)
    c = metrics.bootstrap_classification(probs, labels, {"h": entropy}, n_resamples=70, seed=6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["ECE"], c["ECE"])
    # more resamples extend the same sequence (drawn in fixed blocks)
    idx = bootstrap_indices(160, 70, seed=5)
    assert torch.equal(bootstrap_indices(160, 200, seed=5)[:70], idx)
    assert idx.shape == (70, 160) and int(idx.min()) >= 0 and int(idx.max()) < 160


def test_percentile_interval_and_options():
    assert percentile_interval(np.arange(101.0), level=0.5) == (25.0, 75.0)
    with pytest.raises(InvalidInputError):
        percentile_interval([1.0, 2.0], level=1.0)
    with pytest.raises(InvalidInputError):
        bootstrap_indices(0)
    with pytest.raises(InvalidInputError):
        bootstrap_indices(5, n_resamples=0)
    with pytest.raises(InvalidInputError):
        bootstrap_interval(np.mean)
    with pytest.raises(InvalidInputError):
        bootstrap_interval(lambda a, b: 0.0, np.zeros(3), np.zeros(4))
    with pytest.raises(InvalidInputError):
        metrics.bootstrap_classification(torch.eye(3), torch.arange(3), {"u": torch.zeros(2)})


def test_intervals_cover_the_true_value_at_about_the_nominal_level():
    """Coverage of 95% percentile intervals, over 200 synthetic data sets from a known population.

    ECE: top-label confidence ``c ~ U(0.55, 1)``, right with probability ``c - 0.1`` (two classes),
    ``n = 600`` inputs, 15 bins: every non-empty bin's gap is 0.1, so the population's binned ECE is
    0.1 (checked on 10⁶ inputs as the large-sample truth). AUROC: in-distribution scores ``N(0, 1)``
    (``n = 300``), OOD scores ``N(1, 1)`` (``n = 150``): the true AUROC is ``Φ(1/√2) = 0.7602``.

    With a true coverage of 0.95, the number of the 200 intervals that cover is Binomial(200, 0.95):
    standard deviation 0.0154 in coverage. The percentile bootstrap also under-covers a little at
    these sample sizes (and the binned ECE is biased upwards by the binomial noise in each bin), so
    the test accepts a coverage in [0.89, 0.99]: the nominal level within 3 binomial standard
    deviations (±0.046) widened by 0.015 below for that known under-coverage. A broken interval (e.g.
    one from the MC samples, or an index mistake) covers far less. Fixed seeds: deterministic.
    """
    g = torch.Generator().manual_seed(12345)
    n_sets, n_resamples = 200, 300

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        conf = 0.55 + 0.45 * torch.rand(n, generator=g, dtype=torch.float64)
        right = torch.rand(n, generator=g, dtype=torch.float64) < conf - 0.1
        probs = torch.stack([conf, 1 - conf], 1)
        return probs, torch.where(right, 0, 1)

    true_ece = metrics.expected_calibration_error(*draw(1_000_000))
    assert true_ece == pytest.approx(0.1, abs=0.002)
    true_auroc = float(torch.special.ndtr(torch.tensor(1 / math.sqrt(2))))
    covered_ece = covered_auroc = 0
    for k in range(n_sets):
        probs, labels = draw(600)
        ece = metrics.bootstrap_classification(probs, labels, n_resamples=n_resamples, seed=k)["ECE"]
        low, high = percentile_interval(ece)
        covered_ece += low <= true_ece <= high
        s_in = torch.randn(300, generator=g, dtype=torch.float64)
        s_out = torch.randn(150, generator=g, dtype=torch.float64) + 1
        low, high = percentile_interval(
            metrics.bootstrap_ood(s_in, s_out, n_resamples=n_resamples, seed=k)["AUROC"]
        )
        covered_auroc += low <= true_auroc <= high
    coverage_ece, coverage_auroc = covered_ece / n_sets, covered_auroc / n_sets
    assert 0.89 <= coverage_ece <= 0.99, coverage_ece
    assert 0.89 <= coverage_auroc <= 0.99, coverage_auroc
