"""Risk–coverage curve, AURC, E-AURC and misclassification AUROC."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mcdrop.errors import InvalidInputError
from mcdrop.metrics import RiskCoverageCurve, aurc, e_aurc, misclassification_auroc, risk_coverage_curve


def _plain_aurc(order_errors: np.ndarray) -> float:
    """Geifman et al.: mean over k of the mean loss of the first k samples (already ordered)."""
    e = np.asarray(order_errors, dtype=float)
    return float(np.mean(np.cumsum(e) / np.arange(1, len(e) + 1)))


def test_aurc_by_hand() -> None:
    assert aurc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    assert aurc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx((1 + 1 + 2 / 3 + 2 / 4) / 4)
    assert aurc([0.5], [1]) == 1.0
    assert aurc([0.5], [0]) == 0.0


def test_aurc_without_ties_equals_the_plain_formula() -> None:
    rng = np.random.default_rng(0)
    u = rng.random(500)
    e = (rng.random(500) < u).astype(float)  # errors more likely where uncertain
    assert aurc(u, e) == pytest.approx(_plain_aurc(e[np.argsort(u)]), abs=1e-12)
    losses = rng.exponential(size=500)  # any non-negative loss
    assert aurc(u, losses) == pytest.approx(_plain_aurc(losses[np.argsort(u)]), abs=1e-12)


def test_aurc_ties_are_averaged_over_orderings() -> None:
    u = np.array([0.1, 0.5, 0.5, 0.5, 0.9, 0.9])
    e = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    tie_groups = [[0], [1, 2, 3], [4, 5]]
    values = [
        _plain_aurc(e[[i for group in choice for i in group]])
        for choice in itertools.product(*[list(itertools.permutations(g)) for g in tie_groups])
    ]
    assert aurc(u, e) == pytest.approx(np.mean(values), abs=1e-12)
    perm = np.random.default_rng(1).permutation(6)
    assert aurc(u[perm], e[perm]) == pytest.approx(aurc(u, e), abs=1e-15)


def test_e_aurc_is_zero_for_a_perfect_ranking_and_matches_the_oracle() -> None:
    rng = np.random.default_rng(2)
    e = (rng.random(300) < 0.3).astype(float)
    assert e_aurc(e + 0.01 * rng.random(300), e) == pytest.approx(0.0, abs=1e-12)
    u = rng.random(300)
    oracle = _plain_aurc(np.sort(e))
    assert e_aurc(u, e) == pytest.approx(aurc(u, e) - oracle, abs=1e-12)
    # the continuous approximation of the paper is close for large n
    r = e.mean()
    assert oracle == pytest.approx(r + (1 - r) * np.log(1 - r), abs=0.01)


def test_risk_coverage_curve_points() -> None:
    curve = risk_coverage_curve([0.1, 0.4, 0.4, 0.9], [0, 0, 1, 1])
    assert isinstance(curve, RiskCoverageCurve)
    np.testing.assert_allclose(curve.coverage, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(curve.risk, [0.0, 1 / 3, 0.5])
    np.testing.assert_allclose(curve.threshold, [0.1, 0.4, 0.9])


def test_risk_coverage_curve_ends_at_full_coverage_and_mean_risk() -> None:
    rng = np.random.default_rng(3)
    u, e = rng.random(200), rng.exponential(size=200)
    curve = risk_coverage_curve(torch.from_numpy(u), torch.from_numpy(e))
    assert curve.coverage[-1] == 1.0 and curve.risk[-1] == pytest.approx(e.mean())
    assert np.all(np.diff(curve.coverage) > 0)


def test_misclassification_auroc_matches_sklearn_with_ties() -> None:
    sk_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    u = np.round(rng.random(1000), 2)  # many ties
    wrong = rng.random(1000) < 0.2 + 0.6 * u
    expected = sk_metrics.roc_auc_score(wrong, u)
    assert misclassification_auroc(u, wrong) == pytest.approx(expected, abs=1e-12)
    assert misclassification_auroc(torch.from_numpy(u), torch.from_numpy(wrong.astype(np.int64))) == (
        pytest.approx(expected, abs=1e-12)
    )


def test_misclassification_auroc_by_hand() -> None:
    assert misclassification_auroc([0.1, 0.3, 0.2, 0.9], [False, True, False, True]) == 1.0
    assert misclassification_auroc([0.9, 0.1], [False, True]) == 0.0
    assert misclassification_auroc([0.5, 0.5], [False, True]) == 0.5


def test_misclassification_auroc_needs_both_outcomes() -> None:
    with pytest.raises(InvalidInputError, match="both correct and wrong"):
        misclassification_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(InvalidInputError, match="binary"):
        misclassification_auroc([0.1, 0.2], [0, 2])


def test_selective_input_errors() -> None:
    with pytest.raises(InvalidInputError, match="same length"):
        aurc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(InvalidInputError, match="non-negative"):
        aurc([0.1, 0.2], [0, -1])
    with pytest.raises(InvalidInputError, match="1-D"):
        aurc([[0.1, 0.2]], [[0, 1]])
    with pytest.raises(InvalidInputError, match="empty"):
        e_aurc([], [])
