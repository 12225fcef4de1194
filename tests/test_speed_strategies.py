"""The fast paths of the sampling engine draw the same distribution as plain replication.

Covers ``mcdrop/sampling.py`` (strategies ``"vmap"``, ``"replicate"``, ``"loop"`` and ``"auto"``'s
choice between them, with its fallbacks), ``mcdrop/_probe.py`` (what the probe pass observes),
``mcdrop/_fastdropout.py`` (the faster dropout masks, attention and RNN paths) and the streaming
statistics of ``mcdrop/_statistics.py`` (memory that does not grow with N).

Statistical tolerances: means are compared at 5 standard errors of the difference of two
independent Monte Carlo means (per element; with a few hundred elements per test, a false alarm
has a probability of about 1e-4); variances by their ratio, within bounds that hold at the sample
sizes used by a wide margin. Dropout rates are checked at 5 binomial standard errors.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mcdrop
from mcdrop import _fastdropout as fd
from mcdrop._gatecheck import checking
from mcdrop.errors import InvalidInputError, NoRandomnessWarning, UnsupportedModelError
from mcdrop.sampling import STRATEGIES

LOGGER = "mcdrop.sampling"


# --------------------------------------------------------------------------- models


def mlp(seed: int = 0, p: float = 0.3) -> nn.Module:
    """A trunk (first layer) worth hoisting, and dropout after both hidden layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 32),
        nn.Tanh(),
        nn.Dropout(p),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Dropout(p),
        nn.Linear(32, 3),
    ).eval()


def head_cnn(seed: int = 0) -> nn.Module:
    """Convolutions with BatchNorm (in eval mode: running statistics) and dropout before the head."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(32, 4),
    )  # fmt: skip
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, 6, 6))  # non-trivial running statistics
    return net.eval()


class TrunkThenLSTM(nn.Module):
    """A linear trunk, then an LSTM whose inter-layer dropout lives inside a fused op.

    ``proj_size`` keeps mcdrop's layer-by-layer replacement out, so the dropout is torch's own,
    which ``vmap`` would run once for all samples: auto must notice and not use vmap.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 8))
        self.lstm = nn.LSTM(8, 8, num_layers=2, dropout=0.5, batch_first=True, proj_size=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.trunk(x))[0][:, -1]


class DrawPerPass(nn.Module):
    """A trunk and one random coin per forward pass (not per row): replication would share it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 64)
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if self.training and torch.rand(()) < 0.5:  # Python control flow: vmap cannot batch it
            h = torch.zeros_like(h)
        return self.head(h)


class DataDependent(nn.Module):
    """Python control flow on a value that depends on the dropout mask (vmap cannot batch it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 64)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.trunk(x)))
        if bool(h.sum() > 1e9):  # never true, but vmap cannot know
            h = h * 0
        return self.head(h)


class FixedBatch(nn.Module):
    """Only runs on its own batch size (a hard-coded reshape): replication breaks it."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch = batch
        self.lin = nn.Linear(6, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(x)).reshape(self.batch, 4)  # no trunk: vmap is not tried


def strategy_of(caplog: pytest.LogCaptureFixture) -> str:
    chosen = [r.getMessage() for r in caplog.records if "sampling with strategy" in r.getMessage()]
    assert chosen, "no strategy was logged"
    return chosen[-1].split("strategy ", 1)[1].split(" ", 1)[0].strip("'")


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


# --------------------------------------------------------------------------- the choice of strategy


def test_auto_hoists_a_cnn_trunk_with_vmap(caplog):
    net, x = head_cnn(), torch.randn(5, 3, 6, 6)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        s = mcdrop.MCDropout(net, n_samples=40, seed=0).sample(x)
    assert strategy_of(caplog) == "vmap"
    assert "deterministic trunk holds" in caplog.text
    assert s.shape == (40, 5, 4)
    assert not net.training and not any(m.training for m in net.modules())


def test_auto_keeps_replication_when_there_is_no_trunk_worth_hoisting(caplog):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 3)).eval()  # the first op is random
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        mcdrop.MCDropout(net, n_samples=8, seed=0).sample(torch.randn(4, 6))
    assert strategy_of(caplog) == "replicate"
    assert "no hoisting" in caplog.text


def test_the_decision_is_remembered_per_input_signature(caplog):
    mc = mcdrop.MCDropout(head_cnn(), n_samples=6, seed=0)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        mc.sample(torch.randn(5, 3, 6, 6))
        mc.sample(torch.randn(7, 3, 6, 6))  # another batch size: same signature
        first = len([r for r in caplog.records if "sampling with strategy" in r.getMessage()])
        mc.sample(torch.randn(5, 3, 8, 8))  # another image size: decided again
        second = len([r for r in caplog.records if "sampling with strategy" in r.getMessage()])
    assert (first, second) == (1, 2)


@pytest.mark.parametrize(
    "model, x, expected, reason",
    [
        (TrunkThenLSTM, torch.randn(6, 5, 4), "replicate", "shared between samples"),
        (DrawPerPass, torch.randn(6, 4), "loop", "shared between samples"),
        (DataDependent, torch.randn(6, 5), "replicate", "data-dependent control flow"),
    ],
    ids=["fused-lstm-dropout-under-vmap", "one-draw-per-pass", "vmap-unsupported-op"],
)
def test_auto_falls_back_with_the_reason_at_debug_level(caplog, model, x, expected, reason):
    net = model().eval()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        s = mcdrop.MCDropout(net, n_samples=30, seed=0, task="regression", include=[DrawPerPass]).sample(x)
    assert strategy_of(caplog) == expected
    assert reason in caplog.text
    # every sample drew its own randomness: the samples of a row are not all equal
    assert bool((s.std(0) > 0).any())
    if expected == "loop":  # one coin per pass: each sample is 0-headed or not, about half each
        zeroed = (s == net.head.bias.detach()).all(-1).all(-1)
        assert 3 <= int(zeroed.sum()) <= 27


def test_a_model_that_only_takes_its_own_batch_size_falls_back_to_the_loop(caplog):
    net = FixedBatch(batch=3).eval()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        s = mcdrop.MCDropout(net, n_samples=5, seed=0, task="regression").sample(torch.randn(3, 6))
    assert strategy_of(caplog) == "loop"
    assert s.shape == (5, 3, 4)


class CentersOverTheBatch(nn.Module):
    """Dropout, then each row minus the mean over the batch: a row's output depends on its neighbours.

    In a plain pass the outputs of a batch sum to zero over its rows, whatever the masks; replicas of
    the batch in one pass (or a batch split into chunks) would break that.
    """

    def __init__(self, embed: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(10, 6) if embed else None
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(6, 3)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not checking():
            self.rows.append(x.shape[0])
        if self.embed is not None:
            x = self.embed(x)[:, 0]  # the first token
        h = self.lin(self.drop(x))
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("b", [1, 4, 12])
def test_a_model_mixing_batch_rows_gets_the_whole_batch_once_per_pass(strategy, b, caplog):
    """Each sample is a plain pass of the whole batch: its rows sum to zero, as the model guarantees."""
    net = CentersOverTheBatch().eval()
    x = torch.randn(b, 6, generator=torch.Generator().manual_seed(b))
    mc = mcdrop.MCDropout(net, n_samples=30, seed=0, strategy=strategy, task="regression")
    with caplog.at_level(logging.DEBUG, logger=LOGGER), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = mc.sample(x)
    # one row minus the mean of its batch of one: zero in every pass, and mcdrop says so
    assert any(issubclass(w.category, NoRandomnessWarning) for w in caught) == (b == 1)
    assert s.shape == (30, b, 3)
    assert float(s.sum(1).abs().max()) < 1e-5
    if b > 1:
        assert bool((s.std(0) > 0).all())
    assert set(net.rows) == {b}  # no replicas, no split batch
    assert any("depends on the other rows" in r.getMessage() for r in caplog.records)


def test_a_model_mixing_rows_is_not_split_by_a_tiny_memory_budget():
    net = CentersOverTheBatch().eval()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    s = mcdrop.MCDropout(net, n_samples=8, seed=0, memory_budget=1, task="regression").sample(x)
    assert float(s.sum(1).abs().max()) < 1e-5
    assert set(net.rows) == {10}


def test_a_model_mixing_rows_of_token_ids_is_detected_from_one_row():
    """A single row of integer inputs: the check compares it with the row rolled along its tokens."""
    net = CentersOverTheBatch(embed=True).eval()
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with pytest.warns(NoRandomnessWarning):  # a batch of one row minus its own mean: zero, every pass
        s = mcdrop.MCDropout(net, n_samples=20, seed=0, task="regression").sample(x)
    assert float(s.abs().max()) < 1e-5
    assert set(net.rows) == {1}


def test_replicating_or_splitting_a_model_that_mixes_rows_is_refused_and_leaves_it_unchanged():
    net = CentersOverTheBatch().eval()
    x = torch.randn(6, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="depends on the other rows.*strategy='auto'"):
        mcdrop.MCDropout(net, n_samples=4, strategy="replicate", task="regression").sample(x)
    with pytest.raises(UnsupportedModelError, match=r"max_batch_size=4 would split this batch of 6 rows"):
        mcdrop.MCDropout(net, n_samples=4, max_batch_size=4, task="regression").sample(x)
    assert not any(m.training for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # enough room for the whole batch: allowed, one batch per pass
    s = mcdrop.MCDropout(net, n_samples=4, max_batch_size=30, seed=0, task="regression").sample(x)
    assert float(s.sum(1).abs().max()) < 1e-5


def test_batch_statistics_that_cannot_run_on_one_row_are_still_found_mixing():
    """Batch normalisation with batch statistics fails on a single row; the check uses more rows."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32), nn.Dropout(0.5), nn.BatchNorm1d(32, affine=False, track_running_stats=False)
    ).eval()  # fmt: skip
    x = torch.randn(16, 8)
    with pytest.raises(UnsupportedModelError, match="depends on the other rows"):
        mcdrop.MCDropout(net, n_samples=4, strategy="replicate", task="regression").sample(x)
    s = mcdrop.MCDropout(net, n_samples=10, seed=0, task="regression").sample(x)
    assert float(s.mean(1).abs().max()) < 1e-4  # each pass normalises its own whole batch


def test_mixing_in_bfloat16_is_found():
    net = CentersOverTheBatch().bfloat16().eval()
    x = (torch.randn(16, 6, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    with pytest.raises(UnsupportedModelError, match="depends on the other rows"):
        mcdrop.MCDropout(net, n_samples=4, strategy="replicate", task="regression").sample(x)


def test_row_independent_models_are_still_replicated():
    rows: list[int] = []
    model = mlp()
    handle = model.register_forward_pre_hook(lambda m, a: None if checking() else rows.append(a[0].shape[0]))
    try:
        mcdrop.MCDropout(model, n_samples=8, seed=0, strategy="replicate", max_batch_size=100).sample(
            torch.randn(5, 6)
        )
    finally:
        handle.remove()
    assert rows == [40]


@pytest.mark.parametrize("max_batch_size", [7, 100])
def test_loop_makes_one_pass_per_sample_even_with_room_for_replicas(max_batch_size):
    rows: list[int] = []
    model = mlp()
    handle = model.register_forward_pre_hook(lambda m, a: None if checking() else rows.append(a[0].shape[0]))
    try:
        s = mcdrop.MCDropout(
            model, n_samples=6, seed=0, strategy="loop", max_batch_size=max_batch_size
        ).sample(torch.randn(3, 6))
    finally:
        handle.remove()
    assert rows == [3] * 6
    assert s.shape == (6, 3, 3)


def test_explicit_vmap_that_cannot_sample_correctly_raises():
    with pytest.raises(UnsupportedModelError, match="shared between samples"):
        mcdrop.MCDropout(TrunkThenLSTM().eval(), n_samples=4, strategy="vmap", task="regression").sample(
            torch.randn(3, 5, 4)
        )


def test_strategy_and_dtype_are_validated():
    with pytest.raises(InvalidInputError, match="strategy must be one of"):
        mcdrop.MCDropout(mlp(), strategy="fast")
    with pytest.raises(InvalidInputError, match="dtype must be None"):
        mcdrop.MCDropout(mlp(), dtype=torch.float64)
    assert STRATEGIES == ("auto", "vmap", "replicate", "loop")


def test_model_errors_after_the_decision_propagate():
    class Breaks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.calls = 0

        def forward(self, x):
            self.calls += not checking()  # mcdrop's check passes do not count
            if self.calls == 4:
                raise RuntimeError("boom")
            return self.net(x)

    with pytest.raises(RuntimeError, match="boom"):
        mcdrop.MCDropout(Breaks(), n_samples=40, seed=0, max_batch_size=20).predict(torch.randn(2, 6))


# --------------------------------------------------------------------------- same distribution


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_every_strategy_draws_the_distribution_of_plain_replication(strategy, model):
    net, x = (mlp(), torch.randn(4, 6)) if model == "mlp" else (head_cnn(), torch.randn(3, 3, 6, 6))
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
    net, x = mlp(), torch.randn(5, 6)
    before = torch.get_rng_state()
    a = mcdrop.MCDropout(net, n_samples=12, seed=7, strategy=strategy)
    b = mcdrop.MCDropout(net, n_samples=12, seed=7, strategy=strategy)
    first = [a.sample(x), a.sample(x)]  # the first call decides, the second reuses the decision
    second = [b.sample(x), b.sample(x)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])
    assert torch.equal(torch.get_rng_state(), before)


def test_replicate_plans_do_not_depend_on_history():
    """A batch meets the model in the same pass shapes whether or not the decision was cached."""
    net, x = nn.Sequential(nn.Dropout(0.0), nn.Linear(6, 3)).eval(), torch.randn(4, 6)
    with pytest.warns(mcdrop.NoRandomnessWarning):
        fresh = mcdrop.MCDropout(net, n_samples=9, seed=0, include=[nn.Dropout], task="regression")
    fresh.sample(torch.randn(4, 6))
    with pytest.warns(mcdrop.NoRandomnessWarning):
        other = mcdrop.MCDropout(net, n_samples=9, seed=0, include=[nn.Dropout], task="regression")
    assert torch.equal(fresh.sample(x), other.sample(x))


# --------------------------------------------------------------------------- the fast dropout itself


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.875])
@pytest.mark.parametrize("path", ["numpy", "numpy-blocked", "splitmix", "vmap"])
def test_fast_dropout_has_the_law_and_scale_of_torch_dropout(p, path, monkeypatch):
    x = torch.ones(40_000)
    if path == "numpy-blocked":
        monkeypatch.setattr(fd, "BLOCK_ELEMENTS", 4096)
    with fd.accelerated(nn.Identity(), seed=3) as ctx:
        if path == "splitmix":
            ctx.hash_only = True
        if path == "vmap":
            ctx.vmap_size = 2

            def one(_):
                ctx.vmap_level = torch._C._functorch.maybe_current_level()
                return fd.dropout(x, p)

            y = torch.func.vmap(one, randomness="different")(torch.zeros(2))
            assert not torch.equal(y[0], y[1])
        else:
            y = fd.dropout(x, p)
    dropped = float((y == 0).double().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / y.numel())
    kept = y[y != 0].unique()
    assert torch.equal(kept, torch.nn.functional.dropout(torch.ones(50_000), p, True).unique()[1:])
    assert y.dtype == x.dtype


def test_fast_dropout_is_torch_dropout_where_it_does_not_apply():
    x = torch.randn(100)
    with fd.accelerated(nn.Identity(), seed=0):
        torch.manual_seed(0)
        small = fd.dropout(x, 0.5)  # too small to gain: F.dropout itself
        torch.manual_seed(0)
        assert torch.equal(small, torch.nn.functional.dropout(x, 0.5, True))
        big = torch.randn(5000)
        assert torch.equal(fd.dropout(big, 0.0), big)
        assert torch.equal(fd.dropout(big, 1.0), torch.zeros_like(big))
        inplace = big.clone()
        out = fd.dropout(inplace, 0.5, inplace=True)
        assert out.data_ptr() == inplace.data_ptr() and bool((out == 0).any())


def test_models_are_patched_only_while_sampling_and_only_in_train_mode():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.MultiheadAttention(4, 2, dropout=0.1))
    net.eval()
    with fd.accelerated(net, seed=0) as ctx:
        assert ctx.patched == []  # nothing is in train mode
    net[1].train()
    with fd.accelerated(net, seed=0) as ctx:
        assert ctx.patched == ["1"] and "forward" in net[1].__dict__
    assert "forward" not in net[1].__dict__
    with pytest.raises(RuntimeError), fd.accelerated(net, seed=0):
        raise RuntimeError("restored also on error")
    assert all("forward" not in m.__dict__ for m in net.modules())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding", "both"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_path_is_torchs_attention_without_the_dropout(batch_first, masks, need_weights, cross):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=batch_first).eval()
    b, t = 3, 5
    s = 6 if cross else t
    query = torch.randn(b, t, 8) if batch_first else torch.randn(t, b, 8)
    key = (torch.randn(b, s, 8) if batch_first else torch.randn(s, b, 8)) if cross else query
    attn_mask = {
        "bool": torch.rand(t, s) < 0.3,
        "float": torch.randn(t, s),
        "both": torch.randn(b * 2, t, s),
    }.get(masks)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[:, 0] = False  # no query attends to nothing
    kpm = None
    if masks in ("padding", "both"):
        kpm = torch.rand(b, s) < 0.3
        kpm[:, 0] = False
        kpm = kpm if masks == "padding" else kpm.float().masked_fill(kpm, float("-inf"))
    with torch.no_grad():
        want = mha(query, key, key, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights,
                   average_attn_weights=False)  # fmt: skip
        got = fd.attention_forward(
            mha, query, key, key, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=False, drop=lambda w: w,
        )  # fmt: skip
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_path_is_torchs_rnn_without_the_dropout(kind, batch_first, bidirectional):
    torch.manual_seed(0)
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    rnn = cls(5, 7, num_layers=3, dropout=0.5, batch_first=batch_first, bidirectional=bidirectional).eval()
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    with torch.no_grad():
        want = rnn(x)
        got = fd.rnn_layers_forward(rnn, x, None, drop=lambda t: t)
        # the same with the batch replicated 3 times: the first layer runs once, outputs repeat
        dim = 0 if batch_first else 1
        reps = [1, 1, 1]
        reps[dim] = 3
        with fd.accelerated(nn.Identity(), seed=0) as ctx:
            ctx.replicas = 3
            rep = fd.rnn_layers_forward(rnn, x.repeat(*reps), None, drop=lambda t: t)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    states = zip(got[1], want[1], strict=True) if kind == "lstm" else [(got[1], want[1])]
    for a, b in states:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rep[0].narrow(dim, 0, 4), want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rep[0].narrow(dim, 8, 4), want[0], atol=1e-5, rtol=1e-4)


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


# --------------------------------------------------------------------------- memory


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, counted at every ATen operation.

    Every storage an operation returns is counted once while any tensor using it is alive (views
    share their base's storage). It measures what the engine and the statistics allocate, exactly
    and independently of the allocator or of other processes on the machine (unlike the resident
    set size), which is what "memory does not grow with N" is about.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._users: dict[int, list[int]] = {}

    def _release(self, key: int) -> None:
        entry = self._users[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._users[key]

    def _skip(self, key: int, args, kwargs) -> bool:
        return key == 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if self._skip(key, args, kwargs):
                    continue
                entry = self._users.setdefault(key, [0, storage.nbytes()])
                if entry[0] == 0:
                    self.live += entry[1]
                entry[0] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(fn) -> int:
    with LiveTensorBytes() as meter:
        fn()
    return meter.peak


def segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(8, 21, 1)).eval()


class AllocatedBytes(LiveTensorBytes):
    """Like :class:`LiveTensorBytes`, but a view of a tensor from before the pass (a parameter's
    transpose) allocates nothing and is not counted."""

    def _skip(self, key: int, args, kwargs) -> bool:
        if key == 0 or key in self._users:
            return key == 0
        return any(
            t.untyped_storage().data_ptr() == key
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        )


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(1024, 3),
    ).eval()  # fmt: skip


def wide_cnn() -> nn.Module:
    """Activations 21 times the size of the input: an estimate from the input alone misjudges it."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Dropout(0.3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


def _peaks_of_every_pass(net: nn.Module, run) -> list[int]:
    peaks: list[int] = []
    meters: list[AllocatedBytes] = []

    def start(module, args):
        meters.append(AllocatedBytes().__enter__())

    def stop(module, args, out):
        meter = meters.pop()
        meter.__exit__(None, None, None)
        peaks.append(meter.peak)

    handles = [net.register_forward_pre_hook(start), net.register_forward_hook(stop)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return peaks


@pytest.mark.parametrize("strategy", ["auto", "replicate", "loop", "vmap"])
@pytest.mark.parametrize(
    "make, x, budget",
    [(wide_mlp, torch.randn(256, 16), 2 * 2**20), (wide_cnn, torch.randn(64, 3, 16, 16), 2 * 2**20)],
    ids=["wide-mlp", "wide-cnn"],
)
def test_every_pass_stays_within_an_explicit_memory_budget(strategy, make, x, budget):
    """Each forward pass, the checks included, holds at most the budget (tensor storage it allocated)."""
    net = make()
    mc = mcdrop.MCDropout(net, n_samples=20, seed=0, memory_budget=budget, strategy=strategy)
    peaks = _peaks_of_every_pass(net, lambda: mc.sample(x))
    assert max(peaks) <= budget, f"a pass held {max(peaks) / budget:.2f} x the budget"
    assert len(peaks) < 20 * x.shape[0]  # and it is not met by one row per pass


def test_the_memory_meter_sees_memory_that_grows_with_n():
    net, x = segmenter(), torch.randn(2, 3, 8, 8)
    small = peak_bytes(lambda: mcdrop.MCDropout(net, n_samples=10, keep_samples=True).predict(x))
    large = peak_bytes(lambda: mcdrop.MCDropout(net, n_samples=200, keep_samples=True).predict(x))
    kept = 200 * 2 * 21 * 8 * 8 * 4
    assert large - small > 0.9 * (kept - kept / 20)  # the kept samples show up


def test_streaming_statistics_of_a_segmentation_map_do_not_grow_with_n():
    """Batch 8 x 21 classes x 64 x 64: the peak at N = 1000 is within 10% of the peak at N = 10."""
    net, x = segmenter(), torch.randn(8, 3, 64, 64)
    peaks = {}
    for n in (10, 1000):
        mc = mcdrop.MCDropout(net, n_samples=n, seed=0)
        peaks[n] = peak_bytes(lambda mc=mc: mc.predict(x))
    assert peaks[1000] <= 1.10 * peaks[10], peaks


class WideGate(nn.Module):
    """A functional gate (``F.dropout(training=self.training)``) with activations 64 times its input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 1024)
        self.down = nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        return self.down(nn.functional.dropout(h, 0.5, training=self.training))


class WiderForLargeInputs(nn.Module):
    """Its memory depends on the data: a pass holding a value > 5 makes a scratch tensor 16 times as
    wide as its activations (the outputs do not depend on it, so rows stay independent)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.drop, self.head = nn.Linear(16, 1024), nn.Dropout(0.5), nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        if bool((x > 5).any()):
            h = h + torch.zeros(x.shape[0], 16 * 1024, device=x.device)[:, :1024]
        return self.head(self.drop(h))


def _large_fourth_row() -> torch.Tensor:
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    x[3, 0] = 10.0
    return x


@pytest.mark.parametrize("strategy", ["auto", "replicate", "loop"])
@pytest.mark.parametrize(
    "make, x",
    [(WideGate, torch.randn(256, 16)), (WiderForLargeInputs, _large_fourth_row())],
    ids=["gate", "data"],
)
def test_gate_checks_and_data_dependent_widths_stay_within_the_budget(strategy, make, x):
    """The gate check's rows are capped by the budget; the first pass is sized from the widest check row."""
    budget = 2**20
    net = make().eval()
    mc = mcdrop.MCDropout(net, n_samples=20, seed=0, memory_budget=budget, strategy=strategy)
    peaks = _peaks_of_every_pass(net, lambda: mc.sample(x))
    assert max(peaks) <= budget, f"a pass held {max(peaks) / budget:.2f} x the budget"
    assert len(peaks) < 20 * x.shape[0]


def test_the_gate_check_runs_on_eight_rows_when_the_budget_allows_and_on_two_when_it_is_tiny():
    rows: list[int] = []
    net = WideGate().eval()
    handle = net.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]) if checking() else None)
    try:
        mcdrop.MCDropout(net, n_samples=4, seed=0).sample(torch.randn(32, 16))
        roomy = set(rows)
        rows.clear()
        mcdrop.MCDropout(net, n_samples=4, seed=0, memory_budget=1).sample(torch.randn(32, 16))
        tiny = set(rows)
    finally:
        handle.remove()
    assert 8 in roomy
    assert max(tiny) == 2  # at least two rows (batch statistics need them), no more


# --------------------------------------------------------------------------- row check and other randomness
class TimmStyleDropPath(nn.Module):
    """Stochastic depth as timm and torchvision write it: a per-row Bernoulli mask from ``bernoulli_``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop_prob = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class GaussianNoise(nn.Module):
    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.training else x


class Residual(nn.Module):
    def __init__(self, noise: str = "drop_path", center: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.random = TimmStyleDropPath(0.3) if noise == "drop_path" else GaussianNoise(0.5)
        self.drop = nn.Dropout(0.1)
        self.center = center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.random(self.drop(self.lin(x)))
        return h - h.mean(0, keepdim=True) if self.center else h


def _rows_seen(net: nn.Module, run) -> list[int]:
    rows: list[int] = []
    handle = net.register_forward_pre_hook(lambda m, a: None if checking() else rows.append(a[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return rows


@pytest.mark.parametrize("noise", ["drop_path", "gaussian"])
def test_drop_path_and_noise_do_not_make_a_row_independent_model_look_mixing(noise):
    """Per-row masks and noise land on other rows in a pass over other rows; the check makes them constant."""
    torch.manual_seed(0)
    net = nn.Sequential(Residual(noise), Residual(noise), nn.Linear(8, 3)).eval()
    options = {"drop_path": True} if noise == "drop_path" else {"include": [GaussianNoise]}
    x = torch.randn(16, 8)
    rows = _rows_seen(
        net, lambda: mcdrop.MCDropout(net, n_samples=6, seed=0, max_batch_size=8, **options).sample(x)
    )
    assert max(rows) <= 8 and sum(rows) == 6 * 16  # the batch is split as asked
    rows = _rows_seen(
        net, lambda: mcdrop.MCDropout(net, n_samples=6, seed=0, strategy="replicate", **options).sample(x)
    )
    assert max(rows) > 16  # replicas of the batch in one pass
    budget_rows = _rows_seen(
        net, lambda: mcdrop.MCDropout(net, n_samples=6, seed=0, memory_budget=1, **options).sample(x)
    )
    assert max(budget_rows) < 16  # a tiny budget splits the batch


@pytest.mark.parametrize("noise", ["drop_path", "gaussian"])
def test_a_mixing_model_with_drop_path_or_noise_is_still_found_mixing(noise):
    torch.manual_seed(0)
    net = nn.Sequential(Residual(noise, center=True), nn.Linear(8, 3)).eval()
    options = {"drop_path": True} if noise == "drop_path" else {"include": [GaussianNoise]}
    with pytest.raises(UnsupportedModelError, match="depends on the other rows"):
        mcdrop.MCDropout(net, n_samples=4, strategy="replicate", **options).sample(torch.randn(6, 8))


class Shuffles(nn.Module):
    """Dropout, then a random 0/1 mask from ``randint``: randomness the check cannot make constant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.drop = nn.Linear(6, 6), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.lin(x))
        if self.training:
            h = h * torch.randint(0, 2, h.shape, dtype=h.dtype)
        return h


class CoinMaskedMean(Shuffles):
    """:class:`Shuffles`, then each row minus the batch mean: it mixes rows, and its randomness is
    of a kind the row check cannot make constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("model", [Shuffles, CoinMaskedMean])
def test_no_verdict_samples_the_whole_batch_once_per_pass(model, caplog):
    """Randomness the check cannot make constant: no verdict, so never replicas nor a split batch by
    default — right for the model that mixes rows, and merely slower for the one that does not."""
    net = model().eval()
    x = torch.randn(10, 6)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        rows = _rows_seen(net, lambda: mcdrop.MCDropout(net, n_samples=4, seed=0, include=[model]).sample(x))
    assert set(rows) == {10}  # the whole batch once per pass (vmap over samples or the loop)
    assert any("still draw randomness" in r.getMessage() for r in caplog.records)
    budget_rows = _rows_seen(
        net, lambda: mcdrop.MCDropout(net, n_samples=4, seed=0, include=[model], memory_budget=1).sample(x)
    )
    assert set(budget_rows) == {10}  # a tiny budget does not split it either


def test_no_verdict_mixing_model_gets_the_variance_of_whole_batch_passes():
    """The samples of the mixing model agree in distribution with plain passes over the whole batch
    (replicas would have mixed the MC samples: every row's variance about halved)."""
    net = CoinMaskedMean().eval()
    x = torch.randn(4, 6)
    samples = mcdrop.MCDropout(net, n_samples=400, seed=0, include=[CoinMaskedMean]).sample(x)
    net.train()
    torch.manual_seed(1)
    with torch.no_grad():
        plain = torch.stack([net(x) for _ in range(400)])
    net.eval()
    ratio = samples.var(0) / plain.var(0)
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("ask", ["replicate", "split"])
def test_no_verdict_with_replicas_or_a_split_asked_for_warns_and_does_as_asked(ask):
    net = Shuffles().eval()
    x = torch.randn(10, 6)
    options = {"strategy": "replicate"} if ask == "replicate" else {"max_batch_size": 5}
    with pytest.warns(mcdrop.RowCheckWarning, match="could not check whether the output of a row"):
        rows = _rows_seen(
            net, lambda: mcdrop.MCDropout(net, n_samples=4, seed=0, include=[Shuffles], **options).sample(x)
        )
    assert (max(rows) > 10) if ask == "replicate" else (max(rows) <= 5)


class HandMadeMaskThenMean(nn.Module):
    """A hand-made dropout mask ``rand > rate`` (or ``rand < keep``), then each row minus the batch
    mean. With every uniform draw at its centre 0.5, the mask at rate 0.5 would drop everything and
    the output would be zero whatever the rows: the check must still see the mixing."""

    def __init__(self, keep_convention: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)
        self.keep_convention = keep_convention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.training:
            u = torch.rand_like(h)
            mask = (u < 0.5) if self.keep_convention else (u > 0.5)
            h = h * mask / 0.5
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("keep_convention", [False, True], ids=["rand>rate", "rand<keep"])
def test_a_hand_made_mask_that_drops_all_at_one_quantile_cannot_hide_mixing(keep_convention):
    net = HandMadeMaskThenMean(keep_convention).eval()
    mc = mcdrop.MCDropout(net, n_samples=4, seed=0, include=[HandMadeMaskThenMean], strategy="replicate")
    with pytest.raises(UnsupportedModelError, match="depends on the other rows"):
        mc.sample(torch.randn(6, 6))
    rows = _rows_seen(
        net,
        lambda: mcdrop.MCDropout(net, n_samples=4, seed=0, include=[HandMadeMaskThenMean]).sample(
            torch.randn(6, 6)
        ),
    )
    assert set(rows) == {6}


def test_a_model_without_other_randomness_is_checked_at_one_quantile_only():
    """Plain dropout: no draw is made constant, so the second quantile's passes are not run."""
    net = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.3), nn.Linear(6, 2)).eval()
    checks: list[int] = []
    handle = net.register_forward_pre_hook(lambda m, a: checks.append(a[0].shape[0]) if checking() else None)
    try:
        mcdrop.MCDropout(net, n_samples=4, seed=0).sample(torch.randn(8, 6))
    finally:
        handle.remove()
    assert checks[:4] == [1, 8, 4, 4]  # one row (memory), all rows, the two halves
    assert checks.count(8) == 1


class CentersOverIds(nn.Module):
    """Ids of shape ``(batch,)``, embedded, dropped, then each row minus the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.drop, self.lin = nn.Embedding(10, 6), nn.Dropout(0.5), nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.drop(self.embed(ids)))
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("ids", [[4], [0], [3, 3, 3, 3]], ids=["one-id", "id-0", "repeated-id"])
def test_a_model_mixing_rows_of_one_dimensional_ids_is_detected(ids):
    """One row (or identical rows) of ids with no token axis: the check compares a neighbouring id."""
    net = CentersOverIds().eval()
    x = torch.tensor(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRandomnessWarning)  # one row minus its own mean: zero
        rows = _rows_seen(
            net, lambda: mcdrop.MCDropout(net, n_samples=20, seed=0, task="regression").sample(x)
        )
    assert set(rows) == {len(ids)}  # never replicated
    with pytest.raises(UnsupportedModelError, match="depends on the other rows"):
        mcdrop.MCDropout(net, n_samples=4, strategy="replicate", task="regression").sample(x)


# ---------------------------------------------------------------- the row check reaches every draw
def _scripted_mlp(center: bool = False) -> nn.Module:
    class Scripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.drop, self.out = nn.Linear(6, 16), nn.Dropout(0.3), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.out(self.drop(torch.relu(self.lin(x))))
            return h

    class ScriptedCentered(Scripted):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.out(self.drop(torch.relu(self.lin(x))))
            return h - h.mean(0, keepdim=True)

    torch.manual_seed(0)
    return torch.jit.script(ScriptedCentered() if center else Scripted()).eval()


def test_a_scripted_model_gets_a_verdict_and_is_split_and_replicated_as_asked():
    """Regression: compiled dropout escaped the check's constants, so every TorchScript model gave
    no verdict: whole-batch passes whatever the budget, and a RowCheckWarning (here an error)."""
    net = _scripted_mlp()
    x = torch.randn(16, 6)
    split = mcdrop.MCDropout(net, n_samples=6, seed=0, max_batch_size=8, task="regression").sample(x)
    replicated = mcdrop.MCDropout(net, n_samples=6, seed=0, strategy="replicate", task="regression").sample(x)
    assert split.shape == replicated.shape == (6, 16, 3)
    assert not torch.equal(split[0], split[1])


def test_a_scripted_model_that_mixes_rows_is_still_found():
    net = _scripted_mlp(center=True)
    with pytest.raises(UnsupportedModelError, match="depends on the other rows"):
        mcdrop.MCDropout(net, n_samples=4, strategy="replicate", task="regression").sample(torch.randn(6, 6))


class GumbelHead(nn.Module):
    def __init__(self, hard: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.drop, self.hard = nn.Linear(6, 5), nn.Dropout(0.2), hard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.drop(self.lin(x))
        return F.gumbel_softmax(logits, tau=0.5, hard=self.hard) if self.training else logits.softmax(-1)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gumbel_softmax_draws_are_made_constant_by_the_check(hard):
    """Regression: the draws inside F.gumbel_softmax escaped the check's constants (it runs its body
    with function modes off): no verdict, and a row-independent model sampled 5x slower."""
    net = GumbelHead(hard).eval()
    x = torch.randn(12, 6)
    rows = _rows_seen(
        net,
        lambda: mcdrop.MCDropout(
            net, n_samples=6, seed=0, include=[GumbelHead], output_type="probs", max_batch_size=6
        ).sample(x),
    )
    assert max(rows) <= 6
    rows = _rows_seen(
        net,
        lambda: mcdrop.MCDropout(
            net, n_samples=6, seed=0, include=[GumbelHead], output_type="probs", strategy="replicate"
        ).sample(x),
    )
    assert max(rows) > 12


class MaskedMeanPool(nn.Module):
    """Token embeddings, dropout, and a hand-written masked mean: an all-masked row gives 0/0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.drop, self.out = nn.Embedding(20, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.embed(ids)) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


def test_one_row_whose_check_companion_gives_nan_still_gets_a_verdict():
    """Regression: for one row the check builds a second one (here a mask of zeros: NaN pooled);
    non-finite check outputs gave no verdict and whole-batch passes of one row (10x slower)."""
    net = MaskedMeanPool().eval()
    ids, mask = torch.randint(0, 20, (1, 7)), torch.ones(1, 7)
    rows = _rows_seen(
        net,
        lambda: mcdrop.MCDropout(net, n_samples=30, seed=0, strategy="replicate", task="regression").sample(
            ids, mask
        ),
    )
    assert max(rows) > 1  # replicas of the one row, without a RowCheckWarning


class MarksFirstPlace(nn.Module):
    """Sets the first output of every pass (a place in the pass, not a row) to ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.drop, self.value = nn.Linear(4, 3), nn.Dropout(0.3), value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.lin(x)).clone()
        out[0, 0] = self.value
        return out


def test_a_minus_inf_that_stays_at_a_place_of_the_pass_is_mixing_and_a_nan_is_refused():
    """-inf is a value samples may hold (a masked logit): one that stays at the first place of the
    pass instead of following its row is the pass mixing rows. NaN is refused by sampling, naming
    rows, and says nothing of the rows' neighbours."""
    x = torch.randn(3, 4)
    with pytest.raises(UnsupportedModelError, match="depends on the other rows"):
        mcdrop.MCDropout(MarksFirstPlace(float("-inf")), n_samples=2, max_batch_size=2).predict(x)
    with pytest.raises(mcdrop.NonFiniteError):
        mcdrop.MCDropout(MarksFirstPlace(float("nan")), n_samples=2, max_batch_size=2).predict(x)


def test_a_remembered_decision_still_refuses_or_warns_about_a_split_of_a_larger_batch():
    """Regression: a decision made for a batch that max_batch_size did not split was reused for a
    larger batch it does split: a model mixing rows was split silently, and one the check could not
    judge without a RowCheckWarning."""
    mixing = CentersOverIds().eval()
    mc = mcdrop.MCDropout(mixing, n_samples=4, seed=0, task="regression", max_batch_size=8)
    mc.predict(torch.tensor([1, 2, 3, 4]))
    with pytest.raises(UnsupportedModelError, match="would split this batch of 16 rows"):
        mc.predict(torch.arange(16) % 10)
    unjudged = Shuffles().eval()
    mc = mcdrop.MCDropout(unjudged, n_samples=4, seed=0, include=[Shuffles], max_batch_size=8)
    mc.predict(torch.randn(4, 6))
    with pytest.warns(mcdrop.RowCheckWarning, match="max_batch_size=8"):
        mc.predict(torch.randn(16, 6))
