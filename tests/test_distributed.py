"""Sharded evaluation over ``torch.distributed`` (``mcdrop.distributed``) and ``mcdrop report`` under torchrun.

Two processes with the ``gloo`` backend are started once (``torch.multiprocessing.spawn``) and run
every scenario; their results are compared here with one-process evaluations of the same data:

* exactly (bit for bit), for everything that does not depend on the dropout masks — targets, row
  order, and every statistic of a model whose dropout rate is 0 — whenever the inputs meet the model
  in the same batches as in one process (shards that follow the batch boundaries). In other batches
  the model itself (its matrix products) rounds differently in float32, so shuffled or padded
  shards agree with one process to float32 rounding, which is asserted with a 1e-5 tolerance;
* exactly (to float64 summation order), for metrics computed from the same samples: the all-reduced
  accumulators against the metric functions applied to the gathered rows;
* exactly, for a seeded MC dropout model on rank 0's inputs (rank 0 draws the wrapper's own stream);
* within Monte Carlo error otherwise (another K draws other masks for the other ranks' inputs).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from zoo import mlp

import mcdrop
from mcdrop import distributed
from mcdrop import metrics as M
from mcdrop.errors import InvalidInputError, InvalidTypeError
from mcdrop.metrics.streaming import StreamingClassificationMetrics, StreamingRegressionMetrics

ROOT = Path(__file__).resolve().parents[1]
N, D, K = 13, 4, 3
REL = 1e-12


# --------------------------------------------------------------------------- shared by both sides
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, D, generator=g), torch.randint(0, K, (N,), generator=g))


def regression_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(N, 1, generator=g))


def classifier(p: float) -> nn.Module:
    return mlp(D, K, hidden=16, p=p, act=nn.ReLU)


def wrapper(p: float, **kwargs) -> mcdrop.MCDropout:
    """p == 0: a model whose dropout never drops, so every quantity is deterministic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if p == 0:
            return mcdrop.MCDropout(classifier(0.0), include=[nn.Dropout], seed=0, **kwargs)
        return mcdrop.MCDropout(classifier(p), seed=0, **kwargs)


def regressor() -> mcdrop.MCDropout:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mcdrop.MCDropout(net, n_samples=4, include=[nn.Dropout], task="regression", seed=0)


def one_process(mc: mcdrop.MCDropout, data: TensorDataset, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mc.predict_loader(DataLoader(data, batch_size=4), progress=False, **kwargs)


def fields_close(a, b) -> bool:
    """Equal up to the float32 rounding of the model's own arithmetic in other batch shapes."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "targets" or not isinstance(x, torch.Tensor):
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                if not torch.equal(x, y):
                    return False
            elif x != y:
                return False
        elif y is None or not torch.allclose(x, y, rtol=1e-5, atol=1e-6):
            return False
    return True


def fields_equal(a, b) -> bool:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is None or y is None or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------- the worker (one per rank)
def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        res: dict[str, object] = {}
        data = dataset()
        sharded = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=True, seed=1))
        pred = distributed.predict_loader
        # a deterministic model, shuffled uneven shards (13 inputs: rank 1 gets a padding copy)
        res["det"] = pred(wrapper(0.0, n_samples=5, keep_samples=True), sharded, progress=False)
        res["det_metrics"] = pred(wrapper(0.0, n_samples=5), sharded, keep="metrics", progress=False)
        # uneven shards that follow one process's batch boundaries: rank 0 gets 8 inputs, rank 1 5
        aligned = DataLoader(data, batch_size=4, sampler=list(range(8)) if rank == 0 else list(range(8, N)))
        res["aligned"] = pred(wrapper(0.0, n_samples=5, keep_samples=True), aligned, progress=False)
        res["aligned_metrics"] = pred(wrapper(0.0, n_samples=5), aligned, keep="metrics", progress=False)
        res["aligned_mc"] = pred(wrapper(0.3, n_samples=20), aligned, progress=False)
        adaptive = {"n_samples": "auto", "tolerance": 0.02, "min_samples": 6, "max_samples": 40}
        res["adaptive"] = pred(wrapper(0.3, **adaptive), aligned, progress=False)
        res["adaptive_metrics"] = pred(wrapper(0.3, **adaptive), aligned, keep="metrics", progress=False)
        # a seeded MC dropout model: rows, and metrics from the very same samples (fresh wrappers)
        res["mc"] = pred(wrapper(0.3, n_samples=20), sharded, progress=False, return_indices=True)
        res["mc_again"] = pred(wrapper(0.3, n_samples=20), sharded, progress=False)
        # with the dropout-off baseline of every batch, gathered beside the MC rows
        res["baseline"] = pred(wrapper(0.3, n_samples=20), sharded, progress=False, deterministic=True)
        res["mc_metrics"] = pred(
            wrapper(0.3, n_samples=20), sharded, keep="metrics", dst=None, progress=False
        )
        # an empty shard: rank 0 evaluates everything, in the batches one process would use
        lopsided = DataLoader(data, batch_size=4, sampler=list(range(N)) if rank == 0 else [])
        res["empty"] = pred(wrapper(0.3, n_samples=20), lopsided, progress=False)
        res["empty_metrics"] = pred(wrapper(0.3, n_samples=20), lopsided, keep="metrics", progress=False)
        # overlapping shards of the user's own: duplicates are dropped by index
        overlap = DataLoader(data, batch_size=4, sampler=list(range(8)) if rank == 0 else list(range(4, N)))
        res["overlap"] = pred(wrapper(0.0, n_samples=5), overlap, progress=False, dst=None)
        # batches without targets (e.g. OOD data), gathered to rank 1
        inputs_only = DataLoader(
            TensorDataset(data.tensors[0]), batch_size=5, sampler=DistributedSampler(data)
        )
        res["no_targets"] = pred(wrapper(0.0, n_samples=5), inputs_only, progress=False, dst=1)
        # regression, metrics to rank 1
        reg = regression_dataset()
        reg_loader = DataLoader(reg, batch_size=4, sampler=list(range(8)) if rank == 0 else list(range(8, N)))
        res["reg_metrics"] = pred(regressor(), reg_loader, keep="metrics", dst=1, progress=False)
        # checkpoints: one file per rank; a finished one answers again without evaluating
        ckpt = os.path.join(out, "stream-{rank}.pt")
        first = pred(wrapper(0.3, n_samples=20), sharded, keep="metrics", checkpoint=ckpt, progress=False)
        again = pred(wrapper(0.3, n_samples=20), sharded, keep="metrics", checkpoint=ckpt, progress=False)
        res["ckpt"] = (first, again, os.path.exists(os.path.join(out, f"stream-{rank}.pt")))
        # the user's own loop: accumulate, then reduce; gather with explicit indices
        mine = StreamingClassificationMetrics()
        mine.update(torch.tensor([[0.9, 0.1]]), torch.tensor([rank]))
        res["reduced"] = distributed.reduce_metrics(mine, dst=None).summary()["accuracy"]
        # `mcdrop report` as torchrun starts it: WORLD_SIZE in the environment (the group exists already)
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
        from mcdrop.cli import main

        res["cli"] = main(
            ["report", "--model", os.path.join(out, "model.pt"), "--data", os.path.join(out, "data.npz"),
             "--out", os.path.join(out, "report"), "--n-samples", "8", "--batch-size", "4", "--quiet",
             "--trust-code"]
        )  # fmt: skip
        # errors: raised on every rank, before any collective (no rank is left waiting)
        for name, bad in {
            "unsharded": DataLoader(data, batch_size=4),
            "all_empty": DataLoader(data, batch_size=4, sampler=[]),
        }.items():
            try:
                pred(wrapper(0.0, n_samples=2), bad, progress=False)
                res[name] = None
            except InvalidInputError as err:
                res[name] = str(err)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def report_inputs(folder: Path) -> np.ndarray:
    """A TorchScript classifier and a data file of 21 inputs for ``mcdrop report``; returns the targets."""
    net = classifier(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(folder / "model.pt"))
    g = np.random.default_rng(0)
    x, y = g.normal(size=(21, D)).astype(np.float32), g.integers(0, K, 21)
    np.savez(folder / "data.npz", x=x, y=y)
    return y


def check_report(folder: Path, targets: np.ndarray) -> None:
    import pandas as pd

    per_input = pd.read_csv(folder / "per_input.csv").sort_values("input")
    assert per_input["input"].tolist() == list(range(len(targets)))  # every input once, no padding
    assert per_input["target"].tolist() == targets.tolist()
    summary = pd.read_csv(folder / "summary.csv").set_index("metric")["value"]
    assert summary["n_inputs"] == len(targets) and summary["n_samples"] == 8


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[list[dict[str, object]], Path]:
    out = tmp_path_factory.mktemp("dist")
    report_inputs(out)
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


@pytest.fixture(scope="module")
def ranks(spawned) -> list[dict[str, object]]:
    return spawned[0]


# --------------------------------------------------------------------------- two processes
# (slow: the tests below wait for the two-process run of the ``spawned`` fixture, ~6 s)
@pytest.mark.slow
def test_deterministic_quantities_equal_the_single_process_result_exactly(ranks):
    single = one_process(wrapper(0.0, n_samples=5, keep_samples=True), dataset())
    assert ranks[1]["aligned"] is None  # the result goes to rank 0 only
    assert fields_equal(ranks[0]["aligned"], single)  # probs, std, entropies, samples, targets: all
    # shuffled shards with DistributedSampler's padding copy: the same rows, once each, in order
    assert torch.equal(ranks[0]["det"].targets, dataset().tensors[1])
    assert fields_close(ranks[0]["det"], single)


@pytest.mark.slow
def test_deterministic_baseline_is_gathered_beside_the_mc_rows(ranks):
    got = ranks[0]["baseline"]
    assert ranks[1]["baseline"] is None  # the result goes to rank 0 only
    # the MC rows are those of the same call without the baseline: the extra passes draw no masks
    assert fields_equal(got.__class__(**{**vars(got), "deterministic": None}), ranks[0]["mc_again"])
    # the baseline: dropout off on every input once (the padding copy dropped), in data-set order,
    # equal to one process's predict_deterministic up to float32 rounding in other batch shapes
    x, y = dataset().tensors
    single = wrapper(0.3, n_samples=20).predict_deterministic(x)
    base = got.deterministic
    assert isinstance(base, mcdrop.ClassificationPrediction) and len(base) == N and base.n_samples == 1
    assert torch.allclose(base.probs, single.probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(base.targets, y) and torch.equal(got.targets, y)
    assert not torch.allclose(base.probs, got.probs, atol=1e-3)  # dropout off is not the MC mean
    # as for the one-process loop: refused where only streaming metrics are kept
    with pytest.raises(InvalidInputError, match="deterministic=True needs keep='predictions'"):
        distributed.predict_loader(
            wrapper(0.3, n_samples=2), DataLoader(dataset()), keep="metrics", deterministic=True
        )


@pytest.mark.slow
def test_metrics_equal_the_single_process_metrics(ranks):
    single = one_process(wrapper(0.0, n_samples=5), dataset())
    streamed = one_process(wrapper(0.0, n_samples=5), dataset(), keep="metrics").summary()
    got = ranks[0]["aligned_metrics"].summary()
    assert got == pytest.approx(streamed, rel=REL)
    assert math.isclose(got["ECE"], M.expected_calibration_error(single.probs, single.targets), rel_tol=REL)
    assert math.isclose(got["Brier"], M.brier_score(single.probs, single.targets), rel_tol=REL)
    assert math.isclose(got["NLL"], M.negative_log_likelihood(single.probs, single.targets), rel_tol=REL)
    padded = ranks[0]["det_metrics"].summary()
    assert padded["n_inputs"] == N and padded["accuracy"] == streamed["accuracy"]  # the copy is not counted
    assert padded == pytest.approx(streamed, rel=1e-5)


@pytest.mark.slow
def test_rank_zero_draws_the_wrappers_own_stream(ranks):
    single = one_process(wrapper(0.3, n_samples=20), dataset())
    got = ranks[0]["aligned_mc"]
    assert torch.equal(got.probs[:8], single.probs[:8])  # rank 0's inputs: the very same draws
    assert not torch.equal(got.probs[8:], single.probs[8:])  # rank 1: derive_seed(0, 1)
    se = (2 * single.std.square() / 20).sqrt()
    assert bool(((got.probs - single.probs).abs() <= 6 * se + 1e-6).all())


@pytest.mark.slow
def test_adaptive_sampling_per_rank_matches_one_process_on_rank_zeros_inputs(ranks):
    adaptive = {"n_samples": "auto", "tolerance": 0.02, "min_samples": 6, "max_samples": 40}
    single = one_process(wrapper(0.3, **adaptive), dataset())
    got = ranks[0]["adaptive"]
    assert got.samples_per_input.shape == (N,) and got.max_samples == 40
    # rank 0 draws the wrapper's own stream over the same batches: the very same rounds
    assert torch.equal(got.samples_per_input[:8], single.samples_per_input[:8])
    assert torch.equal(got.probs[:8], single.probs[:8])
    se = got.standard_error("confidence")
    assert bool(((se <= 0.02) | (got.samples_per_input == 40)).all())
    assert int(got.samples_per_input.min()) >= 6
    assert int(got.samples_per_input.max()) > 6  # some inputs went on past the first round
    streamed = ranks[0]["adaptive_metrics"].summary()
    assert streamed["n_inputs"] == N
    assert streamed["accuracy"] == pytest.approx(float((got.predicted == got.targets).float().mean()))


@pytest.mark.slow
def test_mc_dropout_rows_come_back_in_dataset_order_within_monte_carlo_error(ranks):
    pred, indices = ranks[0]["mc"]
    assert torch.equal(indices, torch.arange(N))
    assert torch.equal(pred.targets, dataset().tensors[1])
    single = one_process(wrapper(0.3, n_samples=20), dataset())
    assert not torch.equal(pred.probs, single.probs)  # rank 1 draws its own stream
    se = (2 * single.std.square() / 20).sqrt()
    assert bool(((pred.probs - single.probs).abs() <= 6 * se + 1e-6).all())
    # reproducible given the seed and K
    assert fields_equal(ranks[0]["mc_again"], pred)


@pytest.mark.slow
def test_all_reduced_metrics_equal_metrics_of_the_gathered_rows_from_the_same_samples(ranks):
    pred, _ = ranks[0]["mc"]
    s0, s1 = ranks[0]["mc_metrics"].summary(), ranks[1]["mc_metrics"].summary()  # dst=None: both
    assert s0 == s1
    assert s0["accuracy"] == M.accuracy(pred.probs, pred.targets)
    for key, exact in {
        "ECE": M.expected_calibration_error(pred.probs, pred.targets),
        "MCE": M.expected_calibration_error(pred.probs, pred.targets, norm="max"),
        "Brier": M.brier_score(pred.probs, pred.targets),
        "NLL": M.negative_log_likelihood(pred.probs, pred.targets),
        "mean predictive entropy": float(pred.predictive_entropy.double().mean()),
    }.items():
        assert math.isclose(s0[key], exact, rel_tol=REL), key
    errors = pred.predicted != pred.targets
    auroc = M.misclassification_auroc(pred.predictive_entropy, errors)
    bound = s0["misclassification AUROC (entropy) error bound"]
    assert abs(s0["misclassification AUROC (entropy)"] - auroc) <= bound + 1e-12


@pytest.mark.slow
def test_an_empty_shard_changes_nothing(ranks):
    single = one_process(wrapper(0.3, n_samples=20), dataset())
    assert fields_equal(ranks[0]["empty"], single)  # rank 0's stream is the wrapper's own
    streamed = one_process(wrapper(0.3, n_samples=20), dataset(), keep="metrics").summary()
    assert ranks[0]["empty_metrics"].summary() == pytest.approx(streamed, rel=REL)


@pytest.mark.slow
def test_overlapping_shards_are_deduplicated_by_index(ranks):
    single = one_process(wrapper(0.0, n_samples=5), dataset())
    assert fields_equal(ranks[0]["overlap"], single)
    assert fields_equal(ranks[1]["overlap"], single)


@pytest.mark.slow
def test_batches_without_targets_and_another_destination(ranks):
    assert ranks[0]["no_targets"] is None
    got = ranks[1]["no_targets"]
    single = one_process(wrapper(0.0, n_samples=5), TensorDataset(dataset().tensors[0]))
    assert got.targets is None and fields_close(got, single)


@pytest.mark.slow
def test_regression_metrics(ranks):
    assert ranks[0]["reg_metrics"] is None
    got = ranks[1]["reg_metrics"]
    assert isinstance(got, StreamingRegressionMetrics)
    streamed = one_process(regressor(), regression_dataset(), keep="metrics").summary()
    assert got.summary() == pytest.approx(streamed, rel=REL, nan_ok=True)


@pytest.mark.slow
def test_checkpoints_are_per_rank_and_reduce_metrics_in_own_loops(ranks):
    first, again, exists = ranks[0]["ckpt"]
    assert exists and ranks[1]["ckpt"][2]
    assert again.summary() == first.summary()
    assert ranks[0]["reduced"] == ranks[1]["reduced"] == 0.5


@pytest.mark.slow
def test_errors_are_raised_on_every_rank(ranks):
    for r in ranks:
        assert "not sharded" in r["unsharded"]
        assert "every shard" in r["all_empty"]


@pytest.mark.slow
def test_mcdrop_report_in_a_distributed_world_writes_one_report(spawned):
    ranks, out = spawned
    assert ranks[0]["cli"] == ranks[1]["cli"] == 0
    check_report(out / "report", report_inputs(out / "report"))  # same seed: the same targets


# --------------------------------------------------------------------------- one process, no group
def test_without_a_process_group_it_is_the_one_process_evaluation(tmp_path):
    assert distributed.get_world_size() == 1 and distributed.get_rank() == 0
    data = dataset()
    with distributed.process_group() as world:
        assert world == 1
        got = distributed.predict_loader(
            wrapper(0.3, n_samples=8), distributed.shard_loader(data, 4), progress=False
        )
    assert fields_equal(got, one_process(wrapper(0.3, n_samples=8), data))
    # a plain iterable of batches (no indices): rows in loader order
    batches = [(data.tensors[0][i : i + 4], data.tensors[1][i : i + 4]) for i in range(0, N, 4)]
    plain = distributed.predict_loader(
        wrapper(0.3, n_samples=8), batches, progress=False, return_indices=True
    )
    assert plain[1] is None and fields_equal(plain[0], one_process(wrapper(0.3, n_samples=8), data))


def test_a_shuffled_loader_comes_back_in_dataset_order():
    data = dataset()
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    got, indices = distributed.predict_loader(
        wrapper(0.0, n_samples=3), loader, progress=False, return_indices=True
    )
    assert torch.equal(indices, torch.arange(N))
    assert fields_close(got, one_process(wrapper(0.0, n_samples=3), data))


def test_derive_seed():
    assert distributed.derive_seed(5, 0) == 5
    seeds = {distributed.derive_seed(5, r) for r in range(1, 50)} | {distributed.derive_seed(6, 1)}
    assert len(seeds) == 50 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(InvalidInputError):
        distributed.derive_seed(-1, 0)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(torch.arange(4.0))


@pytest.mark.parametrize(
    "data", [5, iter([[1.0], [2.0]]), _Stream()], ids=["int", "iterator", "IterableDataset"]
)
def test_shard_loader_refuses_what_it_cannot_shard_by_name(data):
    with pytest.raises(
        InvalidTypeError, match=r"dataset must be a map-style data set.*__getitem__ and __len__"
    ):
        distributed.shard_loader(data)


def test_shard_loader_refuses_bad_batch_sizes_by_name():
    with pytest.raises(InvalidInputError, match="batch_size must be at least 1; got 0"):
        distributed.shard_loader(dataset(), batch_size=0)
    with pytest.raises(InvalidTypeError, match="batch_size must be an integer"):
        distributed.shard_loader(dataset(), batch_size=2.5)
    with pytest.raises(InvalidTypeError, match="shuffle must be True or False"):
        distributed.shard_loader(dataset(), shuffle="yes")


def test_distributed_predict_loader_refuses_what_is_not_a_loader():
    with pytest.raises(InvalidTypeError, match="loader must be an iterable of batches"):
        distributed.predict_loader(wrapper(0.3, n_samples=2), 5, progress=False)


def test_gather_predictions_orders_and_deduplicates():
    mc = wrapper(0.3, n_samples=4)
    pred = mc.predict(dataset().tensors[0][:4])
    out = distributed.gather_predictions(pred, torch.tensor([3, 1, 3, 0]))
    assert len(out) == 3
    assert torch.equal(out.probs, pred.probs[[3, 1, 0]])  # index 3: its first occurrence
    with pytest.raises(InvalidInputError, match="one data-set index per input"):
        distributed.gather_predictions(pred, torch.tensor([0, 1]))
    with pytest.raises(InvalidInputError, match="every shard was empty"):
        distributed.gather_predictions(None)
    with pytest.raises(InvalidInputError, match="dst"):
        distributed.gather_predictions(pred, dst=3)


def test_rank_streams_continue_across_calls():
    mc = wrapper(0.3, n_samples=6)
    first = distributed._rank_wrapper(mc, 1)
    assert first.seed == distributed.derive_seed(0, 1) and first.model is mc.model
    a = first.predict(dataset().tensors[0])
    again = distributed._rank_wrapper(mc, 1)
    assert again is first  # one wrapper per rank, kept with mc
    b = again.predict(dataset().tensors[0])
    assert not torch.equal(a.probs, b.probs)  # the rank's stream went on
    fresh = mcdrop.MCDropout(mc.model, **mc.options.replace(seed=distributed.derive_seed(0, 1)).as_kwargs())
    assert fields_equal(fresh.predict(dataset().tensors[0]), a)  # its first call drew from the rank's seed
    assert distributed._rank_wrapper(mc, 0) is mc


# --------------------------------------------------------------------------- mcdrop report under torchrun
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MCDROP_TEST_TORCHRUN") != "1",
    reason="starts torchrun and two Python processes (~25 s on 2 cores); set MCDROP_TEST_TORCHRUN=1",
)
def test_mcdrop_report_under_torchrun_writes_one_report(tmp_path):
    targets = report_inputs(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "mcdrop", "report", "--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.npz"),
        "--out", str(tmp_path / "report"), "--n-samples", "8", "--batch-size", "4", "--quiet", "--trust-code",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    check_report(tmp_path / "report", targets)
