"""Sizing the engine's passes (``mcdrop/engine/plan.py``): chunks, pass sizes and memory budgets.

Every row gets exactly N samples whatever the chunking; a batch larger than ``max_batch_size`` is
split and a small one replicated up to it; pass shapes do not depend on whether a decision was
cached; and every forward pass, the checks included, holds at most an explicit memory budget, as
measured by the tensor-storage meter of ``tests/zoo.py`` (data-dependent widths and unbatched inputs
included).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from zoo import AllocatedBytes, Tagged, distinct_rows

import mcdrop
from mcdrop.engine.checks import checking
from mcdrop.engine.plan import plan_work

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- chunks and pass sizes
@pytest.mark.parametrize("b, max_batch_size", [(10, 4), (9, 3), (5, 1), (7, 6)])
def test_batch_larger_than_max_batch_size_is_split(b, max_batch_size):
    x = distinct_rows(b, 2)
    net = Tagged()
    n = 5
    s = mcdrop.MCDropout(net, n_samples=n, seed=0, max_batch_size=max_batch_size, task="regression").sample(x)
    assert max(net.rows) <= max_batch_size
    assert sum(net.rows) == n * b
    assert len(net.rows) == n * math.ceil(b / max_batch_size)
    assert torch.equal(s[..., :2], x.expand(n, b, 2))


@pytest.mark.parametrize("b, max_batch_size, n", [(3, 10, 8), (2, 7, 5), (4, 4, 3)])
def test_small_batch_is_replicated_up_to_max_batch_size(b, max_batch_size, n):
    net = Tagged()
    x = distinct_rows(b, 2)
    s = mcdrop.MCDropout(net, n_samples=n, seed=0, max_batch_size=max_batch_size, task="regression").sample(x)
    k = max(1, min(n, max_batch_size // b))
    assert max(net.rows) == k * b <= max_batch_size
    assert sum(net.rows) == n * b
    assert torch.equal(s[..., :2], x.expand(n, b, 2))


def test_automatic_chunking_respects_a_tiny_memory_budget():
    x = distinct_rows(5, 3)
    net = Tagged()
    mc = mcdrop.MCDropout(net, n_samples=4, seed=0, memory_budget=1, task="regression")
    s = mc.sample(x)
    assert net.rows == [1] * 20  # budget allows one row per pass
    assert torch.equal(s[..., :3], x.expand(4, 5, 3))


@pytest.mark.parametrize(
    "size, n, max_rows", [(1, 1, 1), (5, 7, 3), (3, 10, 7), (4, 9, 100), (8, 2, 8), (6, 3, 4)]
)
def test_plan_work_gives_every_row_exactly_n_samples(size, n, max_rows):
    start = 2
    counts = [0] * (start + size)
    for s, e, k in plan_work(start, start + size, n, max_rows):
        assert start <= s < e <= start + size
        assert 1 <= k and k * (e - s) <= max_rows
        for i in range(s, e):
            counts[i] += k
    assert counts[start:] == [n] * size
    assert list(plan_work(0, 0, n, max_rows)) == [] and list(plan_work(0, size, 0, max_rows)) == []


def test_replicate_plans_do_not_depend_on_history():
    """A batch meets the model in the same pass shapes whether or not the decision was cached."""
    net, x = nn.Sequential(nn.Dropout(0.0), nn.Linear(6, 3)).eval(), torch.randn(4, 6)
    with pytest.warns(mcdrop.NoRandomnessWarning):
        fresh = mcdrop.MCDropout(net, n_samples=9, seed=0, include=[nn.Dropout], task="regression")
    fresh.sample(torch.randn(4, 6))
    with pytest.warns(mcdrop.NoRandomnessWarning):
        other = mcdrop.MCDropout(net, n_samples=9, seed=0, include=[nn.Dropout], task="regression")
    assert torch.equal(fresh.sample(x), other.sample(x))


# --------------------------------------------------------------------------- memory budgets
class UsesAnAdjacency(nn.Module):
    """A graph layer: rows (nodes) mixed through an adjacency given whole to every pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.drop = nn.Linear(4, 4), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(x)) + adj[: x.shape[0], : x.shape[0]].sum() * 0.0


def test_an_unbatched_input_is_not_counted_as_memory_per_row():
    """Regression: the per-pass copy of a large unbatched tensor was metered as a row's memory, so a
    small batch was cut into many tiny passes."""
    net = UsesAnAdjacency().eval()
    adj = torch.zeros(1024, 1024)  # 4 MiB, given whole to every pass
    x = torch.randn(16, 4)
    passes: list[int] = []
    handle = net.register_forward_pre_hook(lambda m, a: None if checking() else passes.append(a[0].shape[0]))
    try:
        mc = mcdrop.MCDropout(
            net,
            n_samples=40,
            seed=0,
            task="regression",
            strategy="replicate",
            memory_budget=32 * 2**20,
            batch_dim={"adj": None, "*": 0},
        )
        mc.sample(x, adj=adj)
    finally:
        handle.remove()
    assert sum(passes) == 40 * 16
    assert len(passes) <= 3, passes  # the head pass, then the other samples in one or two passes


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
