"""The run-time check of functional gates (mcdrop._gatecheck).

A user class whose forward reads ``self.training`` is put in train mode by the policy (rule 10).
These tests prove that a wrapper then finds out, on the inputs it is given, whether the flag gates
only dropout: a deterministic train-mode change raises (naming the module, model untouched), numpy
randomness warns, hand-made torch randomness is sampled and noted, and the check itself leaves
every generator as it was and runs once per input signature.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mcdrop
from mcdrop._gatecheck import TORCH_RANDOMNESS_NOTE, check_gates, checking
from mcdrop.errors import GateRandomnessWarning, ModelStateError


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
    # the gate check (one row to measure memory, then its reference and train-mode passes on 8 rows),
    # the engine's row check (one row to measure memory, then 8 rows and their halves), then the
    # sampling pass(es)
    checks = [r for r, check in first if check]
    assert checks == [1, 8, 8, 1, 8, 4, 4]
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
