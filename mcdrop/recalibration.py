r"""Post-hoc recalibration, fitted on held-out data and applied to new predictions.

Three recalibrators, each with a ``fit`` on a held-out (validation) set and methods that apply the
fitted map to new predictions:

* :class:`TemperatureScaling` (Guo et al. 2017): classification logits divided by one temperature
  ``T`` fitted by minimising the negative log-likelihood; works on MC samples too, and on a
  :class:`~mcdrop.ClassificationPrediction` with kept samples, which it turns into the prediction
  of the tempered samples.
* :class:`VarianceScaling` (Levi et al. 2019, "std scaling"): regression standard deviations
  multiplied by one factor fitted by minimising the Gaussian negative log-likelihood; on a
  :class:`~mcdrop.RegressionPrediction`, both variances are scaled by the factor squared.
* :class:`IsotonicRecalibration` (Kuleshov et al. 2018): an isotonic map of the predicted CDF levels
  of Gaussian regression predictions, giving recalibrated quantiles and intervals (of arrays or of
  a :class:`~mcdrop.RegressionPrediction`; the recalibrated distribution is not Gaussian, so it is
  not turned into another prediction).

Array outputs keep the kind of the input: a tensor in gives a tensor out (same device and dtype), a
numpy array in gives a numpy array out. Predictions in give predictions (or tensors) out; the input
prediction is not changed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

from mcdrop._checks import check_real, user_stacklevel
from mcdrop._statistics import ClassificationStats
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropWarning, NotFittedError
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
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction

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


def _bound_reached(objective: Any, best_t: float, best_nll: float, low: float, high: float) -> str | None:
    """``"lower"`` or ``"upper"`` where a fitted temperature lies at that bound, else ``None``.

    At a bound means within 1% of the bounds' log-range of it (at most 5%: a temperature of 95
    among the default ``(0.01, 100)``), or no better than the bound itself to a relative 1e-6 (the
    NLL still falls towards the bound, or is flat there, as 0 is for a perfectly separated set and
    the vote fractions are for MC samples that disagree).
    """
    tolerance = min(0.05, 0.01 * math.log(high / low))
    flat = 1e-6 * abs(best_nll) + 1e-12  # float32 rounding of a mean NLL: no better is no better
    for side, bound in (("lower", low), ("upper", high)):
        if abs(math.log(best_t / bound)) <= tolerance or objective(math.log(bound)) <= best_nll + flat:
            return side
    return None


#: The statistics of a classification prediction that tempering its samples recomputes.
_CLASSIFICATION_STATISTICS = (
    "probs",
    "std",
    "predictive_entropy",
    "expected_entropy",
    "variation_ratio",
    "class_dim",
    "probs_se",
    "std_se",
    "predictive_entropy_se",
    "expected_entropy_se",
    "mutual_information_se",
)


def _checked_samples(pred: Any) -> torch.Tensor:
    """A classification prediction's kept samples, refusing a prediction without them (or not a classifier's)."""
    if not isinstance(pred, ClassificationPrediction):
        raise InvalidTypeError(
            "TemperatureScaling recalibrates a classifier's prediction (a ClassificationPrediction), "
            f"logits or MC logits; got a {type(pred).__name__}. For a RegressionPrediction use "
            "VarianceScaling or IsotonicRecalibration."
        )
    if pred.samples is None and pred.samples_per_input is not None:
        raise InvalidInputError(
            "temperature scaling of a prediction divides its Monte Carlo samples by T, and a prediction "
            "of adaptive sampling (n_samples='auto') keeps none (each input has its own N). Predict "
            "the held-out and test sets with a fixed N and keep_samples=True, e.g. "
            "MCDropout(model, n_samples=100, keep_samples=True)."
        )
    if pred.samples is None:
        raise InvalidInputError(
            "temperature scaling of a prediction divides its Monte Carlo samples by T, but this "
            "prediction kept none (its probabilities are averaged over the samples already, and the "
            "average of tempered samples does not follow from the average of the untempered ones). Predict with MCDropout(..., "
            "keep_samples=True), which keeps them in pred.samples, or pass the MC logits "
            "(n_samples, n, K) themselves."
        )
    if pred.output_type not in ("logits", "probs", "log_probs"):
        raise InvalidInputError(
            "this prediction does not say what its samples are (output_type is "
            f"{pred.output_type!r}: built by hand?); set pred.output_type to 'logits', 'probs' or "
            "'log_probs'."
        )
    return pred.samples


def _sample_log_probs_of(pred: ClassificationPrediction) -> torch.Tensor:
    """The per-sample log-probabilities of a checked prediction's samples, class last ``(N, b, ..., K)``.

    Read as the wrapper read them (``pred.output_type``, ``pred.class_dim``; a binary classifier's
    one output becomes two classes). For logits they are ``log_softmax(z)``, which differs from
    ``z`` by one constant per sample and row, so ``softmax(log_softmax(z) / T) = softmax(z / T)``.
    In float64, so that the fitted temperature does not depend on float32 rounding.
    """
    assert pred.samples is not None and pred.output_type is not None
    _, logp = ClassificationStats(pred.output_type, pred.class_dim).to_probs(pred.samples.to(torch.float64))
    return logp


def _prediction_labels(
    pred: ClassificationPrediction, labels: ArrayLike | None, logp: torch.Tensor
) -> torch.Tensor:
    """The labels of a prediction's rows (``labels``, else ``pred.targets``), flattened like ``logp``."""
    if labels is None:
        labels = pred.targets
    if labels is None:
        raise InvalidInputError(
            "no labels to fit on: pass them, fit(pred, labels), or predict with predict_loader on "
            "batches that carry targets (they are kept in pred.targets)."
        )
    y = to_tensor(labels, "labels")
    per_row = tuple(logp.shape[1:-1])  # (b, ...): one label per input, or per position of a map
    if len(per_row) > 1 and tuple(y.shape) == per_row:
        y = y.reshape(-1)
    n = math.prod(per_row)
    return parse_labels(y, n=n, n_classes=int(logp.shape[-1]), probs_shape=tuple(pred.probs.shape))


class TemperatureScaling:
    r"""Temperature scaling of classification logits (Guo et al. 2017).

    Calibrated probabilities are :math:`\mathrm{softmax}(z / T)` with one temperature :math:`T > 0`
    fitted on held-out data by minimising the negative log-likelihood

    .. math::

        T^\star = \arg\min_{T \in [T_{\min}, T_{\max}]} -\frac{1}{n}\sum_i \log \mathrm{softmax}(z_i / T)_{y_i}.

    For Monte Carlo logits ``(T_mc, n, K)`` every sample's logits are scaled *before* averaging the
    probabilities: :math:`p_i = \frac{1}{T_{mc}}\sum_t \mathrm{softmax}(z_{t,i} / T)`, and the NLL of
    that average is minimised.

    A :class:`~mcdrop.ClassificationPrediction` kept with ``keep_samples=True`` is fitted and
    transformed through its samples, the same way: the NLL minimised is that of the MC predictive
    mean :math:`\bar p_i(T) = \frac{1}{N}\sum_t \mathrm{softmax}(z_{t,i} / T)`, where
    :math:`z_{t,i}` are the sample's logits, or, for a model that outputs probabilities (or
    log-probabilities), their logarithms (equal to logits up to a constant per sample, which the
    softmax ignores); :meth:`transform` returns the prediction of the samples :math:`z_{t,i} / T`,
    every statistic recomputed from them, without drawing again.

    Accuracy: for single logits the temperature cannot change the argmax. For MC samples it can,
    because the average of the tempered softmaxes is not the tempered softmax of anything: the
    sample logits ``[3, 0]``, ``[0, 1]`` and ``[0, 1]`` of one input average to class 1 at ``T = 1``
    (0.5032 against 0.4968) and to class 0 at ``T = 10`` (0.5082 against 0.4918): flattening
    shrinks every sample's margin towards a linear function of its logits (``softmax(z/T)_k ≈
    1/K + (z_k - z̄)/(K T)``), so at a high temperature the class with the largest mean logit wins,
    where at ``T = 1`` the saturated confident sample counted for less. So a tempered MC prediction may change
    some argmaxes (and its accuracy), usually few.

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

    def fit(
        self, logits: ArrayLike | ClassificationPrediction, labels: ArrayLike | None = None
    ) -> TemperatureScaling:
        """Fit the temperature on held-out logits (or a held-out prediction) and labels.

        Args:
            logits: Held-out logits, ``(n, K)``, or MC samples ``(T, n, K)`` (samples first); or a
                :class:`~mcdrop.ClassificationPrediction` made with ``keep_samples=True``, fitted
                through its samples (see the class docs).
            labels: Integer class labels, ``(n,)`` (for a dense prediction, one per position,
                shaped like ``pred.predicted``). Optional for a prediction: ``pred.targets`` by
                default.

        Returns:
            ``self``, fitted.

        Raises:
            InvalidInputError: Wrong shapes, labels out of range or missing, empty input; a
                prediction without kept samples.
            InvalidTypeError: A prediction that is not a classifier's.
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
        if isinstance(logits, Prediction):
            _checked_samples(logits)
            assert isinstance(logits, ClassificationPrediction)
            logp = _sample_log_probs_of(logits)
            y = _prediction_labels(logits, labels, logp)
            z = logp.reshape(logp.shape[0], -1, logp.shape[-1])
        else:
            if labels is None:
                raise InvalidInputError(
                    "labels are needed to fit a temperature on logits: fit(logits, labels) (only a "
                    "prediction carries its own, in pred.targets)."
                )
            z = _logits(logits)
            y = parse_labels(labels, n=z.shape[-2], n_classes=z.shape[-1], probs_shape=tuple(z.shape))
        return self._fit(z, y.to(z.device))

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> TemperatureScaling:
        """Minimise the NLL over the temperature, for logits ``(n, K)`` or ``(T, n, K)``."""
        from scipy.optimize import minimize_scalar

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
        if not math.isfinite(nll_one):
            raise InvalidInputError(
                "a held-out label has probability 0 in every sample, so the NLL is infinite at every "
                "temperature and none can be fitted; check the labels against the classes."
            )
        best_t, best_nll = math.exp(float(result.x)), float(result.fun)
        # no better than T = 1 beyond float rounding (constant logits: the same NLL at every T): keep 1
        kept_one = not best_nll < nll_one - (1e-6 * abs(nll_one) + 1e-12) and low <= 1.0 <= high
        if kept_one:
            best_t, best_nll = 1.0, nll_one
        self.temperature_, self.nll_before_, self.nll_after_ = best_t, nll_one, best_nll
        if best_nll > nll_one:
            warnings.warn(
                f"TemperatureScaling: the best temperature within bounds=({low:g}, {high:g}) is {best_t:.4g}, "
                f"whose NLL ({best_nll:.4g}) is higher than that of the unscaled logits ({nll_one:.4g}); "
                "the bounds exclude T = 1. Widen them to include 1 unless a temperature in them is required.",
                McdropWarning,
                stacklevel=user_stacklevel(),
            )
        # T = 1 kept inside the bounds: nothing was better (constant logits), no bound was reached
        side = (
            None
            if best_nll > nll_one or (kept_one and low < 1.0 < high)
            else _bound_reached(objective, best_t, best_nll, low, high)
        )
        if side is not None:
            top = z.argmax(-1)
            # samples that vote for different classes: their mean tends to the vote fractions as T -> 0
            monte_carlo = z.dim() == 3 and bool((top != top[:1]).any())
            likely = (
                "MC samples whose average is underconfident: as T falls every tempered sample becomes a "
                "one-hot vote, so the MC mean tends to the samples' vote fractions and the NLL levels "
                "off there instead of rising again (the averaged prediction is sharper at T -> 0 than "
                "at any temperature of the samples). The tempered prediction is then close to the vote "
                "fractions of these N samples; to temper the averaged probabilities instead, fit on "
                "pred.probs.log() with the labels and scale those"
                if side == "lower" and monte_carlo
                else "probabilities passed as logits (pass logits, or probs.log()), or a validation set "
                "that the model classifies all right with a margin (its NLL falls towards 0 as T does: "
                "it determines no temperature)"
                if side == "lower"
                else "labels that do not match the logits (shifted, or in another class order), or a "
                "validation set that the model classifies (almost) all wrong"
            )
            warnings.warn(
                f"TemperatureScaling: the fitted temperature {best_t:.4g} "
                f"{'lies at' if abs(math.log(best_t / (low if side == 'lower' else high))) < 0.05 else 'is no better than'} "
                f"the {side} bound of bounds=({low:g}, {high:g}): the NLL does not rise again within them, so no temperature "
                f"calibrates these inputs. This usually means {likely}. Check the inputs before using it.",
                McdropWarning,
                stacklevel=user_stacklevel(),
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

    def transform(self, logits: ArrayLike | ClassificationPrediction) -> Any:
        """Calibrated probabilities ``softmax(logits / T)`` (averaged over MC samples), or a prediction.

        A :class:`~mcdrop.ClassificationPrediction` made with ``keep_samples=True`` gives a new
        prediction of the tempered samples: ``samples`` are the logits divided by ``T`` (for a
        model that outputs probabilities or log-probabilities, their logarithms divided by ``T``;
        for one probability per input, a binary classifier's, its log-odds divided by ``T``),
        ``output_type`` is ``"logits"``, and every statistic (``probs``, ``std``, the entropies, the
        mutual information, the variation ratio and the Monte Carlo standard errors) is recomputed
        from them by the code that made the original, as :class:`~mcdrop.MCDropout` would have
        made it from a model whose logits were divided by ``T``, with the same masks. Nothing is
        drawn again; ``n_samples``, ``targets`` and ``deterministic`` are carried over as they are
        (fit another temperature on ``pred.deterministic`` for the baseline). The argmax may change
        for some inputs (see the class docs).

        Args:
            logits: Logits, ``(n, K)``, or MC samples ``(T, n, K)``; or a prediction with kept
                samples.

        Returns:
            Probabilities of shape ``(n, K)``: a tensor if ``logits`` is one (same device and dtype),
            else a numpy array. For a prediction, a new :class:`~mcdrop.ClassificationPrediction`
            (the one given is not changed).

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Wrong shape or empty input; a prediction without kept samples.
            InvalidTypeError: A prediction that is not a classifier's.
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

            A prediction with kept samples comes back tempered, every statistic recomputed:

            >>> import mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5),
            ...                           torch.nn.Linear(16, 4)).eval()
            >>> mc = mcdrop.MCDropout(net, n_samples=20, keep_samples=True, seed=0)
            >>> pred = mc.predict(torch.randn(6, 3))
            >>> ts.temperature_ = 2.0  # as if fitted: ts.fit(held_out_pred)
            >>> hot = ts.transform(pred)
            >>> torch.allclose(hot.samples, pred.samples / 2), hot.n_samples
            (True, 20)
            >>> bool((hot.predictive_entropy > pred.predictive_entropy).all())  # flatter
            True
        """
        if isinstance(logits, Prediction):
            return self._transform_prediction(logits)
        temperature = self._temperature()
        z = _logits(logits)
        probs = torch.softmax(z / temperature, dim=-1)
        if z.ndim == 3:
            probs = probs.mean(dim=0)
        return like_input(probs, logits)

    def _transform_prediction(self, pred: Prediction) -> ClassificationPrediction:
        temperature = self._temperature()
        samples = _checked_samples(pred)
        assert isinstance(pred, ClassificationPrediction)
        dim = pred.class_dim + 1  # the class dimension of the samples (N, b, ...)
        if pred.output_type == "logits":
            scaled = samples / temperature
        else:
            logp = _sample_log_probs_of(pred)
            if samples.shape[dim] == 1:  # one probability per input: its log-odds
                scaled = ((logp[..., 1] - logp[..., 0]) / temperature).unsqueeze(dim).to(samples.dtype)
            else:
                scaled = (logp / temperature).movedim(-1, dim).to(samples.dtype)
        n, batch = int(scaled.shape[0]), int(scaled.shape[1])
        if batch == 0:
            raise InvalidInputError("the prediction holds no input (0 rows): there is nothing to temper.")
        stats = ClassificationStats("logits", pred.class_dim)
        stats.update(0, batch, scaled, batch)
        new = ClassificationPrediction.from_stats(stats, n, None, pred.class_dim)
        values = {name: getattr(new, name) for name in _CLASSIFICATION_STATISTICS}
        return replace(pred, samples=scaled, output_type="logits", **values)


# ----------------------------------------------------------------------------------------------
# regression predictions
# ----------------------------------------------------------------------------------------------
def _gaussian_of(pred: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression prediction's Gaussian: its ``mean`` and ``total_std``, the std checked positive."""
    if not isinstance(pred, RegressionPrediction):
        raise InvalidTypeError(
            f"{who} recalibrates a regression model's prediction (a RegressionPrediction) or arrays "
            f"of means and standard deviations; got a {type(pred).__name__}. For a "
            "ClassificationPrediction use TemperatureScaling."
        )
    std = pred.total_std
    zero = int((std <= 0).sum())
    if zero:
        raise InvalidInputError(
            f"the prediction's total std is 0 for {zero} of {std.numel()} outputs: every sample was "
            "the same there (e.g. the dropout-off baseline of a model without an aleatoric head, or "
            f"dropout that does not reach the output), and {who} cannot recalibrate a spread of 0."
        )
    return pred.mean, std


def _prediction_targets(
    pred: RegressionPrediction, second: ArrayLike | None, targets: ArrayLike | None, who: str
) -> ArrayLike:
    """The targets of ``fit(pred, targets)``: the second argument, ``targets=``, else ``pred.targets``."""
    if second is not None and targets is not None:
        raise InvalidInputError(
            f"{who}.fit(pred, targets): with a prediction the standard deviations are its own "
            "(pred.total_std); pass only the targets."
        )
    y = second if second is not None else targets if targets is not None else pred.targets
    if y is None:
        raise InvalidInputError(
            f"no targets to fit on: pass them, {who}().fit(pred, targets), or predict with "
            "predict_loader on batches that carry targets (they are kept in pred.targets)."
        )
    t = to_tensor(y, "targets")
    if t.numel() == pred.mean.numel() and t.shape != pred.mean.shape:
        t = t.reshape(pred.mean.shape)  # (batch,) targets of (batch, 1) means
    return t


def _fit_arguments(mean: Any, std: Any, targets: Any, who: str) -> tuple[Any, Any, Any]:
    """``(mean, std, targets)`` of ``fit(mean, std, targets)`` or of ``fit(pred[, targets])``."""
    if isinstance(mean, Prediction):
        mu, sigma = _gaussian_of(mean, who)
        return mu, sigma, _prediction_targets(mean, std, targets, who)  # type: ignore[arg-type]
    if std is None or targets is None:
        raise InvalidInputError(
            f"{who}.fit(mean, std, targets) needs all three for arrays; got "
            f"{'no std' if std is None else 'no targets'}. (A RegressionPrediction carries its std: "
            f"{who}().fit(pred, targets).)"
        )
    return mean, std, targets


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

    On a :class:`~mcdrop.RegressionPrediction` the Gaussian is the prediction's own,
    :math:`\mathcal{N}(\text{mean}, \text{total\_variance})`, so :math:`\sigma` is ``total_std``
    (epistemic and aleatoric together), and :meth:`transform` multiplies the epistemic
    ``variance`` and the ``aleatoric_variance`` each by :math:`s^2` (so ``total_std`` by
    :math:`s`), with their Monte Carlo standard errors, and moves kept samples away from their
    mean by the factor :math:`s` (``mean + s * (samples - mean)``, whose variance is then the new
    ``variance``). ``mean`` and its standard error are unchanged.

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

    def fit(
        self,
        mean: ArrayLike | RegressionPrediction,
        std: ArrayLike | None = None,
        targets: ArrayLike | None = None,
    ) -> VarianceScaling:
        """Fit the factor on held-out predictions: arrays, or a :class:`~mcdrop.RegressionPrediction`.

        ``fit(mean, std, targets)`` for arrays; ``fit(pred, targets)`` (or ``fit(pred)``, with
        ``pred.targets``) for a prediction, whose ``total_std`` is the std.

        Args:
            mean: Predictive means (any shape), or a regression prediction.
            std: Predictive standard deviations, same shape, strictly positive. With a prediction:
                the targets (the second argument), optional.
            targets: Held-out targets, same shape (with a prediction: ``pred.targets`` by default;
                ``(batch,)`` targets of ``(batch, 1)`` means are reshaped).

        Returns:
            ``self``, fitted.

        Raises:
            InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` (a prediction whose
                samples are all equal somewhere), missing targets, or all residuals zero (then no
                positive factor minimises the NLL).
            InvalidTypeError: A prediction that is not a regression model's.
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
        mean, std, targets = _fit_arguments(mean, std, targets, type(self).__name__)
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

    def transform(self, std: ArrayLike | RegressionPrediction) -> Any:
        """Return the recalibrated standard deviations ``factor_ * std``, or a recalibrated prediction.

        A :class:`~mcdrop.RegressionPrediction` gives a new prediction whose ``variance`` and
        ``aleatoric_variance`` (and their standard errors) are ``factor_ ** 2`` times the old, whose
        kept samples are ``mean + factor_ * (samples - mean)`` (their own mean), and whose mean,
        targets and other fields are unchanged.

        Args:
            std: Predictive standard deviations (any shape), strictly positive; or a prediction.

        Returns:
            Scaled standard deviations: a tensor if ``std`` is one (same device and dtype), else
            numpy. For a prediction, a new :class:`~mcdrop.RegressionPrediction` (the one given is
            not changed).

        Raises:
            NotFittedError: Called before :meth:`fit`.
            InvalidInputError: Empty input or ``std <= 0``.
            InvalidTypeError: A prediction that is not a regression model's.
            NonFiniteError: NaN or infinity in ``std``.

        Example:
            >>> import torch
            >>> from mcdrop.recalibration import VarianceScaling
            >>> vs = VarianceScaling().fit(torch.zeros(4), torch.ones(4), torch.tensor([2.0, -2.0, 2.0, -2.0]))
            >>> vs.transform(torch.tensor([0.5, 1.0]))
            tensor([1., 2.])
            >>> vs.transform([0.5, 1.0])  # not a tensor: numpy
            array([1., 2.])

            A prediction comes back with both variances scaled by ``factor_ ** 2``:

            >>> from mcdrop import RegressionPrediction
            >>> pred = RegressionPrediction(n_samples=10, mean=torch.tensor([1.0]), variance=torch.tensor([0.5]),
            ...                             aleatoric_variance=torch.tensor([0.25]))
            >>> wider = vs.transform(pred)
            >>> wider.variance, wider.aleatoric_variance, wider.total_std / pred.total_std
            (tensor([2.]), tensor([1.]), tensor([2.]))
        """
        if self.factor_ is None:
            raise _not_fitted(self)
        if isinstance(std, Prediction):
            return self._transform_prediction(std)
        parse_std(std)
        s = as_float(to_tensor(std, "std"))
        return like_input(s * self.factor_, std)

    def _transform_prediction(self, pred: Prediction) -> RegressionPrediction:
        if not isinstance(pred, RegressionPrediction):
            _gaussian_of(pred, type(self).__name__)  # raises, naming the class to use
        assert isinstance(pred, RegressionPrediction) and self.factor_ is not None
        factor, square = self.factor_, self.factor_**2
        values: dict[str, Any] = {"variance": pred.variance * square}
        for name in ("aleatoric_variance", "variance_se", "aleatoric_variance_se"):
            value = getattr(pred, name)
            if value is not None:
                values[name] = value * square
        if pred.samples is not None:
            centre = pred.samples.mean(0, keepdim=True)
            values["samples"] = centre + factor * (pred.samples - centre)
        return replace(pred, **values)


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

    Every method taking ``(mean, std, ...)`` also takes a :class:`~mcdrop.RegressionPrediction` in
    their place, whose Gaussian :math:`\mathcal{N}(\text{mean}, \text{total\_variance})` is
    then the one recalibrated: ``fit(pred[, targets])``, ``cdf(pred, values)``,
    ``quantile(pred, level)``, ``interval(pred, level)``. There is no ``transform`` of a
    prediction into another: the recalibrated distribution :math:`R(F_i(y))` is not Gaussian
    (its quantiles are those of another level, not of another standard deviation), so no mean
    and variance describe it; :meth:`transform` says so. Use the recalibrated quantiles and
    intervals, or :class:`VarianceScaling` for a prediction with a recalibrated spread.

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

    def fit(
        self,
        mean: ArrayLike | RegressionPrediction,
        std: ArrayLike | None = None,
        targets: ArrayLike | None = None,
    ) -> IsotonicRecalibration:
        """Fit the recalibration maps on held-out Gaussian predictions (arrays, or a prediction).

        ``fit(mean, std, targets)`` for arrays; ``fit(pred, targets)`` (or ``fit(pred)``, with
        ``pred.targets``) for a :class:`~mcdrop.RegressionPrediction`, whose ``total_std`` is the
        std.

        Args:
            mean: Predictive means (any shape), or a regression prediction.
            std: Predictive standard deviations, same shape, strictly positive. With a prediction:
                the targets (the second argument), optional.
            targets: Held-out targets, same shape (with a prediction: ``pred.targets`` by default).

        Returns:
            ``self``, fitted.

        Raises:
            InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or missing targets.
            InvalidTypeError: A prediction that is not a regression model's.
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

        mean, std, targets = _fit_arguments(mean, std, targets, type(self).__name__)
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

    def cdf(
        self,
        mean: ArrayLike | RegressionPrediction,
        std: ArrayLike | None = None,
        values: ArrayLike | None = None,
    ) -> Any:
        r"""Recalibrated CDF :math:`R(\Phi((v - \mu)/\sigma))` at ``values``.

        ``cdf(mean, std, values)``, or ``cdf(pred, values)`` for a
        :class:`~mcdrop.RegressionPrediction` (its ``mean`` and ``total_std``; a tensor comes back).

        Args:
            mean: Predictive means (any shape), or a regression prediction.
            std: Predictive standard deviations, same shape, strictly positive (with a prediction:
                the values).
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
            >>> from mcdrop import RegressionPrediction
            >>> pred = RegressionPrediction(n_samples=10, mean=mean, variance=std**2)
            >>> iso.cdf(pred, torch.tensor([-1.2816, 0.0, 1.2816])).round(decimals=2)
            tensor([0.1000, 0.5000, 0.9000], dtype=torch.float64)
        """
        forward, _ = self._maps()
        if isinstance(mean, Prediction):
            if values is not None:
                raise InvalidInputError("cdf(pred, values): with a prediction, pass the values second.")
            mean, std, values = (*_gaussian_of(mean, type(self).__name__), std)
        if std is None or values is None:
            raise InvalidInputError(
                "cdf(mean, std, values) needs all three for arrays (or cdf(pred, values))."
            )
        mu, sigma, v = parse_regression(mean, std, values, targets_name="values")
        assert sigma is not None and v is not None
        pit = torch.special.ndtr((v - mu) / sigma).cpu().numpy()
        out = torch.as_tensor(forward.predict(pit), dtype=F64, device=mu.device)
        return like_input(out.reshape(to_tensor(mean, "mean").shape), mean)

    def quantile(
        self,
        mean: ArrayLike | RegressionPrediction,
        std: ArrayLike | float | None = None,
        level: float | None = None,
    ) -> Any:
        r"""Recalibrated ``level``-quantile :math:`\mu + \sigma\,\Phi^{-1}(R^{-1}(q))` of every prediction.

        ``quantile(mean, std, level)``, or ``quantile(pred, level)`` for a
        :class:`~mcdrop.RegressionPrediction` (its ``mean`` and ``total_std``).

        Args:
            mean: Predictive means (any shape), or a regression prediction.
            std: Predictive standard deviations, same shape, strictly positive (with a prediction:
                the level).
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
        if isinstance(mean, Prediction):
            if level is not None:
                raise InvalidInputError("quantile(pred, level): with a prediction, pass the level second.")
            mean, std, level = (*_gaussian_of(mean, type(self).__name__), std)  # type: ignore[assignment]
        if std is None or level is None:
            raise InvalidInputError(
                "quantile(mean, std, level) needs all three for arrays (or quantile(pred, level))."
            )
        level = check_real(level, "level", low=0.0, high=1.0)
        model_level = float(self.recalibrated_level(level))
        mu, sigma, _ = parse_regression(mean, std, None)
        assert sigma is not None
        z = torch.special.ndtri(torch.tensor(model_level, dtype=F64)).to(mu.device)
        out = mu + sigma * z
        return like_input(out.reshape(to_tensor(mean, "mean").shape), mean)

    def interval(
        self,
        mean: ArrayLike | RegressionPrediction,
        std: ArrayLike | float | None = None,
        level: float = 0.95,
    ) -> tuple[Any, Any]:
        """Recalibrated central prediction interval of nominal coverage ``level``.

        The bounds are the recalibrated quantiles at ``(1 - level) / 2`` and ``(1 + level) / 2``.
        ``interval(mean, std, level)``, or ``interval(pred, level)`` for a
        :class:`~mcdrop.RegressionPrediction` (its ``mean`` and ``total_std``): the recalibrated
        counterpart of ``pred.interval(level)``.

        Args:
            mean: Predictive means (any shape), or a regression prediction.
            std: Predictive standard deviations, same shape, strictly positive (with a prediction:
                the level, optional).
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
            >>> from mcdrop import RegressionPrediction
            >>> pred = RegressionPrediction(n_samples=10, mean=torch.zeros(2), variance=torch.full((2,), 0.25))
            >>> torch.equal(iso.interval(pred, 0.9)[1], upper)
            True
        """
        if isinstance(mean, Prediction):
            if std is not None:
                level = std  # type: ignore[assignment]
            mean, std = _gaussian_of(mean, type(self).__name__)
        if std is None:
            raise InvalidInputError(
                "interval(mean, std, level) needs the std for arrays (or interval(pred, level))."
            )
        level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
        return self.quantile(mean, std, (1 - level) / 2), self.quantile(mean, std, (1 + level) / 2)

    def transform(self, pred: Any) -> NoReturn:
        """Refused: isotonic recalibration does not give another Gaussian prediction.

        The recalibrated CDF :math:`R(F_i(y))` is not Gaussian (its quantiles move by levels, not
        by a factor of the std), so no ``mean`` and ``variance`` of a
        :class:`~mcdrop.RegressionPrediction` describe it. Read it with :meth:`interval`,
        :meth:`quantile` or :meth:`cdf`, which take a prediction, or use :class:`VarianceScaling`
        for a prediction with a recalibrated spread.

        Args:
            pred: Anything: refused.

        Returns:
            Nothing: it always raises.

        Raises:
            InvalidInputError: Always, naming the alternatives.

        Example:
            >>> from mcdrop.recalibration import IsotonicRecalibration
            >>> IsotonicRecalibration().transform(None)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            mcdrop.errors.InvalidInputError: IsotonicRecalibration does not transform a prediction ...
        """
        raise InvalidInputError(
            "IsotonicRecalibration does not transform a prediction into another: the recalibrated "
            "distribution is not Gaussian, so no mean and variance describe it. Use "
            "iso.interval(pred, level), iso.quantile(pred, level) or iso.cdf(pred, values), which "
            "take the prediction, or VarianceScaling().fit(held_out).transform(pred) for a "
            "prediction with a recalibrated spread."
        )


def _levels01(level: ArrayLike | float) -> np.ndarray:
    t = to_tensor(level, "level")
    check_finite(t, "level")
    q = t.to(F64).cpu().numpy()
    if q.size and (q.min() < 0 or q.max() > 1):
        raise InvalidInputError(f"level must lie in [0, 1]; got values in [{q.min():g}, {q.max():g}].")
    return q
