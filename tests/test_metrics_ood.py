"""OOD detection metrics: cross-checked against scikit-learn, both positive-class conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcdrop.errors import InvalidInputError
from mcdrop.metrics import fpr_at_tpr, ood_aupr, ood_auroc

sk_metrics = pytest.importorskip("sklearn.metrics")


def _scores(seed: int, rounded: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s_in = rng.normal(0.0, 1.0, size=700)
    s_out = rng.normal(1.2, 1.3, size=300)
    if rounded:  # many ties, within and across the two sets
        s_in, s_out = np.round(s_in, 1), np.round(s_out, 1)
    return s_in, s_out


def _labelled(s_in: np.ndarray, s_out: np.ndarray, positive: str) -> tuple[np.ndarray, np.ndarray]:
    if positive == "out":
        return np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out]
    return np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], -np.r_[s_in, s_out]


def _sklearn_fpr_at_tpr(y: np.ndarray, score: np.ndarray, tpr: float) -> float:
    fpr, tprs, _ = sk_metrics.roc_curve(y, score, drop_intermediate=False)
    return float(fpr[np.argmax(tprs >= tpr)])


@pytest.mark.parametrize("rounded", [False, True])
def test_auroc_matches_sklearn_either_way_round(rounded: bool) -> None:
    s_in, s_out = _scores(0, rounded)
    for positive in ("in", "out"):
        y, score = _labelled(s_in, s_out, positive)
        assert ood_auroc(s_in, s_out) == pytest.approx(sk_metrics.roc_auc_score(y, score), abs=1e-12)
    assert ood_auroc(s_out, s_in) == pytest.approx(1 - ood_auroc(s_in, s_out), abs=1e-12)


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("positive", ["in", "out"])
def test_aupr_matches_sklearn_average_precision(rounded: bool, positive: str) -> None:
    s_in, s_out = _scores(1, rounded)
    y, score = _labelled(s_in, s_out, positive)
    expected = sk_metrics.average_precision_score(y, score)
    assert ood_aupr(s_in, s_out, positive=positive) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("positive", ["in", "out"])
@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_fpr_at_tpr_matches_the_first_roc_point_reaching_the_tpr(
    rounded: bool, positive: str, tpr: float
) -> None:
    s_in, s_out = _scores(2, rounded)
    y, score = _labelled(s_in, s_out, positive)
    expected = _sklearn_fpr_at_tpr(y, score, tpr)
    assert fpr_at_tpr(s_in, s_out, tpr=tpr, positive=positive) == pytest.approx(expected, abs=1e-12)


def test_fpr_at_tpr_by_hand() -> None:
    scores_in = np.arange(1, 11) / 10  # 0.1 .. 1.0
    scores_out = [0.85, 0.95, 2.0, 3.0]
    # keep 90% of in-distribution: threshold 0.9; OOD accepted (score <= 0.9): only 0.85
    assert fpr_at_tpr(scores_in, scores_out, tpr=0.9) == 0.25
    # flag 75% of OOD (3 of 4): threshold 0.95; in-distribution flagged (>= 0.95): 1.0
    assert fpr_at_tpr(scores_in, scores_out, tpr=0.75, positive="out") == pytest.approx(0.1)
    # the default is FPR at 95% TPR with in-distribution positive
    assert fpr_at_tpr(scores_in, scores_out) == fpr_at_tpr(scores_in, scores_out, tpr=0.95, positive="in")


def test_perfect_separation() -> None:
    s_in, s_out = [0.1, 0.2, 0.3], [0.7, 0.8]
    assert ood_auroc(s_in, s_out) == 1.0
    assert ood_aupr(s_in, s_out, positive="in") == 1.0
    assert ood_aupr(s_in, s_out, positive="out") == 1.0
    assert fpr_at_tpr(s_in, s_out) == 0.0


def test_tensor_inputs_and_float_results() -> None:
    s_in, s_out = _scores(3, False)
    a = ood_auroc(torch.from_numpy(s_in).float(), torch.from_numpy(s_out).float())
    assert type(a) is float
    assert a == pytest.approx(ood_auroc(s_in.astype(np.float32), s_out.astype(np.float32)), abs=1e-15)


def test_ood_input_errors() -> None:
    with pytest.raises(InvalidInputError, match="'in', 'out'"):
        ood_aupr([0.1], [0.2], positive="ood")
    with pytest.raises(InvalidInputError, match="tpr"):
        fpr_at_tpr([0.1], [0.2], tpr=0.0)
    with pytest.raises(InvalidInputError, match="empty"):
        ood_auroc([], [0.2])
    with pytest.raises(InvalidInputError, match="1-D"):
        ood_auroc([[0.1, 0.2]], [0.2])
