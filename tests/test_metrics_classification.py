"""Brier score, NLL and accuracy: cross-checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcdrop.errors import InvalidInputError
from mcdrop.metrics import accuracy, brier_score, negative_log_likelihood

sk_metrics = pytest.importorskip("sklearn.metrics")


def _data(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    labels = rng.integers(0, k, size=n)
    labels[:k] = np.arange(k)  # every class present, as scikit-learn infers classes from labels
    return probs, labels


@pytest.mark.parametrize("k", [2, 3, 10])
def test_brier_matches_sklearn_unscaled(k: int) -> None:
    probs, labels = _data(1000, k, seed=k)
    expected = sk_metrics.brier_score_loss(labels, probs, scale_by_half=False, labels=list(range(k)))
    assert brier_score(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert brier_score(torch.from_numpy(probs), torch.from_numpy(labels)) == pytest.approx(
        expected, abs=1e-12
    )


def test_binary_brier_is_twice_sklearn_default_and_form_invariant() -> None:
    probs, labels = _data(1000, 2, seed=1)
    default = sk_metrics.brier_score_loss(labels, probs[:, 1])  # positive class only: mean (p - y)^2
    assert brier_score(probs[:, 1], labels) == pytest.approx(2 * default, abs=1e-12)
    assert brier_score(probs, labels) == pytest.approx(brier_score(probs[:, 1], labels), abs=1e-12)


def test_brier_by_hand_and_range() -> None:
    assert brier_score([[0.8, 0.2], [0.4, 0.6]], [0, 0]) == pytest.approx((0.08 + 0.72) / 2)
    assert brier_score([[1.0, 0.0, 0.0]], [0]) == 0.0
    assert brier_score([[0.0, 1.0, 0.0]], [0]) == pytest.approx(2.0)


@pytest.mark.parametrize("k", [2, 3, 10])
def test_nll_matches_sklearn_log_loss(k: int) -> None:
    probs, labels = _data(1000, k, seed=10 + k)
    probs = np.clip(probs, 1e-6, None)
    probs /= probs.sum(1, keepdims=True)
    expected = sk_metrics.log_loss(labels, probs, labels=list(range(k)))
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected, abs=1e-10)
    if k == 2:
        assert negative_log_likelihood(probs[:, 1], labels) == pytest.approx(expected, abs=1e-10)


def test_nll_clamp_matches_sklearn_clip_for_zero_probabilities() -> None:
    probs = np.array([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    labels = np.array([1, 1, 1])
    expected = sk_metrics.log_loss(labels, probs, labels=[0, 1])
    got = negative_log_likelihood(probs, labels)
    assert got == pytest.approx(expected, abs=1e-12)
    eps = np.finfo(np.float64).eps
    assert got == pytest.approx((-math.log(eps) - math.log(0.7)) / 3, abs=1e-12)


def test_nll_eps_argument_and_float32_default() -> None:
    assert negative_log_likelihood([[1.0, 0.0]], [1], eps=1e-3) == pytest.approx(-math.log(1e-3))
    p32 = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    assert negative_log_likelihood(p32, [1]) == pytest.approx(-math.log(np.finfo(np.float32).eps))
    with pytest.raises(InvalidInputError, match="eps"):
        negative_log_likelihood([[0.5, 0.5]], [1], eps=0.0)


@pytest.mark.parametrize("k", [2, 3, 10])
def test_accuracy_matches_sklearn(k: int) -> None:
    probs, labels = _data(1000, k, seed=20 + k)
    expected = sk_metrics.accuracy_score(labels, probs.argmax(1))
    assert accuracy(probs, labels) == pytest.approx(expected, abs=1e-15)


def test_binary_accuracy_threshold_and_ties() -> None:
    # p > 0.5 predicts class 1; exactly 0.5 predicts class 0, as argmax of [0.5, 0.5]
    assert accuracy([0.2, 0.5, 0.51], [0, 0, 1]) == 1.0
    assert accuracy([[0.8, 0.2], [0.5, 0.5], [0.49, 0.51]], [0, 0, 1]) == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_brier_of_half_precision_probabilities_is_computed_in_float64(dtype) -> None:
    probs = torch.tensor([[0.625, 0.25, 0.125]], dtype=dtype)  # exact in either dtype
    assert brier_score(probs, [0]) == 0.21875  # 0.390625 + 0.0625 + 0.015625 - 1.25 + 1
    g = torch.Generator().manual_seed(0)
    many = torch.softmax(3 * torch.randn(200, 7, generator=g), -1).to(dtype)
    labels = torch.randint(0, 7, (200,), generator=g)
    by_hand = ((many.double() - torch.eye(7, dtype=torch.float64)[labels]) ** 2).sum(1).mean()
    assert brier_score(many, labels) == pytest.approx(float(by_hand), abs=1e-12)
    binary = (many[:, 0] / (many[:, 0] + many[:, 1])).to(dtype)
    by_hand = (2 * (binary.double() - labels % 2) ** 2).mean()
    assert brier_score(binary, labels % 2) == pytest.approx(float(by_hand), abs=1e-12)


def test_results_are_python_floats() -> None:
    probs, labels = _data(50, 3, seed=0)
    for fn in (brier_score, negative_log_likelihood, accuracy):
        assert type(fn(probs, labels)) is float
        assert type(fn(torch.from_numpy(probs).float(), torch.from_numpy(labels))) is float
