"""The shared binning helpers (``mcdrop.metrics._binning``) and the callers that must use them alike.

The in-memory calibration metrics and the streaming accumulators share one binning; these tests pin
the bin of edge cases (exact ``k/M``, 0 and 1, exact zero scores), the counting of sorted values in
closed intervals, and the exact curve area, against brute force.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcdrop import metrics as M
from mcdrop.metrics import _binning as B
from mcdrop.metrics.streaming import StreamingClassificationMetrics, StreamingRegressionMetrics

F64 = torch.float64


def test_uniform_edges_are_k_over_m_correctly_rounded():
    edges = B.uniform_edges(15)
    assert edges.dtype == F64 and edges.shape == (14,)
    assert edges.tolist() == [k / 15 for k in range(1, 15)]
    assert B.uniform_edges(1).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binned_sums_put_exact_edges_in_the_bin_they_close(dtype):
    m = 15
    conf = torch.tensor([0.0, 1.0] + [k / m for k in range(1, m)], dtype=dtype)
    bins = B.binned_sums(conf, torch.ones_like(conf, dtype=torch.bool), m, "uniform")
    # 0 and 1/M in bin 0, k/M closes bin k-1 (0-based), 1.0 alone in the last bin (14/M closes bin 13)
    assert bins.count.tolist() == [2.0] + [1.0] * (m - 1)
    assert bins.conf_sum.dtype == F64 and float(bins.hit_sum.sum()) == conf.numel()
    assert bins.lower[0] == 0 and bins.upper[-1] == 1
    assert torch.equal(bins.lower[1:], bins.upper[:-1])


def test_bin_index_closed_right_and_left():
    edges = torch.tensor([0.25, 0.5, 0.75], dtype=F64)
    values = torch.tensor([0.0, 0.25, 0.3, 0.5, 0.75, 1.0], dtype=F64)
    assert B.bin_index(values, edges).tolist() == [0, 0, 1, 1, 2, 3]
    assert B.bin_index(values, edges, "left").tolist() == [0, 1, 1, 2, 3, 3]


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_calibration_error_from_bins_matches_a_direct_computation(binning, norm):
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=g, dtype=F64)
    hit = torch.rand(500, generator=g, dtype=F64) < conf
    bins = B.binned_sums(conf, hit, 10, binning)
    inner = B.inner_edges(conf, 10, binning)
    index = np.searchsorted(inner.numpy(), conf.numpy(), side="left")  # (e_{m-1}, e_m]
    gaps, weights = [], []
    for b in range(10):
        members = index == b
        if members.any():
            gaps.append(abs(hit.numpy()[members].mean() - conf.numpy()[members].mean()))
            weights.append(members.mean())
    gaps_a, weights_a = np.array(gaps), np.array(weights)
    expected = {
        "l1": float((weights_a * gaps_a).sum()),
        "l2": math.sqrt(float((weights_a * gaps_a**2).sum())),
        "max": float(gaps_a.max()),
    }[norm]
    assert B.calibration_error(bins, norm) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_table_columns_are_the_reliability_table_and_nan_for_empty_bins():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1, 0])
    conf, hit = probs.max(1).values, probs.argmax(1) == labels
    columns = B.table_columns(B.binned_sums(conf, hit, 5, "uniform"))
    table = M.reliability_table(probs, labels, n_bins=5)
    for name, value in columns.items():
        assert np.array_equal(value, getattr(table, name), equal_nan=True), name
    assert columns["count"].dtype == np.int64 and np.isnan(columns["confidence"][:2]).all()


def test_score_edges_hold_exact_zeros_apart_and_are_log_spaced():
    edges = B.score_edges(math.log(4), 64, 1e-9)
    assert edges.shape == (64,) and edges[0] == 5e-324
    assert bool((torch.diff(edges) > 0).all()) and float(edges[-1]) < math.log(4)
    ratios = edges[2:] / edges[1:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)
    index = B.bin_index(torch.tensor([0.0, 1e-300, 1e-3, math.log(4), 10.0], dtype=F64), edges, "left")
    assert index[0] == 0 and index[1] == 1 and 1 < index[2] < 64 and index[3] == index[4] == 64


def test_count_between_counts_closed_intervals_by_binary_search():
    g = torch.Generator().manual_seed(1)
    values = torch.sort(torch.randint(-5, 6, (300,), generator=g).to(F64)).values
    lower = torch.tensor([-10.0, -2.0, 0.0, 3.0, 4.5], dtype=F64)
    upper = torch.tensor([10.0, 2.0, 0.0, 1.0, 4.6], dtype=F64)
    brute = [int(((values >= lo) & (values <= hi)).sum()) for lo, hi in zip(lower, upper, strict=True)]
    counts = B.count_between(values, lower, upper)
    assert counts.dtype == torch.int64 and counts.tolist() == brute and counts[3] == 0


def test_curve_area_of_a_crossing_and_of_a_one_sided_curve():
    expected = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    # one-sided: a triangle of base 1 and height 0.5
    assert B.curve_area(expected, torch.tensor([0.0, 0.0, 1.0], dtype=F64)) == 0.25
    # gaps (0.2, -0.2, 0): the first segment crosses the diagonal in its middle, two triangles of
    # area 0.5 * 0.25 * 0.2; the second is one triangle of area 0.5 * 0.5 * 0.2
    assert B.curve_area(expected, torch.tensor([0.2, 0.3, 1.0], dtype=F64)) == pytest.approx(0.1, rel=1e-15)
    assert B.curve_area(expected, expected.clone()) == 0.0


def test_streaming_and_in_memory_share_the_bins_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(2 * torch.randn(400, 3, generator=g), 1)
    labels = torch.randint(0, 3, (400,), generator=g)
    acc = StreamingClassificationMetrics(n_bins=12)
    acc.update(probs, labels)
    assert np.array_equal(acc.reliability_table().count, M.reliability_table(probs, labels, n_bins=12).count)
    assert acc.summary()["MCE"] == M.expected_calibration_error(probs, labels, n_bins=12, norm="max")
    mean, std = torch.randn(300, generator=g, dtype=F64), torch.rand(300, generator=g, dtype=F64) + 0.1
    y = mean + std * torch.randn(300, generator=g, dtype=F64)
    reg = StreamingRegressionMetrics(n_curve_levels=40)
    reg.update(mean, std, y)
    assert np.array_equal(
        reg.calibration_curve().observed, M.calibration_curve(mean, std, y, n_levels=40).observed
    )
    assert reg.summary()["miscalibration area"] == M.miscalibration_area(mean, std, y, n_levels=40)
