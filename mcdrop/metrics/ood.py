r"""Out-of-distribution (OOD) detection from per-sample scores of in- and out-of-distribution data.

Every function takes ``scores_in`` (in-distribution test data, shape ``(n_in,)``) and ``scores_out``
(OOD data, shape ``(n_out,)``) of the same uncertainty score, where **higher means more OOD-like**
(predictive entropy, mutual information, ``1 - max_k p_k``, an energy score...; pass ``-confidence``
for a confidence score).

The literature disagrees on which side is the "positive" class. AUROC is the same either way. For
AUPR and FPR@TPR, ``positive="in"`` (the default) follows ODIN (Liang et al. 2018), the energy score
paper (Liu et al. 2020) and OpenOOD: in-distribution samples are the positives, so "FPR at 95% TPR" is
the fraction of OOD samples still accepted when 95% of in-distribution samples are accepted.
``positive="out"`` follows Outlier Exposure (Hendrycks et al. 2019): OOD samples are the positives,
so it is the fraction of in-distribution samples flagged when 95% of OOD samples are flagged.
"""

from __future__ import annotations

from typing import Literal

import torch

from mcdrop._checks import check_choice, check_real
from mcdrop.metrics._ranking import auroc as _auroc
from mcdrop.metrics._ranking import average_precision as _average_precision
from mcdrop.metrics._ranking import fpr_at_tpr as _fpr_at_tpr
from mcdrop.metrics.inputs import ArrayLike, to_f64, vector

__all__ = ["fpr_at_tpr", "ood_auroc", "ood_aupr"]

Positive = Literal["in", "out"]


def _scores(scores_in: ArrayLike, scores_out: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    s_in = to_f64(vector(scores_in, "scores_in"))
    s_out = to_f64(vector(scores_out, "scores_out")).to(s_in.device)
    return s_in, s_out


def _oriented(s_in: torch.Tensor, s_out: torch.Tensor, positive: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives), scored so that higher means more likely positive."""
    if positive == "out":
        return s_out, s_in
    return -s_in, -s_out


def ood_auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    r"""AUROC of separating OOD from in-distribution samples by their score.

    .. math::

        \mathrm{AUROC} = P(s_{\text{out}} > s_{\text{in}}) + \tfrac{1}{2} P(s_{\text{out}} = s_{\text{in}})

    over independent pairs, computed exactly from midranks; it equals
    ``sklearn.metrics.roc_auc_score`` with OOD labelled 1, and (by symmetry) the AUROC with
    in-distribution labelled 1 and the negated score. 0.5 is chance, 1 perfect separation.

    Args:
        scores_in: Scores of in-distribution samples, ``(n_in,)``; higher means more OOD-like.
        scores_out: Scores of OOD samples, ``(n_out,)``.

    Returns:
        The AUROC, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Inputs that are not 1-D or are empty.
        NonFiniteError: NaN or infinity in the scores.

    Example:
        >>> from mcdrop.metrics import ood_auroc
        >>> ood_auroc([0.1, 0.2, 0.6], [0.5, 0.9])
        0.8333333333333334
    """
    s_in, s_out = _scores(scores_in, scores_out)
    return _auroc(s_out, s_in)


def ood_aupr(scores_in: ArrayLike, scores_out: ArrayLike, positive: Positive = "in") -> float:
    r"""Area under the precision–recall curve (average precision) of OOD detection.

    .. math::

        \mathrm{AP} = \sum_t (R_t - R_{t-1})\, P_t,

    with precision :math:`P_t` and recall :math:`R_t` at every distinct score threshold :math:`t`
    (highest first, :math:`R_0 = 0`): the step-wise, non-interpolated definition of
    ``sklearn.metrics.average_precision_score``, which it equals. Unlike AUROC, AUPR depends on which
    side is positive and on the ratio ``n_out / n_in`` (see the module docstring).

    Args:
        scores_in: Scores of in-distribution samples, ``(n_in,)``; higher means more OOD-like.
        scores_out: Scores of OOD samples, ``(n_out,)``.
        positive: ``"in"`` (default, "AUPR-In"): in-distribution samples are the positives and the
            lowest scores rank first. ``"out"`` ("AUPR-Out"): OOD samples are the positives and the
            highest scores rank first.

    Returns:
        The average precision, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Inputs that are not 1-D or are empty, or an unknown ``positive``.
        NonFiniteError: NaN or infinity in the scores.

    Example:
        >>> from mcdrop.metrics import ood_aupr
        >>> round(ood_aupr([0.1, 0.2, 0.6], [0.5, 0.9], positive="out"), 4)
        0.8333
        >>> round(ood_aupr([0.1, 0.2, 0.6], [0.5, 0.9], positive="in"), 4)
        0.9167
    """
    check_choice(positive, ("in", "out"), "positive")
    s_in, s_out = _scores(scores_in, scores_out)
    return _average_precision(*_oriented(s_in, s_out, positive))


def fpr_at_tpr(
    scores_in: ArrayLike, scores_out: ArrayLike, tpr: float = 0.95, positive: Positive = "in"
) -> float:
    r"""False-positive rate at the threshold where the true-positive rate first reaches ``tpr``.

    With positives scored :math:`q_1 \ge q_2 \ge \dots \ge q_{n_+}` (higher means more likely
    positive) and :math:`k` the smallest integer with :math:`k / n_+ \ge \mathrm{tpr}`, the threshold is
    :math:`t = q_k`, the largest one that keeps at least a fraction ``tpr`` of the positives, and

    .. math::

        \mathrm{FPR@TPR} = \frac{|\{\text{negatives scored} \ge t\}|}{n_-}.

    This is the first ROC point with TPR >= ``tpr`` (as computed from ``sklearn.metrics.roc_curve``).
    With the default ``positive="in"`` it is the usual "FPR95" of ODIN and OpenOOD: the fraction of OOD
    samples whose score is at most the in-distribution 95th percentile, i.e. still accepted.

    Args:
        scores_in: Scores of in-distribution samples, ``(n_in,)``; higher means more OOD-like.
        scores_out: Scores of OOD samples, ``(n_out,)``.
        tpr: Target true-positive rate in ``(0, 1]`` (default 0.95).
        positive: ``"in"`` (default): in-distribution samples are the positives, kept when their
            score is low. ``"out"``: OOD samples are the positives, detected when their score is high.

    Returns:
        The false-positive rate, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Inputs that are not 1-D or are empty, ``tpr`` outside ``(0, 1]``, or an
            unknown ``positive``.
        NonFiniteError: NaN or infinity in the scores.

    Example:
        >>> from mcdrop.metrics import fpr_at_tpr
        >>> scores_in = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        >>> scores_out = [0.85, 0.95, 2.0, 3.0]
        >>> fpr_at_tpr(scores_in, scores_out, tpr=0.9)  # 90% of in-dist. kept at score <= 0.9
        0.25
        >>> fpr_at_tpr(scores_in, scores_out, tpr=0.75, positive="out")  # flag score >= 0.95
        0.1
    """
    tpr = check_real(tpr, "tpr", low=0.0, high=1.0, low_open=True)
    check_choice(positive, ("in", "out"), "positive")
    s_in, s_out = _scores(scores_in, scores_out)
    return _fpr_at_tpr(*_oriented(s_in, s_out, positive), tpr)
