r"""Private Gaussian helpers shared by the regression metrics and the streaming accumulators.

The standard normal density, distribution and quantile functions, the quantiles of central
prediction intervals, and the per-element terms of the Gaussian scoring rules (negative
log-likelihood and closed-form CRPS). The in-memory metrics of :mod:`mcdrop.metrics.regression` average
these terms and :class:`~mcdrop.metrics.streaming.StreamingRegressionMetrics` sums them, so both use
the very same floating-point expressions. Quantiles are always evaluated in float64 on the CPU.

Example:
    >>> import torch
    >>> from mcdrop.metrics._gaussian import central_quantiles, nll_terms
    >>> low, high = central_quantiles(0.95)
    >>> round(float(low), 4), round(float(high), 4)
    (-1.96, 1.96)
    >>> nll_terms(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
    ...           torch.zeros(1, dtype=torch.float64)).tolist()  # log(2 pi) / 2
    [0.9189385332046727]
"""

from __future__ import annotations

import math

import torch

from mcdrop.metrics.inputs import F64

__all__ = [
    "LOG_2PI",
    "central_quantiles",
    "crps_terms",
    "ndtri",
    "nll_terms",
    "normal_cdf",
    "normal_pdf",
]

LOG_2PI = math.log(2 * math.pi)  # the constant of the Gaussian log-density


def ndtri(p: torch.Tensor | float) -> torch.Tensor:
    r"""Standard normal quantile function :math:`\Phi^{-1}(p)`, float64, on the CPU.

    Args:
        p: Probabilities in ``[0, 1]``, a float or a tensor (any device).

    Returns:
        The quantiles, a float64 CPU tensor of ``p``'s shape (``-inf`` at 0, ``inf`` at 1).
    """
    if isinstance(p, torch.Tensor):
        p = p.cpu()
    return torch.special.ndtri(torch.as_tensor(p, dtype=F64))


def central_quantiles(levels: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Standard normal quantiles of the central interval of nominal coverage ``p``.

    .. math::

        z_{\mathrm{low}} = \Phi^{-1}\!\left(\tfrac{1-p}{2}\right), \qquad
        z_{\mathrm{high}} = \Phi^{-1}\!\left(\tfrac{1+p}{2}\right),

    computed as ``ndtri(0.5 - p / 2)`` and ``ndtri(0.5 + p / 2)`` in float64.

    Args:
        levels: Nominal coverages ``p`` in ``[0, 1]``, a float or a tensor (any device).

    Returns:
        ``(z_low, z_high)``, float64 CPU tensors of ``levels``' shape.
    """
    p = torch.as_tensor(levels.cpu() if isinstance(levels, torch.Tensor) else levels, dtype=F64)
    return ndtri(0.5 - p / 2), ndtri(0.5 + p / 2)


def normal_pdf(z: torch.Tensor) -> torch.Tensor:
    r"""Standard normal density :math:`\varphi(z) = e^{-z^2/2} / \sqrt{2\pi}`, elementwise.

    Args:
        z: Standardised values.

    Returns:
        The densities, same shape, dtype and device.
    """
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    r"""Standard normal distribution function :math:`\Phi(z)`, elementwise.

    Args:
        z: Standardised values.

    Returns:
        The probabilities, same shape, dtype and device.
    """
    return torch.special.ndtr(z)


def nll_terms(mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-element Gaussian negative log-likelihood :math:`\log\sigma + \frac12\log 2\pi + \frac12 z^2`.

    Args:
        mu: Predictive means.
        sigma: Predictive standard deviations, positive, same shape.
        y: Targets, same shape.

    Returns:
        The terms, with :math:`z = (y - \mu)/\sigma`, same shape.
    """
    z = (y - mu) / sigma
    return torch.log(sigma) + 0.5 * LOG_2PI + 0.5 * z * z


def crps_terms(mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-element closed-form CRPS of Gaussian predictions (Gneiting et al. 2005).

    .. math::

        (y - \mu)\,(2\Phi(z) - 1) + \sigma\,(2\varphi(z) - 1/\sqrt{\pi}), \qquad z = (y - \mu)/\sigma,

    i.e. :math:`\sigma\,[z(2\Phi(z) - 1) + 2\varphi(z) - 1/\sqrt\pi]` with :math:`\sigma z` written
    :math:`y - \mu`: with a tiny :math:`\sigma`, :math:`z` overflows to infinity and
    :math:`\sigma \cdot \infty` would be infinite, while the CRPS tends to :math:`|y - \mu|`.

    Args:
        mu: Predictive means.
        sigma: Predictive standard deviations, positive, same shape.
        y: Targets, same shape.

    Returns:
        The terms, same shape.
    """
    z = (y - mu) / sigma
    pdf = normal_pdf(z)
    cdf = normal_cdf(z)
    return (y - mu) * (2 * cdf - 1) + sigma * (2 * pdf - 1 / math.sqrt(math.pi))
