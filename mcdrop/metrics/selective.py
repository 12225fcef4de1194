r"""Selective prediction and failure detection from any per-sample uncertainty score.

Every function takes ``uncertainty``, shape ``(n,)``, where **higher means less confident** (predictive
entropy, mutual information, ``1 - max_k p_k``, a predictive standard deviation, ...; pass ``-confidence``
for a confidence score), and ``errors``, shape ``(n,)``: the per-sample loss of the prediction. For
classification that is the 0-1 loss, ``errors = (predictions != labels)``: 1 where the prediction is
**wrong**. The risk–coverage functions accept any non-negative loss (e.g. squared error).

Abstaining on the most uncertain samples and keeping the ``k`` most certain ones gives coverage
:math:`k/n` and selective risk :math:`R_k = \frac{1}{k}\sum_{j \le k} e_{(j)}`, the mean loss over the
kept samples, where :math:`e_{(j)}` is the loss of the sample with the ``j``-th smallest uncertainty.
Samples with tied uncertainty cannot be separated by any threshold; every quantity below treats them
as if ordered at random and reports the expectation, so results never depend on the input order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from mcdrop.errors import InvalidInputError
from mcdrop.metrics._ranking import auroc as _auroc
from mcdrop.metrics.inputs import F64, ArrayLike, binary_vector, to_f64, vector

__all__ = ["RiskCoverageCurve", "aurc", "e_aurc", "misclassification_auroc", "risk_coverage_curve"]


class RiskCoverageCurve(NamedTuple):
    """Achievable (coverage, selective risk) points, one per distinct uncertainty threshold.

    Attributes:
        coverage: Fraction of samples kept, ``mean(uncertainty <= threshold)``, increasing to 1.
        risk: Mean loss over the kept samples.
        threshold: The uncertainty threshold of each point (the distinct values, increasing).

    Example:
        >>> from mcdrop.metrics import risk_coverage_curve
        >>> coverage, risk, threshold = risk_coverage_curve([0.2, 0.1], [1, 0])
        >>> coverage.tolist(), risk.tolist(), threshold.tolist()
        ([0.5, 1.0], [0.0, 0.5], [0.1, 0.2])
    """

    coverage: np.ndarray
    risk: np.ndarray
    threshold: np.ndarray


def _pair(uncertainty: ArrayLike, errors: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    u = vector(uncertainty, "uncertainty")
    e = vector(errors, "errors")
    if u.shape != e.shape:
        raise InvalidInputError(
            f"uncertainty and errors must have the same length (one value per sample); got "
            f"{u.shape[0]} and {e.shape[0]}."
        )
    e = to_f64(e).to(to_f64(u).device)
    if bool((e < 0).any()):
        raise InvalidInputError(
            f"errors must be non-negative losses (for classification: 1 where the prediction is wrong); "
            f"got a minimum of {float(e.min()):.4g}."
        )
    return to_f64(u), e


def _tie_groups(u: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort by uncertainty; return the distinct values, their counts and their summed losses."""
    order = torch.argsort(u, stable=True)
    u_sorted, e_sorted = u[order], e[order]
    values, inverse, counts = torch.unique_consecutive(u_sorted, return_inverse=True, return_counts=True)
    sums = torch.zeros(values.shape[0], dtype=F64, device=u.device).index_add_(0, inverse, e_sorted)
    return values, counts.to(F64), sums


def _aurc_sorted(counts: torch.Tensor, sums: torch.Tensor) -> float:
    """AURC from tie groups in order of increasing uncertainty (ties averaged over orderings)."""
    n = counts.sum()
    ends = torch.cumsum(counts, 0)  # rank of each group's last sample (1-based)
    starts = ends - counts  # rank just before the group
    cum_before = torch.cumsum(sums, 0) - sums
    group = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts.long())
    k = torch.arange(1, int(n) + 1, dtype=F64, device=counts.device)
    # expected cumulative loss at rank k inside a tie group: linear between the group's ends
    cum = cum_before[group] + (k - starts[group]) / counts[group] * sums[group]
    return float((cum / k).sum() / n)


def risk_coverage_curve(uncertainty: ArrayLike, errors: ArrayLike) -> RiskCoverageCurve:
    r"""The risk–coverage curve of selective prediction (Geifman & El-Yaniv 2017).

    For every distinct uncertainty value :math:`t` (increasing), keeping the samples with
    :math:`u_i \le t` gives the point

    .. math::

        \mathrm{coverage}(t) = \frac{|\{i: u_i \le t\}|}{n}, \qquad
        \mathrm{risk}(t) = \frac{\sum_{i: u_i \le t} e_i}{|\{i: u_i \le t\}|}.

    Only achievable points are returned: tied samples enter together. The last point has coverage 1
    and the overall mean loss as risk.

    Args:
        uncertainty: Per-sample uncertainty, ``(n,)``; higher means less confident.
        errors: Per-sample non-negative loss, ``(n,)``; for classification ``predictions != labels``.

    Returns:
        A :class:`RiskCoverageCurve` of numpy arrays ``(coverage, risk, threshold)``.

    Raises:
        InvalidInputError: Shapes that are not ``(n,)`` or differ, empty input, negative losses.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import risk_coverage_curve
        >>> curve = risk_coverage_curve([0.1, 0.4, 0.4, 0.9], [0, 0, 1, 1])
        >>> curve.coverage.tolist(), curve.risk.tolist()
        ([0.25, 0.75, 1.0], [0.0, 0.3333333333333333, 0.5])
    """
    u, e = _pair(uncertainty, errors)
    values, counts, sums = _tie_groups(u, e)
    kept = torch.cumsum(counts, 0)
    return RiskCoverageCurve(
        coverage=(kept / kept[-1]).cpu().numpy(),
        risk=(torch.cumsum(sums, 0) / kept).cpu().numpy(),
        threshold=values.cpu().numpy(),
    )


def aurc(uncertainty: ArrayLike, errors: ArrayLike) -> float:
    r"""Area under the risk–coverage curve (AURC, Geifman et al. 2019); lower is better.

    The mean of the selective risk over the ``n`` coverages :math:`k/n`, with samples ordered by
    increasing uncertainty:

    .. math::

        \mathrm{AURC} = \frac{1}{n} \sum_{k=1}^{n} \frac{1}{k} \sum_{j=1}^{k} e_{(j)}.

    Ties in ``uncertainty`` are averaged over their orderings: inside a tie group of ``c`` samples
    with total loss ``S`` starting after rank ``a``, the cumulative loss at rank ``k`` is taken as
    :math:`\sum_{j \le a} e_{(j)} + \frac{k - a}{c} S` (its expectation under a random order). With no
    ties this is exactly the sum above. (Some libraries instead integrate the curve of
    :func:`risk_coverage_curve` with the trapezoidal rule; that gives a slightly different number.)

    Args:
        uncertainty: Per-sample uncertainty, ``(n,)``; higher means less confident.
        errors: Per-sample non-negative loss, ``(n,)``; for classification ``predictions != labels``.

    Returns:
        The AURC, a non-negative float (in ``[0, 1]`` for 0-1 losses).

    Raises:
        InvalidInputError: Shapes that are not ``(n,)`` or differ, empty input, negative losses.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import aurc
        >>> round(aurc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]), 4)  # (0 + 0 + 1/3 + 2/4) / 4
        0.2083
    """
    u, e = _pair(uncertainty, errors)
    _, counts, sums = _tie_groups(u, e)
    return _aurc_sorted(counts, sums)


def e_aurc(uncertainty: ArrayLike, errors: ArrayLike) -> float:
    r"""Excess AURC (Geifman et al. 2019): AURC minus that of the best possible ranking.

    .. math::

        \text{E-AURC} = \mathrm{AURC}(u, e) - \mathrm{AURC}^{*}(e),

    where :math:`\mathrm{AURC}^{*}` is the AURC of an oracle that ranks samples by their own loss
    (smallest first), computed exactly with the same finite-sample formula as :func:`aurc`. (The paper
    also gives the continuous approximation :math:`\hat r + (1 - \hat r)\ln(1 - \hat r)` for 0-1 losses
    with error rate :math:`\hat r`; the exact value is used here, so E-AURC is 0 for a perfect ranking.)

    Args:
        uncertainty: Per-sample uncertainty, ``(n,)``; higher means less confident.
        errors: Per-sample non-negative loss, ``(n,)``; for classification ``predictions != labels``.

    Returns:
        The excess AURC, a non-negative float.

    Raises:
        InvalidInputError: Shapes that are not ``(n,)`` or differ, empty input, negative losses.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import e_aurc
        >>> e_aurc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])  # perfect ranking
        0.0
        >>> round(e_aurc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]), 4)  # worst ranking: 0.7917 - 0.2083
        0.5833
    """
    u, e = _pair(uncertainty, errors)
    _, counts, sums = _tie_groups(u, e)
    _, oracle_counts, oracle_sums = _tie_groups(e, e)
    return max(_aurc_sorted(counts, sums) - _aurc_sorted(oracle_counts, oracle_sums), 0.0)


def misclassification_auroc(uncertainty: ArrayLike, errors: ArrayLike) -> float:
    r"""AUROC of detecting misclassified samples by their uncertainty (failure detection).

    Misclassified samples (``errors == 1``) are the positives and ``uncertainty`` is the score:

    .. math::

        \mathrm{AUROC} = P(u_{\text{wrong}} > u_{\text{right}}) + \tfrac{1}{2} P(u_{\text{wrong}} = u_{\text{right}}),

    computed exactly from midranks. It equals
    ``sklearn.metrics.roc_auc_score(errors, uncertainty)``; 0.5 is chance, 1 a perfect detector.

    Args:
        uncertainty: Per-sample uncertainty, ``(n,)``; higher means less confident.
        errors: Binary, ``(n,)``: True/1 where the prediction is wrong, e.g. ``predictions != labels``.

    Returns:
        The AUROC, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Non-binary ``errors``, mismatched shapes, empty input, or only one kind of
            sample (all right or all wrong), for which the AUROC is undefined.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import misclassification_auroc
        >>> misclassification_auroc([0.1, 0.3, 0.2, 0.9], [False, True, False, True])
        1.0
        >>> misclassification_auroc([0.1, 0.3, 0.3, 0.9], [False, True, False, True])
        0.875
    """
    u = vector(uncertainty, "uncertainty")
    wrong = binary_vector(errors, "errors")
    if u.shape != wrong.shape:
        raise InvalidInputError(
            f"uncertainty and errors must have the same length (one value per sample); got "
            f"{u.shape[0]} and {wrong.shape[0]}."
        )
    u = to_f64(u)
    wrong = wrong.to(u.device)
    n_wrong = int(wrong.sum())
    if n_wrong == 0 or n_wrong == wrong.shape[0]:
        kind = "correct" if n_wrong == 0 else "wrong"
        raise InvalidInputError(
            f"misclassification AUROC needs both correct and wrong predictions; all {wrong.shape[0]} are "
            f"{kind}, so the AUROC is undefined. Evaluate on more data, or report aurc instead."
        )
    return _auroc(u[wrong], u[~wrong])
