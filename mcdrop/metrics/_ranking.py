"""Private exact ranking statistics (AUROC, average precision, FPR at a TPR) on float64 tensors.

Scores are oriented so that **higher means more likely positive**. Ties are handled exactly: AUROC
counts a tie as one half (midranks), and the curve-based statistics only place thresholds between
distinct scores, as scikit-learn does.
"""

from __future__ import annotations

import math

import torch

from mcdrop.metrics.inputs import F64


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(positive score > negative score) + P(tie) / 2, exactly, from midranks (Mann–Whitney U)."""
    n_pos, n_neg = positive.shape[0], negative.shape[0]
    scores = torch.cat([positive, negative])
    sorted_scores, order = torch.sort(scores, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(F64)
    midranks = ends - (counts.to(F64) - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = midranks[inverse]
    rank_sum = ranks[:n_pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Step-wise average precision, sum_t (R_t - R_{t-1}) P_t over distinct thresholds (as sklearn)."""
    n_pos = positive.shape[0]
    scores = torch.cat([positive, negative])
    is_pos = torch.cat([torch.ones_like(positive), torch.zeros_like(negative)])
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    hits = is_pos[order]
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    last = torch.cumsum(counts, 0) - 1  # last index of every group of tied scores
    true_pos = torch.cumsum(hits, 0)[last]
    precision = true_pos / (last + 1).to(F64)
    recall = true_pos / n_pos
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_step * precision).sum())


def fpr_at_tpr(positive: torch.Tensor, negative: torch.Tensor, tpr: float) -> float:
    """Fraction of negatives scored >= the largest threshold whose TPR (positives >= it) is >= tpr."""
    n_pos = positive.shape[0]
    # the smallest k with k / n_pos >= tpr, evaluated in floating point as a ROC curve would
    k = max(1, min(n_pos, math.ceil(tpr * n_pos)))
    while k > 1 and (k - 1) / n_pos >= tpr:
        k -= 1
    while k < n_pos and k / n_pos < tpr:
        k += 1
    threshold = torch.sort(positive, descending=True).values[k - 1]
    return float((negative >= threshold).to(F64).mean())
