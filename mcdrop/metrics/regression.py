r"""Regression metrics for Gaussian predictive distributions and Monte Carlo samples.

Most functions take the predictive ``mean`` and standard deviation ``std`` of a Gaussian
:math:`\mathcal{N}(\mu_i, \sigma_i^2)` per target, and the ``targets`` :math:`y_i`. The three must have
the same shape (any shape: every element is one prediction, so multi-output ``(n, d)`` arrays are
averaged over all ``n * d`` elements). ``std`` must be strictly positive. To get ``mean`` and ``std``
from MC dropout samples use :func:`predictive_moments`; :func:`mc_log_likelihood` works on the samples
directly.

Where uncertainty-toolbox 0.1.1 (Chung et al. 2021) defines the same quantity, the definitions and
defaults coincide and the values agree to floating-point precision: :func:`gaussian_nll`
(``nll_gaussian``), :func:`crps_gaussian`, :func:`sharpness`, :func:`rmse` and :func:`mae`
(``prediction_error_metrics``), :func:`picp` (``get_proportion_in_interval``), the calibration errors
(100 expected proportions ``numpy.linspace(0, 1, 100)``) and the scores :func:`check_score` and
:func:`interval_score` (99 levels ``numpy.linspace(0.01, 0.99, 99)``). One deliberate difference:
uncertainty-toolbox's ``prop_type="quantile"`` counts :math:`(\mu_i - y_i)/\sigma_i \le \Phi^{-1}(p)`,
i.e. targets *above* the :math:`(1-p)` quantile, whereas :func:`calibration_curve` with
``kind="quantile"`` counts targets *at or below* the predicted :math:`p` quantile, the textbook
definition. The two curves are reflections of each other through (0.5, 0.5); since the levels are
symmetric, the scalar calibration errors are the same.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch

from mcdrop._checks import check_choice, check_int, check_real
from mcdrop.errors import InvalidInputError
from mcdrop.metrics._binning import count_between, curve_area
from mcdrop.metrics._gaussian import LOG_2PI, central_quantiles, crps_terms, ndtri, nll_terms
from mcdrop.metrics.inputs import (
    F64,
    ArrayLike,
    as_float,
    check_finite,
    check_nonempty,
    for_sums,
    levels_vector,
    like_input,
    parse_regression,
    parse_std,
    shape_str,
    to_tensor,
    work_device,
)

__all__ = [
    "CalibrationCurve",
    "calibration_curve",
    "check_score",
    "crps_gaussian",
    "gaussian_nll",
    "interval_score",
    "mae",
    "mc_log_likelihood",
    "mean_absolute_calibration_error",
    "miscalibration_area",
    "mpiw",
    "picp",
    "predictive_moments",
    "rmse",
    "root_mean_squared_calibration_error",
    "sharpness",
]

Kind = Literal["interval", "quantile"]
_KINDS = ("interval", "quantile")
_SCORE_LEVELS = np.linspace(0.01, 0.99, 99)  # uncertainty-toolbox's check/interval score levels


# ----------------------------------------------------------------------------------------------
# from samples
# ----------------------------------------------------------------------------------------------
def predictive_moments(samples: ArrayLike, tau: float | None = None) -> tuple[ArrayLike, ArrayLike]:
    r"""Predictive mean and standard deviation from Monte Carlo samples (Gal & Ghahramani 2016).

    .. math::

        \hat\mu = \frac{1}{T}\sum_t \hat y_t, \qquad
        \hat\sigma^2 = \frac{1}{T}\sum_t (\hat y_t - \hat\mu)^2 + \tau^{-1}

    The sample variance uses ``1/T`` (as in the paper), and the model precision :math:`\tau` adds the
    aleatoric noise :math:`\tau^{-1}` when given.

    Args:
        samples: Samples-first predictions, ``(T, ...)`` (e.g. ``(T, n)`` or ``(T, n, d)``).
        tau: Model precision :math:`\tau > 0`; ``None`` (default) adds no noise term.

    Returns:
        ``(mean, std)``, each of shape ``samples.shape[1:]``, as tensors (same device and floating
        dtype) if ``samples`` is a tensor, else as numpy arrays. Float16 and bfloat16 samples are
        reduced in float64 and the results rounded to their dtype once.

    Raises:
        InvalidInputError: Fewer than 1 sample dimension, empty input or ``tau <= 0``.
        NonFiniteError: NaN or infinity in the samples.

    Example:
        >>> import torch
        >>> from mcdrop.metrics import predictive_moments
        >>> samples = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)  # T=2, n=2
        >>> mean, std = predictive_moments(samples, tau=4.0)
        >>> mean.tolist(), std.tolist()  # std = sqrt(1 + 1/4) and sqrt(0 + 1/4)
        ([2.0, 2.0], [1.118033988749895, 0.5])
    """
    s = as_float(to_tensor(samples, "samples"))
    if s.ndim < 2:
        raise InvalidInputError(
            f"samples must be samples-first, shape (T, n, ...); got shape {shape_str(s)}. Stack the T "
            "stochastic predictions along a new first axis, e.g. torch.stack(preds)."
        )
    check_nonempty(s, "samples")
    check_finite(s, "samples")
    var, mean = torch.var_mean(for_sums(s), dim=0, correction=0)  # float16/bfloat16: in float64
    if tau is not None:
        tau = check_real(tau, "tau", low=0.0, low_open=True)
        var = var + 1.0 / tau
    std = var.sqrt()
    mean, std = (t.to(device=s.device, dtype=s.dtype) for t in (mean, std))  # rounded once, at the end
    return like_input(mean, samples), like_input(std, samples)


def mc_log_likelihood(samples: ArrayLike, targets: ArrayLike, tau: float) -> float:
    r"""Test log-likelihood of MC dropout samples (Gal & Ghahramani 2016); higher is better.

    For every target element :math:`y_i` and its ``T`` sampled predictions :math:`\hat y_{t,i}`:

    .. math::

        \log p(y_i) \approx \operatorname{logsumexp}_t\!\left(-\tfrac{\tau}{2}(y_i - \hat y_{t,i})^2\right)
        - \log T - \tfrac{1}{2}\log 2\pi + \tfrac{1}{2}\log\tau,

    the log of the mixture :math:`\frac{1}{T}\sum_t \mathcal{N}(y_i; \hat y_{t,i}, \tau^{-1})`, averaged
    over all target elements (for ``(n, d)`` targets every output is scored on its own, as in the
    paper's code). Computed in float64 with a stable logsumexp.

    Args:
        samples: Samples-first predictions, ``(T, n)`` or ``(T, n, d)`` (``(T,) + targets.shape``).
        targets: Observed targets, ``(n,)`` or ``(n, d)``.
        tau: Model precision :math:`\tau > 0` (inverse observation-noise variance).

    Returns:
        The mean log-likelihood in nats (a float; higher is better).

    Raises:
        InvalidInputError: ``samples.shape != (T,) + targets.shape``, empty input, or ``tau <= 0``.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import math
        >>> from mcdrop.metrics import mc_log_likelihood
        >>> ll = mc_log_likelihood([[0.0], [0.0]], [1.0], tau=1.0)  # two identical samples
        >>> math.isclose(ll, -0.5 - 0.5 * math.log(2 * math.pi))
        True
    """
    s = to_tensor(samples, "samples")
    y = to_tensor(targets, "targets")
    if s.ndim != y.ndim + 1 or tuple(s.shape[1:]) != tuple(y.shape):
        raise InvalidInputError(
            f"samples must be samples-first with shape (T,) + targets.shape = (T, {', '.join(map(str, y.shape))}"
            f"); got samples {shape_str(s)} and targets {shape_str(y)}. Stack the T stochastic predictions "
            "along a new first axis (torch.stack(preds)), and make the targets' shape match one prediction."
        )
    tau = check_real(tau, "tau", low=0.0, low_open=True)
    for name, t in (("samples", s), ("targets", y)):
        check_nonempty(t, name)
        check_finite(t, name)
    device = work_device(s)
    s64 = s.to(device=device, dtype=F64)
    y64 = y.to(device=device, dtype=F64)
    n_samples = s.shape[0]
    log_kernel = torch.logsumexp(-0.5 * tau * (y64.unsqueeze(0) - s64) ** 2, dim=0)
    ll = log_kernel - math.log(n_samples) - 0.5 * LOG_2PI + 0.5 * math.log(tau)
    return float(ll.mean())


# ----------------------------------------------------------------------------------------------
# accuracy and sharpness
# ----------------------------------------------------------------------------------------------
def rmse(mean: ArrayLike, targets: ArrayLike) -> float:
    r"""Root mean squared error of the predictive mean, :math:`\sqrt{\frac{1}{n}\sum_i (\mu_i - y_i)^2}`.

    Args:
        mean: Predictive means (any shape).
        targets: Targets, same shape as ``mean``.

    Returns:
        The RMSE, a non-negative float.

    Raises:
        InvalidInputError: Mismatched shapes or empty input.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import rmse
        >>> rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
        1.1547005383792515
    """
    mu, _, y = parse_regression(mean, None, targets)
    assert y is not None
    return float(torch.sqrt(((mu - y) ** 2).mean()))


def mae(mean: ArrayLike, targets: ArrayLike) -> float:
    r"""Mean absolute error of the predictive mean, :math:`\frac{1}{n}\sum_i |\mu_i - y_i|`.

    Args:
        mean: Predictive means (any shape).
        targets: Targets, same shape as ``mean``.

    Returns:
        The MAE, a non-negative float.

    Raises:
        InvalidInputError: Mismatched shapes or empty input.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import mae
        >>> mae([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
        0.6666666666666666
    """
    mu, _, y = parse_regression(mean, None, targets)
    assert y is not None
    return float((mu - y).abs().mean())


def sharpness(std: ArrayLike) -> float:
    r"""Sharpness: the root mean predictive variance, :math:`\sqrt{\frac{1}{n}\sum_i \sigma_i^2}`.

    As in uncertainty-toolbox (Tran et al. 2020); smaller is sharper. (Some papers report the mean
    standard deviation instead, which is never larger.)

    Args:
        std: Predictive standard deviations (any shape), strictly positive.

    Returns:
        The sharpness, a positive float in the units of the targets.

    Raises:
        InvalidInputError: Empty input or ``std <= 0``.
        NonFiniteError: NaN or infinity in ``std``.

    Example:
        >>> from mcdrop.metrics import sharpness
        >>> sharpness([1.0, 7.0])
        5.0
    """
    sigma = parse_std(std)
    return float(torch.sqrt((sigma**2).mean()))


# ----------------------------------------------------------------------------------------------
# proper scoring rules
# ----------------------------------------------------------------------------------------------
def gaussian_nll(mean: ArrayLike, std: ArrayLike, targets: ArrayLike) -> float:
    r"""Gaussian negative log-likelihood (natural log), averaged over targets; lower is better.

    .. math::

        \mathrm{NLL} = \frac{1}{n}\sum_i \left[\tfrac{1}{2}\log(2\pi\sigma_i^2)
        + \frac{(y_i - \mu_i)^2}{2\sigma_i^2}\right]

    The full NLL, constant included, with no clamp on ``std`` (it must be positive); it equals
    uncertainty-toolbox's ``nll_gaussian`` and ``torch.nn.GaussianNLLLoss(full=True)`` with
    ``var = std**2`` (which clamps the variance at ``eps=1e-6``).

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.

    Returns:
        The mean NLL in nats (a float; can be negative for sharp, accurate predictions).

    Raises:
        InvalidInputError: Mismatched shapes, empty input or ``std <= 0``.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import math
        >>> from mcdrop.metrics import gaussian_nll
        >>> math.isclose(gaussian_nll([0.0], [1.0], [1.0]), 0.5 * math.log(2 * math.pi) + 0.5)
        True
    """
    mu, sigma, y = parse_regression(mean, std, targets)
    assert sigma is not None and y is not None
    return float(nll_terms(mu, sigma, y).mean())


def crps_gaussian(mean: ArrayLike, std: ArrayLike, targets: ArrayLike) -> float:
    r"""Continuous ranked probability score of Gaussian predictions, closed form; lower is better.

    With :math:`z_i = (y_i - \mu_i)/\sigma_i`, and :math:`\Phi`, :math:`\varphi` the standard normal CDF
    and density (Gneiting et al. 2005):

    .. math::

        \mathrm{CRPS} = \frac{1}{n}\sum_i \sigma_i \left[ z_i\,(2\Phi(z_i) - 1) + 2\varphi(z_i)
        - \frac{1}{\sqrt{\pi}} \right]

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.

    Returns:
        The mean CRPS, a non-negative float in the units of the targets.

    Raises:
        InvalidInputError: Mismatched shapes, empty input or ``std <= 0``.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import math
        >>> from mcdrop.metrics import crps_gaussian
        >>> math.isclose(crps_gaussian([0.0], [1.0], [0.0]), 2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi))
        True
    """
    mu, sigma, y = parse_regression(mean, std, targets)
    assert sigma is not None and y is not None
    return float(crps_terms(mu, sigma, y).mean())


def check_score(
    mean: ArrayLike, std: ArrayLike, targets: ArrayLike, levels: ArrayLike | float | None = None
) -> float:
    r"""Check (pinball) score of the Gaussian quantiles, averaged over levels; lower is better.

    With the predicted :math:`q`-quantile :math:`\hat y_i(q) = \mu_i + \sigma_i \Phi^{-1}(q)`:

    .. math::

        \mathrm{CS} = \frac{1}{|Q|}\sum_{q \in Q} \frac{1}{n}\sum_i \rho_q\big(y_i - \hat y_i(q)\big),
        \qquad \rho_q(u) = u\,(q - [u < 0])

    Default levels :math:`Q` = ``numpy.linspace(0.01, 0.99, 99)``, as uncertainty-toolbox's
    ``check_score``.

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.
        levels: Quantile levels in ``(0, 1)``, a float or a 1-D sequence; ``None`` (default) uses the
            99 levels above.

    Returns:
        The mean check score, a non-negative float.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or levels outside ``(0, 1)``.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import check_score
        >>> check_score([0.0, 0.0], [1.0, 1.0], [1.0, -1.0], levels=0.5)  # half the mean |error|
        0.5
    """
    mu, sigma, y = parse_regression(mean, std, targets)
    assert sigma is not None and y is not None
    qs = levels_vector(levels, "levels", default=_SCORE_LEVELS, device=mu.device)
    total = torch.zeros((), dtype=F64, device=mu.device)
    for q, z in zip(qs, ndtri(qs).to(mu.device), strict=True):
        u = y - (mu + sigma * z)
        total += (u * (q - (u < 0).to(F64))).mean()
    return float(total / qs.shape[0])


def interval_score(
    mean: ArrayLike, std: ArrayLike, targets: ArrayLike, levels: ArrayLike | float | None = None
) -> float:
    r"""Interval score of central Gaussian prediction intervals, averaged over levels; lower is better.

    For nominal coverage :math:`p` (:math:`\alpha = 1 - p`) and the central interval
    :math:`[l_i, u_i] = \mu_i + \sigma_i\,[\Phi^{-1}(\alpha/2), \Phi^{-1}(1 - \alpha/2)]`
    (Gneiting & Raftery 2007):

    .. math::

        \mathrm{IS}_p = \frac{1}{n}\sum_i (u_i - l_i) + \frac{2}{\alpha}(l_i - y_i)[y_i < l_i]
        + \frac{2}{\alpha}(y_i - u_i)[y_i > u_i],

    averaged over the levels. Default levels ``numpy.linspace(0.01, 0.99, 99)``, as
    uncertainty-toolbox's ``interval_score``.

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.
        levels: Nominal coverages in ``(0, 1)``, a float or a 1-D sequence; ``None`` (default) uses
            the 99 levels above.

    Returns:
        The mean interval score, a positive float.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or levels outside ``(0, 1)``.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import interval_score
        >>> round(interval_score([0.0], [1.0], [0.0], levels=0.95), 4)  # the width 2 * 1.96
        3.9199
    """
    mu, sigma, y = parse_regression(mean, std, targets)
    assert sigma is not None and y is not None
    ps = levels_vector(levels, "levels", default=_SCORE_LEVELS, device=mu.device)
    lows, highs = (z.to(mu.device) for z in central_quantiles(ps))
    total = torch.zeros((), dtype=F64, device=mu.device)
    for p, z_lo, z_hi in zip(ps, lows, highs, strict=True):
        lower, upper = mu + sigma * z_lo, mu + sigma * z_hi
        penalty = 2.0 / (1 - p)
        below = (lower - y).clamp(min=0)
        above = (y - upper).clamp(min=0)
        total += ((upper - lower) + penalty * below + penalty * above).mean()
    return float(total / ps.shape[0])


# ----------------------------------------------------------------------------------------------
# prediction intervals
# ----------------------------------------------------------------------------------------------
def _check_level(level: float) -> float:
    return check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)


def picp(mean: ArrayLike, std: ArrayLike, targets: ArrayLike, level: float = 0.95) -> float:
    r"""Prediction interval coverage probability of the central Gaussian interval.

    .. math::

        \mathrm{PICP} = \frac{1}{n}\sum_i \left[\Phi^{-1}\!\left(\tfrac{1-p}{2}\right) \le
        \frac{\mu_i - y_i}{\sigma_i} \le \Phi^{-1}\!\left(\tfrac{1+p}{2}\right)\right]

    i.e. the fraction of targets inside the closed interval :math:`\mu_i \pm z\,\sigma_i`,
    :math:`z = \Phi^{-1}((1+p)/2)` (1.96 for ``level=0.95``). A calibrated model has PICP close to ``level``.
    Same as uncertainty-toolbox's ``get_proportion_in_interval``.

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.
        level: Nominal coverage :math:`p` in ``(0, 1)`` (default 0.95).

    Returns:
        The observed coverage, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or ``level`` outside ``(0, 1)``.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import picp
        >>> picp([0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, -1.5, 1.9, 2.5])
        0.75
    """
    level = _check_level(level)
    mu, sigma, y = parse_regression(mean, std, targets)
    assert sigma is not None and y is not None
    z_lo, z_hi = (float(z) for z in central_quantiles(level))
    r = (mu - y) / sigma
    return float(((r >= z_lo) & (r <= z_hi)).to(F64).mean())


def mpiw(std: ArrayLike, level: float = 0.95) -> float:
    r"""Mean prediction interval width of the central Gaussian interval.

    .. math::

        \mathrm{MPIW} = \frac{1}{n}\sum_i 2\,\Phi^{-1}\!\left(\tfrac{1+p}{2}\right)\sigma_i

    Read it together with :func:`picp`: narrow intervals are only good if they still cover.

    Args:
        std: Predictive standard deviations (any shape), strictly positive.
        level: Nominal coverage :math:`p` in ``(0, 1)`` (default 0.95).

    Returns:
        The mean width, a positive float in the units of the targets.

    Raises:
        InvalidInputError: Empty input, ``std <= 0`` or ``level`` outside ``(0, 1)``.
        NonFiniteError: NaN or infinity in ``std``.

    Example:
        >>> from mcdrop.metrics import mpiw
        >>> round(mpiw([1.0, 2.0], level=0.95), 4)  # 2 * 1.96 * 1.5
        5.8799
    """
    level = _check_level(level)
    sigma = parse_std(std)
    return float(2 * central_quantiles(level)[1] * sigma.mean())


# ----------------------------------------------------------------------------------------------
# average calibration
# ----------------------------------------------------------------------------------------------
class CalibrationCurve(NamedTuple):
    """Expected vs observed proportions of a regression calibration curve.

    Attributes:
        expected: The nominal levels :math:`p`, ``numpy.linspace(0, 1, n_levels)``.
        observed: The observed proportion at each level (see :func:`calibration_curve`).

    Example:
        >>> from mcdrop.metrics import calibration_curve
        >>> expected, observed = calibration_curve([0.0, 0.0], [1.0, 1.0], [0.1, -3.0], n_levels=3)
        >>> expected.tolist(), observed.tolist()
        ([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    """

    expected: np.ndarray
    observed: np.ndarray


def _observed(
    mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, expected: torch.Tensor, kind: str
) -> torch.Tensor:
    """Observed proportions at the given expected levels, by binary search in sorted residuals."""
    n = mu.shape[0]
    expected = expected.to(mu.device)
    if kind == "interval":
        r = torch.sort((mu - y) / sigma).values
        lo, hi = (z.to(mu.device) for z in central_quantiles(expected))
        return count_between(r, lo, hi).to(F64) / n
    z = torch.sort((y - mu) / sigma).values
    bound = ndtri(expected).to(mu.device)
    return torch.searchsorted(z, bound, right=True).to(F64) / n


def _curve(
    mean: ArrayLike, std: ArrayLike, targets: ArrayLike, kind: str, n_levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_choice(kind, _KINDS, "kind")
    n_levels = check_int(n_levels, "n_levels", minimum=2)
    mu, sigma, y = parse_regression(mean, std, targets)
    assert sigma is not None and y is not None
    expected = torch.as_tensor(np.linspace(0.0, 1.0, n_levels), dtype=F64)
    return expected, _observed(mu, sigma, y, expected, kind).cpu()


def calibration_curve(
    mean: ArrayLike, std: ArrayLike, targets: ArrayLike, kind: Kind = "interval", n_levels: int = 100
) -> CalibrationCurve:
    r"""Average-calibration curve of Gaussian predictions: observed vs expected proportions.

    At each expected proportion :math:`p` in ``numpy.linspace(0, 1, n_levels)``:

    * ``kind="interval"`` (default): the fraction of targets inside the central interval of nominal
      coverage :math:`p`, :math:`\Phi^{-1}(\frac{1-p}{2}) \le (\mu_i - y_i)/\sigma_i \le \Phi^{-1}(\frac{1+p}{2})`
      (closed), as uncertainty-toolbox.
    * ``kind="quantile"``: the fraction of targets at or below the predicted :math:`p`-quantile,
      :math:`(y_i - \mu_i)/\sigma_i \le \Phi^{-1}(p)` (Kuleshov et al. 2018). uncertainty-toolbox uses
      the mirrored residual; see the module docstring.

    A calibrated model's curve follows the diagonal. Computed in :math:`O((n + L)\log n)` time and
    :math:`O(n + L)` memory by binary search in the sorted standardised residuals.

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.
        kind: ``"interval"`` (default) or ``"quantile"``.
        n_levels: Number :math:`L` of expected proportions, at least 2 (default 100, as
            uncertainty-toolbox's ``num_bins``).

    Returns:
        A :class:`CalibrationCurve` ``(expected, observed)`` of numpy arrays of length ``n_levels``.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0``, or invalid options.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import calibration_curve
        >>> curve = calibration_curve([0.0, 0.0, 0.0, 0.0], [1.0] * 4, [-2.0, -0.1, 0.3, 1.2], n_levels=3)
        >>> curve.expected.tolist(), curve.observed.tolist()
        ([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    """
    expected, observed = _curve(mean, std, targets, kind, n_levels)
    return CalibrationCurve(expected=expected.numpy(), observed=observed.numpy())


def mean_absolute_calibration_error(
    mean: ArrayLike, std: ArrayLike, targets: ArrayLike, kind: Kind = "interval", n_levels: int = 100
) -> float:
    r"""Mean absolute calibration error of Gaussian predictions (uncertainty-toolbox's ``ma_cal``).

    .. math::

        \mathrm{MACE} = \frac{1}{L}\sum_{j=1}^{L} |\hat p_{\mathrm{obs}}(p_j) - p_j|

    over the :math:`L` levels of :func:`calibration_curve` (default 100, ``linspace(0, 1, 100)``).

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.
        kind: ``"interval"`` (default) or ``"quantile"``; see :func:`calibration_curve`.
        n_levels: Number of expected proportions (default 100).

    Returns:
        The MACE, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0``, or invalid options.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import mean_absolute_calibration_error
        >>> mean_absolute_calibration_error([0.0] * 4, [1.0] * 4, [-2.0, -0.1, 0.3, 1.2], n_levels=3)
        0.0
    """
    expected, observed = _curve(mean, std, targets, kind, n_levels)
    return float((observed - expected).abs().mean())


def root_mean_squared_calibration_error(
    mean: ArrayLike, std: ArrayLike, targets: ArrayLike, kind: Kind = "interval", n_levels: int = 100
) -> float:
    r"""Root mean squared calibration error of Gaussian predictions (uncertainty-toolbox's ``rms_cal``).

    .. math::

        \mathrm{RMSCE} = \sqrt{\frac{1}{L}\sum_{j=1}^{L} (\hat p_{\mathrm{obs}}(p_j) - p_j)^2}

    over the :math:`L` levels of :func:`calibration_curve` (default 100, ``linspace(0, 1, 100)``).

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.
        kind: ``"interval"`` (default) or ``"quantile"``; see :func:`calibration_curve`.
        n_levels: Number of expected proportions (default 100).

    Returns:
        The RMSCE, a float in ``[0, 1]``.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0``, or invalid options.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import root_mean_squared_calibration_error
        >>> rmsce = root_mean_squared_calibration_error([0.0], [1.0], [5.0], n_levels=3)
        >>> round(rmsce, 4)  # observed (0, 0, 1) vs expected (0, 0.5, 1)
        0.2887
    """
    expected, observed = _curve(mean, std, targets, kind, n_levels)
    return float(torch.sqrt(((observed - expected) ** 2).mean()))


def miscalibration_area(
    mean: ArrayLike, std: ArrayLike, targets: ArrayLike, kind: Kind = "interval", n_levels: int = 100
) -> float:
    r"""Area between the calibration curve and the diagonal (uncertainty-toolbox's ``miscal_area``).

    The curve of :func:`calibration_curve` is joined linearly between levels and the area between it
    and the diagonal is integrated exactly: on a segment of width :math:`w` with gaps
    :math:`d_l, d_r` (observed minus expected) at its ends, the area is :math:`w\,|d_l + d_r|/2` when
    the gaps have the same sign and :math:`w\,(d_l^2 + d_r^2) / (2(|d_l| + |d_r|))` when the curve
    crosses the diagonal. As ``n_levels`` grows it tends to the MACE.

    Args:
        mean: Predictive means (any shape).
        std: Predictive standard deviations, same shape, strictly positive.
        targets: Targets, same shape.
        kind: ``"interval"`` (default) or ``"quantile"``; see :func:`calibration_curve`.
        n_levels: Number of expected proportions (default 100).

    Returns:
        The area, a float in ``[0, 0.5]``.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0``, or invalid options.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> from mcdrop.metrics import miscalibration_area
        >>> round(miscalibration_area([0.0], [1.0], [5.0], n_levels=3), 4)  # triangle, 0.5 * 1 * 0.5
        0.25
    """
    expected, observed = _curve(mean, std, targets, kind, n_levels)
    return curve_area(expected, observed)
