"""Faster dropout masks (``mcdrop/engine/fastdropout.py``): the same law as torch's dropout.

The fast masks (numpy, blocked, splitmix, under vmap) drop at rate p and scale like ``F.dropout``;
where they do not apply they are ``F.dropout`` itself; models are patched only while sampling and
only in train mode; the attention and RNN paths are torch's attention and RNNs without the dropout.

Statistical tolerances: dropout rates are checked at 5 binomial standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mcdrop
from mcdrop.engine import fastdropout as fd

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the masks
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


class ForceField(nn.Module):
    """Forces as the gradient of an energy, computed inside ``forward`` (as force-field models do).

    The dropout acts on 4 x 1024 elements, above ``MIN_FAST_ELEMENTS``, on a tensor autograd records.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.drop, self.l2 = nn.Linear(3, 1024), nn.Dropout(0.2), nn.Linear(1024, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            energy = self.l2(self.drop(torch.tanh(self.l1(x)))).sum()
            return -torch.autograd.grad(energy, x)[0]


def test_dropout_that_autograd_records_falls_back_to_torch_and_keeps_the_law():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    model = ForceField().eval()
    n = 2000
    pred = mcdrop.MCDropout(model, n_samples=n, seed=0, task="regression", keep_samples=True).predict(x)
    torch.manual_seed(1)
    model.train()
    want = torch.stack([model(x) for _ in range(n)])  # torch's own dropout, one pass per sample
    model.eval()
    got = pred.samples
    assert got.shape == want.shape
    # Means within 5 standard errors of their difference; variances within 20% (their relative
    # standard error is sqrt(2 / n) = 3.2% each, so 4.5 standard errors of the difference).
    se = (got.var(0) / n + want.var(0) / n).sqrt()
    assert bool(((got.mean(0) - want.mean(0)).abs() <= 5 * se).all())
    ratio = got.var(0) / want.var(0)
    assert bool(((ratio - 1).abs() < 0.2).all()), ratio
    with torch.enable_grad(), fd.accelerated(nn.Identity(), seed=0):
        leaf = torch.randn(5000, requires_grad=True)
        fd.dropout(leaf * 1.0, 0.5).sum().backward()  # differentiable: torch's dropout
        assert set(leaf.grad.unique().tolist()) <= {0.0, 2.0}


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


# --------------------------------------------------------------------------- attention and RNN paths
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
