"""The probe pass (``mcdrop/engine/probe.py``): what ``strategy="auto"`` observes in the first pass.

The probe finds the deterministic trunk (the operations before the first random draw) and its
share of the FLOPs: a CNN trunk worth hoisting makes auto choose vmap, a model whose first op is
random keeps replication.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from zoo import SAMPLING_LOGGER, head_cnn, strategy_of

import mcdrop

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the deterministic trunk
def test_auto_hoists_a_cnn_trunk_with_vmap(caplog):
    net, x = head_cnn(), torch.randn(5, 3, 6, 6)
    with caplog.at_level(logging.DEBUG, logger=SAMPLING_LOGGER):
        s = mcdrop.MCDropout(net, n_samples=40, seed=0).sample(x)
    assert strategy_of(caplog) == "vmap"
    assert "deterministic trunk holds" in caplog.text
    assert s.shape == (40, 5, 4)
    assert not net.training and not any(m.training for m in net.modules())


def test_auto_keeps_replication_when_there_is_no_trunk_worth_hoisting(caplog):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 3)).eval()  # the first op is random
    with caplog.at_level(logging.DEBUG, logger=SAMPLING_LOGGER):
        mcdrop.MCDropout(net, n_samples=8, seed=0).sample(torch.randn(4, 6))
    assert strategy_of(caplog) == "replicate"
    assert "no hoisting" in caplog.text
