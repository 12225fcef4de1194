"""Streaming metric accumulators (``mcdrop.metrics.streaming``) and ``predict_loader(keep="metrics")``.

The accumulators must reproduce the in-memory metric functions of :mod:`mcdrop.metrics` (exactly up
to float64 summation order, counts bit for bit), whatever the batching; the histogram AUROC must lie
within its reported bound of the exact AUROC; memory must not grow with the number of inputs; and a
run interrupted and resumed from a checkpoint must give the uninterrupted result.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mcdrop
from mcdrop import metrics as M
from mcdrop.errors import InvalidInputError
from mcdrop.metrics.streaming import (
    StreamingClassificationMetrics,
    StreamingMetrics,
    StreamingRegressionMetrics,
)
from mcdrop.options import describe_option as _describe_option

REL = 1e-12


def close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


def classification_data(n: int, k: int, seed: int = 0, temperature: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(temperature * torch.randn(n, k, generator=g), 1)
    labels = torch.randint(0, k, (n,), generator=g)
    return probs, labels


def stream(probs, labels, sizes, **kwargs) -> StreamingClassificationMetrics:
    acc = StreamingClassificationMetrics(**kwargs)
    start = 0
    for size in sizes:
        if start >= len(labels):
            break
        acc.update(probs[start : start + size], labels[start : start + size])
        start += size
    if start < len(labels):
        acc.update(probs[start:], labels[start:])
    return acc


# --------------------------------------------------------------------------- classification
@pytest.mark.parametrize("k", [2, 3, 10])
def test_classification_matches_in_memory_metrics(k):
    probs, labels = classification_data(2001, k, seed=k)
    s = stream(probs, labels, [1, 7, 300, 64] * 20).summary()
    assert s["n_inputs"] == 2001
    assert s["accuracy"] == M.accuracy(probs, labels)  # counts: exact
    assert close(s["ECE"], M.expected_calibration_error(probs, labels))
    assert close(s["MCE"], M.expected_calibration_error(probs, labels, norm="max"))
    assert close(s["RMSCE"], M.expected_calibration_error(probs, labels, norm="l2"))
    assert close(s["Brier"], M.brier_score(probs, labels))
    assert close(s["NLL"], M.negative_log_likelihood(probs, labels))


def test_binary_positive_class_probabilities_and_float64():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(500, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (500,), generator=g)
    s = stream(p, y, [33] * 20).summary()
    assert close(s["ECE"], M.expected_calibration_error(p, y))
    assert close(s["Brier"], M.brier_score(p, y))
    assert close(s["NLL"], M.negative_log_likelihood(p, y))  # float64 epsilon clamp
    assert s["accuracy"] == M.accuracy(p, y)


def test_bin_edges_are_those_of_expected_calibration_error():
    # confidences exactly at k/M (as float32) close bin k; 1.0 is in the last bin
    conf = torch.tensor([k / 15 for k in range(8, 16)] + [1.0, 0.5], dtype=torch.float32)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.tensor([0, 1] * 5)
    acc = stream(probs, labels, [3, 3, 4])
    table = M.reliability_table(probs, labels)
    assert acc.reliability_table().count.tolist() == table.count.tolist()
    assert np.allclose(acc.reliability_table().gap, table.gap, equal_nan=True)
    assert close(acc.summary()["ECE"], M.expected_calibration_error(probs, labels))
    assert close(acc.reliability_table().ece, acc.summary()["ECE"])


def test_nll_uses_the_same_clamp():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a zero probability for the true class
    labels = torch.tensor([1, 1])
    acc = StreamingClassificationMetrics()
    acc.update(probs, labels)
    assert close(acc.summary()["NLL"], M.negative_log_likelihood(probs, labels))
    assert acc.summary()["NLL"] == pytest.approx(-math.log(torch.finfo(torch.float32).eps) / 2)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 97), min_size=1, max_size=30))
def test_batching_does_not_change_counts_or_sums(sizes):
    probs, labels = classification_data(400, 4, seed=11)
    whole = stream(probs, labels, [400])
    parts = stream(probs, labels, sizes)
    for name, t in whole._tensors().items():
        if t.dtype == torch.int64:
            assert torch.equal(t, parts._tensors()[name]), name
        else:
            assert torch.allclose(t, parts._tensors()[name], rtol=1e-13, atol=1e-13), name


@pytest.mark.parametrize("k", [2, 10])
def test_histogram_auroc_is_within_its_guaranteed_bound(k):
    probs, labels = classification_data(3000, k, seed=5, temperature=3.0)
    entropy = torch.special.entr(probs).sum(1)
    mi = entropy * torch.rand(3000, generator=torch.Generator().manual_seed(6))
    acc = StreamingClassificationMetrics()
    for start in range(0, 3000, 512):
        sl = slice(start, start + 512)
        acc.update(probs[sl], labels[sl], entropy=entropy[sl], mutual_information=mi[sl])
    s = acc.summary()
    errors = probs.argmax(1) != labels
    for name, score in (("entropy", entropy), ("MI", mi)):
        exact = M.misclassification_auroc(score, errors)
        estimate = s[f"misclassification AUROC ({name})"]
        bound = s[f"misclassification AUROC ({name}) error bound"]
        assert abs(estimate - exact) <= bound + 1e-12
        assert bound < 0.01  # ~1% wide bins: few right/wrong pairs share one
    assert close(s["mean predictive entropy"], float(entropy.double().mean()))
    assert close(s["mean mutual information"], float(mi.double().mean()))


def test_histogram_auroc_exact_zeros_and_separated_scores_are_exact():
    labels = torch.tensor([0, 0, 0, 0])
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.2, 0.8], [0.4, 0.6]])  # 2 right, 2 wrong
    scores = torch.tensor([0.0, 0.0, 0.5, 0.0])  # ties at exactly zero
    acc = StreamingClassificationMetrics()
    acc.update(probs, labels, entropy=scores)
    s = acc.summary()
    assert s["misclassification AUROC (entropy)"] == M.misclassification_auroc(
        scores, probs.argmax(1) != labels
    )
    assert s["misclassification AUROC (entropy) error bound"] == 0.0
    # all right: undefined, NaN (as the report)
    only_right = StreamingClassificationMetrics()
    only_right.update(probs[:2], labels[:2])
    assert math.isnan(only_right.summary()["misclassification AUROC (entropy)"])


def test_default_entropy_is_the_predictive_entropy():
    probs, labels = classification_data(300, 3, seed=8)
    acc = stream(probs, labels, [100])
    entropy = torch.special.entr(probs.double()).sum(1)
    assert close(acc.summary()["mean predictive entropy"], float(entropy.mean()))
    assert "misclassification AUROC (MI)" not in acc.summary()


def test_classification_errors():
    acc = StreamingClassificationMetrics()
    acc.update(*classification_data(10, 3))
    with pytest.raises(InvalidInputError, match="3 classes"):
        acc.update(*classification_data(10, 4))
    with pytest.raises(InvalidInputError, match="sum to 1"):
        acc.update(torch.full((2, 3), 0.5), torch.tensor([0, 1]))
    with pytest.raises(InvalidInputError, match="every update or in none"):
        probs, labels = classification_data(10, 3)
        acc.update(probs, labels, mutual_information=torch.zeros(10))
    with pytest.raises(InvalidInputError, match="one value per input"):
        acc.update(probs, labels, entropy=torch.zeros(3))
    empty = StreamingClassificationMetrics().summary()
    assert math.isnan(empty["ECE"]) and empty["n_inputs"] == 0


# --------------------------------------------------------------------------- regression
def regression_data(n: int, d: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if d is None else (n, d)
    mean = torch.randn(shape, generator=g)
    std = torch.rand(shape, generator=g) + 0.2
    y = mean + 1.3 * std * torch.randn(shape, generator=g)
    return mean, std, y


@pytest.mark.parametrize("d", [None, 3])
def test_regression_matches_in_memory_metrics(d):
    mean, std, y = regression_data(1500, d, seed=2)
    acc = StreamingRegressionMetrics()
    for start in range(0, 1500, 230):
        sl = slice(start, start + 230)
        acc.update(mean[sl], std[sl], y[sl])
    s = acc.summary()
    assert s["n_inputs"] == 1500 and acc.n_elements == mean.numel()
    assert close(s["RMSE"], M.rmse(mean, y))
    assert close(s["MAE"], M.mae(mean, y))
    assert close(s["Gaussian NLL"], M.gaussian_nll(mean, std, y))
    assert close(s["CRPS"], M.crps_gaussian(mean, std, y))
    assert close(s["sharpness"], M.sharpness(std))
    for level in (0.5, 0.8, 0.9, 0.95, 0.99):
        assert s[f"PICP ({level * 100:g}%)"] == M.picp(mean, std, y, level=level)
        assert close(s[f"MPIW ({level * 100:g}%)"], M.mpiw(std, level=level))
    # the calibration curve is a vector of counts: these are exact
    assert s["MACE"] == M.mean_absolute_calibration_error(mean, std, y)
    assert s["RMSCE"] == M.root_mean_squared_calibration_error(mean, std, y)
    assert s["miscalibration area"] == M.miscalibration_area(mean, std, y)
    assert np.array_equal(acc.calibration_curve().observed, M.calibration_curve(mean, std, y).observed)


def test_regression_zero_std_gives_nan_gaussian_metrics_not_an_error():
    acc = StreamingRegressionMetrics()
    acc.update(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 2.0]))
    s = acc.summary()
    assert math.isnan(s["Gaussian NLL"]) and math.isnan(s["PICP (95%)"]) and math.isnan(s["MACE"])
    assert close(s["MAE"], 1.0)
    assert np.isnan(acc.calibration_curve().observed).all()


def test_regression_targets_may_differ_in_shape_but_not_in_size():
    acc = StreamingRegressionMetrics(levels=[0.9])
    acc.update(torch.zeros(4, 1), torch.ones(4, 1), torch.tensor([0.1, 0.2, 3.0, -0.5]))
    assert acc.summary()["PICP (90%)"] == 0.75
    with pytest.raises(InvalidInputError):
        acc.update(torch.zeros(4), torch.ones(4), torch.zeros(5))
    with pytest.raises(InvalidInputError, match="same shape"):
        acc.update(torch.zeros(4), torch.ones(3), torch.zeros(4))
    with pytest.raises(InvalidInputError):
        StreamingRegressionMetrics(levels=[1.5])


# --------------------------------------------------------------------------- merge / state
def test_merge_equals_one_accumulator_and_state_round_trips(tmp_path):
    probs, labels = classification_data(600, 5, seed=4)
    a, b = stream(probs[:250], labels[:250], [100]), stream(probs[250:], labels[250:], [100])
    merged = StreamingClassificationMetrics().merge(a).merge(b)
    whole = stream(probs, labels, [100])
    for key, value in whole.summary().items():
        assert close(merged.summary()[key], value), key
    path = tmp_path / "acc.pt"
    torch.save(merged.state_dict(), path)
    restored = StreamingMetrics.from_state_dict(torch.load(path, weights_only=True))
    assert restored.summary() == merged.summary()
    assert isinstance(restored, StreamingClassificationMetrics) and restored.n_classes == 5
    reg = StreamingRegressionMetrics(levels=[0.9])
    reg.update(*regression_data(10))
    assert StreamingMetrics.from_state_dict(reg.state_dict()).summary() == reg.summary()


def test_merge_and_load_refuse_mismatches():
    probs, labels = classification_data(10, 3)
    a = stream(probs, labels, [10])
    with pytest.raises(InvalidInputError, match="configurations"):
        a.merge(StreamingClassificationMetrics(n_bins=10))
    with pytest.raises(InvalidInputError, match="tasks differ"):
        a.merge(StreamingRegressionMetrics())
    other = stream(*classification_data(10, 4), [10])
    with pytest.raises(InvalidInputError, match="n_classes"):
        StreamingClassificationMetrics().merge(a).merge(other)
    with pytest.raises(InvalidInputError, match="configuration"):
        StreamingClassificationMetrics(n_bins=10).load_state_dict(a.state_dict())
    with pytest.raises(InvalidInputError, match="from_state_dict"):
        StreamingRegressionMetrics().load_state_dict(a.state_dict())
    with pytest.raises(InvalidInputError, match="not a streaming-metrics state"):
        StreamingMetrics.from_state_dict({"weights": 1})


def test_memory_of_the_accumulators_does_not_depend_on_n():
    small, big = stream(*classification_data(10, 3), [10]), stream(*classification_data(5000, 3), [999])
    assert small.nbytes == big.nbytes < 100_000
    assert StreamingRegressionMetrics().nbytes < 2_000


def test_a_state_dict_of_the_version_1_format_still_loads_and_is_still_written():
    # written by the accumulators before the statistics were declared with _add_state
    old = {
        "kind": "classification",
        "version": 1,
        "config": {"n_bins": 3, "n_score_bins": 2},
        "metadata": {"n_classes": 2, "has_mutual_information": False},
        "n_samples": 8,
        "tensors": {
            "count": torch.tensor([0, 1, 2]),
            "hits": torch.tensor([0, 0, 1]),
            "conf_sum": torch.tensor([0.0, 0.6, 1.6], dtype=torch.float64),
            "sums": torch.tensor([1.72, 2.2256, 1.609, 0.0], dtype=torch.float64),
            "entropy_hist": torch.tensor([[0, 0, 1], [0, 0, 2]]),
            "mi_hist": torch.zeros(2, 3, dtype=torch.int64),
        },
    }
    acc = StreamingMetrics.from_state_dict(old)
    assert isinstance(acc, StreamingClassificationMetrics)
    assert acc.n == 3 and acc.n_classes == 2 and acc.n_samples == 8
    assert acc.summary()["accuracy"] == 1 / 3 and close(acc.summary()["ECE"], 0.4)
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], dtype=torch.float64)
    fresh = StreamingClassificationMetrics(n_bins=3, n_score_bins=2)
    fresh.update(probs, torch.tensor([0, 0, 1]))
    fresh.n_samples = 8
    state = fresh.state_dict()
    assert list(state) == list(old) and list(state["tensors"]) == list(old["tensors"])
    assert state["metadata"] == old["metadata"] and state["config"] == old["config"]
    for name, value in old["tensors"].items():
        assert state["tensors"][name].dtype == value.dtype and state["tensors"][name].shape == value.shape
    reg = StreamingRegressionMetrics(levels=[0.9], n_curve_levels=3).state_dict()
    assert list(reg["tensors"]) == ["counts", "sums", "inside", "curve_inside"] and reg["metadata"] == {}
    old_reg = {
        "kind": "regression",
        "version": 1,
        "config": {"levels": [0.9], "n_curve_levels": 3},
        "metadata": {},
        "n_samples": None,
        "tensors": {
            "counts": torch.tensor([2, 2, 0]),
            "sums": torch.tensor([4.25, 2.5, 3.9629, 1.7842, 2.0, 2.0], dtype=torch.float64),
            "inside": torch.tensor([1]),
            "curve_inside": torch.tensor([0, 1, 2]),
        },
    }
    restored = StreamingMetrics.from_state_dict(old_reg)
    assert restored.summary()["MAE"] == 1.25 and restored.summary()["PICP (90%)"] == 0.5


def test_declared_states_and_metadata_are_what_merge_and_distributed_use():
    acc = stream(*classification_data(30, 3), [7])
    states = acc.states()
    assert list(states) == ["count", "hits", "conf_sum", "sums", "entropy_hist", "mi_hist"]
    assert all(s.reduce == "sum" for s in states.values())
    assert states["count"].tensor is acc.count  # the live statistics, not copies
    assert acc.nbytes == sum(s.tensor.numel() * s.tensor.element_size() for s in states.values())
    assert acc.metadata() == {"n_classes": 3, "has_mutual_information": False}
    # metadata: None gives way, unknown keys are ignored, a conflict is refused and changes nothing
    empty = StreamingClassificationMetrics()
    assert empty.merge_metadata({"n_classes": None, "other": 1}).metadata() == {
        "n_classes": None,
        "has_mutual_information": None,
    }
    assert empty.merge_metadata(acc.metadata()).metadata() == acc.metadata()
    with pytest.raises(InvalidInputError, match="differ in n_classes"):
        empty.merge_metadata({"n_classes": 4})
    assert empty.n_classes == 3
    # the score-bin edges follow n_classes when a merge or a load sets it
    four = stream(*classification_data(30, 4, seed=1), [30])
    reused = StreamingClassificationMetrics()
    reused.update(*classification_data(5, 3))
    reused.load_state_dict(four.state_dict())
    probs, labels = classification_data(20, 4, seed=2)
    reused.update(probs, labels)
    four.update(probs, labels)
    assert torch.equal(reused.entropy_hist, four.entropy_hist)
    reg = StreamingRegressionMetrics()
    assert reg.metadata() == {} and list(reg.states()) == ["counts", "sums", "inside", "curve_inside"]


def test_declaring_a_statistic_twice_or_of_another_dtype_is_refused():
    acc = StreamingRegressionMetrics()
    with pytest.raises(InvalidInputError, match="declared twice"):
        acc._add_state("sums", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="int64"):
        acc._add_state("extra", torch.zeros(2, dtype=torch.float32))
    with pytest.raises(InvalidInputError, match="reduce"):
        acc._add_state("extra", torch.zeros(2, dtype=torch.int64), reduce="max")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="declared twice"):
        acc._add_metadata("counts")


# --------------------------------------------------------------------------- predict_loader(keep="metrics")
def classifier(k: int = 4, d: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, k)).eval()


def loader_of(n: int, d: int = 6, k: int = 4, batch_size: int = 16, regression: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, 1, generator=g) if regression else torch.randint(0, k, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_keep_metrics_equals_the_in_memory_path_for_a_classifier():
    loader = loader_of(203)
    pred = mcdrop.MCDropout(classifier(), n_samples=12, seed=0).predict_loader(loader, progress=False)
    acc = mcdrop.MCDropout(classifier(), n_samples=12, seed=0).predict_loader(
        loader, progress=False, keep="metrics"
    )
    assert isinstance(acc, StreamingClassificationMetrics)
    s = acc.summary()
    assert s["n_inputs"] == 203 and s["n_samples"] == 12
    assert s["accuracy"] == M.accuracy(pred.probs, pred.targets)
    assert close(s["ECE"], M.expected_calibration_error(pred.probs, pred.targets))
    assert close(s["Brier"], M.brier_score(pred.probs, pred.targets))
    assert close(s["NLL"], M.negative_log_likelihood(pred.probs, pred.targets))
    errors = pred.predicted != pred.targets
    exact = M.misclassification_auroc(pred.predictive_entropy, errors)
    assert (
        abs(s["misclassification AUROC (entropy)"] - exact)
        <= s["misclassification AUROC (entropy) error bound"]
    )
    exact_mi = M.misclassification_auroc(pred.mutual_information, errors)
    assert abs(s["misclassification AUROC (MI)"] - exact_mi) <= s["misclassification AUROC (MI) error bound"]


def test_keep_metrics_for_regression_uses_the_total_std():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1)).eval()
    loader = loader_of(90, regression=True)
    pred = mcdrop.MCDropout(net, n_samples=10, seed=1).predict_loader(loader, progress=False)
    acc = mcdrop.MCDropout(net, n_samples=10, seed=1).predict_loader(loader, progress=False, keep="metrics")
    s = acc.summary()
    assert close(s["RMSE"], M.rmse(pred.mean, pred.targets))
    assert close(s["Gaussian NLL"], M.gaussian_nll(pred.mean, pred.total_std, pred.targets))
    assert s["PICP (95%)"] == M.picp(pred.mean, pred.total_std, pred.targets)


def test_keep_metrics_with_a_configured_accumulator_and_errors():
    loader = loader_of(40)
    acc = mcdrop.MCDropout(classifier(), n_samples=4, seed=0).predict_loader(
        loader, progress=False, metrics=StreamingClassificationMetrics(n_bins=7)
    )
    assert acc.n_bins == 7 and acc.n == 40
    mc = mcdrop.MCDropout(classifier(), n_samples=4, seed=0)
    with pytest.raises(InvalidInputError, match="keep must be one of"):
        mc.predict_loader(loader, keep="everything")
    with pytest.raises(InvalidInputError, match="needs targets"):
        mc.predict_loader([torch.randn(3, 6)], keep="metrics", progress=False)
    with pytest.raises(InvalidInputError, match="no batches"):
        mc.predict_loader([], keep="metrics", progress=False)
    with pytest.raises(InvalidInputError, match="needs keep='metrics'"):
        mc.predict_loader(loader, checkpoint="x.pt", progress=False)
    with pytest.raises(InvalidInputError, match="StreamingRegressionMetrics"):
        mcdrop.MCDropout(classifier(), n_samples=2).predict_loader(
            loader, progress=False, metrics=StreamingRegressionMetrics()
        )


def test_model_state_is_restored_when_the_loader_fails_mid_stream():
    net = classifier()

    def batches():
        yield from loader_of(32)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        mcdrop.MCDropout(net, n_samples=3, seed=0).predict_loader(batches(), keep="metrics", progress=False)
    assert not any(m.training for m in net.modules())


# --------------------------------------------------------------------------- checkpoint / resume
class Interrupted(Exception):
    pass


class FlakyLoader:
    """Yields a fixed list of batches; raises after ``fail_after`` of them when set."""

    def __init__(self, batches, fail_after=None):
        self.batches, self.fail_after = batches, fail_after

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if self.fail_after is not None and i == self.fail_after:
                raise Interrupted
            yield batch


def test_interrupted_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(tmp_path):
    batches = list(loader_of(170, batch_size=10))  # 17 batches
    path = tmp_path / "stream.ckpt"
    uninterrupted = mcdrop.MCDropout(classifier(), n_samples=6, seed=5).predict_loader(
        FlakyLoader(batches), keep="metrics", progress=False
    )
    mc = mcdrop.MCDropout(classifier(), n_samples=6, seed=5)
    with pytest.raises(Interrupted):
        mc.predict_loader(
            FlakyLoader(batches, fail_after=11),
            keep="metrics",
            checkpoint=path,
            checkpoint_every=4,
            progress=False,
        )
    state = torch.load(path, weights_only=True)
    assert state["batches"] == 8 and not state["complete"]
    # a new process: a fresh wrapper with the same settings resumes after batch 8
    resumed = mcdrop.MCDropout(classifier(), n_samples=6, seed=5).predict_loader(
        FlakyLoader(batches), keep="metrics", checkpoint=path, checkpoint_every=4, progress=False
    )
    for name, t in uninterrupted._tensors().items():
        assert torch.equal(t, resumed._tensors()[name]), name  # the same draws, the same order of sums
    assert resumed.summary() == uninterrupted.summary()
    assert torch.load(path, weights_only=True)["complete"]
    # a finished checkpoint answers at once, without reading the loader
    again = mcdrop.MCDropout(classifier(), n_samples=6, seed=5).predict_loader(
        FlakyLoader(batches, fail_after=0), keep="metrics", checkpoint=path, progress=False
    )
    assert again.summary() == uninterrupted.summary()


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    loader = loader_of(30, batch_size=10)
    mcdrop.MCDropout(classifier(), n_samples=3, seed=0).predict_loader(
        loader, keep="metrics", checkpoint=path, progress=False
    )
    with pytest.raises(InvalidInputError, match="n_samples"):
        mcdrop.MCDropout(classifier(), n_samples=4, seed=0).predict_loader(
            loader, keep="metrics", checkpoint=path, progress=False
        )
    # every setting that changes the draws or what is read from them is part of the configuration
    others = {
        "strategy": {"strategy": "loop"},
        "dtype": {"dtype": torch.bfloat16},
        "output": {"output": lambda out: out},
        "output_batch_dim": {"output_batch_dim": -2},
        "batch_dim": {"batch_dim": {"*": 0, "extra": None}},
    }
    for changed, options in others.items():
        with pytest.raises(InvalidInputError, match=f"differs in {changed}"):
            mcdrop.MCDropout(classifier(), n_samples=3, seed=0, **options).predict_loader(
                loader, keep="metrics", checkpoint=path, progress=False
            )
    mcdrop.set_dropout_rate(model := classifier(), 0.1)
    with pytest.raises(InvalidInputError, match="differs in sampled_sites"):
        mcdrop.MCDropout(model, n_samples=3, seed=0).predict_loader(
            loader, keep="metrics", checkpoint=path, progress=False
        )
    # the same settings resume (here: the finished run answers at once)
    mcdrop.MCDropout(classifier(), n_samples=3, seed=0).predict_loader(
        loader, keep="metrics", checkpoint=path, progress=False
    )
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(InvalidInputError, match="not a predict_loader checkpoint"):
        mcdrop.MCDropout(classifier(), n_samples=3, seed=0).predict_loader(
            loader, keep="metrics", checkpoint=bad, progress=False
        )


def _identity_selector():
    return lambda out: out  # a new function object on every call, the same code


def test_checkpoint_fingerprint_tells_callables_apart_by_their_code_and_equal_batch_dims_alike(tmp_path):
    path = tmp_path / "c.pt"
    loader = loader_of(30, batch_size=10)
    run = {"keep": "metrics", "checkpoint": path, "progress": False}
    first = mcdrop.MCDropout(classifier(), n_samples=3, seed=0, output=_identity_selector()).predict_loader(
        loader, **run
    )
    # the same code in a new function object (as in a new process), and batch_dim 0 spelled as a mapping
    again = mcdrop.MCDropout(
        classifier(), n_samples=3, seed=0, output=_identity_selector(), batch_dim={"*": 0}
    ).predict_loader(loader, **run)
    assert again.summary() == first.summary()
    others = [
        lambda out: out.flip(-1),  # another lambda, the same qualified name
        functools.partial(torch.flip, dims=(-1,)),
    ]
    for other in others:
        with pytest.raises(InvalidInputError, match="differs in output"):
            mcdrop.MCDropout(classifier(), n_samples=3, seed=0, output=other).predict_loader(loader, **run)
    path2 = tmp_path / "p.pt"
    run2 = {**run, "checkpoint": path2}
    mcdrop.MCDropout(
        classifier(), n_samples=3, seed=0, output=functools.partial(torch.flip, dims=(-1,))
    ).predict_loader(loader, **run2)
    with pytest.raises(InvalidInputError, match="differs in output"):
        mcdrop.MCDropout(
            classifier(), n_samples=3, seed=0, output=functools.partial(torch.flip, dims=(0,))
        ).predict_loader(loader, **run2)


def _selector_with_an_empty_cell():
    def select(out):
        return out[picked]

    text = _describe_option(select)  # ``picked`` is not assigned yet: its cell is empty
    picked = 0
    return text, _describe_option(select)


def _selector_that_calls_itself():
    def select(out, depth=0):
        return out if depth else select(out, 1)

    return select


@pytest.mark.parametrize(
    "option",
    [
        torch.tensor(3.0),  # 0-d
        torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        torch.eye(3).to_sparse(),  # sparse
        torch.zeros(2, device="meta"),
        _selector_that_calls_itself(),  # a closure that refers to itself
        [1, [2, {"a": functools.partial(torch.flip, dims=(0,))}]],
    ],
    ids=["0-d", "transposed", "sparse", "meta", "recursive-closure", "nested"],
)
def test_every_option_has_a_stable_description(option):
    """Regression: describing a 0-d, non-contiguous or sparse tensor, or a closure that refers to
    itself, raised (a RecursionError, a torch error) and failed the checkpointed run."""
    assert _describe_option(option) == _describe_option(option)


def test_option_descriptions_tell_values_apart_and_survive_an_empty_cell():
    assert _describe_option(torch.tensor(3.0)) != _describe_option(torch.tensor(4.0))
    a, b = torch.arange(12.0).reshape(3, 4), torch.arange(12.0).reshape(4, 3)
    assert _describe_option(a.t()) != _describe_option(a)
    assert _describe_option(torch.eye(3).to_sparse()) != _describe_option((2 * torch.eye(3)).to_sparse())
    assert _describe_option(b) != _describe_option(a)
    before, after = _selector_with_an_empty_cell()
    assert before != after  # the cell's value, once there, is part of the description
    csr = torch.eye(3).to_sparse_csr()
    assert _describe_option(csr) != _describe_option((2 * torch.eye(3)).to_sparse_csr())

    class NoRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    odd = NoRepr()
    one = functools.partial(torch.flip, dims=(0,), tag=odd)
    other = functools.partial(torch.flip, dims=(1,), tag=odd)
    assert _describe_option(one) != _describe_option(other)  # an odd part does not hide the rest
    base = torch.zeros(5000)
    changed = base.clone()
    changed[2500] = 1.0
    assert _describe_option(lambda out, w=base: out * w) != _describe_option(lambda out, w=changed: out * w)


def test_option_descriptions_of_set_constants_do_not_depend_on_the_hash_seed(tmp_path):
    """A lambda testing ``x in {"a", "b", "c"}`` holds a frozenset, whose order follows string
    hashes (PYTHONHASHSEED): the description, and so a checkpoint, must not."""
    import subprocess
    import sys

    script = tmp_path / "describe.py"
    script.write_text(
        "from mcdrop.options import describe_option as _describe_option\n"
        "print(list(frozenset({'logits', 'hidden', 'attentions', 'loss', 'probs'})))\n"
        "print(_describe_option(lambda key: key in {'logits', 'hidden', 'attentions', 'loss', 'probs'}))\n"
        "print(_describe_option({frozenset({'logits', 'hidden', 'attentions', 'loss', 'probs'}): 1}))\n"
    )
    outputs = [
        subprocess.run(
            [sys.executable, str(script)],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n", 1)
        for seed in (0, 1)
    ]
    assert outputs[0][0] != outputs[1][0], "the two hash seeds must order the set differently"
    assert outputs[0][1] == outputs[1][1], outputs


# --------------------------------------------------------------------------- a data set 20x the budget
def _live_bytes() -> int:
    """Bytes of every tensor storage Python holds, plus the Python heap (tracemalloc)."""
    import gc
    import tracemalloc

    gc.collect()  # garbage awaiting the cycle collector is not memory in use
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch objects warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                try:  # fake and functional tensors left by torch.compile have no data
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except (RuntimeError, NotImplementedError):
                    continue
    return sum(storages.values()) + tracemalloc.get_traced_memory()[0]


class LazyData:
    """Batches made on the fly (nothing is held); the memory in use is measured at a few batches."""

    def __init__(self, n: int, batch_size: int, d: int, k: int, probe_at: tuple[int, ...] = ()) -> None:
        self.n, self.batch_size, self.d, self.k = n, batch_size, d, k
        self.probe_at = probe_at
        self.live: list[int] = []
        w = torch.Generator().manual_seed(0)
        self.freq = torch.rand(d, generator=w) * 3 + 0.5

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        for number, start in enumerate(range(0, self.n, self.batch_size)):
            if number in self.probe_at or (self.probe_at and number == len(self) - 1):
                self.live.append(_live_bytes())
            i = torch.arange(start, min(start + self.batch_size, self.n), dtype=torch.float32)
            x = torch.sin(i[:, None] * self.freq[None, :] * 0.001)
            y = ((i * 7919) % self.k).long()
            yield x, y


def test_a_data_set_twenty_times_the_memory_budget_streams_in_constant_memory():
    """keep="metrics" over 20x the budget: what stays alive does not grow, the metrics are exact.

    What stays alive is measured exactly (every tensor storage reachable from Python, plus the
    Python heap via tracemalloc) rather than by the resident set size, which on a shared machine
    moves by more than the budget as the allocator keeps or returns freed pages.
    """
    import tracemalloc

    budget = 2**17  # the memory budget of the evaluation: 128 KiB
    d, k = 64, 20
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(d, k)).eval()
    row_bytes = 2 * k * 4 + 3 * 4 + 8  # what keep="predictions" holds per input: probs, std, 3 scores, target
    n = 20 * budget // row_bytes + 1
    assert n * (d * 4 + 8) > 20 * budget  # the data set itself (inputs, targets) is 20x the budget too
    data = LazyData(n, batch_size=2048, d=d, k=k, probe_at=(3, 8))

    tracemalloc.start()
    try:
        acc = mcdrop.MCDropout(net, n_samples=2, seed=0).predict_loader(data, keep="metrics", progress=False)
    finally:
        tracemalloc.stop()
    assert acc.n == n and n * row_bytes > 20 * budget
    assert acc.nbytes < budget  # O(bins): about 66 KB whatever n
    growth = max(data.live) - data.live[0]
    assert growth < budget / 4, f"memory in use grew by {growth / 2**10:.0f} KiB while streaming"

    # the in-memory path on the same data (same seed: the same draws) holds 20x the budget
    data.probe_at = ()
    pred = mcdrop.MCDropout(net, n_samples=2, seed=0).predict_loader(data, progress=False)
    kept = (
        pred.probs,
        pred.std,
        pred.predictive_entropy,
        pred.expected_entropy,
        pred.variation_ratio,
        pred.targets,
    )
    held = sum(t.numel() * t.element_size() for t in kept)
    assert held > 20 * budget
    s = acc.summary()
    assert close(s["ECE"], M.expected_calibration_error(pred.probs, pred.targets))
    assert close(s["Brier"], M.brier_score(pred.probs, pred.targets))
    assert close(s["NLL"], M.negative_log_likelihood(pred.probs, pred.targets))
    assert s["accuracy"] == M.accuracy(pred.probs, pred.targets)


def test_streaming_brier_of_bfloat16_probabilities_is_computed_in_float64():
    probs = torch.tensor([[0.625, 0.25, 0.125], [0.125, 0.25, 0.625]], dtype=torch.bfloat16)
    acc = StreamingClassificationMetrics()
    acc.update(probs, torch.tensor([0, 1]))
    assert acc.summary()["Brier"] == (0.21875 + 0.96875) / 2


def test_a_refused_batch_leaves_the_classification_accumulator_as_it_was():
    """Regression: the calibration counts (and the number of classes) were added before entropy and
    mutual_information were checked, so a refused batch left counts without their sums (n=2,
    accuracy 1.0, NLL 0)."""
    acc = StreamingClassificationMetrics()
    acc.update(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1]), mutual_information=torch.zeros(2))
    before = acc.state_dict()
    probs, labels = torch.tensor([[0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 0])
    with pytest.raises(InvalidInputError, match="entropy must have one value per input"):
        acc.update(probs, labels, entropy=torch.zeros(3), mutual_information=torch.zeros(2))
    with pytest.raises(InvalidInputError, match="mutual_information contains NaN"):
        acc.update(probs, labels, mutual_information=torch.tensor([0.0, float("nan")]))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    assert same(acc.state_dict(), before)
    fresh = StreamingClassificationMetrics()
    with pytest.raises(InvalidInputError):
        fresh.update(probs, labels, entropy=torch.zeros(3))
    assert fresh.n == 0 and fresh.n_classes is None
