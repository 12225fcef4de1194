"""Numerical robustness: probabilities of exactly 0 and 1, half precision, cancellation, n = 1, n = 10^7.

* Entropies (predictive, expected, mutual information) and the NLL are finite and exact for
  probabilities of exactly 0 and 1 (as probabilities, as log-probabilities of -inf, and as saturated
  logits), in float16, bfloat16, float32 and float64.
* Variances are never negative: the streaming mean/M2 merge under catastrophic cancellation (large
  offsets, tiny spread, any chunking) stays >= 0 and close to the float64 truth.
* Every metric is defined (or NaN with a reason, or an mcdrop error saying why) for n = 1, and the
  streaming metrics stay exact for 10^7 inputs.

Open bugs found here that belong to files other engineers are changing are strict ``xfail`` tests:
they fail (as XPASS) the moment the bug is fixed, so the marker is removed with the fix.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mcdrop
from mcdrop import metrics as M
from mcdrop._statistics import RunningMoments
from mcdrop.errors import InvalidInputError, McdropError, NonFiniteError, NoRandomnessWarning
from mcdrop.metrics.streaming import StreamingClassificationMetrics, StreamingRegressionMetrics

LONG = os.environ.get("MCDROP_FUZZ") == "long"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def fuzz(examples: int) -> settings:
    if LONG:
        return settings(settings.get_profile("mcdrop-long"))
    return settings(settings.get_profile("mcdrop-ci"), max_examples=examples)


pytestmark = pytest.mark.usefixtures("one_thread")


class Picker(nn.Module):
    """Every pass picks, for every input, one row of ``values`` ``(V, K)`` by its dropout mask.

    The outputs are exactly the rows of the table (exact 0s and 1s stay exact), and which row each
    sample gets is random through a real ``nn.Dropout``, so the model is sampled like any other,
    whatever strategy the engine uses.
    """

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.register_buffer("values", values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.drop(torch.ones_like(x[:, :1]).repeat(1, 12)) > 0
        index = (bits.long() * (2 ** torch.arange(12))).sum(1) % self.values.shape[0]
        return self.values[index]


def picked(
    values: torch.Tensor, output_type: str, task: str = "classification", n_samples: int = 48, **options
):
    """``(prediction, per-sample values (N, K) in float64)`` of one input through :class:`Picker`."""
    model = Picker(values).eval()
    mc = mcdrop.MCDropout(
        model, n_samples=n_samples, output_type=output_type, task=task, seed=0, keep_samples=True, **options
    )
    pred = mc.predict(torch.zeros(1, 3, dtype=values.dtype if values.is_floating_point() else torch.float32))
    return pred, pred.samples[:, 0].double()


def per_sample_probs(raw: torch.Tensor, form: str) -> torch.Tensor:
    if raw.shape[-1] == 1:
        p1 = torch.sigmoid(raw) if form == "logits" else (raw.exp() if form == "log_probs" else raw)
        return torch.cat([1 - p1, p1], -1)
    if form == "logits":
        return torch.softmax(raw, -1)
    return raw.exp() if form == "log_probs" else raw


def entropies(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean probabilities, H[mean], mean H[p_t])`` in float64, with 0 log 0 = 0."""
    mean = p.mean(0)
    return mean, torch.special.entr(mean).sum(-1), torch.special.entr(p).sum(-1).mean(0)


# ----------------------------------------------------------------------------- exact 0 and 1
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["probs", "log_probs", "logits"])
@pytest.mark.parametrize("k", [1, 3])
def test_entropies_of_probabilities_exactly_0_and_1_are_exact(dtype, form, k) -> None:
    """Every sample is certain (one-hot, or a binary 0/1); the samples disagree."""
    onehot = torch.eye(3, dtype=torch.float64)[[0, 0, 2, 0]] if k == 3 else torch.tensor([[1.0], [0.0]])
    if form == "probs":
        values = onehot
    elif form == "log_probs":
        values = onehot.log()  # 0 and -inf
    else:  # logits so large the softmax / sigmoid saturates to exactly 0 and 1
        big = 6e4 if dtype == torch.float16 else 1e30
        values = (onehot - 1) * big if k == 3 else (2 * onehot - 1) * big
    pred, raw = picked(values.to(dtype), form)
    p = per_sample_probs(raw, form)
    assert set(p.unique().tolist()) <= {0.0, 1.0}  # exactly certain samples ...
    assert len(set(map(tuple, p.tolist()))) > 1  # ... that disagree
    mean, h, e = entropies(p)
    assert e == 0
    tol = {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(pred.probs[0].double(), mean, **tol)
    torch.testing.assert_close(pred.predictive_entropy[0].double(), h, **tol)
    assert pred.expected_entropy[0] == 0  # exactly: 0 log 0 is 0, not NaN
    torch.testing.assert_close(pred.mutual_information[0].double(), h, **tol)
    votes = p.argmax(-1).bincount(minlength=p.shape[-1]).max().item()
    assert math.isclose(float(pred.variation_ratio[0]), 1 - votes / p.shape[0], rel_tol=1e-6)
    for value in (pred.std, pred.predictive_entropy, pred.expected_entropy, pred.mutual_information):
        assert torch.isfinite(value).all() and (value >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_certain_identical_samples_have_zero_uncertainty_and_say_so(dtype) -> None:
    values = torch.tensor([[0.0, 1.0, 0.0]], dtype=dtype)
    with pytest.warns(NoRandomnessWarning, match="identical"):
        pred, _ = picked(values, "probs")
    assert pred.predictive_entropy[0] == 0 and pred.expected_entropy[0] == 0
    assert pred.mutual_information[0] == 0 and (pred.std == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nll_and_brier_of_probabilities_exactly_0_and_1(dtype) -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    labels = torch.tensor([0, 1, 1, 0])  # two certain and right, two certain and wrong
    eps = torch.finfo(dtype).eps
    nll = M.negative_log_likelihood(probs, labels)
    assert math.isfinite(nll) and math.isclose(nll, -math.log(eps) / 2, rel_tol=1e-12)
    assert M.negative_log_likelihood(probs[:2], labels[:2]) == 0.0  # and not -0.0
    assert math.copysign(1.0, M.negative_log_likelihood(probs[:2], labels[:2])) == 1.0
    assert M.brier_score(probs, labels) == 1.0
    assert M.expected_calibration_error(probs, labels) == 0.5
    # the binary (n,) form gives the same numbers
    assert math.isclose(M.negative_log_likelihood(probs[:, 1], labels), nll, rel_tol=1e-12)
    assert M.brier_score(probs[:, 1], labels) == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_binary_nll_uses_the_exact_complement(dtype) -> None:
    """1 - p for p < 0.5 is not representable in half precision: it is taken in float64."""
    p = torch.tensor([0.498, 0.3, 0.001], dtype=dtype)
    labels = torch.tensor([0, 0, 0])
    exact = float(-(1 - p.double()).log().mean())
    assert math.isclose(M.negative_log_likelihood(p, labels), exact, rel_tol=1e-12)
    two_columns = torch.stack([1 - p.double(), p.double()], 1)  # the same problem, exactly, in float64
    assert math.isclose(M.negative_log_likelihood(two_columns, labels), exact, rel_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_logits_give_the_float64_statistics(dtype) -> None:
    torch.manual_seed(0)
    values = (torch.randn(16, 5, dtype=torch.float64) * 8).to(dtype)  # sharp, in half precision
    pred, raw = picked(values, "logits")
    mean, h, e = entropies(torch.softmax(raw, -1))
    torch.testing.assert_close(pred.probs[0].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.predictive_entropy[0].double(), h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.expected_entropy[0].double(), e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- variances
@fuzz(60)
@given(
    offset=st.sampled_from([0.0, 1.0, 1e3, 1e4, 1e6, -1e6, 1e12]),
    spread=st.sampled_from([0.0, 1e-6, 1e-3, 1.0]),
    n=st.integers(1, 60),
    chunks=st.lists(st.integers(1, 7), min_size=1, max_size=30),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_running_variance_is_never_negative_and_close_to_float64(
    offset, spread, n, chunks, dtype, seed
) -> None:
    if dtype == torch.float16:
        offset = max(min(offset, 6e4), -6e4)
    gen = torch.Generator().manual_seed(seed)
    samples = (offset + spread * torch.randn(n, 3, 2, generator=gen, dtype=torch.float64)).to(dtype)
    moments = RunningMoments()
    done, i = 0, 0
    while done < n:
        k = min(chunks[i % len(chunks)], n - done)
        moments.update(0, 3, samples[done : done + k], 3)
        done, i = done + k, i + 1
    var = moments.variance
    assert torch.isfinite(var).all() and (var >= 0).all()
    truth = samples.double().var(0, correction=0)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    scale = samples.double().abs().max().item() ** 2
    assert float((var.double() - truth).abs().max()) <= 64 * n * acc_eps * scale + 1e-300
    if spread == 0.0:  # identical samples: 0, up to the rounding of their mean (n x may not be exact)
        assert float(var.max()) <= (4 * acc_eps * abs(offset)) ** 2


def test_regression_variance_through_the_wrapper_is_never_negative() -> None:
    # samples 1e6 + {0, 4}: in float32 the naive E[x^2] - E[x]^2 cancels catastrophically (the ulp
    # of 1e12 is 65536), and can come out negative
    values = torch.tensor([[1e6], [1e6 + 4.0]], dtype=torch.float32)
    pred, raw = picked(values, "logits", task="regression", max_batch_size=5)
    truth = raw.var(0, correction=0)
    assert (pred.variance >= 0).all() and truth > 0
    # float32 statistics: the mean is rounded to the ulp of 1e6 (0.0625), a relative error of about
    # ulp / spread in the variance; the naive formula would be off by 100% or more
    torch.testing.assert_close(pred.variance.double()[0], truth, rtol=0.02, atol=0)
    low, high = pred.interval(0.9)
    assert (low <= pred.mean).all() and (pred.mean <= high).all()


def test_predictive_moments_and_streaming_sharpness_are_never_negative() -> None:
    samples = torch.full((7, 5), 1e8, dtype=torch.float32) + torch.tensor([0.0, 8.0] * 3 + [0.0])[:, None]
    mean, std = M.predictive_moments(samples)
    assert (std >= 0).all() and torch.isfinite(std).all()
    acc = StreamingRegressionMetrics()
    acc.update(mean, std.clamp(min=1.0), mean)
    assert acc.summary()["sharpness"] >= 0


def test_crps_with_a_tiny_std_tends_to_the_absolute_error() -> None:
    """sigma * z overflowed to inf for sigma near 0 (z = inf); the CRPS tends to |y - mu|."""
    for sigma in (1e-300, 8.9e-308, 1e-12):
        value = M.crps_gaussian([1540.9961], torch.tensor([sigma], dtype=torch.float64), [1376.857])
        assert math.isclose(value, 1540.9961 - 1376.857, rel_tol=1e-9)


def test_streaming_crps_with_a_tiny_std_is_finite() -> None:
    f64 = {"dtype": torch.float64}
    acc = StreamingRegressionMetrics()
    acc.update(torch.tensor([164.0], **f64), torch.tensor([1e-307], **f64), torch.tensor([0.0], **f64))
    assert math.isclose(acc.summary()["CRPS"], 164.0, rel_tol=1e-9)  # z = 1.6e309 overflows


# ----------------------------------------------------------------------------- n = 1
def test_every_metric_is_defined_for_a_single_input() -> None:
    probs, label = torch.tensor([[0.2, 0.8]]), torch.tensor([1])
    values = {
        "accuracy": M.accuracy(probs, label),
        "NLL": M.negative_log_likelihood(probs, label),
        "Brier": M.brier_score(probs, label),
        "ECE": M.expected_calibration_error(probs, label),
        "adaptive ECE": M.expected_calibration_error(probs, label, binning="quantile"),
        "classwise ECE": M.classwise_calibration_error(probs, label),
        "AURC": M.aurc(torch.tensor([0.3]), torch.tensor([0])),
        "E-AURC": M.e_aurc(torch.tensor([0.3]), torch.tensor([1])),
        "OOD AUROC": M.ood_auroc(torch.tensor([0.1]), torch.tensor([0.9])),
        "OOD AUPR": M.ood_aupr(torch.tensor([0.1]), torch.tensor([0.9])),
        "FPR@95": M.fpr_at_tpr(torch.tensor([0.1]), torch.tensor([0.9])),
    }
    mean, std, y = torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([1.0])
    for fn in (
        M.gaussian_nll,
        M.crps_gaussian,
        M.picp,
        M.mean_absolute_calibration_error,
        M.root_mean_squared_calibration_error,
        M.miscalibration_area,
        M.check_score,
        M.interval_score,
    ):
        values[fn.__name__] = fn(mean, std, y)
    values["rmse"], values["mae"] = M.rmse(mean, y), M.mae(mean, y)
    values["sharpness"], values["mpiw"] = M.sharpness(std), M.mpiw(std)
    values["mc_log_likelihood"] = M.mc_log_likelihood(torch.tensor([[0.5]]), y, tau=1.0)
    for name, value in values.items():
        assert isinstance(value, float) and math.isfinite(value), (name, value)
    # undefined with one input (one class of outcome): a clear error, never a number
    with pytest.raises(InvalidInputError, match="both correct and wrong"):
        M.misclassification_auroc(torch.tensor([0.3]), torch.tensor([1]))


def test_streaming_metrics_of_a_single_input_match_the_functions() -> None:
    acc = StreamingClassificationMetrics()
    acc.update(torch.tensor([[0.2, 0.8]]), torch.tensor([1]))
    s = acc.summary()
    assert s["n_inputs"] == 1 and s["accuracy"] == 1.0
    assert math.isclose(s["NLL"], -math.log(0.8), rel_tol=1e-6)
    assert math.isnan(s["misclassification AUROC (entropy)"])  # documented: NaN when all right
    reg = StreamingRegressionMetrics(levels=[0.9])
    reg.update(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([1.0]))
    r = reg.summary()
    assert math.isclose(r["Gaussian NLL"], M.gaussian_nll([0.5], [1.0], [1.0]), rel_tol=1e-12)
    assert r["PICP (90%)"] == 1.0 and r["n_inputs"] == 1


def test_one_input_one_sample_through_the_wrapper_and_the_report() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1)).eval()
    pred = mcdrop.MCDropout(net, n_samples=1, seed=0).predict(torch.randn(1, 3))
    assert pred.variance.item() == 0.0
    rep = mcdrop.report(pred, torch.zeros(1))
    assert rep.notes and any("std of 0" in note for note in rep.notes)
    assert math.isnan(rep.metrics["Gaussian NLL"]) and math.isfinite(rep.metrics["RMSE"])


# ----------------------------------------------------------------------------- n = 10^7
BIG = 10**7


def test_streaming_classification_metrics_are_exact_for_ten_million_inputs() -> None:
    # p(class 1) = 0.3 everywhere and exactly 30% of the labels are 1: perfectly calibrated
    probs = torch.full((BIG,), 0.3, dtype=torch.float64)
    labels = torch.zeros(BIG, dtype=torch.long)
    labels[::10][:3] = 1  # placeholder, replaced below (keeps the allocation out of the loop)
    labels = (torch.arange(BIG) % 10 < 3).long()
    halves = [StreamingClassificationMetrics(), StreamingClassificationMetrics()]
    step = BIG // 10
    for i, start in enumerate(range(0, BIG, step)):
        halves[i % 2].update(probs[start : start + step], labels[start : start + step])
    acc = halves[0].merge(halves[1])
    s = acc.summary()
    assert s["n_inputs"] == BIG and acc.n == BIG
    assert s["accuracy"] == 0.7  # counted in integers
    assert s["ECE"] < 1e-9 and s["MCE"] < 1e-9
    assert math.isclose(s["Brier"], 2 * (0.3 * 0.7**2 + 0.7 * 0.3**2), rel_tol=1e-12)
    assert math.isclose(s["NLL"], -(0.7 * math.log(0.7) + 0.3 * math.log(0.3)), rel_tol=1e-12)
    assert math.isclose(
        s["mean predictive entropy"], -(0.7 * math.log(0.7) + 0.3 * math.log(0.3)), rel_tol=1e-12
    )


def test_streaming_regression_metrics_are_exact_for_ten_million_inputs() -> None:
    mean = torch.zeros(BIG, dtype=torch.float64)
    std = torch.ones(BIG, dtype=torch.float64)
    targets = torch.where(torch.arange(BIG) % 2 == 0, 1.0, -1.0).double()  # |error| = 1 everywhere
    acc = StreamingRegressionMetrics(levels=[0.5, 0.9])
    step = BIG // 4
    for start in range(0, BIG, step):
        acc.update(mean[start : start + step], std[start : start + step], targets[start : start + step])
    s = acc.summary()
    assert s["n_inputs"] == BIG
    assert s["RMSE"] == 1.0 and s["MAE"] == 1.0 and s["sharpness"] == 1.0
    assert math.isclose(s["Gaussian NLL"], 0.5 * math.log(2 * math.pi) + 0.5, rel_tol=1e-12)
    assert s["PICP (50%)"] == 0.0 and s["PICP (90%)"] == 1.0  # z = 0.67 < 1 < z = 1.64


# ----------------------------------------------------------------------------- open bugs
class Rows(nn.Module):
    """Dropout noise ``(b, K)``, then ``edit(z)`` makes it the case under test."""

    def __init__(self, k: int, edit) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.k, self.edit = k, edit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.edit(self.drop(torch.ones_like(x[:, :1]).repeat(1, self.k)))


def test_a_row_of_all_minus_inf_logits_is_an_error_not_nan() -> None:
    row1 = torch.tensor([[False], [True]])
    model = Rows(3, lambda z: torch.where(row1, -math.inf, z)).eval()  # input 1: every logit -inf
    try:
        pred = mcdrop.MCDropout(model, n_samples=4, seed=0).predict(torch.zeros(2, 3))
    except NonFiniteError:
        return
    assert torch.isfinite(pred.probs).all(), f"silently NaN: {pred.probs}"


def test_regression_outputs_beyond_1e19_have_a_finite_variance() -> None:
    model = Rows(1, lambda z: 2e19 * (1 + 1e-3 * z)).eval()
    pred = mcdrop.MCDropout(model, n_samples=8, seed=0, task="regression", keep_samples=True).predict(
        torch.zeros(2, 3)
    )
    truth = pred.samples.double().var(0, correction=0)
    assert torch.isfinite(pred.variance).all(), f"silently {pred.variance.flatten().tolist()}"
    torch.testing.assert_close(pred.variance.double(), truth, rtol=1e-4, atol=0)


def test_half_precision_probabilities_are_accepted() -> None:
    torch.manual_seed(0)
    values = torch.softmax((torch.randn(8, 7, dtype=torch.float64) * 3).to(torch.bfloat16), -1)
    assert float((values.double().sum(-1) - 1).abs().max()) > 1e-3  # rounding, not a wrong model
    pred, _ = picked(values, "probs")
    assert torch.isfinite(pred.probs).all()


@pytest.mark.parametrize("form", ["probs", "log_probs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accepted_half_precision_probabilities_are_normalised_per_pass(form: str, dtype: torch.dtype) -> None:
    """Rows off by rounding (here +1%, inside half precision's tolerance) are normalised per pass.

    Unnormalised, the expected entropy of two classes at 0.505 each is 0.6933 > ln 2 (a long fuzz
    run found this for a float16 LSTM returning log-probabilities).
    """
    probs = torch.tensor([[0.505, 0.505], [0.9, 0.11]], dtype=torch.float64)
    values = (probs.log() if form == "log_probs" else probs).to(dtype)
    for row in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoRandomnessWarning)  # one row: identical passes
            pred, _ = picked(values[row : row + 1], form)
        assert float(pred.probs.sum()) == pytest.approx(1.0, abs=1e-6)
        ln2 = math.log(2)
        for name in ("predictive_entropy", "expected_entropy"):
            value = float(getattr(pred, name))
            assert 0 <= value <= ln2 + 1e-7, (name, value)
        normalised = probs[row] / probs[row].sum()
        torch.testing.assert_close(pred.probs[0].double(), normalised, atol=1e-2, rtol=0)
    too_big = torch.tensor([[1.5, 0.2]])
    too_big = (too_big.log() if form == "log_probs" else too_big).to(dtype)
    with pytest.raises(
        InvalidInputError, match=r"exp\(outputs\) fall" if form == "log_probs" else "outputs fall"
    ):
        picked(too_big, form)


def test_log_variance_overflow_is_an_error_not_inf() -> None:
    model = Rows(2, lambda z: torch.cat([z[:, :1], z[:, 1:] * 0 + 100.0], 1)).eval()  # log-variance 100
    try:
        pred = mcdrop.MCDropout(model, n_samples=4, seed=0, aleatoric="log_variance").predict(
            torch.zeros(2, 3)
        )
    except McdropError:
        return
    assert torch.isfinite(pred.aleatoric_variance).all(), (
        f"silently {pred.aleatoric_variance.flatten().tolist()}"
    )
