r"""Post-hoc recalibration, fitted on held-out data and applied to new predictions.

Three recalibrators, each with a ``fit`` on a held-out (validation) set and methods that apply the
fitted map to new predictions:

* :class:`TemperatureScaling` (Guo et al. 2017): classification logits divided by one temperature
  ``T`` fitted by minimising the negative log-likelihood; works on MC samples too.
* :class:`VarianceScaling` (Levi et al. 2019, "std scaling"): regression standard deviations
  multiplied by one factor fitted by minimising the Gaussian negative log-likelihood.
* :class:`IsotonicRecalibration` (Kuleshov et al. 2018): an isotonic map of the predicted CDF levels
  of Gaussian regression predictions, giving recalibrated quantiles and intervals.

Outputs keep the kind of the input: a tensor in gives a tensor out (same device and dtype), a numpy
array in gives a numpy array out.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mcdrop._checks import check_real
from mcdrop.errors import InvalidInputError, McdropWarning, NotFittedError
from mcdrop.metrics.inputs import (
    F64,
    ArrayLike,
    as_float,
    check_finite,
    check_nonempty,
    like_input,
    parse_labels,
    parse_regression,
    parse_std,
    shape_str,
    to_tensor,
    work_device,
)

if TYPE_CHECKING:  # pragma: no cover
    from sklearn.isotonic import IsotonicRegression

__all__ = ["IsotonicRecalibration", "NotFittedError", "TemperatureScaling", "VarianceScaling"]

_CHUNK_ELEMENTS = 1 << 22  # logits are processed in row chunks of at most this many elements


def _not_fitted(obj: object) -> NotFittedError:
    name = type(obj).__name__
    return NotFittedError(
        f"this {name} is not fitted yet; call {name}().fit(...) on held-out data before applying it."
    )


# ----------------------------------------------------------------------------------------------
# temperature scaling
# ----------------------------------------------------------------------------------------------
def _logits(logits: ArrayLike, name: str = "logits") -> torch.Tensor:
    z = as_float(to_tensor(logits, name))
    if z.ndim not in (2, 3) or z.shape[-1] < 2:
        raise InvalidInputError(
            f"{name} must have shape (n, K) or, for Monte Carlo samples, (T, n, K), with K >= 2 classes; "
            f"got shape {shape_str(z)}. For a binary model with a single logit z, pass "
            "torch.stack([torch.zeros_like(z), z], dim=-1)."
        )
    check_nonempty(z, name)
    check_finite(z, name)
    return z


def _mean_true_class_nll(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL of the labels under softmax(z / T), averaged over MC samples first when 3-D."""
    samples_first = z.ndim == 3
    n = z.shape[-2]
    per_row = z.shape[-1] * (z.shape[0] if samples_first else 1)
    step = max(1, _CHUNK_ELEMENTS // per_row)
    total = torch.zeros((), dtype=F64, device=work_device(z))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        y = labels[rows]
        # log softmax(z / T)_y = z_y / T - logsumexp(z / T), without materialising every log-probability
        chunk = z[:, rows] if samples_first else z[rows]
        # half-precision logits are computed in float32 (chunk by chunk, so memory stays bounded)
        scaled = chunk.to(torch.promote_types(chunk.dtype, torch.float32)) / temperature
        idx = y.view(1, -1, 1).expand(z.shape[0], -1, 1) if samples_first else y[:, None]
        log_p_true = (scaled.gather(-1, idx).squeeze(-1) - torch.logsumexp(scaled, dim=-1)).to(F64)
        if samples_first:  # log of the mean probability over the T samples
            log_p_true = torch.logsumexp(log_p_true, dim=0) - math.log(z.shape[0])
        total += -log_p_true.to(total.device).sum()
    return float(total / n)


def _bound_reached(
    objective: Any, best_t: float, best_nll: float, low: float, high: float
) -> str | None:
    """``"lower"`` or ``"upper"`` where a fitted temperature lies at that bound, else ``None``.

    At a bound means within 1% of the bounds' log-range of it (at most 5%: a temperature of 95
    among the default ``(0.01, 100)``), or no better than the bound itself (the NLL still falls
    towards the bound, or is flat there, as 0 is for a perfectly separated set).
    """
    tolerance = min(0.05, 0.01 * math.log(high / low))
    for side, bound in (("lower", low), ("upper", high)):
        if abs(math.log(best_t / bound)) <= tolerance or objective(math.log(bound)) <= best_nll:
            return side
    return None


class TemperatureScaling:
    r"""Temperature scaling of classification logits (Guo et al. 2017).

    Calibrated probabilities are :math:`\mathrm{softmax}(z / T)` with one temperature :math:`T > 0`
    fitted on held-out data by minimising the negative log-likelihood

    .. math::

        T^\star = \arg\min_{T \in [T_{\min}, T_{\max}]} -\frac{1}{n}\sum_i \log \mathrm{softmax}(z_i / T)_{y_i}.

    For Monte Carlo logits ``(T_mc, n, K)`` every sample's logits are scaled *before* averaging the
    probabilities: :math:`p_i = \frac{1}{T_{mc}}\sum_t \mathrm{softmax}(z_{t,i} / T)`, and the NLL of
    that average is minimised. The temperature does not change the argmax, so accuracy is unchanged.

    The 1-D problem is solved with bounded Brent minimisation over :math:`\log T` (scipy); the NLL is
    unimodal in :math:`\log T` for single logits. If the optimum found is not better than ``T = 1``
    on the fitting data, ``T = 1`` is kept, so when the bounds contain 1 (the default) fitting never
    increases the NLL of the data it was fitted on. Bounds that exclude 1 force a temperature in
    them even when it is worse than leaving the logits alone: ``nll_after_`` can then exceed
    ``nll_before_``, and :meth:`fit` warns (:class:`~mcdrop.errors.McdropWarning`) when it does.

    Args:
        bounds: Search interval ``(T_min, T_max)`` for the temperature (default ``(0.01, 100)``).
        xatol: Absolute tolerance on :math:`\log T` (default ``1e-6``).

    Attributes:
        temperature_: The fitted temperature (after :meth:`fit`).
        nll_before_: Validation NLL at ``T = 1``.
        nll_after_: Validation NLL at the fitted temperature (never larger than ``nll_before_``
            when the bounds contain 1).

    Example:
        >>> import torch
        >>> from mcdrop.recalibration import TemperatureScaling
        >>> from mcdrop.metrics import negative_log_likelihood
        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.randint(0, 3, (500,), generator=g)
        >>> logits = 3 * torch.randn(500, 3, generator=g)  # over-confident noise ...
        >>> logits[torch.arange(500), labels] += 2.0  # ... with some signal
        >>> ts = TemperatureScaling().fit(logits, labels)
        >>> ts.temperature_ > 1  # over-confident logits get a temperature above one
        True
        >>> ts.nll_after_ < ts.nll_before_
        True
        >>> probs = ts.transform(logits)
        >>> probs.shape
        torch.Size([500, 3])
    """

    def __init__(self, bounds: tuple[float, float] = (0.01, 100.0), xatol: float = 1e-6) -> None:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise InvalidInputError(f"bounds must be a pair (T_min, T_max); got {bounds!r}.")
        low = check_real(bounds[0], "bounds[0]", low=0.0, low_open=True)
        high = check_real(bounds[1], "bounds[1]", low=0.0, low_open=True)
        if not low < high:
            raise InvalidInputError(f"bounds must satisfy T_min < T_max; got ({low}, {high}).")
        self.bounds = (low, high)
        self.xatol = check_real(xatol, "xatol", low=0.0, low_open=True)
        self.temperature_: float | None = None
        self.nll_before_: float | None = None
        self.nll_after_: float | None = None

    def __repr__(self) -> str:
        """Show the fitted temperature, if any."""
        return f"TemperatureScaling(temperature_={self.temperature_})"

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> TemperatureScaling:
        """Fit the temperature on held-out logits and labels.

        Args:
            logits: Held-out logits, ``(n, K)``, or MC samples ``(T, n, K)`` (samples first).
            labels: Integer class labels, ``(n,)``.

        Returns:
            ``self``, fitted.

        Raises:
            InvalidInputError: Wrong shapes, labels out of range, empty input.
            NonFiniteError: NaN or infinity in the logits.

        Warns:
            McdropWarning: The fitted temperature's NLL is higher than that of ``T = 1`` (possible
                only when ``bounds`` exclude 1). Or the fitted temperature lies at a bound (the NLL
                still falls, or is flat, towards it): at the lower bound usually probabilities
                passed as logits, or a validation set classified all right with a margin; at the
                upper bound, labels that do not match the logits, or a set classified (almost) all
                wrong.

        Example:
            >>> import math, torch
            >>> from mcdrop.recalibration import TemperatureScaling
            >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
            >>> labels = torch.tensor([0, 1, 1, 1])  # 3 of 4 right, each with confidence 0.98
            >>> ts = TemperatureScaling().fit(logits, labels)
            >>> abs(ts.temperature_ - 4 / math.log(3)) < 1e-4  # softmax(z / T) is then 0.75, the accuracy
            True
            >>> round(ts.nll_before_, 3), round(ts.nll_after_, 3)
            (1.018, 0.562)
            >>> mc = torch.stack([logits, logits])  # MC samples (T, n, K) fit the same way
            >>> abs(TemperatureScaling().fit(mc, labels).temperature_ - ts.temperature_) < 1e-4
            True
        """
        from scipy.optimize import minimize_scalar

        z = _logits(logits)
        y = parse_labels(labels, n=z.shape[-2], n_classes=z.shape[-1], probs_shape=tuple(z.shape))
        y = y.to(z.device)

        def objective(log_t: float) -> float:
            return _mean_true_class_nll(z, y, math.exp(log_t))

        low, high = self.bounds
        result = minimize_scalar(
            objective,
            bounds=(math.log(low), math.log(high)),
            method="bounded",
            options={"xatol": self.xatol},
        )
        nll_one = _mean_true_class_nll(z, y, 1.0)
        best_t, best_nll = math.exp(float(result.x)), float(result.fun)
        kept_one = not best_nll < nll_one and low <= 1.0 <= high
        if kept_one:
            best_t, best_nll = 1.0, nll_one
        self.temperature_, self.nll_before_, self.nll_after_ = best_t, nll_one, best_nll
        if best_nll > nll_one:
            warnings.warn(
                f"TemperatureScaling: the best temperature within bounds=({low:g}, {high:g}) is {best_t:.4g}, "
                f"whose NLL ({best_nll:.4g}) is higher than that of the unscaled logits ({nll_one:.4g}); "
                "the bounds exclude T = 1. Widen them to include 1 unless a temperature in them is required.",
                McdropWarning,
                stacklevel=2,
            )
        # T = 1 kept inside the bounds: nothing was better (constant logits), no bound was reached
        side = None if best_nll > nll_one or (kept_one and low < 1.0 < high) else _bound_reached(
            objective, best_t, best_nll, low, high
        )
        if side is not None:
            likely = (
                "probabilities passed as logits (pass logits, or probs.log()), or a validation set "
                "that the model classifies all right with a margin (its NLL falls towards 0 as T does: "
                "it determines no temperature)"
                if side == "lower"
                else "labels that do not match the logits (shifted, or in another class order), or a "
                "validation set that the model classifies (almost) all wrong"
            )
            warnings.warn(
                f"TemperatureScaling: the fitted temperature {best_t:.4g} lies at the {side} bound of "
                f"bounds=({low:g}, {high:g}): the NLL does not rise again within them, so no temperature "
                f"calibrates these inputs. This usually means {likely}. Check the inputs before using it.",
                McdropWarning,
                stacklevel=2,
            )
        return self

    def _temperature(self) -> float:
        if self.temperature_ is None:
            raise _not_fitted(self)
        return self.temperature_

    def scale(self, logits: ArrayLike) -> Any:
        """Return ``logits / T`` (same shape; samples-first MC logits are scaled sample by sample).

        Args:
            logits: Logits, ``(n, K)`` or ``(T, n, K)``.

        Returns:
            The scaled logits, a tensor if ``logits`` is one (same device and dtype), else numpy.

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Wrong shape or empty input.
            NonFiniteError: NaN or infinity in the logits.

        Example:
            >>> import math, torch
            >>> from mcdrop.recalibration import TemperatureScaling
            >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
            >>> labels = torch.tensor([0, 1, 1, 1])  # 3 of 4 right, each with confidence 0.98
            >>> ts = TemperatureScaling().fit(logits, labels)
            >>> [round(v, 4) for v in ts.scale(logits)[0].tolist()]  # 4 / T = ln 3
            [1.0986, 0.0]
            >>> type(ts.scale(logits.numpy())).__name__
            'ndarray'
            >>> TemperatureScaling().scale(logits)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            mcdrop.errors.NotFittedError: this TemperatureScaling is not fitted yet; ...
        """
        temperature = self._temperature()
        z = _logits(logits)
        return like_input(z / temperature, logits)

    def transform(self, logits: ArrayLike) -> Any:
        """Calibrated probabilities ``softmax(logits / T)``, averaged over MC samples for 3-D input.

        Args:
            logits: Logits, ``(n, K)``, or MC samples ``(T, n, K)``.

        Returns:
            Probabilities of shape ``(n, K)``: a tensor if ``logits`` is one (same device and dtype),
            else a numpy array.

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Wrong shape or empty input.
            NonFiniteError: NaN or infinity in the logits.

        Example:
            >>> import math, torch
            >>> from mcdrop.recalibration import TemperatureScaling
            >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
            >>> labels = torch.tensor([0, 1, 1, 1])  # 3 of 4 right, each with confidence 0.98
            >>> ts = TemperatureScaling().fit(logits, labels)
            >>> [round(p, 4) for p in ts.transform(logits)[0].tolist()]  # was [0.982, 0.018]
            [0.75, 0.25]
            >>> ts.transform(torch.stack([logits, logits, logits])).shape  # MC samples: averaged
            torch.Size([4, 2])
        """
        temperature = self._temperature()
        z = _logits(logits)
        probs = torch.softmax(z / temperature, dim=-1)
        if z.ndim == 3:
            probs = probs.mean(dim=0)
        return like_input(probs, logits)


# ----------------------------------------------------------------------------------------------
# variance scaling
# ----------------------------------------------------------------------------------------------
class VarianceScaling:
    r"""Scale regression standard deviations by one factor (Levi et al. 2019, "std scaling").

    The factor :math:`s` minimises the Gaussian NLL of :math:`\mathcal{N}(\mu_i, (s\sigma_i)^2)` on
    held-out data. The minimiser has a closed form,

    .. math::

        s^\star = \sqrt{\frac{1}{n}\sum_i \left(\frac{y_i - \mu_i}{\sigma_i}\right)^2},

    the root mean squared standardised residual, and it is the global minimum, so fitting never
    increases the NLL of the data it was fitted on. Means are left unchanged.

    Attributes:
        factor_: The fitted factor :math:`s^\star` (after :meth:`fit`).
        nll_before_: Validation Gaussian NLL with the original standard deviations.
        nll_after_: Validation Gaussian NLL with the scaled standard deviations.

    Example:
        >>> import torch
        >>> from mcdrop.recalibration import VarianceScaling
        >>> g = torch.Generator().manual_seed(0)
        >>> mean = torch.zeros(1000, dtype=torch.float64)
        >>> targets = 2.0 * torch.randn(1000, generator=g, dtype=torch.float64)
        >>> std = torch.ones(1000, dtype=torch.float64)  # under-estimates the true std of 2
        >>> vs = VarianceScaling().fit(mean, std, targets)
        >>> round(vs.factor_, 1)
        2.0
        >>> vs.transform(std)[:3].tolist() == [vs.factor_] * 3
        True
    """

    def __init__(self) -> None:
        self.factor_: float | None = None
        self.nll_before_: float | None = None
        self.nll_after_: float | None = None

    def __repr__(self) -> str:
        """Show the fitted factor, if any."""
        return f"VarianceScaling(factor_={self.factor_})"

    def fit(self, mean: ArrayLike, std: ArrayLike, targets: ArrayLike) -> VarianceScaling:
        """Fit the factor on held-out predictions.

        Args:
            mean: Predictive means (any shape).
            std: Predictive standard deviations, same shape, strictly positive.
            targets: Held-out targets, same shape.

        Returns:
            ``self``, fitted.

        Raises:
            InvalidInputError: Mismatched shapes, empty input, ``std <= 0``, or all residuals zero
                (then no positive factor minimises the NLL).
            NonFiniteError: NaN or infinity in the inputs.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import VarianceScaling
            >>> targets = torch.tensor([2.0, -2.0, 2.0, -2.0])  # residuals of 2 for a std of 1
            >>> vs = VarianceScaling().fit(torch.zeros(4), torch.ones(4), targets)
            >>> vs.factor_
            2.0
            >>> round(vs.nll_before_, 4), round(vs.nll_after_, 4)
            (2.9189, 2.1121)
        """
        mu, sigma, y = parse_regression(mean, std, targets)
        assert sigma is not None and y is not None
        z2 = ((y - mu) / sigma) ** 2
        mean_z2 = float(z2.mean())
        if not mean_z2 > 0:
            raise InvalidInputError(
                "every held-out residual is zero, so the NLL decreases without bound as the std shrinks "
                "and no scaling factor can be fitted; fit on held-out data the model was not trained on."
            )
        const = 0.5 * math.log(2 * math.pi) + float(torch.log(sigma).mean())
        self.factor_ = math.sqrt(mean_z2)
        self.nll_before_ = const + 0.5 * mean_z2
        self.nll_after_ = const + math.log(self.factor_) + 0.5
        return self

    def transform(self, std: ArrayLike) -> Any:
        """Return the recalibrated standard deviations ``factor_ * std``.

        Args:
            std: Predictive standard deviations (any shape), strictly positive.

        Returns:
            Scaled standard deviations: a tensor if ``std`` is one (same device and dtype), else numpy.

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Empty input or ``std <= 0``.
            NonFiniteError: NaN or infinity in ``std``.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import VarianceScaling
            >>> vs = VarianceScaling().fit(torch.zeros(4), torch.ones(4), torch.tensor([2.0, -2.0, 2.0, -2.0]))
            >>> vs.transform(torch.tensor([0.5, 1.0]))
            tensor([1., 2.])
            >>> vs.transform([0.5, 1.0])  # not a tensor: numpy
            array([1., 2.])
        """
        if self.factor_ is None:
            raise _not_fitted(self)
        parse_std(std)
        s = as_float(to_tensor(std, "std"))
        return like_input(s * self.factor_, std)


# ----------------------------------------------------------------------------------------------
# isotonic recalibration of quantiles
# ----------------------------------------------------------------------------------------------
class IsotonicRecalibration:
    r"""Isotonic recalibration of Gaussian regression quantiles (Kuleshov et al. 2018).

    On held-out data the predicted CDF levels (probability integral transform)
    :math:`p_i = \Phi((y_i - \mu_i)/\sigma_i)` are compared with their empirical frequency
    :math:`\hat P(p_i) = \frac{1}{n}|\{j : p_j \le p_i\}|`, and a non-decreasing map
    :math:`R: [0, 1] \to [0, 1]` is fitted to the pairs :math:`(p_i, \hat P(p_i))` with
    ``sklearn.isotonic.IsotonicRegression``. The recalibrated CDF is :math:`R(F_i(y))`; the recalibrated
    :math:`q`-quantile is :math:`F_i^{-1}(R^{-1}(q)) = \mu_i + \sigma_i \Phi^{-1}(R^{-1}(q))`, with
    :math:`R^{-1}` fitted the same way to the swapped pairs :math:`(\hat P(p_i), p_i)` (as
    uncertainty-toolbox does). Both fits include the anchors (0, 0) and (1, 1), so :math:`R` maps
    [0, 1] onto [0, 1]; between and beyond the data both maps interpolate linearly.

    Unlike uncertainty-toolbox's ``iso_recal``, which fits to 100 expected/observed proportion pairs,
    this fits to every held-out point, as in the paper.

    Attributes:
        n_fit_: Number of held-out points used (after :meth:`fit`).

    Example:
        >>> import torch
        >>> from mcdrop.recalibration import IsotonicRecalibration
        >>> from mcdrop.metrics import picp
        >>> g = torch.Generator().manual_seed(0)
        >>> def data(n):  # the model's std is half the truth: over-confident
        ...     mean = torch.randn(n, generator=g, dtype=torch.float64)
        ...     return mean, torch.full((n,), 0.5, dtype=torch.float64), mean + torch.randn(n, generator=g, dtype=torch.float64)
        >>> iso = IsotonicRecalibration().fit(*data(2000))
        >>> mean, std, targets = data(2000)
        >>> round(picp(mean, std, targets, level=0.9), 1)  # far below the nominal 0.9
        0.6
        >>> lower, upper = iso.interval(mean, std, level=0.9)
        >>> round(float(((targets >= lower) & (targets <= upper)).double().mean()), 1)
        0.9
    """

    def __init__(self) -> None:
        self.n_fit_: int | None = None
        self._forward: IsotonicRegression | None = None
        self._inverse: IsotonicRegression | None = None

    def __repr__(self) -> str:
        """Show the number of points fitted on, if any."""
        return f"IsotonicRecalibration(n_fit_={self.n_fit_})"

    def fit(self, mean: ArrayLike, std: ArrayLike, targets: ArrayLike) -> IsotonicRecalibration:
        """Fit the recalibration maps on held-out Gaussian predictions.

        Args:
            mean: Predictive means (any shape).
            std: Predictive standard deviations, same shape, strictly positive.
            targets: Held-out targets, same shape.

        Returns:
            ``self``, fitted.

        Raises:
            InvalidInputError: Mismatched shapes, empty input or ``std <= 0``.
            NonFiniteError: NaN or infinity in the inputs.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import IsotonicRecalibration
            >>> n = 1000
            >>> targets = torch.special.ndtri((torch.arange(n) + 0.5) / n)  # N(0, 1) quantiles
            >>> iso = IsotonicRecalibration().fit(torch.zeros(n), torch.full((n,), 0.5), targets)
            >>> iso.n_fit_
            1000
            >>> round(float(iso.cdf(torch.zeros(1), torch.full((1,), 0.5), torch.tensor([1.2816]))), 2)
            0.9
        """
        from sklearn.isotonic import IsotonicRegression

        mu, sigma, y = parse_regression(mean, std, targets)
        assert sigma is not None and y is not None
        pit = torch.special.ndtr((y - mu) / sigma).cpu().numpy()
        n = pit.shape[0]
        sorted_pit = np.sort(pit)
        empirical = np.searchsorted(sorted_pit, sorted_pit, side="right") / n  # fraction <= p_i
        levels = np.concatenate([[0.0], sorted_pit, [1.0]])
        freqs = np.concatenate([[0.0], empirical, [1.0]])
        self._forward = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(
            levels, freqs
        )
        self._inverse = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(
            freqs, levels
        )
        self.n_fit_ = n
        return self

    def _maps(self) -> tuple[IsotonicRegression, IsotonicRegression]:
        if self._forward is None or self._inverse is None:
            raise _not_fitted(self)
        return self._forward, self._inverse

    def recalibrated_level(self, level: ArrayLike | float) -> np.ndarray:
        r"""The model level :math:`R^{-1}(q)` whose quantile is observed with frequency ``level``.

        Args:
            level: Desired level(s) :math:`q` in ``[0, 1]``, a float or an array.

        Returns:
            A float64 numpy array of the same shape as ``level``.

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Levels outside ``[0, 1]``.
            NonFiniteError: NaN or infinity in ``level``.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import IsotonicRecalibration
            >>> n = 1000
            >>> targets = torch.special.ndtri((torch.arange(n) + 0.5) / n)  # N(0, 1) quantiles
            >>> iso = IsotonicRecalibration().fit(torch.zeros(n), torch.full((n,), 0.5), targets)
            >>> iso.recalibrated_level([0.1, 0.5, 0.9]).round(3).tolist()  # the std is too small
            [0.005, 0.499, 0.995]
            >>> iso.recalibrated_level(0.9).shape
            ()
        """
        _, inverse = self._maps()
        q = _levels01(level)
        return inverse.predict(q.reshape(-1)).reshape(q.shape)

    def cdf(self, mean: ArrayLike, std: ArrayLike, values: ArrayLike) -> Any:
        r"""Recalibrated CDF :math:`R(\Phi((v - \mu)/\sigma))` at ``values``.

        Args:
            mean: Predictive means (any shape).
            std: Predictive standard deviations, same shape, strictly positive.
            values: Points at which to evaluate the CDF, same shape.

        Returns:
            Probabilities in ``[0, 1]`` of the same shape as ``mean``: a tensor (float64, on
            ``mean``'s device) if ``mean`` is one, else a numpy array.

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Mismatched shapes, empty input or ``std <= 0``.
            NonFiniteError: NaN or infinity in the inputs.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import IsotonicRecalibration
            >>> n = 1000
            >>> targets = torch.special.ndtri((torch.arange(n) + 0.5) / n)  # N(0, 1) quantiles
            >>> iso = IsotonicRecalibration().fit(torch.zeros(n), torch.full((n,), 0.5), targets)
            >>> mean, std = torch.zeros(3), torch.full((3,), 0.5)
            >>> iso.cdf(mean, std, torch.tensor([-1.2816, 0.0, 1.2816])).round(decimals=2)
            tensor([0.1000, 0.5000, 0.9000], dtype=torch.float64)
            >>> torch.special.ndtr(torch.tensor([-1.2816, 0.0, 1.2816]) / std).round(decimals=3)  # before
            tensor([0.0050, 0.5000, 0.9950])
        """
        forward, _ = self._maps()
        mu, sigma, v = parse_regression(mean, std, values, targets_name="values")
        assert sigma is not None and v is not None
        pit = torch.special.ndtr((v - mu) / sigma).cpu().numpy()
        out = torch.as_tensor(forward.predict(pit), dtype=F64, device=mu.device)
        return like_input(out.reshape(to_tensor(mean, "mean").shape), mean)

    def quantile(self, mean: ArrayLike, std: ArrayLike, level: float) -> Any:
        r"""Recalibrated ``level``-quantile :math:`\mu + \sigma\,\Phi^{-1}(R^{-1}(q))` of every prediction.

        Args:
            mean: Predictive means (any shape).
            std: Predictive standard deviations, same shape, strictly positive.
            level: Quantile level :math:`q` in ``[0, 1]``.

        Returns:
            The quantiles, same shape as ``mean``: a tensor (float64, on ``mean``'s device) if ``mean``
            is one, else a numpy array. Levels mapped to 0 or 1 give -inf or +inf.

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or ``level`` outside [0, 1].
            NonFiniteError: NaN or infinity in the inputs.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import IsotonicRecalibration
            >>> n = 1000
            >>> targets = torch.special.ndtri((torch.arange(n) + 0.5) / n)  # N(0, 1) quantiles
            >>> iso = IsotonicRecalibration().fit(torch.zeros(n), torch.full((n,), 0.5), targets)
            >>> iso.quantile(torch.tensor([0.0, 10.0]), torch.tensor([0.5, 1.0]), 0.9).round(decimals=2)
            tensor([ 1.2800, 12.5600], dtype=torch.float64)
            >>> iso.quantile(torch.zeros(1), torch.full((1,), 0.5), 0.0)
            tensor([-inf], dtype=torch.float64)
        """
        level = check_real(level, "level", low=0.0, high=1.0)
        model_level = float(self.recalibrated_level(level))
        mu, sigma, _ = parse_regression(mean, std, None)
        assert sigma is not None
        z = torch.special.ndtri(torch.tensor(model_level, dtype=F64)).to(mu.device)
        out = mu + sigma * z
        return like_input(out.reshape(to_tensor(mean, "mean").shape), mean)

    def interval(self, mean: ArrayLike, std: ArrayLike, level: float = 0.95) -> tuple[Any, Any]:
        """Recalibrated central prediction interval of nominal coverage ``level``.

        The bounds are the recalibrated quantiles at ``(1 - level) / 2`` and ``(1 + level) / 2``.

        Args:
            mean: Predictive means (any shape).
            std: Predictive standard deviations, same shape, strictly positive.
            level: Nominal coverage in ``(0, 1)`` (default 0.95).

        Returns:
            ``(lower, upper)``, each shaped like ``mean``: tensors (float64, on ``mean``'s device) if
            ``mean`` is one, else numpy arrays.

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or ``level`` outside (0, 1).
            NonFiniteError: NaN or infinity in the inputs.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import IsotonicRecalibration
            >>> n = 1000
            >>> targets = torch.special.ndtri((torch.arange(n) + 0.5) / n)  # N(0, 1) quantiles
            >>> iso = IsotonicRecalibration().fit(torch.zeros(n), torch.full((n,), 0.5), targets)
            >>> lower, upper = iso.interval(torch.zeros(2), torch.full((2,), 0.5), level=0.9)
            >>> lower.round(decimals=1), upper.round(decimals=1)  # the model's own: 0.5 * 1.64
            (tensor([-1.6000, -1.6000], dtype=torch.float64), tensor([1.6000, 1.6000], dtype=torch.float64))
        """
        level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
        return self.quantile(mean, std, (1 - level) / 2), self.quantile(mean, std, (1 + level) / 2)


def _levels01(level: ArrayLike | float) -> np.ndarray:
    t = to_tensor(level, "level")
    check_finite(t, "level")
    q = t.to(F64).cpu().numpy()
    if q.size and (q.min() < 0 or q.max() > 1):
        raise InvalidInputError(f"level must lie in [0, 1]; got values in [{q.min():g}, {q.max():g}].")
    return q
