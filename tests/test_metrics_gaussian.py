"""The shared Gaussian helpers (``mcdrop.metrics._gaussian``) against scipy and torch references."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats

from mcdrop import metrics as M
from mcdrop.metrics import _gaussian as G
from mcdrop.metrics.streaming import StreamingRegressionMetrics

F64 = torch.float64


def test_standard_normal_functions_match_scipy():
    z = torch.linspace(-8, 8, 161, dtype=F64)
    assert torch.allclose(G.normal_pdf(z), torch.from_numpy(stats.norm.pdf(z.numpy())), rtol=1e-13, atol=0)
    assert torch.allclose(
        G.normal_cdf(z), torch.from_numpy(stats.norm.cdf(z.numpy())), rtol=1e-12, atol=1e-15
    )
    p = torch.linspace(0.001, 0.999, 99, dtype=F64)
    assert torch.allclose(G.ndtri(p), torch.from_numpy(stats.norm.ppf(p.numpy())), rtol=1e-12, atol=1e-14)
    assert G.ndtri(0.5).item() == 0.0 and G.ndtri(0.0).item() == -math.inf


def test_ndtri_returns_float64_on_the_cpu_for_any_input():
    q = G.ndtri(torch.tensor([0.25, 0.75], dtype=torch.float32))
    assert q.dtype == F64 and q.device.type == "cpu"
    assert G.ndtri(0.975).shape == ()


def test_central_quantiles_are_symmetric_and_give_the_nominal_coverage():
    levels = torch.tensor([0.5, 0.9, 0.95, 0.99], dtype=F64)
    low, high = G.central_quantiles(levels)
    assert torch.allclose(low, -high, rtol=1e-15, atol=0)
    assert torch.allclose(G.normal_cdf(high) - G.normal_cdf(low), levels, rtol=1e-12)
    assert float(G.central_quantiles(0.95)[1]) == pytest.approx(1.959963984540054, rel=1e-14)
    # a scalar and a vector give the same bits
    assert [float(G.central_quantiles(float(p))[1]) for p in levels] == high.tolist()


def test_nll_terms_are_the_full_gaussian_nll():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(50, generator=g, dtype=F64), torch.rand(50, generator=g, dtype=F64) + 0.1
    y = torch.randn(50, generator=g, dtype=F64)
    reference = torch.nn.GaussianNLLLoss(full=True, eps=0.0, reduction="none")(mu, y, sigma**2)
    assert torch.allclose(G.nll_terms(mu, sigma, y), reference, rtol=1e-12)
    assert torch.allclose(
        G.nll_terms(mu, sigma, y), -torch.distributions.Normal(mu, sigma).log_prob(y), rtol=1e-12
    )


def test_crps_terms_match_numerical_integration_and_stay_finite_for_a_tiny_sigma():
    mu, sigma, y = 0.3, 0.7, 1.1

    def integrand(x: float, above: bool) -> float:
        return (stats.norm.cdf((x - mu) / sigma) - above) ** 2

    numeric = integrate.quad(integrand, -math.inf, y, args=(False,), epsabs=1e-13)[0]
    numeric += integrate.quad(integrand, y, math.inf, args=(True,), epsabs=1e-13)[0]
    value = G.crps_terms(
        torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64), torch.tensor(y, dtype=F64)
    )
    assert float(value) == pytest.approx(numeric, rel=1e-10)
    tiny = G.crps_terms(
        torch.zeros(1, dtype=F64), torch.full((1,), 1e-310, dtype=F64), torch.ones(1, dtype=F64)
    )
    assert tiny.tolist() == [1.0]


def test_regression_metrics_and_the_accumulator_are_the_means_of_the_same_terms():
    g = torch.Generator().manual_seed(3)
    mu, sigma = torch.randn(200, generator=g, dtype=F64), torch.rand(200, generator=g, dtype=F64) + 0.2
    y = mu + sigma * torch.randn(200, generator=g, dtype=F64)
    assert M.gaussian_nll(mu, sigma, y) == float(G.nll_terms(mu, sigma, y).mean())
    assert M.crps_gaussian(mu, sigma, y) == float(G.crps_terms(mu, sigma, y).mean())
    acc = StreamingRegressionMetrics(levels=[0.9])
    acc.update(mu, sigma, y)
    s = acc.summary()
    assert s["Gaussian NLL"] == float(G.nll_terms(mu, sigma, y).sum()) / 200
    assert s["MPIW (90%)"] == float(2 * G.central_quantiles(0.9)[1] * (sigma.sum() / 200))
    assert s["PICP (90%)"] == M.picp(mu, sigma, y, level=0.9)
