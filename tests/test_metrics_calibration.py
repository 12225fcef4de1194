"""Binned calibration errors: cross-checked against torchmetrics, plus hand-computed edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mcdrop.errors import InvalidInputError
from mcdrop.metrics import (
    ReliabilityTable,
    classwise_calibration_error,
    expected_calibration_error,
    reliability_table,
)

BIN_COUNTS = (10, 15, 50)


def _far_from_edges(values: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Mask of values at least ``margin`` away from every k/M edge for the bin counts tested."""
    keep = np.ones(values.shape, dtype=bool)
    for m in BIN_COUNTS:
        scaled = values * m
        keep &= np.abs(scaled - np.round(scaled)) > margin * m
    return keep


def _random_classification(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities with labels drawn from a sharpened copy (a miscalibrated model)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * rng.uniform(0.3, 4.0, size=(n, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    sharp = probs**1.5
    sharp /= sharp.sum(1, keepdims=True)
    u = rng.random(n)
    labels = np.minimum((np.cumsum(sharp, 1) < u[:, None]).sum(1), k - 1)
    keep = _far_from_edges(probs.max(1))
    if k == 2:
        keep &= _far_from_edges(probs[:, 1])
    return probs[keep], labels[keep]


def _reference_ece(conf: np.ndarray, hit: np.ndarray, n_bins: int, norm: str) -> float:
    """Straightforward loop over right-closed bins ((m-1)/M, m/M], first bin [0, 1/M]."""
    total, worst, squares = 0.0, 0.0, 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if m else (conf >= lo) & (conf <= hi)
        if not in_bin.any():
            continue
        gap = abs(hit[in_bin].mean() - conf[in_bin].mean())
        weight = in_bin.mean()
        total += weight * gap
        squares += weight * gap**2
        worst = max(worst, gap)
    return {"l1": total, "l2": np.sqrt(squares), "max": worst}[norm]


# ----------------------------------------------------------------------------------------------
# reference implementation: torchmetrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", BIN_COUNTS)
@pytest.mark.parametrize("k", [3, 10])
def test_multiclass_matches_torchmetrics(norm: str, n_bins: int, k: int) -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _random_classification(3000, k, seed=k * 100 + n_bins)
    expected = tm.calibration_error(
        torch.from_numpy(probs),
        torch.from_numpy(labels),
        task="multiclass",
        num_classes=k,
        n_bins=n_bins,
        norm=norm,
    )
    got = expected_calibration_error(probs, labels, n_bins=n_bins, norm=norm)
    assert got == pytest.approx(float(expected), abs=1e-6)
    assert got == pytest.approx(
        _reference_ece(probs.max(1), probs.argmax(1) == labels, n_bins, norm), abs=1e-12
    )


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", BIN_COUNTS)
def test_binary_positive_class_matches_torchmetrics(norm: str, n_bins: int) -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _random_classification(3000, 2, seed=n_bins)
    positive = np.ascontiguousarray(probs[:, 1])
    expected = tm.calibration_error(
        torch.from_numpy(positive), torch.from_numpy(labels), task="binary", n_bins=n_bins, norm=norm
    )
    for given in (positive, probs):  # (n,) and (n, 2) describe the same binary problem
        got = expected_calibration_error(given, labels, n_bins=n_bins, norm=norm, target="positive_class")
        assert got == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_binary_top_label_matches_torchmetrics_multiclass(norm: str) -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _random_classification(3000, 2, seed=7)
    expected = tm.multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(labels), num_classes=2, n_bins=15, norm=norm
    )
    assert expected_calibration_error(probs[:, 1], labels, norm=norm) == pytest.approx(
        float(expected), abs=1e-6
    )
    assert expected_calibration_error(probs, labels, norm=norm) == pytest.approx(float(expected), abs=1e-6)


def test_classwise_matches_torchmetrics_binary_per_class() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _random_classification(3000, 4, seed=11)
    keep = np.all([_far_from_edges(probs[:, j]) for j in range(4)], axis=0)
    probs, labels = probs[keep], labels[keep]
    per_class = [
        float(
            tm.binary_calibration_error(
                torch.from_numpy(np.ascontiguousarray(probs[:, j])),
                torch.from_numpy((labels == j).astype(np.int64)),
                n_bins=15,
            )
        )
        for j in range(4)
    ]
    got = classwise_calibration_error(probs, labels, reduction="none")
    np.testing.assert_allclose(got, per_class, atol=1e-6)
    assert classwise_calibration_error(probs, labels) == pytest.approx(np.mean(per_class), abs=1e-6)


def test_float32_inputs_match_torchmetrics() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _random_classification(3000, 5, seed=3)
    probs32 = torch.from_numpy(probs).float()
    probs32 = probs32 / probs32.sum(1, keepdim=True)
    expected = tm.multiclass_calibration_error(probs32, torch.from_numpy(labels), num_classes=5, n_bins=15)
    assert expected_calibration_error(probs32, torch.from_numpy(labels)) == pytest.approx(
        float(expected), abs=1e-6
    )


# ----------------------------------------------------------------------------------------------
# hand-computed edge cases
# ----------------------------------------------------------------------------------------------
def test_confidence_of_one_is_in_the_last_bin() -> None:
    probs = np.array([[1.0, 0.0], [0.05, 0.95]])
    labels = np.array([1, 1])  # confidence 1.0 is wrong, confidence 0.95 is right
    # both in (0.9, 1.0]: mean confidence 0.975, accuracy 0.5
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.475, abs=1e-12)
    table = reliability_table(probs, labels, n_bins=10)
    assert table.count.tolist() == [0] * 9 + [2]


def test_torchmetrics_phantom_bin_for_confidence_one_is_a_documented_difference() -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs = torch.tensor([[1.0, 0.0], [0.05, 0.95]], dtype=torch.float64)
    labels = torch.tensor([1, 1])
    theirs = float(tm.multiclass_calibration_error(probs, labels, num_classes=2, n_bins=10))
    # torchmetrics puts 1.0 alone in an extra bin: 0.5 * |0 - 1| + 0.5 * |1 - 0.95|
    assert theirs == pytest.approx(0.525, abs=1e-6)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.475, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_exact_edge_k_over_m_closes_its_bin(dtype: torch.dtype) -> None:
    # confidences 0.6 (= 3/5) and 0.8 (= 4/5) are in bins (0.4, 0.6] and (0.6, 0.8]
    probs = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.3, 0.7]], dtype=dtype)
    labels = torch.tensor([0, 1, 1])
    table = reliability_table(probs, labels, n_bins=5)
    assert table.count.tolist() == [0, 0, 1, 2, 0]
    np.testing.assert_allclose(table.lower, [0.0, 0.2, 0.4, 0.6, 0.8], atol=1e-3)
    np.testing.assert_allclose(table.upper, [0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-3)


def test_exact_edges_in_positive_class_binning() -> None:
    p = np.array([0.0, 0.1, 0.2, 0.5, 0.9, 1.0])
    y = np.array([0, 0, 1, 1, 1, 1])
    table = reliability_table(p, y, n_bins=10, target="positive_class")
    # 0.0 and 0.1 in [0, 0.1]; 0.2 in (0.1, 0.2]; 0.5 in (0.4, 0.5]; 0.9 in (0.8, 0.9]; 1.0 in (0.9, 1]
    assert table.count.tolist() == [2, 1, 0, 0, 1, 0, 0, 0, 1, 1]
    # gaps: 0.05, 0.8, 0.5, 0.1, 0.0
    expected = (2 * 0.05 + 0.8 + 0.5 + 0.1 + 0.0) / 6
    assert expected_calibration_error(p, y, n_bins=10, target="positive_class") == pytest.approx(
        expected, abs=1e-12
    )


def test_empty_bins_contribute_nothing() -> None:
    probs = np.array([[0.95, 0.05], [0.55, 0.45], [0.52, 0.48]])
    labels = np.array([0, 1, 0])
    # bins (0.5, 0.6] holds 0.55 (wrong) and 0.52 (right): conf 0.535, acc 0.5; (0.9, 1] holds 0.95 (right)
    expected_l1 = (2 * 0.035 + 0.05) / 3
    expected_l2 = np.sqrt((2 * 0.035**2 + 0.05**2) / 3)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected_l1, abs=1e-12)
    assert expected_calibration_error(probs, labels, n_bins=10, norm="l2") == pytest.approx(
        expected_l2, abs=1e-12
    )
    assert expected_calibration_error(probs, labels, n_bins=10, norm="max") == pytest.approx(0.05, abs=1e-12)
    table = reliability_table(probs, labels, n_bins=10)
    assert np.isnan(table.confidence[0]) and np.isnan(table.accuracy[0]) and np.isnan(table.gap[0])
    assert table.gap[5] == pytest.approx(0.035) and table.gap[9] == pytest.approx(-0.05)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("binning", ["uniform", "quantile"])
def test_single_sample(norm: str, binning: str) -> None:
    assert expected_calibration_error([[0.3, 0.7]], [1], norm=norm, binning=binning) == pytest.approx(0.3)
    assert expected_calibration_error([[0.3, 0.7]], [0], norm=norm, binning=binning) == pytest.approx(0.7)


def test_single_bin_is_the_overall_gap() -> None:
    probs, labels = _random_classification(500, 4, seed=5)
    gap = abs(probs.max(1).mean() - (probs.argmax(1) == labels).mean())
    for norm in ("l1", "l2", "max"):
        assert expected_calibration_error(probs, labels, n_bins=1, norm=norm) == pytest.approx(gap, abs=1e-12)


def test_quantile_binning_by_hand() -> None:
    conf = np.array([0.95, 0.55, 0.65, 0.85, 0.75, 0.6])
    hit = np.array([1, 0, 1, 1, 0, 1])
    probs = np.stack([conf, 1 - conf], axis=1)  # class 0 is predicted with confidence conf
    y = np.where(hit == 1, 0, 1)
    # sorted: 0.55 0.6 | 0.65 0.75 | 0.85 0.95 -> gaps |0.5-0.575|, |0.5-0.7|, |1-0.9|
    expected = (2 * 0.075 + 2 * 0.2 + 2 * 0.1) / 6
    got = expected_calibration_error(probs, y, n_bins=3, binning="quantile")
    assert got == pytest.approx(expected, abs=1e-12)
    table = reliability_table(probs, y, n_bins=3, binning="quantile")
    assert table.count.tolist() == [2, 2, 2]
    np.testing.assert_allclose(table.upper, [0.6, 0.75, 1.0])


def test_quantile_binning_keeps_ties_together_and_ignores_order() -> None:
    p = np.array([0.7, 0.7, 0.7, 0.7, 0.2, 0.9])
    y = np.array([1, 0, 1, 1, 0, 1])
    values = set()
    for perm in itertools.permutations(range(6)):
        idx = list(perm)
        values.add(round(expected_calibration_error(p[idx], y[idx], n_bins=3, binning="quantile"), 12))
    assert len(values) == 1
    table = reliability_table(p, y, n_bins=3, binning="quantile")
    assert sorted(table.count.tolist()) == [0, 2, 4] or table.count.sum() == 6


def test_quantile_bins_have_equal_mass() -> None:
    probs, labels = _random_classification(1000, 3, seed=9)
    n = len(labels)
    table = reliability_table(probs, labels, n_bins=15, binning="quantile")
    assert table.count.sum() == n
    assert set(table.count.tolist()) <= {n // 15, -(-n // 15)}
    assert np.all(np.diff(table.confidence) > 0)


def test_quantile_with_more_bins_than_samples() -> None:
    got = expected_calibration_error([[0.8, 0.2], [0.3, 0.7]], [0, 0], n_bins=15, binning="quantile")
    assert got == pytest.approx((0.2 + 0.7) / 2)


def test_reliability_table_agrees_with_ece() -> None:
    probs, labels = _random_classification(2000, 6, seed=21)
    for binning in ("uniform", "quantile"):
        table = reliability_table(probs, labels, n_bins=12, binning=binning)
        assert isinstance(table, ReliabilityTable) and len(table) == 12
        assert table.n == len(labels)
        ece = expected_calibration_error(probs, labels, n_bins=12, binning=binning)
        assert table.ece == pytest.approx(ece, abs=1e-12)
        nonempty = table.count > 0
        np.testing.assert_allclose(table.weight.sum(), 1.0)
        assert np.all(table.confidence[nonempty] >= table.lower[nonempty] - 1e-12)
        assert np.all(table.confidence[nonempty] <= table.upper[nonempty] + 1e-12)


def test_reliability_table_to_frame() -> None:
    pytest.importorskip("pandas")
    frame = reliability_table([[0.9, 0.1], [0.4, 0.6]], [0, 0], n_bins=4).to_frame()
    assert list(frame.columns) == ["lower", "upper", "count", "confidence", "accuracy", "gap"]
    assert frame["count"].tolist() == [0, 0, 1, 1]


def test_classwise_by_hand_and_against_one_vs_rest_ece() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1])
    np.testing.assert_allclose(
        classwise_calibration_error(probs, labels, n_bins=5, reduction="none"), [0.2, 0.8 / 3, 0.8 / 3]
    )
    probs, labels = _random_classification(800, 4, seed=2)
    per_class = [
        expected_calibration_error(probs[:, j], (labels == j).astype(int), norm="l2", target="positive_class")
        for j in range(4)
    ]
    got = classwise_calibration_error(probs, labels, norm="l2", reduction="none")
    np.testing.assert_allclose(got, per_class, atol=1e-12)


def test_classwise_counts_absent_classes() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    per_class = classwise_calibration_error(probs, [0, 0], n_bins=10, reduction="none")
    # class 2 never occurs: its confidences 0.2 and 0.1 are the gaps of their bins
    assert per_class[2] == pytest.approx((0.2 + 0.1) / 2)
    assert classwise_calibration_error(probs, [0, 0], n_bins=10) == pytest.approx(per_class.mean())


# ----------------------------------------------------------------------------------------------
# options, conventions and input kinds
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"norm": "l3"}, "'l1', 'l2', 'max'"),
        ({"binning": "adaptive"}, "'uniform', 'quantile'"),
        ({"target": "positive"}, "'top_label', 'positive_class'"),
        ({"n_bins": 0}, "at least 1"),
    ],
)
def test_options_are_validated_with_the_choices(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        expected_calibration_error([[0.6, 0.4]], [0], **kwargs)


def test_positive_class_needs_a_binary_problem() -> None:
    with pytest.raises(InvalidInputError, match="binary problem"):
        expected_calibration_error([[0.6, 0.3, 0.1]], [0], target="positive_class")


def test_classwise_reduction_is_validated() -> None:
    with pytest.raises(InvalidInputError, match="'mean', 'none'"):
        classwise_calibration_error([[0.6, 0.4]], [0], reduction="sum")


def test_numpy_tensor_and_list_inputs_agree_and_return_floats() -> None:
    probs, labels = _random_classification(300, 3, seed=4)
    values = {
        expected_calibration_error(probs, labels),
        expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels)),
        expected_calibration_error(probs.tolist(), labels.tolist()),
    }
    assert len(values) == 1
    assert type(values.pop()) is float


def test_top_label_ties_go_to_the_lowest_class() -> None:
    # the tie [0.5, 0.5] predicts class 0; the binary p = 0.5 also predicts class 0
    assert expected_calibration_error([[0.5, 0.5]], [0]) == pytest.approx(0.5)
    assert expected_calibration_error([0.5], [0]) == pytest.approx(0.5)
    assert reliability_table([[0.5, 0.5]], [0], n_bins=2).accuracy[0] == 1.0
    assert reliability_table([[0.5, 0.5]], [1], n_bins=2).accuracy[0] == 0.0


def test_input_is_not_modified() -> None:
    probs = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    before = probs.clone()
    expected_calibration_error(probs, torch.tensor([0, 1]), binning="quantile")
    classwise_calibration_error(probs, torch.tensor([0, 1]))
    assert torch.equal(probs, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_inputs_give_the_cpu_result() -> None:
    probs, labels = _random_classification(2000, 5, seed=8)
    for binning in ("uniform", "quantile"):
        cpu = expected_calibration_error(probs, labels, binning=binning)
        gpu = expected_calibration_error(
            torch.from_numpy(probs).cuda(), torch.from_numpy(labels).cuda(), binning=binning
        )
        assert gpu == pytest.approx(cpu, abs=1e-12)
        assert classwise_calibration_error(
            torch.from_numpy(probs).cuda(), torch.from_numpy(labels).cuda()
        ) == (pytest.approx(classwise_calibration_error(probs, labels), abs=1e-12))


def test_half_precision_positive_class_probabilities_are_complemented_in_float64() -> None:
    # 1 - 0.498 is 0.5 in bfloat16: the confidence of class 0 would be rounded before binning
    positive = torch.tensor([0.498, 0.7, 0.2, 0.35], dtype=torch.bfloat16)
    labels = torch.tensor([0, 1, 0, 1])
    exact = positive.double()  # the same values, complemented exactly
    for metric in (expected_calibration_error, classwise_calibration_error):
        assert metric(positive, labels, n_bins=4) == pytest.approx(metric(exact, labels, n_bins=4), abs=1e-12)
