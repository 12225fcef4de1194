"""Choosing a strategy (``mcdrop/engine/choose.py``): the decision, its fallbacks, and remembering it.

``strategy="auto"`` tries vmap, then replication, then the loop, and falls back with the reason at
DEBUG level on the ``mcdrop.sampling`` logger: dropout fused into an op that vmap would run once for
all samples, one draw per pass, data-dependent control flow, a model that only takes its own batch
size. The decision is remembered per input signature; an explicit strategy that cannot sample
correctly raises; the model's own errors after the decision propagate.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from zoo import SAMPLING_LOGGER, head_cnn, strategy_of, trunk_mlp

import mcdrop
from mcdrop.engine.checks import checking
from mcdrop.errors import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- models
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


# --------------------------------------------------------------------------- the choice of strategy
def test_the_decision_is_remembered_per_input_signature(caplog):
    mc = mcdrop.MCDropout(head_cnn(), n_samples=6, seed=0)
    with caplog.at_level(logging.DEBUG, logger=SAMPLING_LOGGER):
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
    with caplog.at_level(logging.DEBUG, logger=SAMPLING_LOGGER):
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
    with caplog.at_level(logging.DEBUG, logger=SAMPLING_LOGGER):
        s = mcdrop.MCDropout(net, n_samples=5, seed=0, task="regression").sample(torch.randn(3, 6))
    assert strategy_of(caplog) == "loop"
    assert s.shape == (5, 3, 4)


def test_explicit_vmap_that_cannot_sample_correctly_raises():
    with pytest.raises(UnsupportedModelError, match="shared between samples"):
        mcdrop.MCDropout(TrunkThenLSTM().eval(), n_samples=4, strategy="vmap", task="regression").sample(
            torch.randn(3, 5, 4)
        )


def test_model_errors_after_the_decision_propagate():
    class Breaks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = trunk_mlp()
            self.calls = 0

        def forward(self, x):
            self.calls += not checking()  # mcdrop's check passes do not count
            if self.calls == 4:
                raise RuntimeError("boom")
            return self.net(x)

    with pytest.raises(RuntimeError, match="boom"):
        mcdrop.MCDropout(Breaks(), n_samples=40, seed=0, max_batch_size=20).predict(torch.randn(2, 6))
