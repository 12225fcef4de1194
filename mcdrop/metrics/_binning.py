"""Binning shared by the metrics and the streaming accumulators: bin edges, bin assignment, per-bin sums.

One implementation of every binning step, so that an in-memory metric and its streaming counterpart
put each input in the same bin and reduce the same sums:

* confidence bins of the calibration errors: :func:`inner_edges` (uniform or quantile),
  :func:`bin_index`, :func:`binned_sums`, and :func:`calibration_error` / :func:`table_columns` from
  the per-bin sums (:class:`Bins`);
* log-spaced score bins of the streaming histogram AUROC: :func:`score_edges` and :func:`bin_index`;
* counts of sorted values inside closed intervals, by binary search (:func:`count_between`), and the
  area between a calibration curve and the diagonal (:func:`curve_area`), for the regression
  calibration curve.

Example:
    >>> import torch
    >>> from mcdrop.metrics._binning import binned_sums, calibration_error
    >>> bins = binned_sums(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, True]), 5,
    ...                    "uniform")
    >>> bins.count.tolist()
    [0.0, 0.0, 1.0, 2.0, 1.0]
    >>> round(calibration_error(bins, "l1"), 4)
    0.25
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mcdrop.metrics.inputs import F64, to_f64

__all__ = [
    "Bins",
    "bin_index",
    "binned_sums",
    "calibration_error",
    "count_between",
    "curve_area",
    "inner_edges",
    "score_edges",
    "table_columns",
    "uniform_edges",
]


@dataclass(frozen=True)
class Bins:
    """Per-bin sums of confidences and outcomes, ``M`` bins, all float64.

    Attributes:
        lower: ``(M,)`` lower bin edges, for display (the first is 0).
        upper: ``(M,)`` upper bin edges (the last is 1).
        count: ``(M,)`` number of inputs in each bin.
        conf_sum: ``(M,)`` sum of the confidences in each bin.
        hit_sum: ``(M,)`` number of hits (outcome 1) in each bin.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    count: torch.Tensor
    conf_sum: torch.Tensor
    hit_sum: torch.Tensor

    @classmethod
    def from_sums(
        cls, inner: torch.Tensor, count: torch.Tensor, conf_sum: torch.Tensor, hit_sum: torch.Tensor
    ) -> Bins:
        """Bins of ``[0, 1]`` cut at the ``M - 1`` float64 ``inner`` edges, with their sums.

        Args:
            inner: ``(M - 1,)`` inner edges, float64, non-decreasing.
            count: ``(M,)`` number of inputs per bin, float64.
            conf_sum: ``(M,)`` sum of the confidences per bin, float64.
            hit_sum: ``(M,)`` number of hits per bin, float64.

        Returns:
            The :class:`Bins`, with ``lower = [0, inner]`` and ``upper = [inner, 1]``.
        """
        return cls(
            lower=torch.cat([inner.new_zeros(1), inner]),
            upper=torch.cat([inner, inner.new_ones(1)]),
            count=count,
            conf_sum=conf_sum,
            hit_sum=hit_sum,
        )


def uniform_edges(n_bins: int) -> torch.Tensor:
    """The ``M - 1`` inner edges ``k / M`` of ``M`` equal-width bins, correctly rounded float64, on the CPU.

    Args:
        n_bins: The number of bins ``M``.

    Returns:
        ``(M - 1,)`` float64 tensor.
    """
    return torch.arange(1, n_bins, dtype=F64) / n_bins


def inner_edges(conf: torch.Tensor, n_bins: int, binning: str) -> torch.Tensor:
    r"""The ``M - 1`` inner bin edges, in ``conf``'s dtype and device (non-decreasing).

    Args:
        conf: ``(n,)`` confidences.
        n_bins: The number of bins ``M``.
        binning: ``"uniform"``: the edges ``k / M`` rounded to ``conf``'s dtype. ``"quantile"``: the
            order statistics :math:`s_{(\lceil mn/M \rceil)}` of ``conf``, ``m = 1..M-1``.

    Returns:
        ``(M - 1,)`` tensor of edges.
    """
    if binning == "uniform":
        # k / M correctly rounded in float64, then to the input's dtype: "exactly k/M" means the
        # representable number nearest to k/M in the precision the confidences are held in.
        return uniform_edges(n_bins).to(device=conf.device, dtype=conf.dtype)
    n = conf.shape[0]
    ranks = [(m * n + n_bins - 1) // n_bins for m in range(1, n_bins)]  # ceil(m n / M), 1-based
    sorted_conf = torch.sort(conf).values
    index = torch.as_tensor([r - 1 for r in ranks], dtype=torch.long, device=conf.device)
    return sorted_conf[index]


def bin_index(
    values: torch.Tensor, edges: torch.Tensor, closed: Literal["right", "left"] = "right"
) -> torch.Tensor:
    """The bin of every value, by binary search in sorted ``edges`` (monotone in the value).

    Args:
        values: Values to bin, any shape.
        edges: ``(E,)`` sorted edges; they cut the line into ``E + 1`` bins, numbered ``0..E``.
        closed: ``"right"`` (default): bins ``(e_{b-1}, e_b]``, the bin is the number of edges strictly
            below the value. ``"left"``: bins ``[e_{b-1}, e_b)``, the number of edges at or below it.

    Returns:
        int64 bin indices, the shape of ``values``.

    Example:
        >>> import torch
        >>> from mcdrop.metrics._binning import bin_index
        >>> edges, values = torch.tensor([0.5]), torch.tensor([0.5, 0.7])
        >>> bin_index(values, edges).tolist(), bin_index(values, edges, "left").tolist()
        ([0, 1], [1, 1])
    """
    return torch.bucketize(values, edges, right=closed == "left")


def binned_sums(conf: torch.Tensor, hit: torch.Tensor, n_bins: int, binning: str) -> Bins:
    """Bin the ``(n,)`` confidences ``conf`` (input dtype) and outcomes ``hit`` (bool) and sum per bin.

    Bins are closed on the right, ``(e_{m-1}, e_m]``, the first also holding 0 and the last 1.

    Args:
        conf: ``(n,)`` confidences in ``[0, 1]``.
        hit: ``(n,)`` outcomes (bool).
        n_bins: The number of bins ``M``.
        binning: ``"uniform"`` or ``"quantile"`` (see :func:`inner_edges`).

    Returns:
        The :class:`Bins`, on ``conf``'s device.
    """
    conf = conf.contiguous()
    inner = inner_edges(conf, n_bins, binning)
    index = bin_index(conf, inner, "right")
    conf64 = to_f64(conf)
    index = index.to(conf64.device)
    count = torch.zeros(n_bins, dtype=F64, device=conf64.device)
    count.index_add_(0, index, torch.ones_like(conf64))
    conf_sum = torch.zeros_like(count).index_add_(0, index, conf64)
    hit_sum = torch.zeros_like(count).index_add_(0, index, to_f64(hit))
    return Bins.from_sums(to_f64(inner), count, conf_sum, hit_sum)


def calibration_error(bins: Bins, norm: str) -> float:
    """Calibration error of the given norm from per-bin sums; empty bins contribute nothing.

    Args:
        bins: The per-bin sums.
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (MCE).

    Returns:
        The calibration error (NaN without any input).
    """
    nonempty = bins.count > 0
    n = bins.count.sum()
    # |acc_m - conf_m| * |B_m| / n == |sum(hit) - sum(conf)| / n: one division, no 0/0.
    diff = (bins.hit_sum - bins.conf_sum)[nonempty]
    count = bins.count[nonempty]
    if norm == "l1":
        return float(diff.abs().sum() / n)
    if norm == "l2":
        return float(torch.sqrt((diff * diff / count).sum() / n))
    return float((diff.abs() / count).max())


def table_columns(bins: Bins) -> dict[str, np.ndarray]:
    """The columns of a reliability table from per-bin sums (NaN means for empty bins).

    Args:
        bins: The per-bin sums (any device).

    Returns:
        ``{"lower", "upper", "count" (int64), "confidence", "accuracy", "gap"}`` numpy arrays, the
        fields of :class:`~mcdrop.metrics.ReliabilityTable`.
    """
    count = bins.count.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(count > 0, bins.conf_sum.cpu().numpy() / count, np.nan)
        accuracy = np.where(count > 0, bins.hit_sum.cpu().numpy() / count, np.nan)
    return {
        "lower": bins.lower.cpu().numpy(),
        "upper": bins.upper.cpu().numpy(),
        "count": count.astype(np.int64),
        "confidence": confidence,
        "accuracy": accuracy,
        "gap": confidence - accuracy,
    }


def score_edges(high: float, n_bins: int, relative_range: float) -> torch.Tensor:
    """Edges of a score histogram whose bin 0 holds exact zeros, the others log-spaced up to ``high``.

    Used with :func:`bin_index` ``closed="left"``: bin 0 is ``[0, 5e-324)`` (exact zeros), bin 1
    ``[5e-324, lo)`` and bins ``2..n_bins`` are log-spaced between ``lo = relative_range * high`` and
    ``high`` (larger scores go to the last bin).

    Args:
        high: The largest score expected (e.g. ``ln K`` for an entropy over ``K`` classes), positive.
        n_bins: The number of bins above the zero bin, at least 2.
        relative_range: ``lo / high``, in ``(0, 1)``.

    Returns:
        ``(n_bins,)`` float64 edges on the CPU: ``[smallest positive float64, lo, ..., < high]``.
    """
    lo = relative_range * high
    inner = lo * (high / lo) ** (torch.arange(n_bins - 1, dtype=F64) / (n_bins - 1))
    return torch.cat([torch.tensor([5e-324], dtype=F64), inner])


def count_between(sorted_values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """How many of the ascending ``sorted_values`` lie in each closed interval ``[lower_j, upper_j]``.

    Args:
        sorted_values: ``(n,)`` values, sorted ascending.
        lower: ``(L,)`` lower ends, on the device of ``sorted_values``.
        upper: ``(L,)`` upper ends, same.

    Returns:
        ``(L,)`` int64 counts (0 for an empty interval, ``lower_j > upper_j``).

    Example:
        >>> import torch
        >>> from mcdrop.metrics._binning import count_between
        >>> values = torch.tensor([0.0, 1.0, 2.0])
        >>> count_between(values, torch.tensor([0.0, 1.5]), torch.tensor([1.0, 1.0])).tolist()
        [2, 0]
    """
    inside = torch.searchsorted(sorted_values, upper, right=True) - torch.searchsorted(
        sorted_values, lower, right=False
    )
    return inside.clamp(min=0)


def curve_area(expected: torch.Tensor, observed: torch.Tensor) -> float:
    r"""Area between a piecewise-linear calibration curve and the diagonal, integrated exactly.

    On a segment of width :math:`w` with gaps :math:`d_l, d_r` (observed minus expected) at its ends the
    area is :math:`w\,|d_l + d_r|/2` when the gaps have the same sign and
    :math:`w\,(d_l^2 + d_r^2) / (2(|d_l| + |d_r|))` when the curve crosses the diagonal.

    Args:
        expected: ``(L,)`` float64 expected proportions, increasing.
        observed: ``(L,)`` float64 observed proportions, same device.

    Returns:
        The area.
    """
    gap = observed - expected
    width = torch.diff(expected)
    left, right = gap[:-1], gap[1:]
    same_side = left * right >= 0
    magnitude = left.abs() + right.abs()
    crossing = (left**2 + right**2) / (2 * torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude)))
    area = torch.where(same_side, (left + right).abs() / 2, crossing) * width
    return float(area.sum())
