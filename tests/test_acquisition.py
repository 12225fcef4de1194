"""Active-learning acquisition: scores, stochastic and BatchBALD selection, streaming over a loader.

BatchBALD is cross-checked against the reference implementation of Kirsch et al.
(``batchbald_redux.batchbald.get_batchbald_batch``, which takes log-probabilities ``(pool, samples,
classes)``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mcdrop
from mcdrop import acquisition
from mcdrop.acquisition import StreamingSelection, batch_bald, select, select_from_loader, stochastic_top_k
from mcdrop.errors import InvalidInputError, InvalidTypeError, NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(
    n_in: int = 4, n_classes: int = 3, p: float = 0.5, seed: int = 0, head: nn.Module | None = None
):
    torch.manual_seed(seed)
    layers = [nn.Linear(n_in, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, n_classes)]
    if head is not None:
        layers.append(head)
    return nn.Sequential(*layers).eval()


def pool_prediction(
    n: int = 60, n_samples: int = 16, n_classes: int = 3, keep_samples: bool = True, seed: int = 0
):
    torch.manual_seed(100 + seed)
    x = torch.randn(n, 4) * 2
    mc = mcdrop.MCDropout(
        classifier(n_classes=n_classes, seed=seed), n_samples=n_samples, keep_samples=keep_samples, seed=seed
    )
    return mc.predict(x)


def prediction_from_log_probs(log_probs: torch.Tensor) -> mcdrop.ClassificationPrediction:
    """A prediction built by hand from log-probabilities ``(pool, samples, classes)``, samples kept raw."""
    p = log_probs.exp()
    mean = p.mean(1)
    return mcdrop.ClassificationPrediction(
        n_samples=p.shape[1],
        samples=log_probs.permute(1, 0, 2).contiguous(),
        probs=mean,
        predictive_entropy=torch.special.entr(mean).sum(-1),
        expected_entropy=torch.special.entr(p).sum(-1).mean(1),
        variation_ratio=torch.zeros(p.shape[0]),
    )


def reference_log_probs(n: int, n_samples: int, n_classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(n, n_samples, n_classes, generator=g) + 2 * torch.randn(
        n, 1, n_classes, generator=g
    )
    return torch.log_softmax(logits.double(), -1)  # rows that sum to 1 in float64


def permuted(pred: mcdrop.ClassificationPrediction, perm: torch.Tensor) -> mcdrop.ClassificationPrediction:
    return mcdrop.ClassificationPrediction(
        n_samples=pred.n_samples,
        samples=None if pred.samples is None else pred.samples[:, perm],
        probs=pred.probs[perm],
        predictive_entropy=pred.predictive_entropy[perm],
        expected_entropy=pred.expected_entropy[perm],
        variation_ratio=pred.variation_ratio[perm],
    )


# ----------------------------------------------------------------------------- BatchBALD vs the reference
@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch):
    """batchbald_redux's BatchBALD, without the garbage collection its chunking runs before every loop.

    toma calls ``gc.collect()`` (and empties the CUDA cache) each time it chunks, which in a large
    test process costs seconds; it changes no number.
    """
    module = pytest.importorskip("batchbald_redux.batchbald")
    import toma

    monkeypatch.setattr(toma, "gc_cuda", lambda: None)
    return module


def test_batch_bald_equals_the_reference_in_the_exact_regime(reference) -> None:
    log_probs = reference_log_probs(n=30, n_samples=12, n_classes=3, seed=0)
    # 3^4 = 81 configurations at the last step, below n_joint_samples: every joint entropy is exact
    expected = reference.get_batchbald_batch(log_probs, 5, 1000, dtype=torch.double)
    for pool in (prediction_from_log_probs(log_probs), log_probs.exp().permute(1, 0, 2)):
        ours = batch_bald(pool, 5, n_joint_samples=1000)
        assert ours.indices.tolist() == expected.indices
        torch.testing.assert_close(
            ours.scores, torch.tensor(expected.scores, dtype=torch.float64), rtol=0, atol=1e-12
        )
    # the joint mutual information of a growing batch does not decrease, and is below the sum of BALD scores
    assert bool((ours.scores.diff() >= -1e-12).all())
    bald = acquisition.bald(prediction_from_log_probs(log_probs)).double()
    assert float(ours.scores[-1]) <= float(bald[ours.indices].sum()) + 1e-9


def test_batch_bald_sampled_regime_agrees_with_the_reference(reference) -> None:
    log_probs = reference_log_probs(n=24, n_samples=10, n_classes=10, seed=1)
    # 10 classes: exact up to 4 chosen inputs (10^4 <= 20000); the 6th step samples 20000 configurations
    torch.manual_seed(3)
    expected = reference.get_batchbald_batch(log_probs, 6, 20000, dtype=torch.double)
    ours = batch_bald(log_probs.exp().permute(1, 0, 2), 6, n_joint_samples=20000, seed=3)
    assert ours.indices.tolist() == expected.indices
    # Both draw M / N configurations per MC sample from the same Mersenne-Twister stream in the same
    # layout, so with the same seed the sampled estimate is the same up to summation order.
    torch.testing.assert_close(
        ours.scores, torch.tensor(expected.scores, dtype=torch.float64), rtol=0, atol=1e-8
    )


def separated_pool() -> torch.Tensor:
    """Per-sample probabilities ``(N, n, K)``: 6 inputs on which the samples disagree wildly, 10 they agree on."""
    g = torch.Generator().manual_seed(0)
    informative = 4 * torch.randn(6, 10, 10, generator=g, dtype=torch.float64)
    dull = 4 * torch.randn(10, 1, 10, generator=g, dtype=torch.float64)
    dull = dull + 0.3 * torch.randn(10, 10, 10, generator=g, dtype=torch.float64)
    logits = torch.cat([dull[:5], informative, dull[5:]])
    return torch.softmax(logits, -1).permute(1, 0, 2)


def test_batch_bald_sampled_estimate_is_consistent_with_the_exact_joint() -> None:
    probs = separated_pool()
    exact = batch_bald(probs, 4, n_joint_samples=1000)  # 10^3 configurations at most: all exact
    for seed in range(4):
        # 10 classes: exact while 10^b <= 5000 (b <= 3 chosen), sampled at steps 5 and 6
        sampled = batch_bald(probs, 6, n_joint_samples=5000, seed=seed)
        assert set(sampled.indices.tolist()) == set(range(5, 11))  # the six informative inputs
        assert sampled.indices[:4].tolist() == exact.indices.tolist()
        torch.testing.assert_close(sampled.scores[:4], exact.scores, rtol=0, atol=1e-10)
    # The estimate of the step that has one candidate left is free of the greedy choice's
    # winner's-curse bias: the importance-sampling estimate of the joint entropy is unbiased, so
    # over 12 seeds its mean lies within 4 standard errors (or 0.005 nats) of the exact joint
    # mutual information of the six, and every draw within 0.05 nats.
    six = probs[:, 5:11]
    truth = float(batch_bald(six, 6, n_joint_samples=10**6).scores[5])
    last = torch.tensor(
        [float(batch_bald(six, 6, n_joint_samples=5000, seed=s).scores[5]) for s in range(12)]
    )
    se = float(last.std()) / math.sqrt(len(last))
    assert abs(float(last.mean()) - truth) < max(4 * se, 0.005), (float(last.mean()), truth, se)
    assert float((last - truth).abs().max()) < 0.05
    assert len(set(last.tolist())) > 1  # other seeds draw other configurations


def test_batch_bald_is_seeded() -> None:
    probs = reference_log_probs(n=20, n_samples=8, n_classes=10, seed=2).exp().permute(1, 0, 2)
    first = batch_bald(probs, 4, n_joint_samples=50, seed=7)
    again = batch_bald(probs, 4, n_joint_samples=50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.indices, again.indices) and torch.equal(first.scores, again.scores)


@settings(settings.get_profile("mcdrop-ci"), max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_samples=st.integers(1, 6),
    n=st.integers(2, 8),
    n_classes=st.integers(2, 4),
    scale=st.sampled_from([0.0, 0.5, 2.0, 60.0]),  # 0: every sample alike; 60: one-hot rows with exact zeros
    data=st.data(),
)
def test_batch_bald_properties(seed: int, n_samples: int, n: int, n_classes: int, scale: float, data) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n_samples, n, n_classes, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    k = data.draw(st.integers(1, n))
    result = batch_bald(probs, k, n_joint_samples=10**6)  # at most 4^7 configurations: exact
    bald = torch.special.entr(probs.mean(0)).sum(-1) - torch.special.entr(probs).sum(-1).mean(0)
    assert result.indices.shape == (k,) and len(set(result.indices.tolist())) == k
    assert bool(torch.isfinite(result.scores).all())
    # joint MI: starts at the top BALD score, never decreases, is at most log N (the N samples are
    # the only uncertainty) and at most the sum of the chosen inputs' BALD scores (labels are
    # independent given the weights)
    assert abs(float(result.scores[0]) - float(bald.max())) < 1e-9
    assert bool((result.scores.diff() >= -1e-9).all())
    assert float(result.scores[-1]) <= math.log(n_samples) + 1e-9
    assert float(result.scores[-1]) <= float(bald[result.indices].sum()) + 1e-9
    # relabelling the pool relabels the choice (the joint information of each prefix is the same)
    perm = torch.randperm(n, generator=g)
    again = batch_bald(probs[:, perm], k, n_joint_samples=10**6)
    torch.testing.assert_close(again.scores, result.scores, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- scores
def test_bald_is_the_mutual_information_of_the_samples() -> None:
    pred = pool_prediction(n=30, n_samples=25)
    p = torch.softmax(pred.samples.double(), -1)  # (N, n, K): the samples are logits here
    mean = p.mean(0)
    by_hand = torch.special.entr(mean).sum(-1) - torch.special.entr(p).sum(-1).mean(0)
    torch.testing.assert_close(acquisition.bald(pred).double(), by_hand, rtol=0, atol=1e-5)
    assert bool((acquisition.bald(pred) >= 0).all())
    assert bool((by_hand > 1e-3).any())  # the test is not one of zeros


def test_the_other_scores_by_hand() -> None:
    pred = pool_prediction(n=30, n_samples=25)
    p = torch.softmax(pred.samples.double(), -1)
    mean = p.mean(0)
    torch.testing.assert_close(
        acquisition.max_entropy(pred).double(), torch.special.entr(mean).sum(-1), rtol=0, atol=1e-5
    )
    top2 = mean.sort(-1, descending=True).values[:, :2]
    margin = acquisition.margin(pred).double()
    torch.testing.assert_close(margin, 1 - (top2[:, 0] - top2[:, 1]), rtol=0, atol=1e-5)
    assert bool(((margin >= 0) & (margin <= 1)).all())
    votes = torch.nn.functional.one_hot(p.argmax(-1), 3).sum(0)
    torch.testing.assert_close(acquisition.variation_ratio(pred).double(), 1 - votes.amax(-1).double() / 25)


def test_batch_bald_of_one_is_the_top_bald_input() -> None:
    pred = pool_prediction(n=40, n_samples=20)
    result = batch_bald(pred, 1)
    bald = acquisition.bald(pred)
    assert int(result.indices[0]) == int(bald.argmax())
    assert abs(float(result.scores[0]) - float(bald.max())) < 1e-5
    assert torch.equal(select(pred, 1, "batch_bald"), select(pred, 1, "bald"))


def test_batch_bald_spreads_out_over_duplicates() -> None:
    # the most informative input three times over: BALD takes all three copies, BatchBALD one
    log_probs = reference_log_probs(n=20, n_samples=12, n_classes=3, seed=4)
    best = int(acquisition.bald(prediction_from_log_probs(log_probs)).argmax())
    pool = torch.cat([log_probs, log_probs[best : best + 1].expand(2, -1, -1)])
    pred = prediction_from_log_probs(pool)
    copies = {best, 20, 21}
    assert set(select(pred, 3, "bald").tolist()) == copies
    assert len(set(select(pred, 3, "batch_bald").tolist()) & copies) == 1


@pytest.mark.parametrize("method", ["bald", "max_entropy", "margin", "batch_bald", "variation_ratio"])
def test_selection_is_permutation_equivariant(method: str) -> None:
    pred = pool_prediction(n=40, n_samples=20)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    chosen = select(pred, 5, method)
    chosen_perm = select(permuted(pred, perm), 5, method)
    if (
        method == "variation_ratio"
    ):  # few distinct values: ties go to the lower index, so compare sets of scores
        scores = acquisition.variation_ratio(pred)
        assert sorted(scores[chosen].tolist()) == sorted(scores[perm[chosen_perm]].tolist())
    else:
        assert perm[chosen_perm].tolist() == chosen.tolist()
    assert chosen.dtype == torch.int64 and chosen.device.type == "cpu"


def test_ties_go_to_the_lower_index() -> None:
    pred = pool_prediction(n=60, n_samples=4)
    scores = acquisition.variation_ratio(pred)
    chosen = select(pred, 10, "variation_ratio")
    order = sorted(range(60), key=lambda i: (-float(scores[i]), i))
    assert chosen.tolist() == order[:10]


# ----------------------------------------------------------------------------- stochastic acquisition
def test_power_bald_is_seeded() -> None:
    pred = pool_prediction(n=60)
    a = select(pred, 10, "power_bald", seed=1)
    assert torch.equal(a, select(pred, 10, "power_bald", seed=1))
    assert torch.equal(a, select(pred, 10, "power_bald", generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, select(pred, 10, "power_bald", seed=2))
    assert len(set(a.tolist())) == 10


def test_power_bald_function_is_select_power_bald() -> None:
    pred = pool_prediction(n=60)
    for beta, seed in ((1.0, 1), (2.5, 4), (0.0, 7)):
        assert torch.equal(
            acquisition.power_bald(pred, 10, beta=beta, seed=seed),
            select(pred, 10, "power_bald", beta=beta, seed=seed),
        )
    drawn = acquisition.power_bald(pred, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, select(pred, 10, "power_bald", generator=torch.Generator().manual_seed(3)))
    assert drawn.dtype == torch.int64 and len(set(drawn.tolist())) == 10
    assert "power_bald" in acquisition.__all__
    with pytest.raises(InvalidInputError, match="beta"):
        acquisition.power_bald(pred, 10, beta=-1.0, seed=0)


@pytest.mark.parametrize(
    ("mode", "weights"),
    [
        ("power", lambda s, b: s**b),
        ("softmax", lambda s, b: torch.exp(b * s)),
        ("softrank", lambda s, b: torch.arange(1, len(s) + 1, dtype=s.dtype).flip(0) ** -b),
    ],
)
def test_stochastic_first_draw_follows_its_law(mode: str, weights) -> None:
    # scores increasing with the index, so the rank of index i is n - i
    scores = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8, 1.6], dtype=torch.float64)
    beta = 1.5
    g = torch.Generator().manual_seed(0)
    draws = 3000
    counts = torch.zeros(6)
    for _ in range(draws):
        counts[int(stochastic_top_k(scores, 1, mode=mode, beta=beta, generator=g)[0])] += 1
    expected = weights(scores, beta)
    expected = (expected / expected.sum() * draws).numpy()
    # chi-square goodness of fit of the first draw's frequencies (fixed seed; 5 degrees of freedom)
    assert stats.chisquare(counts.numpy(), expected).pvalue > 1e-3


def test_power_bald_favours_high_scores() -> None:
    pred = pool_prediction(n=60)
    bald = acquisition.bald(pred)
    high = set(bald.topk(15).indices.tolist())  # the top quarter
    picked_power = picked_random = 0
    for seed in range(40):
        picked_power += len(high & set(select(pred, 10, "power_bald", seed=seed).tolist()))
        picked_random += len(high & set(select(pred, 10, "random", seed=seed).tolist()))
    # 400 picks each: uniform draws take the top quarter ~25% of the time; power draws far more
    assert picked_random / 400 < 0.35
    assert picked_power / 400 > 0.45
    # a very cold power draw is the top k
    assert set(select(pred, 10, "power_bald", beta=1e6, seed=0).tolist()) == set(
        bald.topk(10).indices.tolist()
    )


def test_random_is_uniform() -> None:
    pred = pool_prediction(n=20)
    counts = torch.zeros(20)
    for seed in range(500):
        counts[select(pred, 4, "random", seed=seed)] += 1
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3  # each index drawn 100 times on average


# ----------------------------------------------------------------------------- streaming over a loader
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("bald", {}),
        ("margin", {}),
        ("variation_ratio", {}),
        ("power_bald", {"seed": 3}),
        ("softmax_max_entropy", {"seed": 4, "beta": 5.0}),
        ("random", {"seed": 5}),
        ("batch_bald", {"prefilter": 12, "seed": 0}),
    ],
)
def test_select_from_loader_equals_select_on_the_whole_pool(method: str, options: dict) -> None:
    torch.manual_seed(0)
    pool = torch.randn(70, 4) * 2
    loader = DataLoader(TensorDataset(pool), batch_size=16)
    net = classifier()
    picked = select_from_loader(
        mcdrop.MCDropout(net, n_samples=12, seed=0, keep_samples=True), loader, 6, method, **options
    )
    whole = mcdrop.MCDropout(net, n_samples=12, seed=0, keep_samples=True).predict_loader(
        loader, progress=False
    )
    assert torch.equal(picked, select(whole, 6, method, **options))
    assert picked.dtype == torch.int64 and len(set(picked.tolist())) == 6


def test_streaming_state_stays_the_size_of_k() -> None:
    mc = mcdrop.MCDropout(classifier(), n_samples=10, seed=0, keep_samples=True)
    torch.manual_seed(0)
    batches = [mc.predict(torch.randn(25, 4)) for _ in range(6)]
    for method, options, bound in [
        ("bald", {}, 5),
        ("power_bald", {"seed": 0}, 5),
        ("batch_bald", {"prefilter": 8}, 8),
    ]:
        stream = StreamingSelection(5, method, **options)
        for number, part in enumerate(batches, 1):
            stream.update(part)
            assert stream.n_seen == 25 * number
            assert stream.keys.shape == (bound,) and stream.indices.shape == (bound,)
            if method == "batch_bald":
                assert stream.probs.shape == (10, bound, 3)
            else:
                assert stream.probs is None
        # the retained candidates are the best ones of the whole pool
        whole = mcdrop.concat_predictions(batches)
        if method != "power_bald":
            best = set(acquisition.bald(whole).topk(bound).indices.tolist())
            assert set(stream.indices.tolist()) == best
        assert set(stream.result().tolist()) <= set(stream.indices.tolist())


# ----------------------------------------------------------------------------- readings of the samples
@pytest.mark.parametrize(
    ("head", "output_type", "n_classes"),
    [(None, None, 3), (nn.Softmax(-1), "probs", 3), (nn.LogSoftmax(-1), "log_probs", 3), (None, None, 1)],
)
def test_sample_probs_reads_every_output_type(head, output_type, n_classes) -> None:
    net = classifier(n_classes=n_classes, head=head)
    task = "classification"
    mc = mcdrop.MCDropout(net, n_samples=10, seed=0, keep_samples=True, output_type=output_type, task=task)
    pred = mc.predict(torch.randn(12, 4))
    p = acquisition.sample_probs(pred)
    assert p.shape == (10, 12, max(n_classes, 2))
    torch.testing.assert_close(p.mean(0), pred.probs.double(), rtol=0, atol=1e-6)
    # the reading is found without the wrapper's word: the prediction built by hand keeps only samples
    bare = permuted(pred, torch.arange(12))
    torch.testing.assert_close(acquisition.sample_probs(bare), p)
    assert batch_bald(bare, 3).indices.tolist() == batch_bald(pred, 3).indices.tolist()


# ----------------------------------------------------------------------------- errors
def test_errors_are_clear() -> None:
    pred = pool_prediction(n=10, keep_samples=False)
    with pytest.raises(InvalidInputError, match="at least 1"):
        select(pred, 0)
    with pytest.raises(InvalidInputError, match="more than the 10 inputs"):
        select(pred, 11)
    with pytest.raises(InvalidTypeError, match="integer"):
        select(pred, 2.5)
    with pytest.raises(InvalidInputError, match="power_bald") as info:
        select(pred, 2, "entropy")
    assert "batch_bald" in str(info.value) and "max_entropy" in str(info.value)
    with pytest.raises(InvalidInputError, match="keep_samples=True"):
        select(pred, 2, "batch_bald")
    with pytest.raises(InvalidInputError, match="keep_samples=True"):
        batch_bald(pred, 2)
    with pytest.raises(InvalidInputError, match="prefilter= is for method='batch_bald'"):
        select(pred, 2, "bald", prefilter=5)
    with pytest.raises(InvalidInputError, match="seed= or generator="):
        select(pred, 2, "power_bald", seed=0, generator=torch.Generator())
    with pytest.raises(InvalidInputError, match="non-negative"):
        stochastic_top_k(torch.tensor([-1.0, 2.0]), 1, mode="power")
    with pytest.raises(NonFiniteError):
        stochastic_top_k(torch.tensor([float("nan"), 2.0]), 1)
    with pytest.raises(InvalidTypeError, match="ClassificationPrediction"):
        select(torch.rand(10), 2)

    kept = pool_prediction(n=10)
    wrong = permuted(kept, torch.arange(10))
    wrong.probs = wrong.probs.flip(1)  # samples that do not average to the probabilities
    with pytest.raises(InvalidInputError, match="output_type="):
        batch_bald(wrong, 2)
    adaptive = permuted(kept, torch.arange(10))
    adaptive.samples_per_input = torch.full((10,), kept.n_samples).index_fill(0, torch.tensor([3]), 5)
    with pytest.raises(InvalidInputError, match="different numbers of MC samples"):
        batch_bald(adaptive, 2)
    with pytest.raises(InvalidInputError, match="sum to 1"):
        batch_bald(torch.rand(4, 10, 3), 2)

    dense = mcdrop.ClassificationPrediction(
        n_samples=2,
        probs=torch.full((3, 2, 4, 4), 0.5),
        predictive_entropy=torch.zeros(3, 4, 4),
        expected_entropy=torch.zeros(3, 4, 4),
        variation_ratio=torch.zeros(3, 4, 4),
    )
    with pytest.raises(InvalidInputError, match="segmentation map"):
        select(dense, 1)

    regression = mcdrop.MCDropout(
        nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1)).eval(),
        n_samples=4,
        task="regression",
    ).predict(torch.randn(5, 2))
    with pytest.raises(InvalidInputError, match="classifiers .*variance"):
        select(regression, 2)
    with pytest.raises(InvalidInputError, match="classification prediction"):
        acquisition.bald(regression)


def test_loader_errors_are_clear() -> None:
    loader = DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=8)
    mc = mcdrop.MCDropout(classifier(), n_samples=4, seed=0)
    with pytest.raises(InvalidInputError, match="prefilter=m"):
        select_from_loader(mc, loader, 3, "batch_bald")
    with pytest.raises(InvalidInputError, match="keep_samples=True"):
        select_from_loader(mc, loader, 3, "batch_bald", prefilter=10)
    with pytest.raises(InvalidInputError, match="rank"):
        select_from_loader(mc, loader, 3, "softrank_bald")
    with pytest.raises(InvalidInputError, match="more than the 20 inputs"):
        select_from_loader(mc, loader, 21)
    with pytest.raises(InvalidInputError, match="no inputs"):
        select_from_loader(mc, [], 3)
    with pytest.raises(InvalidTypeError, match="iterable of batches"):
        select_from_loader(mc, "pool.pt", 3)


def test_the_examples_of_docs_acquisition_run() -> None:
    """The Python blocks of docs/acquisition.md, run in order in one namespace (they assert what they say)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "acquisition.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/acquisition.md", "exec"), namespace)  # noqa: S102
    assert namespace["picked"].shape == (10,) and namespace["joint"].indices.shape == (10,)
