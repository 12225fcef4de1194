"""Outputs of the sampling engine (``mcdrop/engine/outputs.py``): the analysed output, samples first, finite.

Samples come back samples-first ``(N, B, ...)`` (trailing dimensions kept, ``output_batch_dim``
honoured); the analysed output is chosen from tuples, dicts and output objects (``output=``) or the
choice is refused with a message that says what to pass; NaN and +inf in the outputs are refused
naming the rows.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from zoo import distinct_rows, mlp, randn_rows

import mcdrop
from mcdrop import McdropError, MCDropout, NonFiniteError
from mcdrop.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- samples first
@pytest.mark.parametrize("n, b, d", [(1, 1, 1), (4, 3, 2), (7, 5, 3)])
def test_sample_shape_is_samples_first(n, b, d):
    net = mlp(d_in=d, d_out=6)
    s = mcdrop.MCDropout(net, n_samples=n, seed=0).sample(torch.randn(b, d))
    assert s.shape == (n, b, 6)
    assert s.dtype == torch.float32


def test_sample_of_segmentation_output_keeps_trailing_dims():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.Conv2d(4, 2, 1)).eval()
    s = mcdrop.MCDropout(net, n_samples=5, seed=0).sample(torch.randn(3, 3, 4, 6))
    assert s.shape == (5, 3, 2, 4, 6)


def test_batch_dim_1_input_with_output_batch_dim_0():
    """Inputs batched on dim 1 (``(F, B)``) and an output batched on dim 0."""

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):  # x: (F, B)
            xt = x.t()
            return torch.cat([xt, self.drop(torch.ones_like(xt))], 1)

    x = distinct_rows(4, 3).t().contiguous()  # (3, 4): batch of 4 on dim 1
    mc = mcdrop.MCDropout(
        Transposed(),
        n_samples=5,
        batch_dim=1,
        output_batch_dim=0,
        seed=0,
        task="regression",
        max_batch_size=8,
    )
    s = mc.sample(x)
    assert s.shape == (5, 4, 6)
    assert torch.equal(s[..., :3], x.t().expand(5, 4, 3))


def test_wrong_output_batch_dim_is_reported():
    lstm = nn.LSTM(2, 3, num_layers=2, dropout=0.5)
    mc = mcdrop.MCDropout(lstm, n_samples=2, batch_dim=1, output_batch_dim=0, task="regression")
    with pytest.raises(InvalidInputError, match="output_batch_dim"):
        mc.sample(torch.randn(5, 3, 2))
    mc = mcdrop.MCDropout(mlp(), n_samples=2, output_batch_dim=4)
    with pytest.raises(InvalidInputError, match="no batch dimension 4"):
        mc.sample(torch.randn(3, 5))


class SequenceFirst(nn.Module):
    """``src (T, B, E)`` and a padding mask ``(B, T)`` to ``(T, B, 2 E)``: ``src`` as it is, then dropout.

    The first half of the features is the input itself, so the test can see whether every row of a
    result is the row of the batch that it claims to be.
    """

    def __init__(self, one_feature: bool = False) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.one_feature = one_feature  # (T, B, 1): no pass of one row tells where the batch is

    def forward(self, src, mask=None):
        if mask is not None:
            src = src.masked_fill(mask.t()[..., None], 0.0)
        if self.one_feature:
            return self.drop(src).sum(-1, keepdim=True)
        return torch.cat([src, self.drop(torch.ones_like(src))], -1)


def _sequence_first(t: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = distinct_rows(t * b, 3).reshape(t, b, 3)
    return src, torch.zeros(b, t, dtype=torch.bool)


@pytest.mark.parametrize("strategy", ["auto", "vmap", "replicate", "loop"])
@pytest.mark.parametrize("explicit", [False, True], ids=["inferred", "output_batch_dim=1"])
def test_batch_dim_mapping_with_time_equal_to_batch_is_not_swapped(strategy, explicit):
    src, mask = _sequence_first(t=4, b=4)
    mc = MCDropout(
        SequenceFirst(), n_samples=3, seed=0, task="regression", strategy=strategy,
        batch_dim={"src": 1, "mask": 0}, **({"output_batch_dim": 1} if explicit else {}),
    )
    s = mc.sample(src=src, mask=mask)
    assert s.shape == (3, 4, 4, 6) and torch.equal(s[..., :3], src.transpose(0, 1).expand(3, 4, 4, 3))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batch_dim_mapping_whose_outputs_never_tell_the_batch_is_refused(strategy):
    src, mask = _sequence_first(t=4, b=4)  # every pass: (4, 1, 1) or (4, 4, 1)
    mc = MCDropout(
        SequenceFirst(one_feature=True), n_samples=3, seed=0, task="regression", strategy=strategy,
        batch_dim={"src": 1, "mask": 0},
    )
    with pytest.raises(InvalidInputError, match=r"dimensions \[0, 1\] all have that size.*output_batch_dim="):
        mc.sample(src=src, mask=mask)
    mc = MCDropout(
        SequenceFirst(one_feature=True), n_samples=3, seed=0, task="regression", strategy=strategy,
        batch_dim={"src": 1, "mask": 0}, output_batch_dim=1,
    )
    assert mc.sample(src=src, mask=mask).shape == (3, 4, 4, 1)


@pytest.mark.parametrize("strategy", ["auto", "vmap", "replicate", "loop"])
@pytest.mark.parametrize(
    "t, batch_dim, with_mask",
    [
        (6, {"src": 1, "mask": 0}, True),  # the output's only dimension of the batch's size
        (5, {"src": 1, "mask": None}, False),  # every batched input on dim 1 (T == B too)
        (5, {"src": 1}, False),  # the "*" default 0 names no input of the call
    ],
    ids=["output-tells", "mapping-gives-one-dim", "inputs-share-one-dim"],
)
def test_batch_dim_mapping_infers_the_output_batch_dim_only_when_unambiguous(strategy, t, batch_dim, with_mask):
    src, mask = _sequence_first(t=t, b=5)
    kwargs = {"mask": mask} if with_mask else {}
    mc = MCDropout(SequenceFirst(), n_samples=3, seed=0, task="regression", strategy=strategy, batch_dim=batch_dim)
    s = mc.sample(src=src, **kwargs)
    assert s.shape == (3, 5, t, 6) and torch.equal(s[..., :3], src.transpose(0, 1).expand(3, 5, t, 3))


def test_infer_output_batch_dim_takes_the_only_dimension_of_the_batch_size():
    from mcdrop.engine.outputs import infer_output_batch_dim

    assert infer_output_batch_dim((7, 4, 3), 4) == 1
    with pytest.raises(InvalidInputError, match=r"dimensions \[0, 1\] all have"):
        infer_output_batch_dim((4, 4, 3), 4)
    with pytest.raises(InvalidInputError, match="no dimension has"):
        infer_output_batch_dim((7, 2), 4)


# --------------------------------------------------------------------------- output selection
class MultiOut(nn.Module):
    """Returns the tagged output in several containers, chosen by ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        tagged = torch.cat([x, self.drop(torch.ones_like(x))], -1)
        other = torch.zeros(x.shape[0], 1)
        if self.kind == "tensor":
            return tagged
        if self.kind == "tuple":
            return tagged, other
        if self.kind == "tuple_second":
            return other, tagged
        if self.kind == "dict_logits":
            return {"loss": torch.tensor(0.0), "logits": tagged}
        if self.kind == "dict_scores":
            return {"scores": tagged, "other": other}
        if self.kind == "dict_single":
            return {"scores": tagged}
        if self.kind == "object":
            return types.SimpleNamespace(logits=tagged, hidden=other)
        if self.kind == "object_scores":
            return types.SimpleNamespace(scores=tagged, hidden=other)
        raise AssertionError(self.kind)


@pytest.mark.parametrize(
    "kind, output",
    [
        ("tensor", None),
        ("tuple", None),
        ("tuple", 0),
        ("tuple_second", 1),
        ("tuple_second", -1),
        ("dict_logits", None),
        ("dict_logits", "logits"),
        ("dict_scores", "scores"),
        ("dict_single", None),
        ("object", None),
        ("object_scores", "scores"),
        ("dict_scores", lambda o: o["scores"]),
        ("tuple_second", lambda o: o[1]),
    ],
)
def test_output_selection(kind, output):
    x = distinct_rows(3, 2)
    mc = mcdrop.MCDropout(
        MultiOut(kind), n_samples=4, seed=0, output=output, task="regression", max_batch_size=5
    )
    s = mc.sample(x)
    assert s.shape == (4, 3, 4)
    assert torch.equal(s[..., :2], x.expand(4, 3, 2))


@pytest.mark.parametrize(
    "kind, output, match",
    [
        ("dict_scores", "missing", r"output='missing'.*no key or attribute 'missing'.*'scores', 'other'"),
        ("object", "missing", r"no key or attribute 'missing'.*logits"),
        ("tuple", 5, r"output=5: the model returned only 2 outputs"),
        ("tensor", 0, r"output=0: the model output is a Tensor, not a tuple"),
        ("dict_scores", None, r"Cannot tell which part.*Pass output="),
        ("dict_scores", lambda o: "nope", r"not a tensor.*Pass output="),
    ],
)
def test_bad_output_selection_is_reported(kind, output, match):
    mc = mcdrop.MCDropout(MultiOut(kind), n_samples=2, output=output, task="regression")
    with pytest.raises(InvalidInputError, match=match):
        mc.sample(torch.randn(3, 2))


# --------------------------------------------------------------------------- finite checks
def test_minus_infinity_that_breaks_the_outputs_is_refused_on_the_outputs():
    x = randn_rows()
    x[2, 1] = -float("inf")
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).eval()  # -inf times a weight: +-inf outputs
    with pytest.raises(NonFiniteError, match=r"model produced NaN or infinity.*batch rows \[2\]"):
        MCDropout(linear, n_samples=2, task="regression").predict(x)
    # a model that maps -inf to finite values (tanh saturates) is sampled as it computes
    assert bool(torch.isfinite(MCDropout(mlp(4, 3), n_samples=2).predict(x).probs).all())


def test_model_that_outputs_nan():
    class NaNRow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(4, 3)

        def forward(self, x):
            out = self.net(x)
            return torch.where(x[:, :1] > 100, torch.full_like(out, float("nan")), out)

    x = randn_rows()
    x[3, 0] = 1000.0
    with pytest.raises(NonFiniteError, match=r"produced NaN or infinity in its output \(batch rows \[3\]"):
        MCDropout(NaNRow(), n_samples=3).predict(x)
    assert issubclass(NonFiniteError, McdropError)
