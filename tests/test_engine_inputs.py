"""Inputs of the sampling engine (``mcdrop/engine/inputs.py``): preparing, replicating, slicing, copying.

Row ``i`` of every sample is input row ``i`` (replicated, split and reshaped back bit for bit, with
the tagged models of ``tests/zoo.py``); batch dimensions other than 0; nested and keyword inputs and
inputs marked as not batched; casts to the model's dtype; the validation of the inputs (empty
batches, disagreeing batch sizes, NaN and +inf); and the inputs are left alone: every pass gets its
own copy of what it could change in place (tensors, mutable objects such as a Hugging Face cache),
while plain values, code and random generators are passed as they are.

Statistical tolerances: the only statistical comparison (LSTM engine vs a per-sample loop) allows
5 standard errors of the difference of two independent means, per element.
"""

from __future__ import annotations

import threading
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from zoo import Tagged, distinct_rows, mlp, randn_rows

import mcdrop
from mcdrop import MCDropout, NonFiniteError
from mcdrop.errors import InvalidInputError, NoRandomnessWarning

pytestmark = pytest.mark.usefixtures("one_thread")


# -------------------------------------------------------------- replication: row i of every sample is input i
@pytest.mark.parametrize("max_batch_size", [1, 2, 3, 5, 12, 100, None])
def test_row_i_of_every_sample_is_input_i(max_batch_size):
    x = distinct_rows(6, 3)
    net = Tagged()
    s = mcdrop.MCDropout(net, n_samples=4, seed=0, max_batch_size=max_batch_size, task="regression").sample(x)
    assert s.shape == (4, 6, 6)
    assert torch.equal(s[..., :3], x.expand(4, 6, 3))
    noise = s[..., 3:]
    assert set(noise.unique().tolist()) == {0.0, 2.0}  # dropout(ones) with p=0.5
    assert sum(net.rows) == 4 * 6


def test_p0_dropout_identity_model_returns_inputs_exactly():
    """A deterministic identity model (dropout switched on via include= but with p=0)."""
    x = distinct_rows(5, 4)
    net = nn.Sequential(nn.Dropout(0.0), nn.Identity())
    with pytest.warns(NoRandomnessWarning, match="rate 0"):
        mc = mcdrop.MCDropout(net, n_samples=6, include=[nn.Dropout], task="regression", max_batch_size=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRandomnessWarning)
        s = mc.sample(x)
    assert torch.equal(s, x.expand(6, 5, 4))


# --------------------------------------------------------------------------- batch dimensions
def test_lstm_batch_second_matches_a_per_sample_loop_in_distribution():
    t, b, f, h, n = 4, 3, 2, 6, 150
    torch.manual_seed(0)
    lstm = nn.LSTM(f, h, num_layers=2, dropout=0.5).eval()  # batch_first=False: (T, B, F)
    x = torch.randn(t, b, f)
    mc = mcdrop.MCDropout(lstm, n_samples=n, batch_dim=1, task="regression", seed=0)
    s = mc.sample(x)
    assert s.shape == (n, b, t, h)
    assert not lstm.training

    torch.manual_seed(1)
    lstm.train()
    with torch.no_grad():
        ref = torch.stack([lstm(x)[0] for _ in range(n)]).permute(0, 2, 1, 3)  # (N, B, T, H)
    lstm.eval()
    with torch.no_grad():
        deterministic = lstm(x)[0].permute(1, 0, 2)

    assert bool((s.std(0) > 0).all())  # every element varies: layer 2 sees dropped layer-1 outputs
    se = torch.sqrt(s.var(0) / n + ref.var(0) / n)
    assert bool(((s.mean(0) - ref.mean(0)).abs() <= 5 * se + 1e-6).all())
    ratio = s.var(0).mean() / ref.var(0).mean()
    assert 0.8 < float(ratio) < 1.25
    # Row i belongs to input i: the sample mean is nearer to row i's own dropout-free output.
    dist = torch.cdist(s.mean(0).flatten(1), deterministic.flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(b))

    pred = mcdrop.MCDropout(lstm, n_samples=n, batch_dim=1, task="regression", seed=0).predict(x)
    assert pred.mean.shape == (b, t, h)
    torch.testing.assert_close(pred.mean, s.mean(0), atol=1e-5, rtol=0)


def test_positional_index_in_batch_dim_does_not_match_list_elements():
    """Regression: ``_dim_for`` used to look ``path[-1]`` up before ``path[0]``, so the key ``1``
    meant for positional argument 1 (a shared mask) also matches element 1 of a list passed as
    argument 0, which is then wrongly treated as not batched (and not replicated).
    """

    class ListAndMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, xs, mask):
            out = (xs[0] + xs[1]) @ mask
            return torch.cat([out, self.drop(torch.ones_like(out))], -1)

    a, b = distinct_rows(4, 3, seed=0), distinct_rows(4, 3, seed=1)
    mask = torch.tril(torch.ones(3, 3))
    mc = mcdrop.MCDropout(
        ListAndMask(), n_samples=4, seed=0, task="regression", max_batch_size=8, batch_dim={1: None, "*": 0}
    )
    s = mc.sample([a, b], mask)
    assert torch.equal(s[..., :3], ((a + b) @ mask).expand(4, 4, 3))


# --------------------------------------------------------------------------- input structures and dtypes
class KwargNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, features, scale=None, mask=None):
        out = features if scale is None else features * scale
        if mask is not None:
            assert mask.shape == (features.shape[1], features.shape[1]), "mask must not be replicated"
            out = out @ mask
        return torch.cat([out, self.drop(torch.ones_like(out))], -1)


class DictArgNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, batch):
        out = batch["features"] + batch["offset"]
        return torch.cat([out, self.drop(torch.ones_like(out))], -1)


def test_dict_inputs_as_kwargs():
    x = distinct_rows(4, 3)
    scale = torch.arange(1.0, 5.0)[:, None]
    mc = mcdrop.MCDropout(KwargNet(), n_samples=5, seed=0, task="regression", max_batch_size=6)
    s = mc.sample(**{"features": x, "scale": scale})
    assert s.shape == (5, 4, 6)
    assert torch.equal(s[..., :3], (x * scale).expand(5, 4, 3))


def test_positional_dict_input():
    x = distinct_rows(4, 3)
    offset = torch.arange(4.0)[:, None]
    mc = mcdrop.MCDropout(DictArgNet(), n_samples=3, seed=0, task="regression", max_batch_size=5)
    s = mc.sample({"features": x, "offset": offset})
    assert torch.equal(s[..., :3], (x + offset).expand(3, 4, 3))


def test_shared_mask_marked_not_batched():
    t = 3
    x = distinct_rows(5, t)
    mask = torch.tril(torch.ones(t, t))
    mc = mcdrop.MCDropout(
        KwargNet(), n_samples=4, seed=0, task="regression", batch_dim={"mask": None, "*": 0}
    )
    s = mc.sample(x, mask=mask)
    assert torch.equal(s[..., :t], (x @ mask).expand(4, 5, t))


def test_unmarked_shared_mask_is_a_batch_size_disagreement():
    mc = mcdrop.MCDropout(KwargNet(), n_samples=2, task="regression")
    with pytest.raises(InvalidInputError, match=r"disagree on the batch size.*batch_dim=\{'name': None"):
        mc.sample(torch.randn(5, 3), mask=torch.ones(3, 3))


def test_integer_inputs_are_not_cast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(8, 3)).eval()
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    s = mcdrop.MCDropout(net, n_samples=4, seed=0).sample(ids)
    assert s.shape == (4, 3, 3)


def test_float32_inputs_are_cast_to_a_float64_model():
    seen: list[torch.dtype] = []
    net = mlp(d_in=3, d_out=2).double()
    net[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(4, 3)
    mc = mcdrop.MCDropout(net, n_samples=3, seed=0, keep_samples=True)
    s = mc.sample(x)
    assert s.dtype == torch.float64 and s.device == torch.device("cpu")
    assert seen and set(seen) == {torch.float64}
    pred = mcdrop.MCDropout(net, n_samples=3, seed=0, keep_samples=True).predict(x)
    assert pred.probs.dtype == torch.float64
    assert torch.equal(pred.samples, s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_come_back_on_the_model_device():
    net = mlp(d_in=3, d_out=2).cuda()
    x = torch.randn(4, 3)  # on the CPU
    mc = mcdrop.MCDropout(net, n_samples=3, seed=0, keep_samples=True)
    assert mc.sample(x).device.type == "cuda"
    pred = mc.predict(x)
    assert pred.probs.device.type == "cuda" and pred.samples.device.type == "cuda"
    before = torch.cuda.get_rng_state()
    mc.predict(x)
    assert torch.equal(torch.cuda.get_rng_state(), before)


# --------------------------------------------------------------------------- validation
def test_empty_batch():
    with pytest.raises(InvalidInputError, match=r"batch is empty \(batch size 0\)"):
        MCDropout(mlp(4, 3), n_samples=2).predict(torch.randn(0, 4))


def test_inputs_disagree_on_batch_size():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(4, 3)

        def forward(self, a, b):
            return self.net(a + b)

    mc = MCDropout(Two(), n_samples=2)
    with pytest.raises(
        InvalidInputError, match=r"disagree on the batch size \(argument 0: 5, argument 1: 3\)"
    ):
        mc.predict(torch.randn(5, 4), torch.randn(3, 4))
    with pytest.raises(InvalidInputError, match=r"argument 0: 5, keyword 'b': 2"):
        mc.predict(torch.randn(5, 4), b=torch.randn(2, 4))


@pytest.mark.parametrize("args", [(), ([1.0, 2.0],), ("text",), (3.0,)])
def test_no_tensor_inputs(args):
    with pytest.raises(InvalidInputError, match="No tensor among the inputs"):
        MCDropout(mlp(4, 3), n_samples=2).predict(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(bad):
    x = randn_rows()
    x[2, 1] = bad
    with pytest.raises(NonFiniteError, match=r"argument 0 contains NaN or \+infinity"):
        MCDropout(mlp(4, 3), n_samples=2).predict(x)
    with pytest.raises(NonFiniteError, match=r"keyword 'input' contains NaN or \+infinity"):
        MCDropout(mlp(4, 3), n_samples=2).sample(input=x)


def test_minus_infinity_is_accepted_where_additive_attention_masks_hold_it():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    causal = nn.Transformer.generate_square_subsequent_mask(5)  # 0 on and below the diagonal, -inf above
    x = torch.randn(3, 5, 8)
    mc = MCDropout(encoder, n_samples=6, seed=0, task="regression", batch_dim={"mask": None, "*": 0})
    s = mc.sample(x, mask=causal)
    assert s.shape == (6, 3, 5, 8) and bool(torch.isfinite(s).all()) and bool((s.std(0) > 0).any())
    # the mask is applied: the first position sees only itself, so changing the last one leaves it alone
    later = x.clone()
    later[:, -1] += 1.0
    again = MCDropout(encoder, n_samples=6, seed=0, task="regression", batch_dim={"mask": None, "*": 0})
    assert torch.allclose(again.sample(later, mask=causal)[:, :, 0], s[:, :, 0], atol=1e-5)


def test_an_input_the_cast_to_the_model_dtype_overflows_is_refused():
    x = randn_rows().double()
    x[1, 0] = -1e300
    with pytest.raises(NonFiniteError, match=r"beyond the range of the model's dtype torch.float32"):
        MCDropout(mlp(4, 3), n_samples=2).predict(x)


def test_zero_dim_tensor_input():
    with pytest.raises(InvalidInputError, match="0-d tensor"):
        MCDropout(mlp(4, 3), n_samples=2).predict(torch.tensor(1.0))


# --------------------------------------------------------------- inputs are left alone: a copy for every pass
@pytest.mark.parametrize("max_batch_size", [None, 3, 100])
def test_in_place_input_dropout_neither_modifies_the_inputs_nor_compounds(max_batch_size):
    """Regression: with k=1 passes the caller's own tensor used to be handed to the model (``replicate``
    returns the inputs as they are for k == 1, and ``prepare_inputs`` does not copy them), so an
    in-place first layer such as ``nn.Dropout(p, inplace=True)`` zeroes the user's input and the
    following samples see an input that was already dropped (values 4 = 2 * 2, far more zeros).
    """
    net = nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Identity())
    x = torch.ones(3, 40)
    mc = mcdrop.MCDropout(net, n_samples=6, seed=0, task="regression", max_batch_size=max_batch_size)
    s = mc.sample(x)
    assert bool((x == 1).all()), "the caller's input was modified"
    assert set(s.unique().tolist()) <= {0.0, 2.0}
    assert float((s == 0).float().mean()) < 0.65  # 720 Bernoulli(0.5) draws: 0.5 +- 0.019


class Memory:
    """A mutable, non-tensor input that the model appends to, as a Hugging Face KV cache does."""

    def __init__(self) -> None:
        self.seen: list[int] = []


class AppendsToMemory(nn.Module):
    """``cat([x + len(memory.seen), dropout(ones)])``, appending to ``memory`` in every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 3)  # so that auto also considers vmap
        self.drop = nn.Dropout(0.5)
        self.lengths: list[int] = []

    def forward(self, x, memory, same_memory=None):
        if same_memory is not None:
            assert same_memory is memory, "objects shared between inputs must stay shared within a pass"
        self.lengths.append(len(memory.seen))
        memory.seen.append(x.shape[0])
        out = x + len(memory.seen) - 1
        return torch.cat([out, self.drop(torch.ones_like(out) + 0 * self.trunk(x))], -1)


@pytest.mark.parametrize("strategy", ["auto", "vmap", "replicate", "loop"])
@pytest.mark.parametrize("max_batch_size", [None, 2])
def test_a_mutable_object_input_is_copied_for_every_pass(strategy, max_batch_size):
    """Regression: a non-tensor input object (here a stand-in for a Hugging Face ``DynamicCache``)
    was handed to every pass (the checks, the probe, every sample) as it was, so a model that
    changes it in place changed the caller's object and each pass saw what the previous ones left.
    """
    x, memory = distinct_rows(4, 3), Memory()
    net = AppendsToMemory()
    mc = mcdrop.MCDropout(
        net, n_samples=5, seed=0, task="regression", strategy=strategy, max_batch_size=max_batch_size
    )
    s = mc.sample(x, memory, same_memory=memory)
    assert memory.seen == [], "the caller's object was changed"
    assert net.lengths and set(net.lengths) == {0}, "a pass saw what another pass left in the object"
    assert torch.equal(s[..., :3], x.expand(5, 4, 3))
    drawn = s[..., 3:]
    assert bool((drawn == 0).any()) and bool((drawn == 2).any())


def test_plain_values_and_code_are_passed_as_they_are():
    """Immutable values and code (functions, classes, dtypes, enums) are not copied."""
    seen = []

    class TakesOptions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x, act, kind, dtype, name, fn):
            seen.append((act, kind, dtype, name, fn))
            return self.drop(act(x.to(dtype)))

    def fn(t):
        return t

    options = (torch.tanh, nn.ReLU, torch.float64, "text", fn)
    mcdrop.MCDropout(TakesOptions(), n_samples=3, seed=0, task="regression").sample(
        torch.ones(2, 3), *options
    )
    assert seen and all(all(a is b for a, b in zip(call, options, strict=True)) for call in seen)


def test_an_input_object_that_cannot_be_copied_is_refused_naming_it():
    net = AppendsToMemory()
    mc = mcdrop.MCDropout(net, n_samples=3, seed=0, task="regression")
    with pytest.raises(
        InvalidInputError, match=r"keyword 'memory' is a lock.*cannot be deep-copied.*every pass"
    ):
        mc.sample(torch.ones(2, 3), memory=threading.Lock())
    assert net.lengths == [], "no pass may run with an object that would be shared"


@pytest.mark.parametrize("strategy", ["vmap", "replicate", "loop"])
def test_in_place_changes_to_unbatched_and_batched_inputs_do_not_reach_the_caller_or_compound(strategy):
    """Regression: tensors marked as not batched were handed to every pass as they were (and, with
    vmap, the batched ones too), so an in-place op on them changed the caller's tensor and compounded."""

    class AddsInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
            self.drop = nn.Dropout(0.5)

        def forward(self, x, bias):
            x.add_(1.0)
            bias.add_(1.0)
            return torch.cat([x + bias, self.drop(torch.ones_like(x) + 0 * self.trunk(x))], -1)

    x, bias = distinct_rows(4, 3), torch.zeros(3)
    x0 = x.clone()
    mc = mcdrop.MCDropout(
        AddsInPlace(),
        n_samples=5,
        seed=0,
        task="regression",
        strategy=strategy,
        batch_dim={"bias": None, "*": 0},
    )
    s = mc.sample(x, bias=bias)
    assert torch.equal(x, x0) and torch.equal(bias, torch.zeros(3)), "the caller's inputs were changed"
    assert torch.equal(s[..., :3], (x + 2).expand(5, 4, 3))


# --------------------------------------------------------------------------- generator inputs
class NoiseFromAGenerator(nn.Module):
    """Dropout on nothing (zero weights), plus normal noise drawn from a generator passed as input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop = nn.Linear(3, 3), nn.Dropout(0.5)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.drop(self.lin(x)) + torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize("strategy", ["loop", "auto"])
def test_a_generator_given_as_input_is_passed_by_reference_not_copied_per_pass(strategy):
    """Regression: a torch.Generator input was deep-copied for every pass, so every pass drew the
    same noise from the same copied state (identical samples) and the caller's generator never moved."""
    generator = torch.Generator().manual_seed(123)
    before = generator.get_state()
    mc = mcdrop.MCDropout(NoiseFromAGenerator(), n_samples=6, seed=0, task="regression", strategy=strategy)
    samples = mc.sample(torch.ones(2, 3), generator=generator)
    flat = samples.reshape(6, -1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i + 1, 6))
    assert not torch.equal(generator.get_state(), before), "the caller's generator was not used"


def test_the_checks_leave_a_generator_input_where_sampling_alone_would():
    """The row and gate checks run the model too; they put a generator passed as input back, so the
    first call (which decides) draws from it as much as a later call (which reuses the decision)."""
    net = NoiseFromAGenerator()
    generator = torch.Generator()
    mc = mcdrop.MCDropout(net, n_samples=5, seed=0, task="regression", strategy="loop")
    states = []
    for _ in range(2):
        generator.manual_seed(7)
        mc.sample(torch.ones(3, 3), generator=generator)
        states.append(generator.get_state())
    assert torch.equal(states[0], states[1])


# --------------------------------------------------------- errors of the model with inputs that hold no batch
class WeighsByAnArray(nn.Module):
    """Takes a numpy array of weights that holds no batch; fails on a part of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop = nn.Linear(3, 3), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor, weights) -> torch.Tensor:
        if x.shape[0] % 4:
            raise RuntimeError("this model takes multiples of 4 rows")
        return self.drop(self.lin(x)) * torch.as_tensor(weights, dtype=x.dtype)


def test_an_input_object_without_a_batch_is_not_blamed_for_the_models_error():

    net = WeighsByAnArray()
    mc = mcdrop.MCDropout(net, n_samples=4, seed=0, task="regression", max_batch_size=6)
    with pytest.raises(RuntimeError, match="multiples of 4") as info:
        mc.sample(torch.ones(8, 3), weights=np.ones(3, dtype=np.float32))
    assert not isinstance(info.value, InvalidInputError)


def test_an_out_of_memory_error_passes_as_it_is():
    class RunsOutOfMemory(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.drop = nn.Linear(3, 3), nn.Dropout(0.3)

        def forward(self, x, cache):
            if x.shape[0] < cache.keys.shape[0]:
                raise torch.OutOfMemoryError("out of memory")
            return self.drop(self.lin(x))

    mc = mcdrop.MCDropout(RunsOutOfMemory(), n_samples=4, seed=0, task="regression", max_batch_size=2)
    with pytest.raises(torch.OutOfMemoryError):
        mc.sample(torch.ones(4, 3), cache=types.SimpleNamespace(keys=torch.zeros(4, 2)))
