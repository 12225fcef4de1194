"""Tests for mcdrop.nn: our own training-time dropout (functional ops and layers).

Statistical tolerances
----------------------
Every random test uses a fixed seed, so it is deterministic; the tolerances are nevertheless chosen
so that the test would pass for (almost) any seed, i.e. they are honest rather than tuned:

* Drop rate: the number of dropped units among ``n`` independent ones is Binomial(n, p), so the
  empirical fraction has standard error ``sqrt(p * (1 - p) / n)``. We allow 5 standard errors
  (two-sided normal tail ~6e-7 per check).
* Expectation: one output element is ``x * B / (1 - p)`` with ``B ~ Bernoulli(1 - p)``, so its
  variance is ``x**2 * p / (1 - p)``; the mean of ``K`` independent draws has standard error
  ``|x| * sqrt(p / ((1 - p) * K))``. We allow 5 standard errors per element (a few hundred
  elements in all, so the family-wise false-alarm rate stays below ~1e-4).
"""

from __future__ import annotations

import doctest
import importlib
import io
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import mlp

import mcdrop.nn as mnn
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropError
from mcdrop.nn import Dropout, Dropout2d
from mcdrop.nn import functional as F

N_SIGMA = 5.0
RATES = [0.1, 0.5, 0.9]
CHANNEL_SHAPES = {"1d": (100, 200, 3), "2d": (100, 200, 2, 2), "3d": (100, 200, 2, 2, 2)}
BAD_RATES = [-0.1, 1.5, float("nan"), "a"]

jit_warnings = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- drop rates


@pytest.mark.parametrize("p", RATES)
def test_elementwise_drop_rate_is_p(p: float) -> None:
    n = 1_000_000
    out = F.dropout(torch.ones(1000, 1000), p, generator=gen(1))
    dropped = out == 0
    kept_values = out[~dropped]
    assert torch.all(kept_values == torch.tensor(1 / (1 - p), dtype=out.dtype))
    se = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.double().mean().item() - p) < N_SIGMA * se


@pytest.mark.parametrize("p", RATES)
def test_elementwise_module_drop_rate_is_p(p: float) -> None:
    n = 200_000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        out = Dropout(p)(torch.ones(n))
    se = math.sqrt(p * (1 - p) / n)
    assert abs((out == 0).double().mean().item() - p) < N_SIGMA * se


@pytest.mark.parametrize("kind", sorted(CHANNEL_SHAPES))
@pytest.mark.parametrize("p", RATES)
@pytest.mark.parametrize("use_module", [False, True])
def test_channel_drop_rate_is_p_and_all_or_nothing(p: float, kind: str, use_module: bool) -> None:
    shape = CHANNEL_SHAPES[kind]
    x = torch.ones(shape)
    if use_module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            out = Dropout2d(p)(x)
    else:
        out = F.dropout2d(x, p, generator=gen(3))
    channels = out.flatten(2)  # (N, C, prod(spatial))
    all_zero = (channels == 0).all(-1)
    all_kept = (channels == torch.tensor(1 / (1 - p), dtype=out.dtype)).all(-1)
    assert torch.all(all_zero | all_kept), "a channel was partly dropped"
    n_channels = shape[0] * shape[1]
    se = math.sqrt(p * (1 - p) / n_channels)
    assert abs(all_zero.double().mean().item() - p) < N_SIGMA * se


# --------------------------------------------------------------------------- expectation


def _expectation_tolerance(x: torch.Tensor, p: float, k: int) -> torch.Tensor:
    return N_SIGMA * x.abs() * math.sqrt(p / ((1 - p) * k))


@pytest.mark.parametrize("p", RATES)
def test_elementwise_expectation_equals_input(p: float) -> None:
    k = 20_000  # independent draws, taken in one call along a broadcast batch dim
    x = torch.randn(64, generator=gen(4), dtype=torch.float64)
    out = F.dropout(x.expand(k, -1), p, generator=gen(5))
    err = (out.mean(0) - x).abs()
    assert torch.all(err <= _expectation_tolerance(x, p, k))


@pytest.mark.parametrize("p", RATES)
def test_channel_expectation_equals_input(p: float) -> None:
    k = 20_000
    x = torch.randn(16, 5, generator=gen(6), dtype=torch.float64)  # (C, L)
    out = F.dropout2d(x.expand(k, -1, -1), p, generator=gen(7))
    err = (out.mean(0) - x).abs()
    assert torch.all(err <= _expectation_tolerance(x, p, k))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fn,shape", [(F.dropout, (4, 5)), (F.dropout2d, (3, 4, 2, 2))])
def test_gradcheck_with_fixed_mask(fn, shape) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=gen(8)).requires_grad_()

    def f(inp: torch.Tensor) -> torch.Tensor:
        return fn(inp, 0.3, generator=gen(9))  # re-seeded each call: same mask every time

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("p", RATES)
@pytest.mark.parametrize("fn,shape", [(F.dropout, (50, 40)), (F.dropout2d, (10, 20, 3, 3))])
def test_gradient_is_mask_times_scale(p: float, fn, shape) -> None:
    x = (torch.rand(*shape, generator=gen(10)) + 0.5).requires_grad_()  # nonzero
    out = fn(x, p, generator=gen(11))
    out.sum().backward()
    expected = (out != 0).to(x.dtype) * torch.tensor(1 / (1 - p), dtype=x.dtype)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [Dropout, Dropout2d])
def test_module_gradient_is_mask_times_scale(layer) -> None:
    x = (torch.rand(8, 6, 5, generator=gen(12)) + 0.5).requires_grad_()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(13)
        out = layer(0.4)(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.6)


# --------------------------------------------------------------------------- identities and limits


@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
def test_functional_eval_and_p0_are_identity(fn) -> None:
    x = torch.randn(2, 3, 4)
    assert fn(x, 0.5, training=False) is x
    assert fn(x, 0.0) is x
    assert fn(x, 0, generator=gen()) is x


@pytest.mark.parametrize("layer", [Dropout, Dropout2d])
def test_module_eval_and_p0_are_identity(layer) -> None:
    x = torch.randn(2, 3, 4)
    assert layer(0.7).eval()(x) is x
    assert layer(0.0).train()(x) is x
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), layer(0.9)).eval()
    torch.testing.assert_close(net(x), net[0](x))


P1_CALLS = {
    "dropout": lambda x: F.dropout(x, 1.0, generator=gen()),
    "dropout2d": lambda x: F.dropout2d(x, 1.0, generator=gen()),
    "Dropout": lambda x: Dropout(1.0)(x),
    "Dropout2d": lambda x: Dropout2d(1.0)(x),
}


@pytest.mark.parametrize("name", sorted(P1_CALLS))
def test_p1_gives_zeros_without_nan_and_zero_grad(name: str) -> None:
    x = (torch.randn(3, 4, 5) * 1e30).requires_grad_()
    out = P1_CALLS[name](x)
    assert not torch.isnan(out).any()
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(x.grad == 0)


# --------------------------------------------------------------------------- validation


def _bad_rate_error(bad) -> type[McdropError]:
    return InvalidTypeError if isinstance(bad, str) else InvalidInputError


@pytest.mark.parametrize("bad", BAD_RATES)
@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
def test_functional_rejects_bad_rate(fn, bad) -> None:
    with pytest.raises(_bad_rate_error(bad), match=re.escape(repr(bad))):
        fn(torch.ones(2, 3, 4), bad)
    with pytest.raises(McdropError):  # checked in eval mode too
        fn(torch.ones(2, 3, 4), bad, training=False)


@pytest.mark.parametrize("bad", BAD_RATES)
@pytest.mark.parametrize("layer", [Dropout, Dropout2d])
def test_module_rejects_bad_rate_at_construction_and_assignment(layer, bad) -> None:
    with pytest.raises(_bad_rate_error(bad), match=re.escape(repr(bad))):
        layer(bad)
    module = layer(0.5)
    with pytest.raises(_bad_rate_error(bad), match=re.escape(repr(bad))):
        module.p = bad
    assert module.p == 0.5


def test_errors_are_also_builtin_errors() -> None:
    with pytest.raises(ValueError):
        Dropout(1.5)
    with pytest.raises(TypeError):
        Dropout("a")


@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
def test_rejects_non_float_and_non_tensor_input(fn) -> None:
    with pytest.raises(InvalidTypeError, match="floating-point"):
        fn(torch.ones(2, 3, 4, dtype=torch.int64), 0.5)
    with pytest.raises(InvalidTypeError, match="floating-point"):
        fn(torch.ones(2, 3, 4, dtype=torch.bool), 0.5, training=False)
    with pytest.raises(InvalidTypeError, match="list"):
        fn([[[1.0]]], 0.5)
    with pytest.raises(InvalidTypeError, match="generator"):
        fn(torch.ones(2, 3, 4), 0.5, generator=0)


@pytest.mark.parametrize("shape", [(), (5,), (4, 5)])
def test_dropout2d_requires_ndim_at_least_3(shape) -> None:
    x = torch.ones(shape)
    for call in (lambda: F.dropout2d(x), lambda: F.dropout2d(x, training=False), lambda: Dropout2d()(x)):
        with pytest.raises(InvalidInputError, match=r"ndim >= 3.*" + re.escape(str(list(shape)))):
            call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_preserved(dtype) -> None:
    x = torch.ones(4, 8, 3, dtype=dtype)
    for out in (F.dropout(x, 0.5, generator=gen()), F.dropout2d(x, 0.5, generator=gen())):
        assert out.dtype == dtype
        assert set(out.unique().tolist()) <= {0.0, 2.0}


def test_does_not_use_torch_dropout(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("torch's dropout was called")

    for owner, name in [
        (torch, "dropout"),
        (torch, "dropout_"),
        (torch, "feature_dropout"),
        (torch.nn.functional, "dropout"),
        (torch.nn.functional, "dropout1d"),
        (torch.nn.functional, "dropout2d"),
        (torch.nn.functional, "dropout3d"),
    ]:
        monkeypatch.setattr(owner, name, boom)
    x = torch.ones(2, 3, 4)
    F.dropout(x, 0.5)
    F.dropout2d(x, 0.5)
    Dropout(0.5)(x)
    Dropout2d(0.5)(x)


# --------------------------------------------------------------------------- in place


@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
def test_functional_inplace(fn) -> None:
    x = torch.ones(4, 5, 6)
    out = fn(x, 0.5, generator=gen(14), inplace=True)
    assert out is x
    assert torch.equal(x, fn(torch.ones(4, 5, 6), 0.5, generator=gen(14)))
    y = torch.ones(4, 5, 6)
    fn(y, 0.5, generator=gen(14))
    assert torch.all(y == 1), "inplace=False must not touch the input"


@pytest.mark.parametrize("layer", [Dropout, Dropout2d])
def test_module_inplace_like_torch(layer) -> None:
    x = torch.ones(4, 5, 6)
    out = layer(0.5, inplace=True)(x)
    assert out is x
    assert torch.any(x == 0) and torch.any(x == 2)


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
def test_generator_reproducible_and_global_rng_untouched(fn) -> None:
    x = torch.randn(8, 16, 4, generator=gen(15))
    state = torch.get_rng_state()
    a = fn(x, 0.5, generator=gen(16))
    b = fn(x, 0.5, generator=gen(16))
    c = fn(x, 0.5, generator=gen(17))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("layer", [Dropout, Dropout2d])
def test_module_reproducible_under_manual_seed(layer) -> None:
    x = torch.randn(8, 16, 4, generator=gen(18))
    outs = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(2):
            torch.manual_seed(19)
            outs.append(layer(0.5)(x))
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- torch compatibility


def test_state_dict_interchange_with_torch() -> None:
    assert Dropout().state_dict() == {} and Dropout2d().state_dict() == {}
    torch.manual_seed(20)
    shape = {"hidden": 8, "act": torch.nn.ReLU, "seed": None, "eval_mode": False}
    theirs, ours = mlp(4, 2, p=torch.nn.Dropout(0.3), **shape), mlp(4, 2, p=Dropout(0.3), **shape)
    assert ours.load_state_dict(theirs.state_dict(), strict=True).missing_keys == []
    x = torch.randn(5, 4)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    back = mlp(4, 2, p=torch.nn.Dropout(0.3), **shape)
    back.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(back.eval()(x), ours(x))
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("ours,theirs", [(Dropout, torch.nn.Dropout), (Dropout2d, torch.nn.Dropout2d)])
def test_repr_matches_torch(ours, theirs, p, inplace) -> None:
    assert ours(p, inplace).extra_repr() == theirs(p, inplace).extra_repr()
    assert repr(ours(p=p, inplace=inplace)) == repr(theirs(p=p, inplace=inplace))
    assert ours().extra_repr() == theirs().extra_repr() == "p=0.5, inplace=False"


@jit_warnings
@pytest.mark.parametrize("layer", [Dropout, Dropout2d])
def test_torchscript_standalone_matches_eager(layer) -> None:
    eager = layer(0.5)
    scripted = torch.jit.script(eager)
    x = torch.randn(6, 8, 5, generator=gen(21))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(22)
        expected = eager(x)
        torch.manual_seed(22)
        got = scripted(x)
    assert torch.equal(got, expected)  # same kernel, same RNG stream
    assert torch.any(got == 0) and torch.any(got != 0)
    assert torch.equal(scripted.eval()(x), x)
    assert torch.all(torch.jit.script(layer(1.0))(x) == 0)


@jit_warnings
def test_torchscript_in_sequential_and_save_load() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv1d(3, 8, 3),
        Dropout2d(0.5),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6, 16),
        Dropout(0.5, inplace=True),
        torch.nn.Linear(16, 2),
    )
    scripted = torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(4, 3, 8, generator=gen(23))
    for model in (scripted, loaded):
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(24)
            a = model(x)
            torch.manual_seed(24)
            b = net.train()(x)
            c = model(x)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # really random in training mode
        model.eval()
        torch.testing.assert_close(model(x), net.eval()(x))
        torch.testing.assert_close(model(x), model(x))


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    p=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**31 - 1),
    channel=st.booleans(),
)
def test_property_outputs_are_zero_or_scaled_input(shape, p, seed, channel) -> None:
    if channel:
        shape = [2, 3, *shape][: max(3, len(shape))]
    x = torch.randn(*shape, generator=gen(seed)) + 3.0  # safely nonzero in float32
    fn = F.dropout2d if channel else F.dropout
    out = fn(x, p, generator=gen(seed + 1))
    assert out.shape == x.shape and out.dtype == x.dtype
    if p == 1.0:
        assert torch.all(out == 0)
        return
    kept = torch.isclose(out, x / (1 - p), rtol=1e-5, atol=0)
    assert torch.all((out == 0) | kept)
    if channel:  # whole channels agree
        k = kept.flatten(2)
        assert torch.all(k.all(-1) | (~k).all(-1))


# --------------------------------------------------------------------------- docs

MODULES = ["mcdrop.nn", "mcdrop.nn.functional", "mcdrop.nn.modules"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name: str) -> None:
    mod = importlib.import_module(name)
    with torch.random.fork_rng(devices=[]):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_has_a_runnable_example(name: str) -> None:
    mod = importlib.import_module(name)
    assert "Example:" in (mod.__doc__ or "")
    for attr in mod.__all__:
        obj = getattr(mod, attr)
        assert "Example:" in (obj.__doc__ or ""), f"{name}.{attr} lacks an Example:"
        if isinstance(obj, type):
            assert "Example:" in (obj.forward.__doc__ or "")


def test_public_face() -> None:
    assert mnn.__all__ == ["Dropout", "Dropout2d", "functional"]
    assert mnn.functional.__all__ == ["dropout", "dropout2d"]
    assert issubclass(Dropout, torch.nn.Module) and issubclass(Dropout2d, torch.nn.Module)


def test_user_doc_examples_pass() -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "nn.md"
    with torch.random.fork_rng(devices=[]):
        result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
