"""The check passes (``mcdrop/engine/checks.py``): functional gates, and whether rows mix.

**The gate check.** A user class whose forward reads ``self.training`` is put in train mode by the
policy (rule 10). A wrapper then finds out, on the inputs it is given, whether the flag gates only
dropout: a deterministic train-mode change raises (naming the module, model untouched), numpy
randomness warns, hand-made torch randomness is sampled and noted, and the check itself leaves
every generator as it was and runs once per input signature.

**The row check.** A model whose output for a row depends on the other rows of its batch (batch
statistics, a mean over the batch) gets the whole batch once per pass: never replicas, never a split
batch (refused when asked for, with the reason); drop path, noise and other randomness the check
makes constant do not make a row-independent model look mixing, and randomness it cannot make
constant gives no verdict (whole-batch passes, and a ``RowCheckWarning`` where replicas or a split
were asked for). Generators given as inputs and lazily initialised modules are left as sampling
alone would leave them.
"""

from __future__ import annotations

import copy
import logging
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import SAMPLING_LOGGER, trunk_mlp

import mcdrop
from mcdrop.engine.checks import TORCH_RANDOMNESS_NOTE, check_gates, checking
from mcdrop.errors import GateRandomnessWarning, ModelStateError, NoRandomnessWarning, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the gate check
class LinearGate(nn.Module):
    """A linear layer 4 -> 3; the subclasses say what their forward does with self.training."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)


class DropoutGate(LinearGate):
    """Reads self.training only for dropout: fine."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.lin(x), 0.3, training=self.training)


class AttentionGate(nn.Module):
    """Hugging Face style: dropout_p = p if self.training else 0.0 into SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.p = 0.4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (b, 1 head, 4)
        q, k, v = (t.unsqueeze(2).expand(-1, -1, 5, -1) for t in (q, k, v))  # 5 tokens
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return out.mean((1, 2))[:, :3]


class TemperatureGate(LinearGate):
    """Train mode divides by a temperature: not dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.dropout(self.lin(x), 0.3, training=self.training)
        return z if self.training else z / 2.0


class BatchStatisticsGate(nn.Module):
    """A hand-written normalisation without buffers: batch statistics in train mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.shift = nn.Parameter(torch.full((3,), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        return z - z.mean(0) if self.training else z - self.shift


class HandMadeMaskGate(LinearGate):
    """Dropout written by hand with torch.rand_like: randomness mcdrop samples and notes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        if self.training:
            z = z * (torch.rand_like(z) > 0.3) / 0.7
        return z


class NumpyMaskGate(LinearGate):
    """Train-mode masking drawn from numpy's global RNG (like SpecAugment in wav2vec2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        if self.training:
            keep = np.random.rand(*z.shape) > 0.3
            z = z * torch.as_tensor(keep, dtype=z.dtype)
        return z


class Net(nn.Module):
    """A BatchNorm trunk, a dropout head and a gate in the middle."""

    def __init__(self, gate: nn.Module, width: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.block = gate
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.trunk(x)))


def build(gate_cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    net = Net(gate_cls())
    net.trunk[1].running_mean.uniform_(-0.5, 0.5)
    return net.eval()


def x_in(b: int = 6) -> torch.Tensor:
    return torch.randn(b, 4, generator=torch.Generator().manual_seed(3))


def snapshot(model: nn.Module) -> tuple:
    return (
        [m.training for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
    )


def assert_same(model: nn.Module, before: tuple) -> None:
    flags, state, grads = before
    assert [m.training for m in model.modules()] == flags
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize("gate_cls", [DropoutGate, AttentionGate])
def test_gates_of_dropout_only_pass_silently(gate_cls) -> None:
    model = build(gate_cls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc = mcdrop.MCDropout(model, n_samples=30, seed=0, keep_samples=True)
        samples = mc.sample(x_in())
    assert (samples.std(0) > 0).any()
    site = {s.path: s for s in mc.sites}["block"]
    assert site.sampled and TORCH_RANDOMNESS_NOTE not in site.note


@pytest.mark.parametrize("gate_cls", [TemperatureGate, BatchStatisticsGate])
def test_a_gate_that_changes_more_than_dropout_in_train_mode_is_refused(gate_cls) -> None:
    model = build(gate_cls)
    model.block.train()  # mixed flags, to prove they come back exactly
    before = snapshot(model)
    global_rng = torch.get_rng_state()
    mc = mcdrop.MCDropout(model, n_samples=8, seed=0)
    for call in (mc.predict, mc.sample):
        with pytest.raises(ModelStateError) as info:
            call(x_in())
        message = str(info.value)
        assert "these modules still change the output, the same way from any seed: block by up to" in message
        assert "exclude=['block']" in message and "include=" in message
        assert_same(model, before)
    assert torch.equal(torch.get_rng_state(), global_rng)


def test_excluding_or_including_the_gate_settles_it() -> None:
    model = build(TemperatureGate)
    x = x_in()
    kept_off = mcdrop.MCDropout(model, n_samples=200, seed=0, exclude=["block"]).predict(x)
    # with the gate in eval, its own dropout and its train-mode temperature are both off
    with torch.no_grad():
        eval_out = model(x)
    assert kept_off.samples is None
    mean_logits = mcdrop.MCDropout(model, n_samples=200, seed=0, exclude=["block"], keep_samples=True).sample(
        x
    )
    torch.testing.assert_close(mean_logits.mean(0), eval_out, atol=0.1, rtol=0)
    # include= says the train-mode behaviour is wanted: sampled without the check
    included = mcdrop.MCDropout(model, n_samples=8, seed=0, include=[TemperatureGate]).sample(x)
    assert included.shape == (8, 6, 2) and (included.std(0) > 0).any()


def test_a_gate_drawing_from_numpy_warns_and_is_noted() -> None:
    model = build(NumpyMaskGate)
    mc = mcdrop.MCDropout(model, n_samples=6, seed=0)
    with pytest.warns(GateRandomnessWarning, match=r"the module\(s\) block draw from numpy's or Python's"):
        mc.predict(x_in())
    notes = mcdrop.describe(mc).set_index("path")["note"]
    assert "draws from numpy's or Python's RNG in train mode" in notes["block"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc.predict(x_in())  # checked once per input signature


def test_hand_made_torch_randomness_is_sampled_and_noted() -> None:
    model = build(HandMadeMaskGate)
    mc = mcdrop.MCDropout(model, n_samples=40, seed=0, exclude=["head.0"], keep_samples=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = mc.sample(x_in())
    assert (samples.std(0) > 0).any()  # the only randomness left is the hand-made mask
    table = mc.describe().set_index("path")
    assert TORCH_RANDOMNESS_NOTE in table.loc["block", "note"]
    assert table.loc["head.0", "note"] != TORCH_RANDOMNESS_NOTE


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, args) -> None:
        self.calls += 1


def test_the_check_runs_once_per_input_signature_on_a_few_rows() -> None:
    model = build(DropoutGate)
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: rows.append((args[0].shape[0], checking())))
    try:
        mc = mcdrop.MCDropout(model, n_samples=4, max_batch_size=100, strategy="replicate")
        mc.predict(x_in(20))
        first = list(rows)
        rows.clear()
        mc.predict(x_in(20))
        mc.predict(x_in(7))  # another batch size: the same signature
        again = list(rows)
    finally:
        handle.remove()
    # run-time discovery (on 8 rows: the policy's pass, recording what the gate draws, and the same
    # with the unclassified user modules, here Net itself, in train mode), the gate check (one row to
    # measure memory, then its reference and train-mode passes on 8 rows), the engine's row check (one
    # row to measure memory, then 8 rows and their halves), then the sampling pass(es)
    checks = [r for r, check in first if check]
    assert checks == [8, 8, 1, 8, 8, 1, 8, 4, 4]
    assert first[: len(checks)] == [(r, True) for r in checks]
    assert sum(r for r, check in first if not check) == 4 * 20
    assert sum(r for r, _ in again) == 4 * 27 and not any(check for _, check in again)


def test_the_check_leaves_every_generator_as_it_was() -> None:
    model = build(NumpyMaskGate)
    gates = ["block"]
    x = x_in()
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with mcdrop.enable_dropout(model), torch.no_grad():
        notes, deterministic, outside = check_gates(model, gates, lambda: model(x), [])
    assert outside == ["block"] and deterministic == [] and notes == {}
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_an_interruption_inside_the_check_leaves_the_model_as_it_was() -> None:
    model = build(TemperatureGate)
    model.trunk.train()
    before = snapshot(model)
    calls = Counter()

    def interrupt(module, args):
        calls(module, args)
        if calls.calls == 2:  # the check's train-mode pass
            raise KeyboardInterrupt

    handle = model.block.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            mcdrop.MCDropout(model, n_samples=4, seed=0).predict(x_in())
    finally:
        handle.remove()
    assert_same(model, before)


# ------------------------------------------------------------------------ the row check: models that mix rows
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
    with (
        caplog.at_level(logging.DEBUG, logger=SAMPLING_LOGGER),
        warnings.catch_warnings(record=True) as caught,
    ):
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
    model = trunk_mlp()
    handle = model.register_forward_pre_hook(lambda m, a: None if checking() else rows.append(a[0].shape[0]))
    try:
        mcdrop.MCDropout(model, n_samples=8, seed=0, strategy="replicate", max_batch_size=100).sample(
            torch.randn(5, 6)
        )
    finally:
        handle.remove()
    assert rows == [40]


# ------------------------------------------------------------------------- the row check and other randomness
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
    with caplog.at_level(logging.DEBUG, logger=SAMPLING_LOGGER):
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


# --------------------------------------------------------------------------- the row check reaches every draw
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


# ------------------------------------------------ the warning's line, generator inputs and lazy modules
def test_row_check_warning_points_at_the_users_line():
    net = Shuffles()
    for name in ("predict", "sample"):
        # a fresh wrapper remembers no decision: the row check runs (and warns) in this call
        mc = mcdrop.MCDropout(
            net, n_samples=4, seed=0, include=[Shuffles], task="regression", max_batch_size=2
        )
        with pytest.warns(mcdrop.RowCheckWarning) as caught:
            getattr(mc, name)(torch.randn(4, 6))
        assert caught[0].filename == __file__, (name, caught[0].filename)


class MasksWithAGenerator(nn.Module):
    """A train-only hand-made mask drawn from a generator passed as input: a random gate."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        if self.training:
            h = h * (torch.rand(h.shape, generator=generator) > 0.3) / 0.7
        return self.l2(h)


def test_a_gate_drawing_from_a_generator_input_is_random_to_the_gate_check():
    """Regression: the gate check put the generator back after every pass, so its passes from two
    seeds drew the same mask and the gate read as deterministic (ModelStateError)."""
    net = MasksWithAGenerator().eval()
    generator = torch.Generator().manual_seed(3)
    mc = mcdrop.MCDropout(net, n_samples=8, seed=0, task="regression")  # found as a functional gate
    samples = mc.sample(torch.randn(16, 6), generator=generator)
    assert not torch.equal(samples[0], samples[1])


class JittersWithAGenerator(nn.Module):
    """Row-independent: dropout, plus an integer per row drawn from a generator passed as input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.drop, self.l2 = nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.l2(self.drop(self.l1(x)) + torch.randint(0, 3, (x.shape[0], 1), generator=generator))


def test_randomness_from_a_generator_input_gives_no_verdict_rather_than_mixing():
    """Regression: with the generator put back after every check pass, the passes from two seeds
    drew alike, so per-row draws read as rows mixing and replicate was refused."""
    net = JittersWithAGenerator().eval()
    generator = torch.Generator().manual_seed(3)
    mc = mcdrop.MCDropout(net, n_samples=4, seed=0, task="regression", strategy="replicate")
    with pytest.warns(mcdrop.RowCheckWarning):
        samples = mc.sample(torch.randn(16, 6), generator=generator)
    assert samples.shape == (4, 16, 2)


def test_a_lazy_module_initialised_in_the_first_pass_keeps_random_weights():
    """Regression: the row check made every draw a constant, nn.init's included, so a LazyLinear
    first run by the check got a weight of one repeated value, for good."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)).eval()
    mcdrop.MCDropout(net, n_samples=4, seed=0, task="regression").predict(torch.randn(8, 6))
    assert net[0].weight.unique().numel() == net[0].weight.numel()


# --------------------------------------------------------------------------- checks leave the model alone
class LooksUpIds(nn.Module):
    """Ids -> ``nn.Embedding(max_norm=1)`` (which renormalises the rows it looks up, in place) -> dropout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.drop, self.out = nn.Embedding(10, 8, max_norm=1.0), nn.Dropout(0.3), nn.Linear(8, 3)
        with torch.no_grad():
            self.emb.weight.mul_(5)  # every row longer than max_norm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.emb(ids)))


def test_check_passes_leave_an_embedding_with_max_norm_as_the_users_passes_leave_it():
    """Regression (issue 18, item 3): for a lone row the row check ran an invented neighbouring id,
    whose embedding row was renormalised although the user never looked it up."""
    net = LooksUpIds().eval()
    before = net.emb.weight.detach().clone()
    mcdrop.MCDropout(net, n_samples=8, seed=0).predict(torch.tensor([5]))
    assert (net.emb.weight != before).any(1).nonzero().flatten().tolist() == [5]  # the user's id only


class MaxAbsObserver(nn.Module):
    """An eval-time observer: a buffer holding the largest ``|x|`` seen, updated in one of three ways."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.register_buffer("max_abs", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = torch.maximum(self.max_abs, x.detach().abs().max())
        if self.how == "in place":
            self.max_abs.copy_(seen)
        elif self.how == "re-assigned":
            self.max_abs = seen
        else:
            self.max_abs.data = seen
        return x


@pytest.mark.parametrize("observer", ["in place", "re-assigned", "data swapped", "FakeQuantize"])
@pytest.mark.parametrize("rows", [1, 2])
def test_check_passes_leave_observers_as_the_users_passes_leave_them(observer, rows):
    """Regression (issue 18, item 3): the check's invented row (``1.25 x + 0.5`` of a lone row, or of
    identical rows) was recorded by eval-time observers, changing every later eval output."""
    torch.manual_seed(0)
    if observer == "FakeQuantize":
        obs: nn.Module = torch.ao.quantization.FakeQuantize()
    else:
        obs = MaxAbsObserver(observer)
    net = nn.Sequential(obs, nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 2)).eval()
    x = torch.tensor([[1.0, -0.5, 0.25, 2.0]]).expand(rows, 4)  # the invented row reaches 3.0
    users = copy.deepcopy(net)
    with torch.no_grad():
        users(x)  # what the user's own passes show the observer (the input itself)
    mcdrop.MCDropout(net, n_samples=8, seed=0).predict(x)
    for (name, got), want in zip(net.state_dict().items(), users.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_checking_is_public_and_tells_the_check_passes_of_a_call_apart():
    assert mcdrop.checking is checking and "checking" in mcdrop.__all__
    net = trunk_mlp()
    seen: list[tuple[bool, int]] = []
    net.register_forward_hook(lambda m, args, out: seen.append((mcdrop.checking(), out.shape[0])))
    mcdrop.MCDropout(net, n_samples=6, seed=0, strategy="replicate").predict(torch.randn(3, 6))
    assert {check for check, _ in seen} == {True, False}
    assert sum(rows for check, rows in seen if not check) == 6 * 3  # the samples' rows, replicas included
    assert not mcdrop.checking()
