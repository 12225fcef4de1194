r"""Percentile bootstrap over inputs: confidence intervals for the metrics, computed for all resamples at once.

A resample draws ``n`` of the ``n`` inputs with replacement (:func:`bootstrap_indices`); the metric of
every resample is computed, and the interval at ``level`` is the ``(1 - level)/2`` and
``(1 + level)/2`` quantiles of those values (:func:`percentile_interval`). It says how much a metric
would move on another sample of inputs of the same size from the same population; it does **not**
include the Monte Carlo noise of the dropout passes (the inputs' predictions are held fixed).

Fast paths: a resample is a row of counts ``w_i`` (how often input ``i`` was drawn), so a mean of
per-input terms is ``w @ terms / n``, binned sums (ECE, MCE, classwise ECE) are weighted
``scatter_add`` sums over a (resample, bin) index, and the rank statistics (AURC, E-AURC, AUROC,
AUPR, FPR at a TPR) sort the inputs once and sum the weights of tied groups per resample. Each
resample's value is the metric of :mod:`mcdrop.metrics` on the resampled inputs (up to floating-point
rounding, tested against :func:`bootstrap_interval`, which calls the metric on every resample).

Resamples are drawn in blocks of 64 from a ``torch.Generator`` seeded with ``seed + stream`` on the
CPU, so the same ``(n, n_resamples, seed, stream)`` always gives the same resamples, on any machine
with the same torch version. Work is on the CPU in float64; memory is a few ``64 × n`` float64 blocks.

Example:
    >>> import torch
    >>> from mcdrop import metrics
    >>> g = torch.Generator().manual_seed(0)
    >>> probs = torch.softmax(torch.randn(500, 3, generator=g), dim=1)
    >>> labels = torch.randint(0, 3, (500,), generator=g)
    >>> values = metrics.bootstrap_classification(probs, labels, n_resamples=200)["accuracy"]
    >>> low, high = metrics.percentile_interval(values, level=0.95)
    >>> bool(low < metrics.accuracy(probs, labels) < high)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from mcdrop._checks import check_int, check_real
from mcdrop.errors import InvalidInputError
from mcdrop.metrics._binning import bin_index, curve_area, inner_edges
from mcdrop.metrics._gaussian import central_quantiles, crps_terms, nll_terms
from mcdrop.metrics.inputs import F64, ArrayLike, parse_classification, parse_regression, to_f64, vector

__all__ = [
    "BootstrapInterval",
    "bootstrap_classification",
    "bootstrap_indices",
    "bootstrap_interval",
    "bootstrap_ood",
    "bootstrap_regression",
    "percentile_interval",
]

#: Defaults used by :mod:`mcdrop.report`: 1000 resamples, seed 0, 95% intervals.
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
_BLOCK = 64  # resamples drawn (and evaluated) together


# ----------------------------------------------------------------------------------------------
# resamples and intervals
# ----------------------------------------------------------------------------------------------
def _check(n_resamples: int, seed: int) -> tuple[int, int]:
    return check_int(n_resamples, "n_resamples", minimum=1), check_int(seed, "seed", minimum=0)


def _index_blocks(n: int, n_resamples: int, seed: int, stream: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + stream)
    for start in range(0, n_resamples, _BLOCK):
        yield torch.randint(n, (min(_BLOCK, n_resamples - start), n), generator=gen)


def _weights(index: torch.Tensor, n: int) -> torch.Tensor:
    """(b, n) float64 counts: how often each input is drawn in each resample."""
    w = torch.zeros(index.shape[0], n, dtype=F64)
    return w.scatter_add_(1, index, torch.ones(index.shape, dtype=F64))


def _weight_blocks(n: int, n_resamples: int, seed: int, stream: int = 0) -> Iterator[torch.Tensor]:
    for index in _index_blocks(n, n_resamples, seed, stream):
        yield _weights(index, n)


def bootstrap_indices(
    n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, stream: int = 0
) -> torch.Tensor:
    """The resamples of a bootstrap over ``n`` inputs: row ``b`` lists the inputs drawn in resample ``b``.

    Each row draws ``n`` indices uniformly with replacement. These are the resamples every function of
    this module uses for the same ``(n, n_resamples, seed, stream)``.

    Args:
        n: Number of inputs, at least 1.
        n_resamples: Number of resamples ``B`` (default 1000).
        seed: Seed of the CPU generator (default 0), a non-negative int.
        stream: Which independent stream: the generator is seeded with ``seed + stream``. 0 for the
            inputs, 1 for the out-of-distribution inputs (which :func:`bootstrap_ood` resamples
            separately).

    Returns:
        ``(B, n)`` int64 CPU tensor of indices in ``[0, n)``.

    Raises:
        InvalidInputError: ``n`` or ``n_resamples`` below 1, or a negative seed.

    Example:
        >>> from mcdrop.metrics import bootstrap_indices
        >>> idx = bootstrap_indices(5, n_resamples=3, seed=0)
        >>> tuple(idx.shape), bool((idx == bootstrap_indices(5, n_resamples=3, seed=0)).all())
        ((3, 5), True)
    """
    n = check_int(n, "n", minimum=1)
    n_resamples, seed = _check(n_resamples, seed)
    stream = check_int(stream, "stream", minimum=0)
    return torch.cat(list(_index_blocks(n, n_resamples, seed, stream)))


def percentile_interval(values: ArrayLike, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap values: their ``(1 - level)/2`` and ``(1 + level)/2`` quantiles.

    Quantiles are numpy's default (linear interpolation between order statistics). NaN values (a
    resample where the metric is undefined, e.g. an AUROC with no wrong prediction) are left out;
    without any finite value the interval is ``(nan, nan)``.

    Args:
        values: The metric's values on the resamples, any 1-D array or tensor.
        level: Nominal coverage in ``(0, 1)`` (default 0.95).

    Returns:
        ``(low, high)`` as floats.

    Raises:
        InvalidInputError: ``level`` outside ``(0, 1)``.

    Example:
        >>> from mcdrop.metrics import percentile_interval
        >>> percentile_interval(list(range(101)), level=0.5)
        (25.0, 75.0)
    """
    level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    low, high = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return (float(low), float(high))


class BootstrapInterval(NamedTuple):
    """A percentile bootstrap interval and the values it was read from.

    Attributes:
        low: Lower end.
        high: Upper end.
        values: ``(B,)`` numpy array of the statistic on every resample (NaN where undefined).

    Example:
        >>> from mcdrop.metrics import BootstrapInterval
        >>> BootstrapInterval(0.1, 0.3, None).high
        0.3
    """

    low: float
    high: float
    values: np.ndarray


def bootstrap_interval(
    statistic: Callable[..., float],
    *arrays: Any,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> BootstrapInterval:
    """Percentile bootstrap interval of any statistic, calling it once per resample (the reference).

    ``statistic(*(a[idx] for a in arrays))`` is evaluated for every row ``idx`` of
    :func:`bootstrap_indices` (``n = len(arrays[0])``); a resample on which it raises
    :class:`~mcdrop.errors.InvalidInputError` (undefined for those inputs) counts as NaN. This is the
    slow, general path: the ``bootstrap_*`` functions compute the report's metrics on the same
    resamples for all of them at once.

    Args:
        statistic: A function of the resampled arrays returning a float, e.g.
            :func:`mcdrop.metrics.expected_calibration_error`.
        *arrays: Tensors or numpy arrays with one row per input (the same ``n``).
        n_resamples: Number of resamples (default 1000).
        level: Nominal coverage of the interval (default 0.95).
        seed: Seed of the resamples (default 0).

    Returns:
        A :class:`BootstrapInterval`.

    Raises:
        InvalidInputError: No arrays, arrays of different lengths, or invalid options.

    Example:
        >>> import numpy as np
        >>> from mcdrop.metrics import bootstrap_interval
        >>> x = np.arange(100.0)
        >>> low, high, values = bootstrap_interval(np.mean, x, n_resamples=200)
        >>> bool(low < 49.5 < high), values.shape
        (True, (200,))
    """
    if not arrays:
        raise InvalidInputError("bootstrap_interval needs at least one array to resample.")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise InvalidInputError(
            f"the arrays must have one row per input; got lengths {[len(a) for a in arrays]}."
        )
    index = bootstrap_indices(n, n_resamples, seed)
    values = np.empty(index.shape[0], dtype=np.float64)
    arrays = tuple(a if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays)
    for b, row in enumerate(index):
        picked = [a[row] if isinstance(a, torch.Tensor) else a[row.numpy()] for a in arrays]
        try:
            values[b] = float(statistic(*picked))
        except InvalidInputError:
            values[b] = math.nan
    low, high = percentile_interval(values, level)
    return BootstrapInterval(low, high, values)


# ----------------------------------------------------------------------------------------------
# weighted (resampled) statistics; w is a (b, n) float64 block of counts
# ----------------------------------------------------------------------------------------------
def _mean(w: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    return (w @ terms) / w.shape[1]


def _bin_sums(w: torch.Tensor, index: torch.Tensor, n_bins: int, *values: torch.Tensor) -> list[torch.Tensor]:
    """Per-(resample, bin) sums of the weights and of the weighted ``values``; ``index``: (n,) or (b, n)."""
    idx = index.expand(w.shape[0], -1) if index.dim() == 1 else index
    out = []
    for v in (None, *values):
        src = w if v is None else w * v
        out.append(torch.zeros(w.shape[0], n_bins, dtype=F64).scatter_add_(1, idx, src))
    return out


def _calibration(
    count: torch.Tensor, conf_sum: torch.Tensor, hit_sum: torch.Tensor, norm: str
) -> torch.Tensor:
    """:func:`mcdrop.metrics._binning.calibration_error` of every row of per-bin sums."""
    nonempty = count > 0
    diff = (hit_sum - conf_sum).abs()
    if norm == "l1":
        return torch.where(nonempty, diff, 0.0).sum(1) / count.sum(1)
    return torch.where(nonempty, diff / torch.where(nonempty, count, 1.0), -math.inf).max(1).values


def _groups(scores: torch.Tensor, descending: bool = False) -> tuple[torch.Tensor, int]:
    """Group id of every input among the distinct scores, in sorted order (ties share a group)."""
    order = torch.sort(scores, descending=descending, stable=True).indices
    _, inverse = torch.unique_consecutive(scores[order], return_inverse=True)
    group = torch.empty_like(inverse)
    group[order] = inverse
    return group, int(inverse.max()) + 1 if inverse.numel() else 0


def _group_sums(
    w: torch.Tensor, group: torch.Tensor, n_groups: int, values: torch.Tensor | None
) -> torch.Tensor:
    src = w if values is None else w * values
    return torch.zeros(w.shape[0], n_groups, dtype=F64).index_add_(1, group, src)


def _aurc(
    w: torch.Tensor, group: torch.Tensor, n_groups: int, e: torch.Tensor, harmonic: torch.Tensor
) -> torch.Tensor:
    """AURC of every resample (``selective._aurc_sorted`` on the resample's tie groups, in closed form).

    Inside a group of ``c`` inputs with loss ``S`` after ``a`` inputs with loss ``L``, the sum over
    its ranks ``k`` of ``(L + (k - a) S / c) / k`` is ``L ΔH + S - (S / c) a ΔH``, ``ΔH = H_{a+c} - H_a``.
    """
    count = _group_sums(w, group, n_groups, None)
    loss = _group_sums(w, group, n_groups, e)
    ends = torch.cumsum(count, 1)
    starts = ends - count
    before = torch.cumsum(loss, 1) - loss
    dh = harmonic[ends.long()] - harmonic[starts.long()]
    per_loss = torch.where(count > 0, loss / torch.where(count > 0, count, 1.0), 0.0)
    return (before * dh + loss - per_loss * starts * dh).sum(1) / w.shape[1]


def _auroc(w: torch.Tensor, group: torch.Tensor, n_groups: int, positive: torch.Tensor) -> torch.Tensor:
    """P(positive > negative) + P(tie)/2 of every resample (NaN without positives or negatives)."""
    pos = _group_sums(w, group, n_groups, positive)
    neg = _group_sums(w, group, n_groups, 1.0 - positive)
    below = torch.cumsum(neg, 1) - neg
    total = pos.sum(1) * neg.sum(1)
    value = (pos * (below + neg / 2)).sum(1)
    return torch.where(total > 0, value / torch.where(total > 0, total, 1.0), math.nan)


def _average_precision(
    w: torch.Tensor, group: torch.Tensor, n_groups: int, positive: torch.Tensor
) -> torch.Tensor:
    """Step-wise average precision of every resample; ``group`` ranks the scores in decreasing order."""
    pos = _group_sums(w, group, n_groups, positive)
    everyone = _group_sums(w, group, n_groups, None)
    true_pos, kept = torch.cumsum(pos, 1), torch.cumsum(everyone, 1)
    precision = torch.where(kept > 0, true_pos / torch.where(kept > 0, kept, 1.0), 0.0)
    return (pos * precision).sum(1) / pos.sum(1)


def _fpr_at_tpr(
    w_pos: torch.Tensor, w_neg: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, tpr: float
) -> torch.Tensor:
    """``_ranking.fpr_at_tpr`` of every resample (the number of positives is fixed: ``len(positive)``)."""
    n_pos = positive.shape[0]
    k = max(1, min(n_pos, math.ceil(tpr * n_pos)))
    while k > 1 and (k - 1) / n_pos >= tpr:
        k -= 1
    while k < n_pos and k / n_pos < tpr:
        k += 1
    # the k-th largest resampled positive: first place where the descending cumulative weight reaches k
    values, order = torch.sort(positive, descending=True, stable=True)
    reached = torch.cumsum(w_pos[:, order], 1)
    at = torch.searchsorted(reached, torch.full((w_pos.shape[0], 1), float(k), dtype=F64)).clamp(
        max=n_pos - 1
    )
    threshold = values[at[:, 0]]
    # weight of the negatives >= threshold
    neg_sorted, neg_order = torch.sort(negative, stable=True)
    cum = torch.nn.functional.pad(torch.cumsum(w_neg[:, neg_order], 1), (1, 0))
    first = torch.searchsorted(neg_sorted, threshold)
    above = cum[:, -1] - cum.gather(1, first[:, None])[:, 0]
    return above / negative.shape[0]


def _collect(blocks: Iterator[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    parts: dict[str, list[torch.Tensor]] = {}
    for block in blocks:
        for key, value in block.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(value).numpy() for key, value in parts.items()}


def _harmonic(n: int) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=F64), 0)])


def _uncertainty(scores: Mapping[str, ArrayLike] | None, n: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, s in (scores or {}).items():
        t = to_f64(vector(s, f"scores[{name!r}]")).cpu()
        if t.shape[0] != n:
            raise InvalidInputError(
                f"scores[{name!r}] has {t.shape[0]} values for {n} inputs; give one per input."
            )
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------
# public: the report's metrics on every resample
# ----------------------------------------------------------------------------------------------
def bootstrap_classification(
    probs: ArrayLike,
    labels: ArrayLike,
    uncertainty: Mapping[str, ArrayLike] | None = None,
    means: Mapping[str, ArrayLike] | None = None,
    *,
    n_bins: int = 15,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, np.ndarray]:
    """A classifier's metrics on every bootstrap resample of its inputs, computed for all at once.

    Keys, each a ``(B,)`` float64 numpy array, the metric of :mod:`mcdrop.metrics` on resample ``b``
    of :func:`bootstrap_indices` (``n``, ``n_resamples``, ``seed``): ``"accuracy"``, ``"NLL"``
    (:func:`~mcdrop.metrics.negative_log_likelihood`, default ``eps``), ``"Brier"``, ``"ECE"``, ``"MCE"``,
    ``"adaptive ECE"`` (quantile bins), ``"classwise ECE"`` (all with ``n_bins`` bins); per entry
    ``name`` of ``uncertainty``: ``"AURC (name)"``, ``"E-AURC (name)"`` and
    ``"misclassification AUROC (name)"`` (NaN on a resample with no wrong or no right prediction),
    with the 0-1 errors of the top-label prediction; per entry ``name`` of ``means``: ``"mean (name)"``.

    Args:
        probs: ``(n, K)`` probabilities (or binary ``(n,)``), as for the metrics.
        labels: ``(n,)`` integer labels.
        uncertainty: Per-input uncertainty scores by name, e.g. ``{"entropy": h}``.
        means: Per-input values whose mean is reported, by name.
        n_bins: Number of bins of the calibration errors (default 15).
        n_resamples: Number of resamples (default 1000).
        seed: Seed of the resamples (default 0).

    Returns:
        ``{key: values}`` as above.

    Raises:
        InvalidInputError: Invalid probabilities, labels, scores or options (as the metrics).

    Example:
        >>> import torch
        >>> from mcdrop import metrics
        >>> probs = torch.softmax(torch.randn(300, 4, generator=torch.Generator().manual_seed(1)), 1)
        >>> labels = probs.argmax(1) % 3
        >>> out = metrics.bootstrap_classification(probs, labels, n_resamples=100)
        >>> sorted(out)[:3], out["ECE"].shape
        (['Brier', 'ECE', 'MCE'], (100,))
    """
    n_bins = check_int(n_bins, "n_bins", minimum=1)
    n_resamples, seed = _check(n_resamples, seed)
    data = parse_classification(probs, labels)
    n = data.n
    conf, hit = (t.cpu() for t in data.top_label())
    conf64, hit64 = to_f64(conf), to_f64(hit)
    uniform = bin_index(conf, inner_edges(conf, n_bins, "uniform"), "right")
    dtype = (data.probs if data.probs is not None else data.positive).dtype  # type: ignore[union-attr]
    nll = -torch.log(to_f64(data.true_class_prob()).cpu().clamp(min=torch.finfo(dtype).eps))
    if data.positive is not None:
        brier = 2 * (to_f64(data.positive).cpu() - to_f64(data.labels).cpu()) ** 2
    else:
        brier = (data.sum_of_squares() - 2 * to_f64(data.true_class_prob()) + 1).cpu()
    correct = to_f64(data.predictions().cpu() == data.labels.cpu())
    classes = []
    for k in range(data.n_classes):
        column = data.column(k).clamp(0.0, 1.0)
        index = bin_index(column, inner_edges(column, n_bins, "uniform"), "right").cpu()
        classes.append((index, to_f64(column).cpu(), to_f64(data.labels.cpu() == k)))
    # adaptive ECE: resampled order statistics of the confidence
    conf_sorted = torch.sort(conf).values
    ranks = torch.tensor([(m * n + n_bins - 1) // n_bins for m in range(1, n_bins)], dtype=F64)
    conf_order = torch.sort(conf, stable=True).indices
    errors = 1.0 - correct
    scores = _uncertainty(uncertainty, n)
    ranked = {name: _groups(s) for name, s in scores.items()}
    oracle = _groups(errors)
    harmonic = _harmonic(n)
    averaged = _uncertainty(means, n)

    def blocks() -> Iterator[dict[str, torch.Tensor]]:
        for w in _weight_blocks(n, n_resamples, seed):
            out = {"accuracy": _mean(w, correct), "NLL": _mean(w, nll) + 0.0, "Brier": _mean(w, brier)}
            count, conf_sum, hit_sum = _bin_sums(w, uniform, n_bins, conf64, hit64)
            out["ECE"] = _calibration(count, conf_sum, hit_sum, "l1")
            out["MCE"] = _calibration(count, conf_sum, hit_sum, "max")
            if n_bins > 1:
                reached = torch.cumsum(w[:, conf_order], 1)
                at = torch.searchsorted(reached, ranks.expand(w.shape[0], -1).contiguous())
                edges = conf_sorted[at.clamp(max=n - 1)]
                adaptive = torch.searchsorted(edges, conf.expand(w.shape[0], -1).contiguous())
            else:
                adaptive = torch.zeros(n, dtype=torch.long)
            out["adaptive ECE"] = _calibration(*_bin_sums(w, adaptive, n_bins, conf64, hit64), "l1")
            per_class = [
                _calibration(*_bin_sums(w, idx, n_bins, p_k, y_k), "l1") for idx, p_k, y_k in classes
            ]
            out["classwise ECE"] = torch.stack(per_class, 1).mean(1)
            best = _aurc(w, *oracle, errors, harmonic)
            for name, (group, n_groups) in ranked.items():
                value = _aurc(w, group, n_groups, errors, harmonic)
                out[f"AURC ({name})"] = value
                out[f"E-AURC ({name})"] = (value - best).clamp(min=0.0)
                out[f"misclassification AUROC ({name})"] = _auroc(w, group, n_groups, errors)
            for name, values in averaged.items():
                out[f"mean ({name})"] = _mean(w, values)
            yield out

    return _collect(blocks())


def bootstrap_regression(
    mean: ArrayLike,
    std: ArrayLike | None,
    targets: ArrayLike,
    means: Mapping[str, ArrayLike] | None = None,
    *,
    level: float = 0.95,
    n_levels: int = 100,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, np.ndarray]:
    """A regression model's metrics on every bootstrap resample of its inputs, computed for all at once.

    Keys, each a ``(B,)`` float64 numpy array, the metric of :mod:`mcdrop.metrics` on resample ``b``
    of :func:`bootstrap_indices`: ``"RMSE"``, ``"MAE"``; with ``std``: ``"Gaussian NLL"``, ``"CRPS"``,
    ``"PICP"`` and ``"MPIW"`` (at ``level``), ``"miscalibration area"``, ``"MACE"``, ``"RMSCE"``
    (interval calibration curve at ``n_levels`` levels), ``"sharpness"``; per entry ``name`` of
    ``means``: ``"mean (name)"``.

    Args:
        mean: ``(n,)`` predictive means.
        std: ``(n,)`` predictive standard deviations (strictly positive), or ``None`` for the error
            metrics only.
        targets: ``(n,)`` targets.
        means: Per-input values whose mean is reported, by name.
        level: Nominal coverage of PICP and MPIW (default 0.95).
        n_levels: Levels of the calibration curve (default 100).
        n_resamples: Number of resamples (default 1000).
        seed: Seed of the resamples (default 0).

    Returns:
        ``{key: values}`` as above.

    Raises:
        InvalidInputError: Mismatched shapes, ``std <= 0`` or invalid options (as the metrics).

    Example:
        >>> import torch
        >>> from mcdrop import metrics
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randn(400, generator=g)
        >>> out = metrics.bootstrap_regression(torch.zeros(400), torch.ones(400), y, n_resamples=100)
        >>> low, high = metrics.percentile_interval(out["PICP"])
        >>> bool(low <= metrics.picp(torch.zeros(400), torch.ones(400), y) <= high)
        True
    """
    level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
    n_levels = check_int(n_levels, "n_levels", minimum=2)
    n_resamples, seed = _check(n_resamples, seed)
    mu, sigma, y = (None if t is None else t.cpu() for t in parse_regression(mean, std, targets))
    assert mu is not None and y is not None
    n = mu.shape[0]
    averaged = _uncertainty(means, n)
    if sigma is not None:
        z_lo, z_hi = (float(z) for z in central_quantiles(level))
        r = (mu - y) / sigma
        inside = ((r >= z_lo) & (r <= z_hi)).to(F64)
        expected = torch.as_tensor(np.linspace(0.0, 1.0, n_levels), dtype=F64)
        lo, hi = central_quantiles(expected)
        curve_inside = ((r[:, None] >= lo[None]) & (r[:, None] <= hi[None])).to(F64)
        width = 2 * central_quantiles(level)[1]

    def blocks() -> Iterator[dict[str, torch.Tensor]]:
        for w in _weight_blocks(n, n_resamples, seed):
            out = {"RMSE": torch.sqrt(_mean(w, (mu - y) ** 2)), "MAE": _mean(w, (mu - y).abs())}
            if sigma is not None:
                out["Gaussian NLL"] = _mean(w, nll_terms(mu, sigma, y))
                out["CRPS"] = _mean(w, crps_terms(mu, sigma, y))
                out["PICP"] = _mean(w, inside)
                out["MPIW"] = width * _mean(w, sigma)
                observed = _mean(w, curve_inside)
                gap = observed - expected
                out["miscalibration area"] = torch.tensor(
                    [curve_area(expected, row) for row in observed], dtype=F64
                )
                out["MACE"] = gap.abs().mean(1)
                out["RMSCE"] = torch.sqrt((gap**2).mean(1))
                out["sharpness"] = torch.sqrt(_mean(w, sigma**2))
            for name, values in averaged.items():
                out[f"mean ({name})"] = _mean(w, values)
            yield out

    return _collect(blocks())


def bootstrap_ood(
    scores_in: ArrayLike,
    scores_out: ArrayLike,
    *,
    tpr: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, np.ndarray]:
    """OOD detection metrics on every bootstrap resample, in- and out-of-distribution inputs resampled apart.

    The in-distribution inputs are resampled with stream 0 of :func:`bootstrap_indices` (the same
    resamples as the other metrics of the same inputs), the OOD inputs independently with stream 1
    (a stratified bootstrap: both sample sizes stay fixed). Keys, each a ``(B,)`` float64 numpy array:
    ``"AUROC"`` (:func:`~mcdrop.metrics.ood_auroc`), ``"AUPR-In"``
    (:func:`~mcdrop.metrics.ood_aupr`, ``positive="in"``) and ``"FPR@TPR"``
    (:func:`~mcdrop.metrics.fpr_at_tpr` at ``tpr``, ``positive="in"``).

    Args:
        scores_in: ``(n_in,)`` scores of the in-distribution inputs (higher: more likely OOD).
        scores_out: ``(n_out,)`` scores of the OOD inputs.
        tpr: True-positive rate of the FPR (default 0.95).
        n_resamples: Number of resamples (default 1000).
        seed: Seed of the resamples (default 0).

    Returns:
        ``{key: values}`` as above.

    Raises:
        InvalidInputError: Scores that are not 1-D or are empty, or invalid options.

    Example:
        >>> import torch
        >>> from mcdrop import metrics
        >>> g = torch.Generator().manual_seed(0)
        >>> s_in, s_out = torch.randn(200, generator=g), torch.randn(100, generator=g) + 1
        >>> out = metrics.bootstrap_ood(s_in, s_out, n_resamples=100)
        >>> low, high = metrics.percentile_interval(out["AUROC"])
        >>> bool(low < metrics.ood_auroc(s_in, s_out) < high)
        True
    """
    tpr = check_real(tpr, "tpr", low=0.0, high=1.0, low_open=True)
    n_resamples, seed = _check(n_resamples, seed)
    s_in = to_f64(vector(scores_in, "scores_in")).cpu()
    s_out = to_f64(vector(scores_out, "scores_out")).cpu()
    n_in = s_in.shape[0]
    scores = torch.cat([s_in, s_out])
    is_out = torch.cat([torch.zeros(n_in, dtype=F64), torch.ones(s_out.shape[0], dtype=F64)])
    up, n_up = _groups(scores)
    down, n_down = _groups(-scores, descending=True)

    def blocks() -> Iterator[dict[str, torch.Tensor]]:
        pairs = zip(
            _weight_blocks(n_in, n_resamples, seed, 0),
            _weight_blocks(s_out.shape[0], n_resamples, seed, 1),
            strict=True,
        )
        for w_in, w_out in pairs:
            w = torch.cat([w_in, w_out], 1)
            yield {
                "AUROC": _auroc(w, up, n_up, is_out),
                "AUPR-In": _average_precision(w, down, n_down, 1.0 - is_out),
                "FPR@TPR": _fpr_at_tpr(w_in, w_out, -s_in, -s_out, tpr),
            }

    return _collect(blocks())
