r"""Proper scoring rules and accuracy for classifiers: Brier score, negative log-likelihood, accuracy.

Inputs are predicted probabilities ``probs`` of shape ``(n, K)`` (rows summing to one) or, for a
binary problem, ``(n,)`` positive-class probabilities, and integer ``labels`` of shape ``(n,)``. A
binary problem gives the same value whichever of the two forms it is passed in.
"""

from __future__ import annotations

import torch

from mcdrop._checks import check_real
from mcdrop.metrics.inputs import ArrayLike, parse_classification, to_f64

__all__ = ["accuracy", "brier_score", "negative_log_likelihood"]


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""Brier score: squared error summed over classes, averaged over samples (lower is better).

    .. math::

        \mathrm{BS} = \frac{1}{n} \sum_{i=1}^{n} \sum_{k=1}^{K} (p_{ik} - [y_i = k])^2 \in [0, 2]

    This is Brier's (1950) original multiclass definition. For a binary problem it is
    :math:`\frac{2}{n}\sum_i (p_{i1} - y_i)^2`, twice the positive-class-only score that
    ``sklearn.metrics.brier_score_loss`` returns by default for binary inputs; it equals
    ``brier_score_loss(..., scale_by_half=False)`` for any number of classes.

    Args:
        probs: Predicted probabilities, ``(n, K)`` or binary ``(n,)``; tensor or numpy array.
        labels: Integer class labels, ``(n,)``.

    Returns:
        The Brier score, a float in ``[0, 2]``.

    Raises:
        InvalidInputError: Probabilities not in ``[0, 1]`` or rows not summing to 1 (with a hint when
            they look like logits), labels out of range, mismatched shapes or empty input.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import brier_score
        >>> round(brier_score([[0.8, 0.2], [0.4, 0.6]], [0, 0]), 4)
        0.4
        >>> round(brier_score([0.2, 0.6], [0, 0]), 4)  # same problem as (n,) positive-class probs
        0.4
    """
    data = parse_classification(probs, labels)
    y = data.labels
    if data.positive is not None:
        p = to_f64(data.positive)
        per_sample = 2 * (p - to_f64(y)) ** 2
    else:
        assert data.probs is not None
        # sum_k (p_k - [y = k])^2 = sum_k p_k^2 - 2 p_y + 1, without building a one-hot matrix
        per_sample = data.sum_of_squares() - 2 * to_f64(data.true_class_prob()) + 1
    return float(per_sample.mean())


def negative_log_likelihood(probs: ArrayLike, labels: ArrayLike, eps: float | None = None) -> float:
    r"""Negative log-likelihood (cross-entropy, natural log) of the true labels (lower is better).

    .. math::

        \mathrm{NLL} = -\frac{1}{n} \sum_{i=1}^{n} \ln \max(p_{i y_i}, \varepsilon)

    The clamp keeps a zero probability for the true class finite: by default :math:`\varepsilon` is the
    machine epsilon of ``probs``' dtype (float64: 2.2e-16, so at most 36.04 nats per sample; float32:
    1.2e-7, at most 15.9 nats), which is the clip ``sklearn.metrics.log_loss`` applies. (scikit-learn
    also clips from above at :math:`1 - \varepsilon`; the difference is below :math:`\varepsilon`.)

    Args:
        probs: Predicted probabilities, ``(n, K)`` or binary ``(n,)``; tensor or numpy array.
        labels: Integer class labels, ``(n,)``.
        eps: Lower clamp for the true-class probability, in ``(0, 1)``; ``None`` (default) uses the
            machine epsilon of the input dtype.

    Returns:
        The mean negative log-likelihood in nats, a non-negative float.

    Raises:
        InvalidInputError: Invalid probabilities, labels, shapes, empty input or an ``eps`` outside
            ``(0, 1)``.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import math
        >>> from mcdrop.metrics import negative_log_likelihood
        >>> nll = negative_log_likelihood([[0.8, 0.2], [0.4, 0.6]], [0, 1])
        >>> math.isclose(nll, -(math.log(0.8) + math.log(0.6)) / 2)
        True
        >>> round(negative_log_likelihood([[1.0, 0.0]], [1]), 2)  # clamped at float64 epsilon
        36.04
    """
    data = parse_classification(probs, labels)
    dtype = (data.probs if data.probs is not None else data.positive).dtype  # type: ignore[union-attr]
    if eps is None:
        eps = torch.finfo(dtype).eps
    else:
        eps = check_real(eps, "eps", low=0.0, high=1.0, low_open=True, high_open=True)
    p_true = to_f64(data.true_class_prob()).clamp(min=eps)
    return float(-torch.log(p_true).mean()) + 0.0  # + 0.0: a certain, right prediction gives 0.0, not -0.0


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    r"""Top-1 accuracy: the fraction of samples whose most probable class is the label.

    .. math::

        \mathrm{acc} = \frac{1}{n} \sum_{i=1}^{n} [\arg\max_k p_{ik} = y_i]

    Ties go to the lowest class index (as ``argmax``); for ``(n,)`` binary probabilities class 1 is
    predicted when ``p > 0.5``.

    Args:
        probs: Predicted probabilities, ``(n, K)`` or binary ``(n,)``; tensor or numpy array.
        labels: Integer class labels, ``(n,)``.

    Returns:
        The accuracy, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Invalid probabilities, labels, shapes or empty input.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import torch
        >>> from mcdrop.metrics import accuracy
        >>> accuracy(torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]]), torch.tensor([0, 0, 0]))
        0.6666666666666666
    """
    data = parse_classification(probs, labels)
    return float((data.predictions() == data.labels).double().mean())
