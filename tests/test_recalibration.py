"""Temperature scaling, variance scaling and isotonic recalibration."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mcdrop import ClassificationPrediction, MCDropout, RegressionPrediction, metrics
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropError, McdropWarning
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
    with pytest.warns(McdropWarning, match="lower bound.*probabilities passed as logits"):  # MC samples too
        TemperatureScaling().fit(torch.stack([probs, probs]), labels)


def test_mc_samples_whose_average_is_underconfident_warn_of_vote_fractions_at_the_lower_bound() -> None:
    # two of three samples vote for the label with a margin, one against: the MC mean's probability of
    # the label rises as T falls, up to the vote fraction 2/3, so no temperature inside the bounds is best
    logits = torch.tensor([[[5.0, 0.0]], [[5.0, 0.0]], [[0.0, 5.0]]]).repeat(1, 20, 1)
    labels = torch.zeros(20, dtype=torch.long)
    with pytest.warns(McdropWarning, match="no better than the lower bound.*one-hot vote.*pred.probs.log"):
        ts = TemperatureScaling().fit(logits, labels)
    assert ts.nll_after_ == pytest.approx(
        math.log(3 / 2), rel=1e-5
    )  # the vote fraction's NLL: flat below T ~ 0.4
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


# ----------------------------------------------------------------------------------------------
# recalibrating predictions of MCDropout
# ----------------------------------------------------------------------------------------------
class _Tempered(nn.Module):
    """The model with its outputs divided by ``t`` (logits), or log-softmaxed then divided (``log``)."""

    def __init__(self, net: nn.Module, t: float) -> None:
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / self.t


def _classifier(k: int = 4, seed: int = 0, head: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, k)]
    return nn.Sequential(*layers, *([head] if head is not None else [])).eval()


def _inputs(n: int = 40, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


_STATISTICS = (
    "probs",
    "std",
    "predictive_entropy",
    "expected_entropy",
    "variation_ratio",
    "mutual_information",
)
_STANDARD_ERRORS = ("probs", "std", "predictive_entropy", "expected_entropy", "mutual_information")


def _assert_same_prediction(a: ClassificationPrediction, b: ClassificationPrediction, atol: float) -> None:
    for name in _STATISTICS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol, msg=name)
    for name in _STANDARD_ERRORS:
        torch.testing.assert_close(
            a.standard_error(name), b.standard_error(name), rtol=0, atol=atol, msg=name
        )


def test_a_tempered_prediction_is_the_prediction_of_the_tempered_model_with_the_same_masks() -> None:
    net, x, t = _classifier(), _inputs(), 2.5
    pred = MCDropout(net, n_samples=25, keep_samples=True, seed=3).predict(x)
    pred.targets = torch.arange(40) % 4
    before = pred.probs.clone()
    ts = TemperatureScaling()
    ts.temperature_ = t  # as if fitted
    hot = ts.transform(pred)
    assert isinstance(hot, ClassificationPrediction) and hot is not pred
    assert torch.equal(pred.probs, before)  # the prediction given is not changed
    assert hot.n_samples == 25 and hot.output_type == "logits" and torch.equal(hot.targets, pred.targets)
    torch.testing.assert_close(hot.samples, pred.samples / t, rtol=0, atol=0)
    # what MCDropout gives for a model whose logits are divided by T, drawn with the same masks
    reference = MCDropout(_Tempered(net, t), n_samples=25, keep_samples=True, seed=3).predict(x)
    torch.testing.assert_close(reference.samples, hot.samples, rtol=0, atol=1e-6)
    _assert_same_prediction(hot, reference, atol=1e-6)
    # and by hand from the samples
    p = torch.softmax(pred.samples.double() / t, -1)
    mean = p.mean(0)
    h = -(p * p.log()).sum(-1)
    torch.testing.assert_close(hot.probs.double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(hot.std.double(), p.std(0, correction=0), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        hot.predictive_entropy.double(), -(mean * mean.log()).sum(-1), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(hot.expected_entropy.double(), h.mean(0), rtol=0, atol=1e-6)
    votes = torch.nn.functional.one_hot(p.argmax(-1), 4).sum(0).amax(-1)
    torch.testing.assert_close(hot.variation_ratio.double(), 1 - votes.double() / 25, rtol=0, atol=1e-7)
    torch.testing.assert_close(
        hot.standard_error("probs").double(), p.std(0, correction=1) / math.sqrt(25), rtol=0, atol=1e-6
    )
    assert bool((hot.predictive_entropy > pred.predictive_entropy).all())  # T > 1 flattens


@pytest.mark.parametrize("kind", ["probs", "log_probs", "binary_probs", "binary_logits", "dense"])
def test_tempering_reads_the_samples_as_the_wrapper_read_them(kind: str) -> None:
    t = 0.6
    x = _inputs(12, seed=2)
    if kind in ("probs", "log_probs"):
        logits_net = _classifier(k=3, seed=4)
        head = nn.Softmax(-1) if kind == "probs" else nn.LogSoftmax(-1)
        net, options = nn.Sequential(logits_net, head).eval(), {"output_type": kind}
    elif kind.startswith("binary"):
        logits_net = _classifier(k=1, seed=5)
        net = nn.Sequential(logits_net, nn.Sigmoid()).eval() if kind == "binary_probs" else logits_net
        options = {"task": "classification", "output_type": kind.split("_")[1]}
    else:  # a segmentation map (batch, K, 2, 2)
        logits_net = nn.Sequential(_classifier(k=12, seed=6), nn.Unflatten(1, (3, 2, 2))).eval()
        net, options = logits_net, {}
    pred = MCDropout(net, n_samples=10, keep_samples=True, seed=9, **options).predict(x)
    assert pred.output_type == options.get("output_type", "logits")
    ts = TemperatureScaling()
    ts.temperature_ = t
    hot = ts.transform(pred)
    read = {"task": "classification", "output_type": "logits"} if kind.startswith("binary") else {}
    reference = MCDropout(_Tempered(logits_net, t), n_samples=10, seed=9, **read).predict(x)
    for name in _STATISTICS:
        torch.testing.assert_close(getattr(hot, name), getattr(reference, name), rtol=0, atol=2e-5, msg=name)
    assert hot.samples.shape == pred.samples.shape and hot.class_dim == pred.class_dim


def test_accuracy_is_kept_where_no_argmax_can_change_and_changed_by_the_counter_example() -> None:
    # one pass (the dropout-off baseline): softmax(z / T) keeps the argmax of z for every T
    net, x = _classifier(k=5, seed=7), _inputs(60, seed=3)
    labels = torch.arange(60) % 5
    base = MCDropout(net, n_samples=10, keep_samples=True).predict_deterministic(x)
    # two classes, every sample voting alike: every tempered sample keeps its side of 1/2
    binary = _classifier(k=2, seed=8)
    pred = MCDropout(binary, n_samples=8, keep_samples=True, seed=0).predict(x)
    agree = (pred.samples.argmax(-1) == pred.samples[0].argmax(-1)).all(0)
    assert int(agree.sum()) > 40
    for t in (0.2, 3.0, 50.0):
        ts = TemperatureScaling()
        ts.temperature_ = t
        assert torch.equal(ts.transform(base).predicted, base.predicted)
        assert metrics.accuracy(ts.transform(base).probs, labels) == metrics.accuracy(base.probs, labels)
        assert torch.equal(ts.transform(pred).predicted[agree], pred.predicted[agree])
    # the counter-example: three samples of one input
    samples = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])
    hand = ClassificationPrediction(
        n_samples=3, samples=samples, probs=torch.softmax(samples, -1).mean(0), output_type="logits"
    )
    one, ten = TemperatureScaling(), TemperatureScaling()
    one.temperature_, ten.temperature_ = 1.0, 10.0
    assert one.transform(hand).predicted.tolist() == [1]
    assert ten.transform(hand).predicted.tolist() == [0]
    torch.testing.assert_close(
        ten.transform(hand).probs, torch.softmax(samples / 10, -1).mean(0), rtol=0, atol=1e-7
    )
    target = torch.tensor([1])
    assert metrics.accuracy(one.transform(hand).probs, target) == 1.0
    assert metrics.accuracy(ten.transform(hand).probs, target) == 0.0
    # the arrays path says the same
    assert ten.transform(samples).argmax(-1).tolist() == [0]


def test_fitting_on_a_prediction_minimises_the_nll_of_the_mc_predictive_mean() -> None:
    net, x = _classifier(k=4, seed=10), _inputs(300, seed=4)
    with torch.no_grad():  # labels drawn from a flatter law than the model's: T > 1 is right
        labels = torch.multinomial(
            torch.softmax(net(x) / 3, -1), 1, generator=torch.Generator().manual_seed(0)
        )[:, 0]
    loader = DataLoader(TensorDataset(x, labels), batch_size=100)
    pred = MCDropout(net, n_samples=16, keep_samples=True, seed=0).predict_loader(loader, progress=False)
    ts = TemperatureScaling().fit(pred)  # labels from pred.targets
    assert ts.temperature_ > 1
    same = TemperatureScaling().fit(pred.samples.double(), labels)  # the MC logits themselves
    assert ts.temperature_ == pytest.approx(same.temperature_, rel=1e-6)

    def nll(t: float) -> float:
        mean = torch.softmax(pred.samples.double() / t, -1).mean(0)
        return float(-mean[torch.arange(300), labels].log().mean())

    assert ts.nll_after_ == pytest.approx(nll(ts.temperature_), abs=1e-6)
    assert ts.nll_before_ == pytest.approx(nll(1.0), abs=1e-6)
    assert all(ts.nll_after_ <= nll(ts.temperature_ * f) + 1e-9 for f in (0.95, 1.05))
    hot = ts.transform(pred)
    assert metrics.negative_log_likelihood(hot.probs, labels) == pytest.approx(ts.nll_after_, abs=1e-5)
    # a model giving probabilities is fitted through their logarithms: the same temperature
    soft = MCDropout(
        nn.Sequential(net, nn.Softmax(-1)).eval(),
        n_samples=16,
        keep_samples=True,
        seed=0,
        output_type="probs",
    ).predict_loader(loader, progress=False)
    assert TemperatureScaling().fit(soft, labels).temperature_ == pytest.approx(ts.temperature_, rel=1e-4)


def test_temperature_scaling_of_predictions_errors() -> None:
    net, x = _classifier(), _inputs(8)
    ts = TemperatureScaling()
    ts.temperature_ = 2.0
    plain = MCDropout(net, n_samples=4, seed=0).predict(x)
    for call in (lambda: ts.fit(plain, torch.zeros(8, dtype=torch.long)), lambda: ts.transform(plain)):
        with pytest.raises(InvalidInputError, match=r"MCDropout\(\.\.\., keep_samples=True\)"):
            call()
    kept = MCDropout(net, n_samples=4, seed=0, keep_samples=True).predict(x)
    with pytest.raises(InvalidInputError, match="no labels to fit on"):
        TemperatureScaling().fit(kept)
    with pytest.raises(InvalidInputError, match="labels must have shape"):
        TemperatureScaling().fit(kept, torch.zeros(7, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="labels are needed"):
        TemperatureScaling().fit(kept.samples)
    regression = MCDropout(_classifier(k=1), n_samples=4, keep_samples=True, seed=0).predict(x)
    with pytest.raises(InvalidTypeError, match="VarianceScaling or IsotonicRecalibration"):
        ts.transform(regression)
    unknown = ClassificationPrediction(n_samples=4, samples=kept.samples, probs=kept.probs)
    with pytest.raises(InvalidInputError, match="output_type"):
        ts.transform(unknown)
    with pytest.raises(NotFittedError):
        TemperatureScaling().transform(kept)


def _regressor(seed: int = 0, aleatoric: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 2 if aleatoric else 1)
    ).eval()


def test_variance_scaling_of_a_prediction_scales_both_variances() -> None:
    net, x = _regressor(seed=1, aleatoric=True), _inputs(200, seed=5)
    with torch.no_grad():
        y = net(x)[:, 0] + 0.8 * torch.randn(200, generator=torch.Generator().manual_seed(2))
    mc = MCDropout(net, n_samples=20, aleatoric="log_variance", keep_samples=True, seed=0)
    pred = mc.predict(x)
    vs = VarianceScaling().fit(pred, y)
    arrays = VarianceScaling().fit(pred.mean, pred.total_std, y.reshape(200, 1))
    assert vs.factor_ == pytest.approx(arrays.factor_, rel=1e-12)
    pred.targets = y
    assert VarianceScaling().fit(pred).factor_ == vs.factor_  # targets from the prediction
    before = pred.variance.clone()
    wide = vs.transform(pred)
    s = vs.factor_
    assert isinstance(wide, RegressionPrediction) and torch.equal(pred.variance, before)
    assert torch.equal(wide.mean, pred.mean) and torch.equal(wide.targets, pred.targets)
    torch.testing.assert_close(wide.variance, pred.variance * s**2)
    torch.testing.assert_close(wide.aleatoric_variance, pred.aleatoric_variance * s**2)
    torch.testing.assert_close(wide.total_std, pred.total_std * s)
    torch.testing.assert_close(wide.samples.var(0, correction=0), wide.variance, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(wide.samples.mean(0), pred.samples.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(wide.standard_error("variance"), pred.standard_error("variance") * s**2)
    torch.testing.assert_close(wide.standard_error("std"), pred.standard_error("std") * s)
    assert torch.equal(wide.standard_error("mean"), pred.standard_error("mean"))
    assert metrics.gaussian_nll(wide.mean, wide.total_std, y.reshape(200, 1)) == pytest.approx(
        vs.nll_after_, abs=1e-5
    )


def test_regression_recalibration_of_predictions_errors() -> None:
    net, x = _regressor(seed=2), _inputs(10)
    mc = MCDropout(net, n_samples=5, seed=0)
    pred, base = mc.predict(x), mc.predict_deterministic(x)
    y = torch.zeros(10)
    for make in (VarianceScaling, IsotonicRecalibration):
        with pytest.raises(InvalidInputError, match="total std is 0 for 10 of 10"):
            make().fit(base, y)
        with pytest.raises(InvalidInputError, match="no targets to fit on"):
            make().fit(pred)
        with pytest.raises(InvalidInputError, match="pass only the targets"):
            make().fit(pred, y, y)
        with pytest.raises(InvalidTypeError, match="TemperatureScaling"):
            make().fit(MCDropout(_classifier(), n_samples=3).predict(x), torch.zeros(10))
        with pytest.raises(InvalidInputError, match="needs all three"):
            make().fit(pred.mean, pred.std)
    vs = VarianceScaling().fit(pred, y + 1)
    with pytest.raises(InvalidTypeError, match="TemperatureScaling"):
        vs.transform(MCDropout(_classifier(), n_samples=3).predict(x))


def test_isotonic_recalibration_reads_a_prediction_as_its_gaussian() -> None:
    net, x = _regressor(seed=3), _inputs(400, seed=6)
    with torch.no_grad():
        y = net(x)[:, 0] + 0.5 * torch.randn(400, generator=torch.Generator().manual_seed(3))
    pred = MCDropout(net, n_samples=20, seed=0).predict(x)
    pred.targets = y
    iso = IsotonicRecalibration().fit(pred)
    arrays = IsotonicRecalibration().fit(pred.mean, pred.total_std, y.reshape(400, 1))
    for level in (0.5, 0.9):
        lo, hi = iso.interval(pred, level)
        lo_a, hi_a = arrays.interval(pred.mean, pred.total_std, level)
        assert torch.equal(lo, lo_a) and torch.equal(hi, hi_a) and lo.shape == pred.mean.shape
        assert torch.equal(iso.interval(pred, level=level)[0], lo)
        assert torch.equal(iso.quantile(pred, level), arrays.quantile(pred.mean, pred.total_std, level))
    values = y.reshape(400, 1)
    assert torch.equal(iso.cdf(pred, values), arrays.cdf(pred.mean, pred.total_std, values))
    lo, hi = iso.interval(pred, 0.9)  # in-sample coverage, recalibrated to the nominal level
    assert float(((values >= lo) & (values <= hi)).double().mean()) == pytest.approx(0.9, abs=0.02)
    with pytest.raises(InvalidInputError, match="does not transform a prediction"):
        iso.transform(pred)
