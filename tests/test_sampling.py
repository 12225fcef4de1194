"""Tests for mcdrop/sampling.py: the engine that draws N stochastic passes in batch.

The engine is exercised through ``MCDropout.sample``/``predict`` (its only public face) and, where
an invariant is easier to state there, through its private helpers (``plan_work``, ``RunningMoments``
and ``SampleStore`` from ``mcdrop/_statistics.py``).

Most models here are "tagged": their output is ``cat([f(x), dropout(ones)])``, so the first part is
an exact, known function of input row ``i`` in every sample (which checks the replication and the
reshaping back to ``(N, B, ...)`` bit for bit) while the second part carries the dropout randomness.

Statistical tolerances: the only statistical comparison (LSTM engine vs a per-sample loop) allows
5 standard errors of the difference of two independent means, per element.
"""

from __future__ import annotations

import math
import random
import threading
import types
import warnings

import pytest
import torch
from test_speed_strategies import Shuffles
from torch import nn

import mcdrop
from mcdrop._gatecheck import checking
from mcdrop._statistics import ClassificationStats, RunningMoments, SampleStore
from mcdrop.errors import InvalidInputError, NoRandomnessWarning
from mcdrop.sampling import plan_work


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP spin-waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tagged(nn.Module):
    """``cat([x, dropout(ones)], -1)``; records the rows of every sampling pass (not the checks)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not checking():
            self.rows.append(x.shape[0])
        return torch.cat([x, self.drop(torch.ones_like(x))], -1)


def distinct_rows(b: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose rows all differ (so a row mix-up cannot go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g) + torch.arange(b, dtype=torch.float32)[:, None] * 10


def mlp(d_in: int = 5, d_out: int = 4, hidden: int = 32, p: float = 0.5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Dropout(p), nn.Linear(hidden, d_out)).eval()


# --------------------------------------------------------------------------- shapes and replication


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


def test_replicas_get_independent_dropout_masks():
    """k replicas of one input in one forward pass must not share a mask."""
    x = torch.ones(1, 200)
    net = Tagged()
    s = mcdrop.MCDropout(net, n_samples=8, seed=0, task="regression").sample(x)
    assert net.rows == [1, 7]  # auto plan: one probe sample, then the 7 others in one pass
    masks = s[:, 0, 200:]
    for a in range(8):
        for c in range(a + 1, 8):
            assert not torch.equal(masks[a], masks[c])


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


# --------------------------------------------------------------------------- batch_dim / LSTM


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


# --------------------------------------------------------------------------- input structures


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


# --------------------------------------------------------------------------- streaming statistics vs chunking


B = 5


@pytest.mark.parametrize("max_batch_size", [1, 3, B, 7 * B, None])
def test_classification_statistics_do_not_depend_on_chunking(max_batch_size):
    net = mlp(d_in=3, d_out=4)
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(1))
    n = 9
    mc = mcdrop.MCDropout(net, n_samples=n, seed=3, keep_samples=True, max_batch_size=max_batch_size)
    pred = mc.predict(x)
    probs = pred.samples.softmax(-1).double()  # (N, B, K), recomputed from this run's own samples
    torch.testing.assert_close(pred.probs.double(), probs.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(pred.std.double(), probs.std(0, correction=0), atol=1e-5, rtol=0)
    ent = -torch.special.xlogy(probs, probs).sum(-1)
    torch.testing.assert_close(pred.expected_entropy.double(), ent.mean(0), atol=1e-5, rtol=0)
    votes = torch.nn.functional.one_hot(probs.argmax(-1), 4).sum(0)
    torch.testing.assert_close(
        pred.variation_ratio.double(), 1 - votes.amax(-1).double() / n, atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("max_batch_size", [1, 3, B, 7 * B, None])
def test_regression_statistics_do_not_depend_on_chunking(max_batch_size):
    net = mlp(d_in=3, d_out=2)
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(1))
    mc = mcdrop.MCDropout(
        net, n_samples=11, seed=3, keep_samples=True, max_batch_size=max_batch_size, task="regression"
    )
    pred = mc.predict(x)
    ys = pred.samples.double()
    torch.testing.assert_close(pred.mean.double(), ys.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.variance.double(), ys.var(0, correction=0), atol=1e-5, rtol=1e-4)


def test_auto_chunking_with_small_budget_agrees_with_kept_samples():
    net = mlp(d_in=3, d_out=2)
    x = torch.randn(B, 3)
    for budget in (1, 2000, 5000):
        mc = mcdrop.MCDropout(
            net, n_samples=7, seed=3, keep_samples=True, memory_budget=budget, task="regression"
        )
        pred = mc.predict(x)
        ys = pred.samples.double()
        torch.testing.assert_close(pred.mean.double(), ys.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(pred.variance.double(), ys.var(0, correction=0), atol=1e-5, rtol=1e-4)


def random_plan(rng: random.Random, b: int, n: int) -> list[tuple[int, int, int, int]]:
    """Random chunks ``(start, stop, s0, s1)`` covering samples ``0:n`` of every row of ``0:b``.

    Rows are split into random contiguous blocks, each block's samples into random runs; the
    chunks of different blocks are interleaved at random (each row's own runs stay in order).
    """
    cuts = sorted(rng.sample(range(1, b), rng.randint(0, b - 1))) if b > 1 else []
    bounds = [0, *cuts, b]
    queues = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        done, runs = 0, []
        while done < n:
            k = rng.randint(1, n - done)
            runs.append((start, stop, done, done + k))
            done += k
        queues.append(runs)
    plan = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        plan.append(q.pop(0))
    return plan


@pytest.mark.parametrize(
    "dtype, offset, tol",
    [(torch.float32, 0.0, 1e-5), (torch.float32, 1000.0, 2e-3), (torch.float64, 1000.0, 1e-9)],
)
def test_running_moments_match_torch_for_random_chunkings(dtype, offset, tol):
    g = torch.Generator().manual_seed(0)
    n, b = 13, 6
    data = (torch.randn(n, b, 3, 2, generator=g) * 2 + offset).to(dtype)
    ref = data.double()
    rng = random.Random(0)
    for _ in range(10):
        rm = RunningMoments()
        store = SampleStore(n)
        for start, stop, s0, s1 in random_plan(rng, b, n):
            rm.update(start, stop, data[s0:s1, start:stop], b)
            store.update(start, stop, data[s0:s1, start:stop], b)
        assert rm.mean.dtype == dtype
        assert torch.equal(rm.count, torch.full((b,), n))
        torch.testing.assert_close(rm.mean.double(), ref.mean(0), atol=tol, rtol=tol)
        torch.testing.assert_close(rm.variance.double(), ref.var(0, correction=0), atol=tol, rtol=tol)
        assert torch.equal(store.data, data)


def test_running_moments_of_a_single_sample_have_zero_variance():
    rm = RunningMoments()
    x = torch.randn(1, 4)
    rm.update(0, 4, x, 4)
    assert torch.equal(rm.mean, x[0]) and torch.equal(rm.variance, torch.zeros(4))


def test_classification_stats_votes_do_not_depend_on_chunking():
    g = torch.Generator().manual_seed(0)
    n, b, k = 11, 4, 3
    logits = torch.randn(n, b, k, generator=g) * 3
    expected = torch.nn.functional.one_hot(logits.argmax(-1), k).sum(0)
    rng = random.Random(1)
    for _ in range(5):
        stats = ClassificationStats("logits", 1)
        for start, stop, s0, s1 in random_plan(rng, b, n):
            stats.update(start, stop, logits[s0:s1, start:stop], b)
        assert torch.equal(stats.votes, expected.to(stats.votes.dtype))
        torch.testing.assert_close(stats.probs.mean, logits.softmax(-1).mean(0), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- inputs are left alone


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
    import numpy as np

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


def test_row_check_warning_points_at_the_users_line():
    net = Shuffles()
    mc = mcdrop.MCDropout(net, n_samples=4, seed=0, include=[Shuffles], task="regression", max_batch_size=2)
    for call in (mc.predict, mc.sample):
        mc._engine_cache.clear()
        with pytest.warns(mcdrop.RowCheckWarning) as caught:
            call(torch.randn(4, 6))
        assert caught[0].filename == __file__, (call.__name__, caught[0].filename)


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
