"""The sampling strategies (``mcdrop/engine/strategies.py``) draw the distribution of plain replication.

``"vmap"``, ``"replicate"`` and ``"loop"`` (and ``"auto"``'s choice between them) agree in
distribution with plain replication and with torch's own dropout, one pass per sample; masks are
independent across samples, replicas and chunks; seeded runs reproduce and leave the global RNG
alone; the loop makes one pass per sample; mixed precision runs the model in low precision and
returns float32.

Statistical tolerances: means are compared at 5 standard errors of the difference of two
independent Monte Carlo means (per element; with a few hundred elements per test, a false alarm
has a probability of about 1e-4); variances by their ratio, within bounds that hold at the sample
sizes used by a wide margin. Dropout rates are checked at 5 binomial standard errors.
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
from torch import nn
from zoo import SAMPLING_LOGGER, Tagged, head_cnn, strategy_of, trunk_mlp

import mcdrop
from mcdrop.engine.checks import checking
from mcdrop.engine.strategies import STRATEGIES
from mcdrop.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers
def assert_same_distribution(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two independent sets of samples ``(N, ...)``: equal means (5 SE) and comparable variances."""
    a, b = a.double(), b.double()
    se = torch.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0])
    gap = (a.mean(0) - b.mean(0)).abs()
    assert bool((gap <= 5 * se + 1e-9).all()), (
        f"means differ by up to {float((gap / (se + 1e-12)).max()):.1f} SE"
    )
    ratio = float(a.var(0).mean() / b.var(0).mean())
    assert 0.8 < ratio < 1.25, f"variance ratio {ratio:.3f}"


# ------------------------------------------------------------------------ replicas, the loop, and the options
def test_replicas_get_independent_dropout_masks():
    """k replicas of one input in one forward pass must not share a mask."""
    x = torch.ones(1, 200)
    net = Tagged()
    s = mcdrop.MCDropout(net, n_samples=8, seed=0, task="regression").sample(x)
    assert net.rows == [1, 7]  # auto plan: one probe sample, then the 7 others in one pass
    masks = s[:, 0, 200:]
    for a in range(8):
        for c in range(a + 1, 8):
            assert not torch.equal(masks[a], masks[c])


@pytest.mark.parametrize("max_batch_size", [7, 100])
def test_loop_makes_one_pass_per_sample_even_with_room_for_replicas(max_batch_size):
    rows: list[int] = []
    model = trunk_mlp()
    handle = model.register_forward_pre_hook(lambda m, a: None if checking() else rows.append(a[0].shape[0]))
    try:
        s = mcdrop.MCDropout(
            model, n_samples=6, seed=0, strategy="loop", max_batch_size=max_batch_size
        ).sample(torch.randn(3, 6))
    finally:
        handle.remove()
    assert rows == [3] * 6
    assert s.shape == (6, 3, 3)


def test_strategy_and_dtype_are_validated():
    with pytest.raises(InvalidInputError, match="strategy must be one of"):
        mcdrop.MCDropout(trunk_mlp(), strategy="fast")
    with pytest.raises(InvalidInputError, match="dtype must be None"):
        mcdrop.MCDropout(trunk_mlp(), dtype=torch.float64)
    assert STRATEGIES == ("auto", "vmap", "replicate", "loop")


# --------------------------------------------------------------------------- same distribution
@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_every_strategy_draws_the_distribution_of_plain_replication(strategy, model):
    net, x = (trunk_mlp(), torch.randn(4, 6)) if model == "mlp" else (head_cnn(), torch.randn(3, 3, 6, 6))
    n = 600
    reference = mcdrop.MCDropout(net, n_samples=n, seed=1, strategy="replicate", task="regression").sample(x)
    other = mcdrop.MCDropout(net, n_samples=n, seed=2, strategy=strategy, task="regression").sample(x)
    assert_same_distribution(other, reference)


def test_transformer_and_lstm_engines_match_torchs_own_dropout_in_distribution():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True).eval()
    lstm = nn.LSTM(6, 12, num_layers=2, dropout=0.4, batch_first=True).eval()
    cases = [(layer, torch.randn(3, 5, 16), lambda o: o), (lstm, torch.randn(3, 4, 6), lambda o: o[0])]
    n = 400
    for model, x, pick in cases:
        mine = mcdrop.MCDropout(model, n_samples=n, seed=0, task="regression", output=pick).sample(x)
        torch.manual_seed(1)
        with mcdrop.enable_dropout(model), torch.no_grad():
            ref = torch.stack([pick(model(x)) for _ in range(n)])  # torch's dropout, one pass per sample
        assert_same_distribution(mine, ref)


def test_vmap_masks_are_independent_across_samples_and_chunks():
    class Masks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(3, 3000)
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            return self.drop(torch.ones_like(self.trunk(x)))

    n = 24
    s = mcdrop.MCDropout(Masks(), n_samples=n, seed=0, strategy="vmap", max_batch_size=16, task="regression")
    masks = s.sample(torch.randn(2, 3)) > 0  # (N, 2, 3000); 8 samples per chunk, 3 chunks
    flat = masks.reshape(n * 2, -1).double()
    rate = 1 - float(flat.mean())
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / flat.numel())
    corr = torch.corrcoef(flat)  # masks of different samples and rows: uncorrelated
    off = corr[~torch.eye(n * 2, dtype=torch.bool)]
    assert float(off.abs().max()) < 5 / math.sqrt(3000)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seeded_runs_reproduce_and_leave_the_global_rng_alone(strategy):
    net, x = trunk_mlp(), torch.randn(5, 6)
    before = torch.get_rng_state()
    a = mcdrop.MCDropout(net, n_samples=12, seed=7, strategy=strategy)
    b = mcdrop.MCDropout(net, n_samples=12, seed=7, strategy=strategy)
    first = [a.sample(x), a.sample(x)]  # the first call decides, the second reuses the decision
    second = [b.sample(x), b.sample(x)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_runs_the_model_in_low_precision_and_returns_float32(dtype):
    net, x = head_cnn(), torch.randn(6, 3, 6, 6)
    full = mcdrop.MCDropout(net, n_samples=200, seed=0).predict(x)
    low = mcdrop.MCDropout(net, n_samples=200, seed=0, dtype=dtype)
    pred = low.predict(x)
    assert pred.probs.dtype == torch.float32
    assert float((pred.probs - full.probs).abs().max()) < 0.05
    assert low.sample(x).dtype == torch.float32
    assert next(net.parameters()).dtype == torch.float32  # the model is not cast


# --------------------------------------------------------------------------- tensors a model or hook keeps
def plain(t: torch.Tensor) -> bool:
    """Not a functorch wrapper (a dead one raises on every use once its vmap has returned)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(t) and (t + 1).shape == t.shape


class KeepsEmbedding(nn.Module):
    """A deterministic trunk worth hoisting; the forward keeps the tensor after its dropout on itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.drop, self.head = nn.Linear(6, 32), nn.Dropout(0.3), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_embedding = self.drop(torch.tanh(self.trunk(x)))
        return self.head(self.last_embedding)


def test_a_tensor_the_forward_keeps_on_the_model_is_plain_and_vmap_is_not_used(caplog):
    """Regression (issue 18, item 4): with vmap chosen, ``model.last_embedding`` was a dead BatchedTensor."""
    caplog.set_level(logging.DEBUG, SAMPLING_LOGGER)
    net = KeepsEmbedding().eval()
    mcdrop.MCDropout(net, n_samples=16, seed=0).predict(torch.randn(8, 6))
    assert plain(net.last_embedding)
    assert strategy_of(caplog) == "replicate"
    assert (
        "vmap rejected" in caplog.text
        and "kept a tensor computed inside vmap (<model>.last_embedding)" in caplog.text
    )
    with pytest.raises(mcdrop.UnsupportedModelError, match="last_embedding"):
        mcdrop.MCDropout(net, n_samples=16, seed=0, strategy="vmap").predict(torch.randn(8, 6))
    assert plain(net.last_embedding)


CAPTURED: dict[str, torch.Tensor] = {}


def capture_in_a_global(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    CAPTURED["out"] = out


class Recorder:
    """A callable hook object keeping what it sees."""

    def __init__(self) -> None:
        self.outs: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.outs.append(out)


def hoisted_mlp() -> nn.Sequential:
    """16 -> 64 -> 3 with dropout after the hidden layer: the trunk holds 84% of the FLOPs, so auto picks vmap."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Dropout(0.3), nn.Linear(64, 3)).eval()


@pytest.mark.parametrize("how", ["closure list", "nonlocal", "global", "callable object", "partial"])
def test_a_tensor_a_forward_hook_captures_is_plain(how, caplog):
    """Regression (issue 18, item 4): hooks on a module after the first dropout captured dead tensors."""
    caplog.set_level(logging.DEBUG, SAMPLING_LOGGER)
    net = hoisted_mlp()
    kept: list[torch.Tensor] = []
    last: list[torch.Tensor] = []  # what the nonlocal variable holds at the end
    if how == "closure list":
        hook = lambda m, args, out: kept.append(out)  # noqa: E731
    elif how == "nonlocal":
        latest = None

        def hook(m, args, out):
            nonlocal latest
            latest = out

        def read() -> None:
            last.append(latest)
    elif how == "global":
        hook = capture_in_a_global
    elif how == "callable object":
        hook = Recorder()
        kept = hook.outs
    else:
        hook = functools.partial(lambda store, m, args, out: store.append(out), kept)
    net[2].register_forward_hook(hook)
    mcdrop.MCDropout(net, n_samples=16, seed=0).predict(torch.randn(8, 16))
    if how == "nonlocal":
        read()
        kept = last
    elif how == "global":
        kept = [CAPTURED.pop("out")]
    assert kept and all(plain(t) for t in kept)
    assert strategy_of(caplog) == "replicate" and "kept a tensor computed inside vmap" in caplog.text


def test_a_hook_added_after_vmap_was_chosen_gets_plain_tensors_and_the_choice_is_made_again(caplog):
    caplog.set_level(logging.DEBUG, SAMPLING_LOGGER)
    net = hoisted_mlp()
    x = torch.randn(8, 16)
    mc = mcdrop.MCDropout(net, n_samples=16, seed=0)
    mc.predict(x)
    assert strategy_of(caplog) == "vmap"
    kept: list[torch.Tensor] = []
    net[2].register_forward_hook(lambda m, args, out: None if checking() else kept.append(out))
    caplog.clear()
    pred = mc.predict(x)  # the remembered vmap decision: its first pass is dropped, the rest looped
    assert "vmap given up for the rest of the call" in caplog.text
    assert kept and all(plain(t) for t in kept)
    assert sum(t.shape[0] for t in kept) == 16 * 8 and bool(pred.probs.isfinite().all())
    caplog.clear()
    mc.predict(x)  # decided afresh: vmap's trial is refused
    assert strategy_of(caplog) == "replicate"
