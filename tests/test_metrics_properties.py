"""Property tests (hypothesis): ranges, consistency and convergence of the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mcdrop import metrics
from mcdrop.recalibration import TemperatureScaling

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)

EDGE_VALUES = [0.0, 1.0, 0.5, 0.1, 0.2, 1 / 3, 2 / 3, 0.6, 0.8, 0.9, 14 / 15, 1 / 15]


@st.composite
def multiclass(draw):
    n = draw(st.integers(1, 40))
    k = draw(st.integers(2, 6))
    raw = draw(
        arrays(np.float64, (n, k), elements=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5])))
    )
    raw[:, 0] += 1e-3  # no all-zero rows
    probs = raw / raw.sum(1, keepdims=True)
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    return probs, labels


@st.composite
def binary(draw):
    n = draw(st.integers(1, 40))
    p = draw(arrays(np.float64, (n,), elements=st.one_of(st.floats(0.0, 1.0), st.sampled_from(EDGE_VALUES))))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, 1)))
    return p, labels


OPTIONS = st.fixed_dictionaries(
    {
        "n_bins": st.integers(1, 20),
        "norm": st.sampled_from(["l1", "l2", "max"]),
        "binning": st.sampled_from(["uniform", "quantile"]),
    }
)


@SETTINGS
@given(data=multiclass(), options=OPTIONS)
def test_multiclass_calibration_errors_are_in_unit_interval(data, options) -> None:
    probs, labels = data
    ece = metrics.expected_calibration_error(probs, labels, **options)
    cw = metrics.classwise_calibration_error(probs, labels, **options)
    assert 0.0 <= ece <= 1.0 and 0.0 <= cw <= 1.0
    if options["norm"] == "l1":
        table = metrics.reliability_table(probs, labels, n_bins=options["n_bins"], binning=options["binning"])
        assert table.ece == pytest.approx(ece, abs=1e-12)
        assert table.count.sum() == len(labels)


@SETTINGS
@given(data=binary(), options=OPTIONS, target=st.sampled_from(["top_label", "positive_class"]))
def test_binary_calibration_errors_are_in_unit_interval_and_form_invariant(data, options, target) -> None:
    p, labels = data
    ece = metrics.expected_calibration_error(p, labels, target=target, **options)
    assert 0.0 <= ece <= 1.0
    as_two_columns = np.stack([1 - p, p], axis=1)
    assert metrics.expected_calibration_error(
        as_two_columns, labels, target=target, **options
    ) == pytest.approx(ece, abs=1e-12)
    # l1 <= l2 <= max (weighted mean <= weighted root mean square <= maximum)
    l1, l2, mx = (
        metrics.expected_calibration_error(p, labels, target=target, n_bins=options["n_bins"], norm=norm)
        for norm in ("l1", "l2", "max")
    )
    assert l1 <= l2 + 1e-12 and l2 <= mx + 1e-12


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(2, 10),
    alpha=st.floats(0.1, 5.0),
    n_bins=st.sampled_from([10, 15, 50]),
    binning=st.sampled_from(["uniform", "quantile"]),
)
def test_perfectly_calibrated_model_has_ece_tending_to_zero(seed, k, alpha, n_bins, binning) -> None:
    rng = np.random.default_rng(seed)
    n_max = 20_000
    probs = rng.dirichlet(np.full(k, alpha), size=n_max)
    labels = np.minimum((np.cumsum(probs, 1) < rng.random((n_max, 1))).sum(1), k - 1)  # y ~ p
    for n in (200, 2_000, n_max):
        ece = metrics.expected_calibration_error(probs[:n], labels[:n], n_bins=n_bins, binning=binning)
        # a calibrated model's ECE is pure finite-sample bias, at most about 0.4 sqrt(M / n) on
        # average; the bound 2 sqrt(M / n) goes to zero as n grows
        assert ece <= 2 * math.sqrt(n_bins / n)
    assert ece < 0.08


@st.composite
def logits_and_labels(draw):
    samples = draw(st.sampled_from([None, 1, 3]))
    n = draw(st.integers(1, 30))
    k = draw(st.integers(2, 5))
    shape = (n, k) if samples is None else (samples, n, k)
    logits = draw(arrays(np.float64, shape, elements=st.floats(-15.0, 15.0)))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    return logits, labels


def _exact_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(logits / T) (averaged over MC samples first), computed in numpy."""
    from scipy.special import logsumexp

    z = logits / temperature
    log_p = z - logsumexp(z, axis=-1, keepdims=True)
    if z.ndim == 3:
        log_p = logsumexp(log_p, axis=0) - math.log(z.shape[0])
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


@SETTINGS
@given(data=logits_and_labels())
@pytest.mark.filterwarnings("ignore:TemperatureScaling. the fitted temperature .* bound of bounds:mcdrop.errors.McdropWarning")
def test_temperature_scaling_never_increases_validation_nll(data) -> None:
    logits, labels = data
    ts = TemperatureScaling().fit(logits, labels)
    before, after = _exact_nll(logits, labels, 1.0), _exact_nll(logits, labels, ts.temperature_)
    assert after <= before + 1e-12
    assert ts.nll_after_ == pytest.approx(after, abs=1e-9) and ts.nll_before_ == pytest.approx(
        before, abs=1e-9
    )

    # the same holds for the metric on the calibrated probabilities, wherever its clamp is inactive
    def probs(temperature: float) -> np.ndarray:
        p = torch.softmax(torch.from_numpy(logits) / temperature, dim=-1)
        return (p.mean(0) if p.ndim == 3 else p).numpy()

    raw, calibrated = probs(1.0), ts.transform(logits)
    np.testing.assert_allclose(calibrated, probs(ts.temperature_), atol=1e-12)
    eps = np.finfo(np.float64).eps
    rows = np.arange(len(labels))
    if raw[rows, labels].min() > eps and calibrated[rows, labels].min() > eps:
        nll_raw = metrics.negative_log_likelihood(raw / raw.sum(1, keepdims=True), labels)
        nll_cal = metrics.negative_log_likelihood(calibrated / calibrated.sum(1, keepdims=True), labels)
        assert nll_cal <= nll_raw + 1e-9


@SETTINGS
@given(
    data=st.integers(1, 60).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, (n,), elements=st.floats(-5, 5)),
            arrays(np.float64, (n,), elements=st.floats(0.01, 5)),
            arrays(np.float64, (n,), elements=st.floats(-5, 5)),
        )
    ),
    kind=st.sampled_from(["interval", "quantile"]),
)
def test_regression_calibration_errors_are_bounded(data, kind) -> None:
    mean, std, targets = data
    mace = metrics.mean_absolute_calibration_error(mean, std, targets, kind=kind)
    rmsce = metrics.root_mean_squared_calibration_error(mean, std, targets, kind=kind)
    area = metrics.miscalibration_area(mean, std, targets, kind=kind)
    assert 0.0 <= mace <= rmsce + 1e-12 <= 1.0 + 1e-12
    assert 0.0 <= area <= 0.5 + 1e-12
    assert 0.0 <= metrics.picp(mean, std, targets) <= 1.0


@SETTINGS
@given(
    u=arrays(np.float64, st.integers(2, 50), elements=st.floats(0, 1).map(lambda x: round(x, 1))),
    seed=st.integers(0, 1000),
)
def test_selective_and_ood_ranges(u, seed) -> None:
    rng = np.random.default_rng(seed)
    errors = rng.random(u.shape[0]) < 0.5
    assert 0.0 <= metrics.aurc(u, errors) <= 1.0
    assert metrics.e_aurc(u, errors) >= 0.0
    half = u.shape[0] // 2
    auroc = metrics.ood_auroc(u[:half], u[half:])
    assert 0.0 <= auroc <= 1.0
    assert metrics.ood_auroc(u[half:], u[:half]) == pytest.approx(1 - auroc, abs=1e-12)
    for positive in ("in", "out"):
        assert 0.0 <= metrics.ood_aupr(u[:half], u[half:], positive=positive) <= 1.0
        assert 0.0 <= metrics.fpr_at_tpr(u[:half], u[half:], positive=positive) <= 1.0
