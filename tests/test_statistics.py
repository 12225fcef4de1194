"""The streaming statistics (``mcdrop/_statistics.py``): exact whatever the chunking, constant memory.

Every field of a prediction equals its definition recomputed from the kept samples whatever the
chunking (``max_batch_size``, memory budgets); ``RunningMoments``, ``SampleStore`` and
``ClassificationStats`` match torch for random chunkings (rows split into blocks, samples into runs,
interleaved); and the memory of the streaming statistics does not grow with N (tensor storage
measured by the meter of ``tests/zoo.py``).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from zoo import LiveTensorBytes, mlp

import mcdrop
from mcdrop._statistics import (
    JACKKNIFE_GROUPS,
    ClassificationStats,
    GroupedSums,
    RunningMoments,
    SampleStore,
    grouped_jackknife_se,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- predictions do not depend on chunking
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


# ---------------------------------------------------------------------- the accumulators for random chunkings
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


@pytest.mark.parametrize("dtype, offset, tol", [(torch.float32, 0.0, 1e-4), (torch.float64, 100.0, 1e-8)])
def test_higher_moments_chunked_equal_one_shot(dtype, offset, tol):
    """M3 and M4 (Pébay's merge) of random chunkings equal one update with every sample, and torch's."""
    g = torch.Generator().manual_seed(3)
    n, b = 17, 6
    data = (torch.randn(n, b, 3, generator=g).pow(3) + offset).to(dtype)  # skewed, heavy-tailed
    dev = data.double() - data.double().mean(0)
    one = RunningMoments(higher=True)
    one.update(0, b, data, b)
    rng = random.Random(1)
    for _ in range(10):
        rm = RunningMoments(higher=True)
        for start, stop, s0, s1 in random_plan(rng, b, n):
            rm.update(start, stop, data[s0:s1, start:stop], b)
        for j, got, single in ((2, rm.m2, one.m2), (3, rm.m3, one.m3), (4, rm.m4, one.m4)):
            scale = float(dev.pow(j).abs().sum(0).max())
            torch.testing.assert_close(got.double(), single.double(), atol=tol * scale, rtol=0)
            torch.testing.assert_close(got.double(), dev.pow(j).sum(0), atol=tol * scale, rtol=0)


def test_grouped_sums_do_not_depend_on_chunking():
    """Sample t of a row goes to group t mod G whatever the chunks; rows at different counts too."""
    g = torch.Generator().manual_seed(4)
    n, b = 47, 5
    data = torch.randn(n, b, 3, generator=g, dtype=torch.float64)
    expected = torch.zeros(JACKKNIFE_GROUPS, b, 3, dtype=torch.float64)
    expected.index_add_(0, torch.arange(n) % JACKKNIFE_GROUPS, data)
    rng = random.Random(2)
    for _ in range(10):
        gs = GroupedSums()
        for start, stop, s0, s1 in random_plan(rng, b, n):
            gs.update(start, stop, data[s0:s1, start:stop], b)
        torch.testing.assert_close(gs.sums, expected, atol=1e-12, rtol=0)
    probe_first = GroupedSums()  # a probe's one sample of the first rows, then whole-batch chunks
    probe_first.update(0, 2, data[:1, :2], b)
    probe_first.update(2, b, data[:3, 2:], b)
    probe_first.update(0, b, torch.cat([data[1:4, :2], data[3:6, 2:]], 1), b)
    head = torch.zeros_like(expected)
    head.index_add_(0, torch.arange(4) % JACKKNIFE_GROUPS, data[:4])
    head[:, 2:] = 0
    head[:, 2:].index_add_(0, torch.arange(6) % JACKKNIFE_GROUPS, data[:6, 2:])
    torch.testing.assert_close(probe_first.sums, head, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [2, 7, 20, 40, 47])
def test_grouped_jackknife_of_a_mean_and_a_ratio(n):
    """Of a mean it is the batch-means SE (``s/√N`` exactly for N ≤ G); groups of unequal size
    follow Busing et al.'s delete-m_g formula, recomputed here group by group."""
    g = torch.Generator().manual_seed(n)
    data = torch.rand(n, 4, 2, generator=g, dtype=torch.float64) + 0.5
    gs = GroupedSums()
    gs.update(0, 4, data, 4)
    se = grouped_jackknife_se(lambda m: m, [gs.sums], n)
    if n <= JACKKNIFE_GROUPS:
        torch.testing.assert_close(se, data.std(0) / n**0.5, atol=1e-12, rtol=0)
    ratio = grouped_jackknife_se(lambda m: m[..., 0] / m[..., 1], [gs.sums], n)
    groups = torch.arange(n) % JACKKNIFE_GROUPS
    used = sorted(set(groups.tolist()))
    full = data.mean(0)[..., 0] / data.mean(0)[..., 1]
    thetas, hs = [], []
    for k in used:
        rest = data[groups != k].mean(0)
        thetas.append(rest[..., 0] / rest[..., 1])
        hs.append(n / int((groups == k).sum()))
    thetas_t, h = torch.stack(thetas), torch.tensor(hs, dtype=torch.float64).view(-1, 1)
    theta_j = len(used) * full - ((1 - 1 / h) * thetas_t).sum(0)
    pseudo = h * full - (h - 1) * thetas_t
    var = ((pseudo - theta_j) ** 2 / (h - 1)).sum(0) / len(used)
    torch.testing.assert_close(ratio, var.sqrt(), atol=1e-12, rtol=0)


def test_standard_errors_of_one_sample_are_nan():
    pred = mcdrop.MCDropout(mlp(d_in=3, d_out=4), n_samples=1, seed=0).predict(torch.randn(2, 3))
    for name in ("probs", "std", "predictive_entropy", "expected_entropy", "mutual_information"):
        assert bool(pred.standard_error(name).isnan().all()), name


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


# --------------------------------------------------------------------------- how an output is read
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [2, 10, 1000])
def test_probabilities_given_as_logits_are_told_apart_from_logits(dtype, k):
    """Issue 18, item 6a: rows that are probabilities in every pass are refused, real logits never."""
    gen = torch.Generator().manual_seed(k)
    logits = (3 * torch.randn(4, 6, k, generator=gen, dtype=torch.float64)).to(dtype)
    # a model's nn.Softmax, computed in float32 at least and rounded to the model's dtype
    softmax = logits.to(torch.promote_types(dtype, torch.float32)).softmax(-1).to(dtype)
    stats = ClassificationStats("logits", -1, detect_probs=True)
    stats.update(0, 6, softmax, 6)
    with pytest.raises(mcdrop.InvalidInputError, match="output_type='probs'"):
        stats.check_reading()
    not_told = ClassificationStats("logits", -1)  # output_type given: read as logits, as said
    not_told.update(0, 6, softmax, 6)
    not_told.check_reading()
    relu = torch.relu(logits)  # non-negative logits: their rows do not sum to 1
    near = torch.cat([softmax[:, :5], logits[:, 5:]], 1)  # one row of logits among probabilities
    scaled = softmax.double().mul(1.05 if dtype in (torch.float16, torch.bfloat16) else 1.0001).to(dtype)
    for real in (logits, relu, near, scaled):
        stats = ClassificationStats("logits", -1, detect_probs=True)
        stats.update(0, 6, real, 6)
        stats.check_reading()
    # probabilities of the first chunk, logits in the second: not probabilities
    stats = ClassificationStats("logits", -1, detect_probs=True)
    stats.update(0, 3, softmax[:, :3], 6)
    stats.update(3, 6, logits[:, 3:], 6)
    stats.check_reading()


def test_probabilities_of_a_segmentation_map_are_found_along_its_class_dim():
    maps = torch.randn(3, 2, 4, 5, 6).softmax(2)  # (k, b, K, H, W)
    stats = ClassificationStats("logits", 1, detect_probs=True)
    stats.update(0, 2, maps, 2)
    with pytest.raises(mcdrop.InvalidInputError, match=r"class_dim=1.*output_type='probs'"):
        stats.check_reading()


@pytest.mark.parametrize(
    ("options", "shape", "config", "expected"),
    [
        # task="auto": regression for one value per input, aleatoric, a config that says so
        ({}, (5,), {}, ("regression", 1)),
        ({}, (5, 1), {}, ("regression", 1)),
        ({"aleatoric": "variance"}, (5, 4), {}, ("regression", 1)),
        ({}, (5, 3), {"problem_type": "regression", "num_labels": 3}, ("regression", 1)),
        # classification; declared probabilities stay classes whatever the shape
        ({}, (5, 3), {}, ("classification", 1)),
        ({"output_type": "probs"}, (5, 1), {}, ("classification", 1)),
        ({}, (5, 3), {"problem_type": "single_label_classification", "num_labels": 3}, ("classification", 1)),
        # the class dimension: given, named by the config, PyTorch's (b, K, d1, d2, ...)
        ({"class_dim": -1}, (5, 7, 4), {}, ("classification", -1)),
        ({"class_dim": 1}, (5, 7, 4), {"num_labels": 4}, ("classification", 1)),
        ({}, (5, 7, 4), {"num_labels": 4}, ("classification", 2)),
        ({}, (5, 4, 7), {"num_labels": 4}, ("classification", 1)),
        ({}, (5, 3, 8, 8), {}, ("classification", 1)),
        ({}, (5, 8, 8, 3), {"num_labels": 3}, ("classification", 3)),
        ({}, (5, 8, 8, 8), {"num_labels": 8}, ("classification", 1)),
        ({}, (5, 4, 8, 4), {"num_labels": 4}, ("classification", 1)),
        ({"task": "regression"}, (5, 7, 4), {}, ("regression", 1)),
        # refused: two non-batch dims with nothing to tell, or a config naming two of them
        ({}, (5, 7, 4), {}, r"\(batch, 7, 4\).*whether it holds classes.*class_dim=-1.*task='regression'"),
        ({"task": "classification"}, (5, 7, 4), {}, r"nothing says.*class_dim=-1"),
        ({}, (5, 7, 4), {"num_labels": 2}, r"num_labels=2, the size of none"),
        ({}, (5, 4, 4), {"num_labels": 4}, r"num_labels=4, which is the size of dimensions \[1, 2\]"),
        ({}, (5, 8, 4, 4), {"num_labels": 4}, r"dimensions \[2, 3\]"),
    ],
)
def test_how_an_output_is_read(options, shape, config, expected):
    """Issue 18, items 6b and 6c: the rules of docs/outputs.md, "How an output is read"."""
    from mcdrop._statistics import resolve_reading

    given = {"task": "auto", "aleatoric": None, "output_type": None, "class_dim": None, **options}
    chunk = torch.zeros(2, *shape)
    if isinstance(expected, str):
        with pytest.raises(mcdrop.InvalidInputError, match=expected):
            resolve_reading(*given.values(), chunk, **config)
    else:
        assert resolve_reading(*given.values(), chunk, **config) == expected


# --------------------------------------------------------------------------- memory does not grow with N
def peak_bytes(fn) -> int:
    with LiveTensorBytes() as meter:
        fn()
    return meter.peak


def segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(8, 21, 1)).eval()


def test_the_memory_meter_sees_memory_that_grows_with_n():
    net, x = segmenter(), torch.randn(2, 3, 8, 8)
    small = peak_bytes(lambda: mcdrop.MCDropout(net, n_samples=10, keep_samples=True).predict(x))
    large = peak_bytes(lambda: mcdrop.MCDropout(net, n_samples=200, keep_samples=True).predict(x))
    kept = 200 * 2 * 21 * 8 * 8 * 4
    assert large - small > 0.9 * (kept - kept / 20)  # the kept samples show up


@pytest.mark.slow  # N = 1000 passes of a 64 x 64 segmentation map under the meter: 6-13 s
def test_streaming_statistics_of_a_segmentation_map_do_not_grow_with_n():
    """Batch 8 x 21 classes x 64 x 64: the peak at N = 1000 is within 10% of the peak at N = 10."""
    net, x = segmenter(), torch.randn(8, 3, 64, 64)
    peaks = {}
    for n in (10, 1000):
        mc = mcdrop.MCDropout(net, n_samples=n, seed=0)
        peaks[n] = peak_bytes(lambda mc=mc: mc.predict(x))
    assert peaks[1000] <= 1.10 * peaks[10], peaks


def test_dense_outputs_stream_no_higher_moments_nor_jackknife_groups():
    """A segmentation map has a class vector per position: M3, M4 and the group sums there would take
    22 times the memory of the probabilities, so they are not streamed, and the standard errors that
    need them say so; those of the probabilities and the expected entropy are there."""
    import mcdrop
    from mcdrop.errors import InvalidInputError

    stats = ClassificationStats("logits", class_dim=1)
    chunk = torch.randn(4, 2, 3, 5, 6, generator=torch.Generator().manual_seed(0))  # (k, b, K, H, W)
    stats.update(0, 2, chunk, batch_size=2)
    assert not stats.detailed and stats.probs.m4 is None and stats.probs_groups.sums is None
    pred = mcdrop.ClassificationPrediction.from_stats(stats, n_samples=4, store=None, class_dim=1)
    assert pred.standard_error("probs").shape == (2, 3, 5, 6)
    assert pred.standard_error("expected_entropy").shape == (2, 5, 6)
    for name in ("std", "predictive_entropy", "mutual_information"):
        with pytest.raises(InvalidInputError, match="dense prediction"):
            pred.standard_error(name)
    vector = ClassificationStats("logits", class_dim=1)
    vector.update(0, 2, chunk[:, :, :, 0, 0], batch_size=2)
    assert vector.detailed and vector.probs.m4 is not None and vector.probs_groups.sums is not None
