"""Tests for mcdrop/engine/discover.py: train-gated randomness the static scan misses, found at run time.

Each model hides ``F.dropout(..., self.training)`` where the scan of the code cannot follow it, beside
an ``nn.Dropout`` that the rules find. Before run-time discovery, mcdrop sampled only that one and said
nothing: the MC variance was a few percent of a train-mode loop's. Now the hidden dropout is found on
the first call, sampled, and named in ``describe()``; randomness that is not dropout warns.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mcdrop
from mcdrop.engine.checks import checking
from mcdrop.engine.discover import draw_kind
from mcdrop.errors import TrainModeRandomnessWarning

pytestmark = pytest.mark.usefixtures("one_thread")

P = 0.3
X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))

# Helpers called through a module object: the scan of a class's code follows helpers called by bare
# name, not attributes of other modules.
dropout_utils = types.ModuleType("dropout_utils")
dropout_utils.apply_dropout = lambda module, x: F.dropout(x, P, module.training)
dropout_utils.add_noise = lambda module, x: x + torch.randn_like(x) if module.training else x
dropout_utils.cool = lambda module, x: x / 2.0 if module.training else x


class ViaModule(nn.Module):
    """A helper called through its module: ``dropout_utils.apply_dropout(self, x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_utils.apply_dropout(self, self.lin(x))


class Dropper:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, P, self.module.training)


class ViaObject(nn.Module):
    """A helper object holding the module: ``self.dropper(x)`` reads ``self.module.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.dropper = Dropper(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropper(self.lin(x))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.lin(x), P, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class ViaChild(nn.Module):
    """A child's method other than ``forward``: ``self.enc.embed(x)`` reads ``self.enc.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = Encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc.embed(x)


class ViaGetattr(nn.Module):
    """``getattr(self, "_apply_" + mode)`` dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.mode = "drop"

    def _apply_drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, P, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "_apply_" + self.mode)(self.lin(x))


class ViaCheckpointingCondition(nn.Module):
    """``if self.training and not self.gradient_checkpointing:``, read as a checkpointing switch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        if self.training and not self.gradient_checkpointing:
            x = F.dropout(x, P, True)
        return x


class Noise(nn.Module):
    """Gaussian noise in train mode: a gate the scan finds, drawing noise, not dropout masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.randn_like(x) if self.training else x


class Flip(nn.Module):
    """A random flip in train mode: one coin for the whole pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if self.training and bool(torch.rand(()) < 0.5) else x


class HiddenNoise(nn.Module):
    """Noise behind a helper the scan cannot follow: found at run time, not dropout, left off."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_utils.add_noise(self, self.lin(x))


class HiddenTemperature(nn.Module):
    """Hidden dropout and a train-only temperature: found, but its train mode is more than randomness."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_utils.cool(self, dropout_utils.apply_dropout(self, self.lin(x)))


def net(block: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), block, nn.Dropout(0.1), nn.Linear(8, 3)).eval()


def train_loop_variance(model: nn.Module, n: int) -> torch.Tensor:
    """The per-output variance of a hand-written MC loop: everything in train mode but BatchNorm."""
    model.train()
    model[1].eval()
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            return torch.stack([model(X) for _ in range(n)]).var(0)
    finally:
        model.eval()


HIDDEN = [ViaModule, ViaObject, ViaChild, ViaGetattr, ViaCheckpointingCondition]


@pytest.mark.parametrize("block", HIDDEN, ids=lambda c: c.__name__)
def test_hidden_dropout_is_found_sampled_and_named(block):
    model = net(block())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mc = mcdrop.MCDropout(model, n_samples=400, seed=0)
    samples = mc.sample(X)
    found = [s for s in mc.sites if s.note.startswith("found at run time")]
    assert found and found[0].path == "2" and all(s.sampled and s.kind == "functional" for s in found)
    assert "found at run time" in " ".join(mc.describe()["note"])
    # the same distribution as a train-mode loop: the variances agree (at N = 400 a variance
    # estimate is within ~15% of the truth; without the hidden dropout the ratio was ~0.05)
    ratio = float(samples.var(0).mean() / train_loop_variance(model, 400).mean())
    assert 0.8 < ratio < 1.25, ratio
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is as it was
    assert all(not m.training for m in model.modules())


def test_discovery_runs_once_per_input_signature_and_its_passes_are_check_passes():
    model = net(ViaModule())
    passes: list[tuple[int, bool]] = []
    model[2].register_forward_pre_hook(lambda m, args: passes.append((args[0].shape[0], checking())))
    mc = mcdrop.MCDropout(model, n_samples=3, seed=0, strategy="loop")
    mc.predict(X)
    first = list(passes)
    passes.clear()
    mc.predict(X[:5])  # the same signature: no discovery, no gate check, no row check
    assert any(check for _, check in first)
    assert passes == [(5, False)] * 3


def test_a_model_without_user_modules_runs_no_discovery_pass():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 3)).eval()
    seen: list[bool] = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(checking()))
    mcdrop.MCDropout(model, n_samples=2, seed=0, strategy="loop", max_batch_size=1).predict(X[:1])
    assert seen == [False, False]  # the two sampling passes only


@pytest.mark.parametrize("block", [Noise, Flip], ids=["noise", "flip"])
def test_a_gate_drawing_other_than_dropout_warns_and_include_or_exclude_settle_it(block):
    with pytest.warns(
        TrainModeRandomnessWarning, match=r"in train mode, 2 draws .* which is not dropout.*exclude=\['2'\]"
    ):
        mcdrop.MCDropout(net(block()), n_samples=4, seed=0).predict(X)
    for option in ({"include": ["2"]}, {"exclude": ["2"]}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mcdrop.MCDropout(net(block()), n_samples=4, seed=0, **option).predict(X)


def test_hidden_randomness_that_is_not_dropout_warns_and_is_left_off():
    model = net(HiddenNoise())
    with pytest.warns(
        TrainModeRandomnessWarning, match=r"2 draws noise \(randn_like\).*does not sample.*include=\['2'\]"
    ):
        mc = mcdrop.MCDropout(model, n_samples=4, seed=0)
        mc.predict(X)
    assert not any(s.path == "2" for s in mc.sites)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mcdrop.MCDropout(model, n_samples=4, seed=0, exclude=["2"]).predict(X)


def test_hidden_dropout_whose_train_mode_changes_more_than_randomness_is_left_off_with_a_warning():
    with pytest.warns(TrainModeRandomnessWarning, match="also changes more than randomness"):
        mc = mcdrop.MCDropout(net(HiddenTemperature()), n_samples=4, seed=0)
        mc.predict(X)
    assert not any(s.path == "2" for s in mc.sites)


def test_draw_kinds():
    ops = torch.ops.aten
    assert draw_kind(ops.randn_like.default, torch.zeros(3)) == "noise"
    assert draw_kind(ops.rand.default, torch.zeros(())) == "coin"
    assert draw_kind(ops.rand.default, torch.zeros(4)) == "mask"
    assert draw_kind(ops.bernoulli_.float, torch.zeros(4)) == "mask"
    assert draw_kind(ops.randperm.default, torch.zeros(4)) == "integers"
    assert draw_kind(ops.mm.default, torch.zeros(4)) is None


class RenormsAndHidesDropout(nn.Module):
    """Hidden dropout after an Embedding(max_norm=1), which renormalises the rows it looks up, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8, max_norm=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dropout_utils.apply_dropout(self, self.emb(ids).mean(1))


def test_discovery_passes_leave_parameters_as_the_users_own_passes_would():
    torch.manual_seed(0)
    model = nn.Sequential(RenormsAndHidesDropout(), nn.Dropout(0.1), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].emb.weight.mul_(3.0)  # every row beyond max_norm
    ids = torch.tensor([[1, 2]])  # one row: the row check also runs an invented row of other ids
    with torch.no_grad():
        model(ids)  # the user's own pass renormalises rows 1 and 2 of the table, and only those
    expected = model[0].emb.weight.detach().clone()
    mcdrop.MCDropout(model, n_samples=3, seed=0).predict(ids)
    assert torch.equal(model[0].emb.weight, expected)  # discovery, gate and row checks wrote nothing else
