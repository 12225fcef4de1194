r"""Binned calibration errors of classifiers: ECE, RMS calibration error, MCE, classwise ECE.

All functions take predicted probabilities ``probs`` of shape ``(n, K)`` (rows summing to one) or, for
a binary problem, ``(n,)`` positive-class probabilities, and integer ``labels`` of shape ``(n,)``.

Binning (the part on which libraries disagree) is fixed as follows.

* ``binning="uniform"`` (default, Guo et al. 2017): ``M`` equal-width bins closed on the right,
  :math:`B_1 = [0, 1/M]` and :math:`B_m = ((m-1)/M, m/M]` for :math:`m = 2..M`. A confidence of exactly
  1.0 is in the last bin, and a confidence equal to :math:`k/M` (the number nearest to it in the
  input's floating-point dtype) is in bin :math:`k`, the one it closes. torchmetrics instead uses bins
  closed on the left, ``[(m-1)/M, m/M)``, so an exact :math:`k/M` moves one bin up and a confidence of
  1.0 lands in a phantom bin ``M+1`` of its own; away from those edges both agree to float precision.
* ``binning="quantile"`` (equal-mass, "adaptive" binning, Nixon et al. 2019): with the confidences
  sorted, :math:`s_{(1)} \le \dots \le s_{(n)}`, the inner edges are :math:`e_m = s_{(\lceil mn/M \rceil)}`
  for :math:`m = 1..M-1` and the bins are :math:`(e_{m}, e_{m+1}]` as above. Without ties every bin
  holds :math:`\lfloor n/M \rfloor` or :math:`\lceil n/M \rceil` samples; tied confidences always share a
  bin, so the result does not depend on the order of the samples.

With :math:`c_i` the confidence and :math:`a_i \in \{0, 1\}` the outcome of sample :math:`i`, and for a
non-empty bin :math:`\mathrm{conf}(B_m)` and :math:`\mathrm{acc}(B_m)` the means of :math:`c_i` and
:math:`a_i` over the bin, the calibration errors are (empty bins contribute nothing):

.. math::

    \mathrm{ECE} = \sum_m \frac{|B_m|}{n} |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)|, \quad
    \mathrm{RMSCE} = \sqrt{\sum_m \frac{|B_m|}{n} (\mathrm{acc}(B_m) - \mathrm{conf}(B_m))^2}, \quad
    \mathrm{MCE} = \max_{m: |B_m| > 0} |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)|.

``target="top_label"`` (default) uses :math:`c_i = \max_k p_{ik}` and :math:`a_i = [\arg\max_k p_{ik} = y_i]`
(ties to the lowest class index). ``target="positive_class"`` (binary problems only) uses
:math:`c_i = p_{i1}` and :math:`a_i = [y_i = 1]`: the binary reliability diagram, and what
``torchmetrics.functional.classification.binary_calibration_error`` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from mcdrop._checks import check_choice, check_int
from mcdrop.errors import InvalidInputError
from mcdrop.metrics._binning import binned_sums, calibration_error, table_columns
from mcdrop.metrics.inputs import ArrayLike, Classification, parse_classification

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = [
    "ReliabilityTable",
    "classwise_calibration_error",
    "expected_calibration_error",
    "reliability_table",
]

Norm = Literal["l1", "l2", "max"]
Binning = Literal["uniform", "quantile"]
Target = Literal["top_label", "positive_class"]

_NORMS = ("l1", "l2", "max")
_BINNINGS = ("uniform", "quantile")
_TARGETS = ("top_label", "positive_class")


def _select(data: Classification, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    if target == "top_label":
        return data.top_label()
    if not data.is_binary:
        raise InvalidInputError(
            f"target='positive_class' needs a binary problem (probs of shape (n,) or (n, 2)); got "
            f"{data.n_classes} classes. Use target='top_label', or classwise_calibration_error for the "
            "calibration of every class."
        )
    return data.positive_class()


def _check_options(n_bins: int, norm: str | None, binning: str, target: str | None) -> int:
    n_bins = check_int(n_bins, "n_bins", minimum=1)
    if norm is not None:
        check_choice(norm, _NORMS, "norm")
    check_choice(binning, _BINNINGS, "binning")
    if target is not None:
        check_choice(target, _TARGETS, "target")
    return n_bins


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def expected_calibration_error(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    norm: Norm = "l1",
    binning: Binning = "uniform",
    target: Target = "top_label",
) -> float:
    r"""Expected calibration error (ECE), its root-mean-square variant, or the maximum (MCE).

    .. math::

        \mathrm{ECE} = \sum_{m=1}^{M} \frac{|B_m|}{n}\, |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)|

    The defaults are those of Guo et al. (2017): top-label confidence, ``M = 15`` equal-width bins
    closed on the right, ``((m-1)/M, m/M]`` (a confidence of 1.0 is in the last bin), weights
    ``|B_m|/n``, and empty bins contribute nothing. See the module docstring for the exact bin edges
    and where torchmetrics differs.

    Args:
        probs: Predicted probabilities, ``(n, K)`` with rows summing to 1, or ``(n,)`` positive-class
            probabilities of a binary problem. Tensor (any device) or numpy array.
        labels: Integer class labels, ``(n,)``, in ``[0, K)``.
        n_bins: Number of bins ``M`` (default 15).
        norm: ``"l1"`` (default) the ECE; ``"l2"`` the root of the weighted mean squared gap,
            :math:`\sqrt{\sum_m \frac{|B_m|}{n} (\mathrm{acc} - \mathrm{conf})^2}`; ``"max"`` the maximum
            calibration error (MCE) over non-empty bins.
        binning: ``"uniform"`` (default) equal-width bins or ``"quantile"`` equal-mass (adaptive) bins.
        target: ``"top_label"`` (default): confidence of the predicted class and whether it is right.
            ``"positive_class"`` (binary problems only): probability of class 1 and whether the label
            is 1.

    Returns:
        The calibration error, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Probabilities not in ``[0, 1]`` or rows not summing to 1 (with a hint when
            they look like logits), labels out of range, shapes that do not match, empty input, or an
            unknown option.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import torch
        >>> from mcdrop.metrics import expected_calibration_error
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> labels = torch.tensor([0, 1, 1, 0])
        >>> # confidences 0.9, 0.8, 0.7, 0.6; the exact edges 0.6 and 0.8 close bins 3 and 4
        >>> round(expected_calibration_error(probs, labels, n_bins=5), 4)
        0.25
        >>> round(expected_calibration_error(probs, labels, n_bins=5, norm="max"), 4)
        0.4
    """
    n_bins = _check_options(n_bins, norm, binning, target)
    data = parse_classification(probs, labels)
    conf, hit = _select(data, target)
    return calibration_error(binned_sums(conf, hit, n_bins, binning), norm)


def classwise_calibration_error(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    norm: Norm = "l1",
    binning: Binning = "uniform",
    reduction: Literal["mean", "none"] = "mean",
) -> float | np.ndarray:
    r"""Classwise calibration error (Kull et al. 2019), a.k.a. static calibration error (SCE).

    Every class ``k`` is treated as its own binary problem, with confidence :math:`p_{ik}` and outcome
    :math:`[y_i = k]` for *all* samples, binned exactly as in :func:`expected_calibration_error`:

    .. math::

        \mathrm{CE}_k = \sum_m \frac{|B_{mk}|}{n} |\mathrm{freq}(B_{mk}) - \mathrm{conf}(B_{mk})|,
        \qquad \text{classwise-ECE} = \frac{1}{K}\sum_{k=1}^{K} \mathrm{CE}_k

    (``norm="l2"`` and ``"max"`` change :math:`\mathrm{CE}_k` as in :func:`expected_calibration_error`).
    Every class counts, including classes that never occur in ``labels``.

    Args:
        probs: Predicted probabilities, ``(n, K)`` or binary ``(n,)`` (then ``K = 2``).
        labels: Integer class labels, ``(n,)``.
        n_bins: Number of bins per class (default 15).
        norm: ``"l1"`` (default), ``"l2"`` or ``"max"``, per class.
        binning: ``"uniform"`` (default) or ``"quantile"``; quantile edges are computed per class.
        reduction: ``"mean"`` (default) averages over classes and returns a float; ``"none"`` returns
            the ``(K,)`` numpy array of per-class errors.

    Returns:
        The mean classwise error (float in ``[0, 1]``) or the per-class errors.

    Raises:
        InvalidInputError: Invalid probabilities, labels, shapes or options (see
            :func:`expected_calibration_error`).
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import numpy as np
        >>> from mcdrop.metrics import classwise_calibration_error
        >>> probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
        >>> labels = np.array([0, 1, 1])
        >>> round(classwise_calibration_error(probs, labels, n_bins=5), 4)
        0.2444
        >>> classwise_calibration_error(probs, labels, n_bins=5, reduction="none").round(4)
        array([0.2   , 0.2667, 0.2667])
    """
    n_bins = _check_options(n_bins, norm, binning, None)
    check_choice(reduction, ("mean", "none"), "reduction")
    data = parse_classification(probs, labels)
    errors = np.empty(data.n_classes, dtype=np.float64)
    for k in range(data.n_classes):
        conf = data.column(k).clamp(0.0, 1.0)
        errors[k] = calibration_error(binned_sums(conf, data.labels == k, n_bins, binning), norm)
    if reduction == "none":
        return errors
    return float(errors.mean())


@dataclass(frozen=True)
class ReliabilityTable:
    """Per-bin statistics of a reliability diagram, one entry per bin (empty bins included).

    Attributes:
        lower: Lower bin edges (the first bin also contains its lower edge).
        upper: Upper bin edges (bins are closed on the right).
        count: Number of samples in each bin (int64).
        confidence: Mean confidence in each bin (NaN for an empty bin).
        accuracy: Fraction of hits in each bin: top-label accuracy, or the frequency of class 1 for
            ``target="positive_class"`` (NaN for an empty bin).
        gap: ``confidence - accuracy``: positive where the model is over-confident (NaN if empty).

    Example:
        >>> from mcdrop.metrics import reliability_table
        >>> table = reliability_table([0.9, 0.8, 0.35, 0.6], [1, 0, 0, 1], n_bins=2,
        ...                           target="positive_class")
        >>> table.count.tolist(), table.accuracy.tolist()
        ([1, 3], [0.0, 0.6666666666666666])
        >>> round(table.ece, 4)  # (1 * 0.35 + 3 * |0.7667 - 0.6667|) / 4
        0.1625
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    gap: np.ndarray

    @property
    def n(self) -> int:
        """Total number of samples."""
        return int(self.count.sum())

    @property
    def weight(self) -> np.ndarray:
        """Fraction of the samples in each bin, ``count / n``."""
        return self.count / self.n

    @property
    def ece(self) -> float:
        """The ECE (``norm="l1"``) of this table: ``sum(weight * |gap|)`` over non-empty bins."""
        nonempty = self.count > 0
        return float(np.sum(self.weight[nonempty] * np.abs(self.gap[nonempty])))

    def __len__(self) -> int:
        """Number of bins."""
        return int(self.count.shape[0])

    def to_frame(self) -> pandas.DataFrame:
        """The table as a pandas DataFrame, one row per bin (imports pandas on first use).

        Returns:
            A DataFrame with columns ``lower, upper, count, confidence, accuracy, gap``.

        Example:
            >>> from mcdrop.metrics import reliability_table
            >>> frame = reliability_table([0.9, 0.8, 0.35, 0.6], [1, 0, 0, 1], n_bins=2).to_frame()
            >>> list(frame.columns)
            ['lower', 'upper', 'count', 'confidence', 'accuracy', 'gap']
        """
        import pandas

        return pandas.DataFrame(
            {
                "lower": self.lower,
                "upper": self.upper,
                "count": self.count,
                "confidence": self.confidence,
                "accuracy": self.accuracy,
                "gap": self.gap,
            }
        )


def reliability_table(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    binning: Binning = "uniform",
    target: Target = "top_label",
) -> ReliabilityTable:
    """The data of a reliability diagram: per-bin count, mean confidence, accuracy and gap.

    The bins and the confidence/outcome pairs are exactly those of :func:`expected_calibration_error`
    with the same arguments, so ``reliability_table(...).ece == expected_calibration_error(...)`` (up to
    floating-point rounding).

    Args:
        probs: Predicted probabilities, ``(n, K)`` or binary ``(n,)``.
        labels: Integer class labels, ``(n,)``.
        n_bins: Number of bins (default 15).
        binning: ``"uniform"`` (default) or ``"quantile"``.
        target: ``"top_label"`` (default) or ``"positive_class"`` (binary problems only).

    Returns:
        A :class:`ReliabilityTable` of numpy arrays; ``.to_frame()`` gives a pandas DataFrame.

    Raises:
        InvalidInputError: Invalid probabilities, labels, shapes or options.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import torch
        >>> from mcdrop.metrics import reliability_table
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> table = reliability_table(probs, torch.tensor([0, 1, 1, 0]), n_bins=5)
        >>> table.count.tolist()
        [0, 0, 1, 2, 1]
        >>> table.gap[2:].round(4).tolist()  # confidence - accuracy; > 0 is over-confident
        [-0.4, 0.25, -0.1]
    """
    n_bins = _check_options(n_bins, None, binning, target)
    data = parse_classification(probs, labels)
    conf, hit = _select(data, target)
    return ReliabilityTable(**table_columns(binned_sums(conf, hit, n_bins, binning)))
