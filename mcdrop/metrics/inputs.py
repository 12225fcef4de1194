"""Parsing metric inputs: the conversion and validation shared by every metric family and its consumers.

Every public metric funnels its inputs through this module (and so do the figures of
:mod:`mcdrop.report` and :mod:`mcdrop.recalibration`, which take the same inputs), so all of them accept the same things
(``torch.Tensor`` on any device, ``numpy.ndarray``, or plain Python sequences) and fail with the same
clear messages.

Copies are kept to what is needed: numpy arrays are wrapped without a copy (``torch.from_numpy``),
tensors are only detached, and the large ``(n, K)`` probability matrices are validated and reduced
in their own dtype on their own device; only the ``(n,)`` per-sample quantities derived from them are
cast to float64 for exact accumulation. MPS has no float64, so those reductions move to the CPU there.
Float16 and bfloat16 inputs are the exception: their own precision would round every sum over a row
(a Brier score of 0.2168 for 0.21875) and every ``1 - p``, so what is summed or complemented is
taken in float64 first (:func:`for_sums`); selections (a row's maximum, its true-class entry) stay
exact in any dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mcdrop.errors import InvalidInputError, InvalidTypeError, NonFiniteError

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any] | float | int
"""What every metric accepts: a tensor (any device), a numpy array, or a (nested) Python sequence."""

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------
def to_tensor(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` as a detached tensor, sharing memory with ``x`` whenever possible."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise InvalidTypeError(f"{name} must be real-valued; got a complex tensor of dtype {x.dtype}.")
        if x.is_meta:
            raise InvalidTypeError(
                f"{name} is on the 'meta' device, which holds shapes but no values; pass a tensor with data "
                "(on the CPU or a GPU)."
            )
        if x.layout != torch.strided or x.is_nested:
            raise InvalidTypeError(
                f"{name} must be a dense tensor; got layout {x.layout}{' (nested)' if x.is_nested else ''}. "
                "Convert it first, e.g. x.to_dense()."
            )
        return x.detach()
    if isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (list, tuple, int, float, np.number, np.bool_)) and not isinstance(x, str):
        try:
            arr = np.asarray(x)
        except ValueError as err:  # ragged nested lists
            raise InvalidInputError(
                f"{name} could not be read as a rectangular array ({err}); expected a tensor, a numpy "
                "array or a nested list whose rows all have the same length."
            ) from None
    else:
        raise InvalidTypeError(
            f"{name} must be a torch.Tensor, a numpy.ndarray or a sequence of numbers; "
            f"got {type(x).__name__}. Convert it with torch.as_tensor(...) or numpy.asarray(...)."
        )
    if arr.dtype.kind not in "biuf":
        raise InvalidTypeError(
            f"{name} must hold real numbers (bool, integer or float dtype); got dtype {arr.dtype}. "
            "Convert it to a numeric array first, e.g. numpy.asarray(x, dtype=float)."
        )
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        if arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise InvalidInputError(
                f"{name} holds unsigned integers up to {int(arr.max())}, beyond the int64 range; expected "
                "numbers of a sensible magnitude (class indices, counts)."
            )
        arr = arr.astype(np.int64)
    with warnings.catch_warnings():
        # A read-only array is fine: metrics never write into their inputs.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def work_device(t: torch.Tensor) -> torch.device:
    """The device float64 work happens on: the tensor's own, except MPS (no float64) -> CPU."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


def to_f64(t: torch.Tensor) -> torch.Tensor:
    """Cast a (small, per-sample) tensor to float64 on its work device; never modify the result."""
    return t.to(device=work_device(t), dtype=F64)


def for_sums(t: torch.Tensor) -> torch.Tensor:
    """``t`` ready to be summed: float16/bfloat16 in float64 (on the work device), else as it is.

    Summed in their own precision, half-precision values are rounded to 8 or 11 bits on the way
    (squares, partial sums, a norm), which shifts the result; float32 and float64 tensors are
    reduced in their own dtype, without a float64 copy of a large matrix.
    """
    return to_f64(t) if t.is_floating_point() and t.dtype.itemsize < 4 else t


def as_float(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` if floating point, else a float64 copy (integer or bool inputs are rare here)."""
    return t if t.is_floating_point() else t.to(F64)


def like_input(result: torch.Tensor, original: Any) -> Any:
    """Return ``result`` as the same kind of object as ``original``: a tensor or a numpy array."""
    if isinstance(original, torch.Tensor):
        return result
    return result.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# generic checks
# ----------------------------------------------------------------------------------------------
def shape_str(t: torch.Tensor) -> str:
    """Shape as a plain tuple string, e.g. ``(3, 4)``."""
    return str(tuple(t.shape))


def check_nonempty(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` has no elements."""
    if t.numel() == 0:
        raise InvalidInputError(
            f"{name} is empty (shape {shape_str(t)}); expected at least one sample. "
            "Check that the evaluation data loader yielded data."
        )


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds NaN or infinity.

    The common case costs one reduction and no allocation of the input's size: the sum of finite
    numbers is finite unless it overflows, and only then (or when a NaN/inf is present) is the
    element-wise check run.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    if bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if n_bad == 0:  # the sum overflowed, the values are fine
        return
    n_nan = int(torch.isnan(t).sum())
    first = np.unravel_index(int(bad.reshape(-1).nonzero()[0, 0]), tuple(t.shape)) if t.ndim else ()
    where = f" (first at index {tuple(int(i) for i in first)})" if t.ndim else ""
    raise NonFiniteError(
        f"{name} contains {n_nan} NaN and {n_bad - n_nan} infinite value(s) out of {t.numel()}{where}; "
        "expected finite numbers. Find where the model or the data produced them, or drop those "
        "samples before computing the metric."
    )


def check_same_shape(tensors: dict[str, torch.Tensor], hint: str = "") -> None:
    """Raise if the named tensors do not all have the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        names = ", ".join(shapes)
        raise InvalidInputError(
            f"{names} must have the same shape (one entry per sample); got {listed}.{hint}"
        )


def prob_tolerance(dtype: torch.dtype) -> float:
    """Tolerance for 'sums to one' and 'lies in [0, 1]': sqrt(machine epsilon), at least 1e-5.

    That is scikit-learn's tolerance (float32: 3.5e-4, float16: 0.031), with a floor so that float32
    probabilities cast to float64 are still accepted.
    """
    return max(math.sqrt(torch.finfo(dtype).eps), 1e-5)


def vector(x: ArrayLike, name: str) -> torch.Tensor:
    """A non-empty, finite, 1-D tensor (0-d inputs are rejected with the expected shape)."""
    t = to_tensor(x, name)
    if t.ndim != 1:
        raise InvalidInputError(
            f"{name} must be 1-D with one value per sample, shape (n,); got shape {shape_str(t)}. "
            "Flatten it, e.g. x.reshape(-1), if each element is a sample."
        )
    check_nonempty(t, name)
    check_finite(t, name)
    return t


def binary_vector(x: ArrayLike, name: str) -> torch.Tensor:
    """A non-empty 1-D tensor of 0/1 (or bool) values, returned as bool."""
    t = vector(x, name)
    if t.dtype == torch.bool:
        return t
    is_binary = bool(((t == 0) | (t == 1)).all())
    if not is_binary:
        lo, hi = float(t.min()), float(t.max())
        raise InvalidInputError(
            f"{name} must be binary (bool, or 0/1 values); got values in [{lo:g}, {hi:g}]. "
            "For a misclassification indicator use errors = (predictions != labels)."
        )
    return t != 0


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Classification:
    """Validated classification inputs.

    Exactly one of ``probs`` (an ``(n, K)`` matrix, ``K >= 2``) and ``positive`` (``(n,)``
    positive-class probabilities of a binary problem) is set. Both keep the caller's dtype and device.
    """

    probs: torch.Tensor | None
    positive: torch.Tensor | None
    labels: torch.Tensor  # (n,) int64 on the probabilities' device
    n_classes: int

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])

    @property
    def is_binary(self) -> bool:
        """Whether the problem has exactly two classes."""
        return self.n_classes == 2

    def top_label(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-label confidence (clamped to [0, 1]) and whether the top label is right.

        The confidence is in the input dtype, except for ``(n,)`` positive-class probabilities held
        in float16/bfloat16, whose complement ``1 - p`` is taken in float64 (see
        :meth:`true_class_prob`). Ties go to the lowest class index (as ``argmax``); a binary
        positive-class probability of exactly 0.5 predicts class 0.
        """
        if self.positive is not None:
            p = for_sums(self.positive)
            pred_pos = p > 0.5
            conf = torch.where(pred_pos, p, 1 - p)
            correct = pred_pos == (self.labels == 1)
        else:
            assert self.probs is not None
            conf, pred = self.probs.max(dim=1)
            correct = pred == self.labels
        return conf.clamp(0.0, 1.0), correct

    def positive_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability of class 1 (input dtype, clamped to [0, 1]) and whether the label is 1."""
        p = self.positive if self.positive is not None else self.column(1)
        return p.clamp(0.0, 1.0), self.labels == 1

    def column(self, k: int) -> torch.Tensor:
        """Predicted probability of class ``k`` for every sample (input dtype; see :meth:`top_label`)."""
        if self.positive is not None:
            return self.positive if k == 1 else 1 - for_sums(self.positive)
        assert self.probs is not None
        return self.probs[:, k]

    def predictions(self) -> torch.Tensor:
        """Predicted class (argmax, ties to the lowest index; binary: ``p > 0.5``)."""
        if self.positive is not None:
            return (self.positive > 0.5).long()
        assert self.probs is not None
        return self.probs.argmax(dim=1)

    def sum_of_squares(self) -> torch.Tensor:
        """The sum of the squared probabilities of every row of ``probs``, in float64 (see :func:`for_sums`)."""
        assert self.probs is not None
        p = for_sums(self.probs)
        return to_f64(torch.linalg.vecdot(p, p, dim=1))

    def true_class_prob(self) -> torch.Tensor:
        """Predicted probability of each sample's true class (input dtype; float64 for ``(n,)`` inputs).

        For positive-class probabilities the complement ``1 - p`` is taken in float64: in float16 or
        bfloat16 it would be rounded (1 - 0.498 is 0.5 in bfloat16), which shifts the NLL.
        """
        if self.positive is not None:
            p = to_f64(self.positive)
            return torch.where(self.labels.to(p.device) == 1, p, 1 - p)
        assert self.probs is not None
        return self.probs.gather(1, self.labels[:, None]).squeeze(1)


def _looks_like_logits_hint(binary: bool) -> str:
    if binary:
        return " They look like logits: apply torch.sigmoid(logits) first."
    return " They look like logits (unnormalised scores): apply torch.softmax(logits, dim=-1) first."


def parse_classification(probs: ArrayLike, labels: ArrayLike) -> Classification:
    """Validate ``probs`` (``(n, K)`` or binary ``(n,)``) and integer ``labels`` (``(n,)``)."""
    p = as_float(to_tensor(probs, "probs"))
    if p.ndim == 2:
        if p.shape[1] < 2:
            raise InvalidInputError(
                f"probs has shape {shape_str(p)}: a single column is ambiguous. Expected (n, K) class "
                "probabilities with K >= 2, or (n,) positive-class probabilities for a binary problem "
                "(use probs[:, 0])."
            )
        n_classes = int(p.shape[1])
    elif p.ndim == 1:
        n_classes = 2
    else:
        hint = (
            " If these are Monte Carlo samples (n_samples, n, K), average them first: probs.mean(0)."
            if p.ndim == 3
            else " For dense predictions move the class axis last and flatten: probs.reshape(-1, K)."
        )
        raise InvalidInputError(
            f"probs must have shape (n, K) or (n,) for binary problems; got shape {shape_str(p)}.{hint}"
        )
    check_nonempty(p, "probs")
    binary_1d = p.ndim == 1
    tol = prob_tolerance(p.dtype)

    if binary_1d:
        check_finite(p, "probs")
    else:
        row_sums = p.sum(dim=1)
        if not bool(torch.isfinite(row_sums).all()):
            check_finite(p, "probs")  # raises with the count and position of the bad entries
    lo, hi = (float(v) for v in torch.aminmax(p))
    if lo < -tol or hi > 1 + tol:
        raise InvalidInputError(
            f"probs must hold probabilities in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]."
            + _looks_like_logits_hint(binary_1d)
        )
    if not binary_1d:
        deviation = (row_sums - 1).abs()
        worst = float(deviation.max())
        if worst > tol:
            row = int(deviation.argmax())
            raise InvalidInputError(
                f"each row of probs must sum to 1 (a distribution over the {n_classes} classes); row {row} "
                f"sums to {float(row_sums[row]):.6g} (tolerance {tol:.1g}). Normalise with "
                "probs / probs.sum(-1, keepdim=True); if the columns are independent sigmoid outputs of "
                "a multi-label model, evaluate each label as a binary problem with (n,) probabilities."
            )

    y = parse_labels(labels, n=int(p.shape[0]), n_classes=n_classes, probs_shape=tuple(p.shape))
    y = y.to(p.device)
    return Classification(
        probs=None if binary_1d else p,
        positive=p if binary_1d else None,
        labels=y,
        n_classes=n_classes,
    )


def parse_labels(labels: ArrayLike, *, n: int, n_classes: int, probs_shape: tuple[int, ...]) -> torch.Tensor:
    """Validate integer class labels of shape ``(n,)`` with values in ``[0, n_classes)``; int64."""
    y = to_tensor(labels, "labels")
    if tuple(y.shape) != (n,):
        raise InvalidInputError(
            f"labels must have shape ({n},), one integer class per row of probs {probs_shape}; "
            f"got shape {shape_str(y)}."
            + (" Labels given as one-hot rows? Use labels.argmax(-1)." if y.ndim == 2 else "")
        )
    if y.is_floating_point():
        check_finite(y, "labels")
        if not bool((y == y.round()).all()):
            raise InvalidInputError(
                "labels must be integer class indices; got non-integer values. If these are "
                "probabilities, pass them as probs and the class indices as labels."
            )
    y = y.long()
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        hint = ""
        if lo >= 1 and hi == n_classes:
            hint = " They look 1-based: subtract 1."
        raise InvalidInputError(
            f"labels must be class indices in [0, {n_classes - 1}] for {n_classes} classes; got values "
            f"in [{lo}, {hi}].{hint}"
        )
    return y


# ----------------------------------------------------------------------------------------------
# regression
# ----------------------------------------------------------------------------------------------
def parse_regression(
    mean: ArrayLike,
    std: ArrayLike | None,
    targets: ArrayLike | None,
    *,
    targets_name: str = "targets",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validate predictive means, standard deviations and targets (each but ``mean`` optional).

    All given must have the same shape (any shape; every element is one prediction). They are
    returned flattened, as float64 on ``mean``'s work device; ``std`` must be strictly positive.
    """
    tensors = {"mean": to_tensor(mean, "mean")}
    if std is not None:
        tensors["std"] = to_tensor(std, "std")
    if targets is not None:
        tensors[targets_name] = to_tensor(targets, targets_name)
    check_same_shape(tensors, " Reshape them to match, e.g. std.reshape(mean.shape).")
    device = work_device(tensors["mean"])
    out = {}
    for name, t in tensors.items():
        check_nonempty(t, name)
        check_finite(t, name)
        out[name] = t.reshape(-1).to(device=device, dtype=F64)
    if std is not None:
        check_positive(out["std"], "std")
    return out["mean"], out.get("std"), out.get(targets_name)


def check_positive(t: torch.Tensor, name: str) -> None:
    """Raise if any element of ``t`` is <= 0 (standard deviations must be strictly positive)."""
    bad = t <= 0
    n_bad = int(bad.sum())
    if n_bad:
        raise InvalidInputError(
            f"{name} must be strictly positive; got {n_bad} value(s) <= 0 (smallest {float(t.min()):.4g}). "
            f"A zero {name} makes the Gaussian degenerate: clamp it, e.g. {name}.clamp_min(1e-6), and check "
            "that you passed standard deviations (not variances' logs or signed values)."
        )


def levels_vector(levels: Any, name: str, *, default: np.ndarray, device: torch.device) -> torch.Tensor:
    """Probability levels strictly inside (0, 1) as a float64 1-D tensor (``None`` -> ``default``)."""
    if levels is None:
        return torch.as_tensor(default, dtype=F64, device=device)
    t = to_tensor(levels, name).reshape(-1)
    check_nonempty(t, name)
    check_finite(t, name)
    t = t.to(device=device, dtype=F64)
    if bool(((t <= 0) | (t >= 1)).any()):
        raise InvalidInputError(
            f"{name} must lie strictly between 0 and 1; got values in [{float(t.min()):g}, "
            f"{float(t.max()):g}]."
        )
    return t


def parse_std(std: ArrayLike, name: str = "std") -> torch.Tensor:
    """Validate standard deviations alone (any shape): flattened float64, finite and > 0."""
    t = to_tensor(std, name)
    check_nonempty(t, name)
    check_finite(t, name)
    t = t.reshape(-1).to(device=work_device(t), dtype=F64)
    check_positive(t, name)
    return t
