"""Adaptive sampling (``n_samples="auto"``): stops only below the tolerance, never past max_samples.

The honesty tests count the passes every input really received (a model that records the ids of
the rows it sees) and check the stopping rule against the standard error the prediction reports.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import mlp

import mcdrop
from mcdrop.errors import InvalidInputError


class Counting(nn.Module):
    """A dropout MLP on ``x[:, 1:]`` that counts, per input id ``x[:, 0]``, the rows it is given."""

    def __init__(self, n_inputs: int, d: int = 4, k: int = 3, p: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(d, k, hidden=32, p=p, act=nn.ReLU)
        self.register_buffer("seen", torch.zeros(n_inputs, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0].round().long()
        self.seen += torch.bincount(ids, minlength=self.seen.numel())
        return self.net(x[:, 1:])


def with_ids(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.arange(len(x), dtype=x.dtype)[:, None], x], 1)


def spread_inputs(n: int = 60, seed: int = 0) -> torch.Tensor:
    """Inputs from near the origin (uncertain) to far out (confident)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) * torch.linspace(0.05, 4, n)[:, None]


@pytest.mark.slow
def test_every_input_stops_below_the_tolerance_or_at_max_samples_and_the_counts_are_the_passes_drawn():
    x = spread_inputs()
    model = Counting(len(x)).eval()
    mc = mcdrop.MCDropout(model, n_samples="auto", tolerance=0.02, min_samples=8, max_samples=120,
                          strategy="loop", seed=0)  # fmt: skip
    pred = mc.predict(with_ids(x))
    counts = pred.samples_per_input
    se = pred.standard_error("confidence")
    assert counts.dtype == torch.int64 and counts.shape == (len(x),)
    assert bool(((se <= 0.02) | (counts == 120)).all())  # stopped only below the tolerance, or at the cap
    assert int(counts.max()) <= 120 and int(counts.min()) >= 8
    assert pred.n_samples == int(counts.max()) and pred.max_samples == 120
    # the counts are what the model was really given (the probe and check passes draw no samples
    # of the result: they are counted apart, as the first call's extra passes of the first rows)
    mc_again = mcdrop.MCDropout(model, n_samples="auto", tolerance=0.02, min_samples=8, max_samples=120,
                                strategy="loop", seed=0)  # fmt: skip
    mc_again.predict(with_ids(x))  # decisions and checks made; now count one call alone
    model.seen.zero_()
    again = mc_again.predict(with_ids(x))
    assert torch.equal(model.seen, again.samples_per_input)
    # a spread of counts: inputs whose top probability varies little stop at min_samples, the others go on
    assert int(counts.min()) == 8 and int(counts.max()) > 8
    spread = pred.std.gather(1, pred.predicted[:, None])[:, 0]
    assert float(spread[counts == 8].max()) < float(spread[counts > 8].mean())


def test_inputs_that_have_not_converged_stop_at_max_samples():
    x = spread_inputs(20)
    model = Counting(len(x)).eval()
    mc = mcdrop.MCDropout(model, n_samples="auto", tolerance=1e-6, min_samples=4, max_samples=25,
                          strategy="loop", seed=0)  # fmt: skip
    mc.predict(with_ids(x))
    model.seen.zero_()
    pred = mc.predict(with_ids(x))
    uncertain = pred.standard_error("confidence") > 1e-6
    assert bool(uncertain.any())
    assert bool((pred.samples_per_input[uncertain] == 25).all())
    assert int(model.seen.max()) == 25  # never more passes than max_samples


def test_a_loose_tolerance_gives_the_fixed_n_prediction_of_min_samples_exactly():
    x = spread_inputs(30)
    net = mlp(4, 3, hidden=32, p=0.3, act=nn.ReLU)
    fixed = mcdrop.MCDropout(net, n_samples=12, seed=3).predict(x)
    adaptive = mcdrop.MCDropout(net, n_samples="auto", tolerance=10.0, min_samples=12, seed=3).predict(x)
    assert torch.equal(adaptive.samples_per_input, torch.full((30,), 12))
    for name in ("probs", "std", "predictive_entropy", "expected_entropy", "variation_ratio"):
        assert torch.equal(getattr(adaptive, name), getattr(fixed, name)), name
    assert torch.equal(
        adaptive.standard_error("mutual_information"), fixed.standard_error("mutual_information")
    )


@pytest.mark.slow
def test_rows_come_back_in_input_order_and_agree_with_a_long_run():
    x = spread_inputs(60, seed=1)
    net = mlp(4, 3, hidden=32, p=0.3, act=nn.ReLU)
    ref = mcdrop.MCDropout(net, n_samples=20000, seed=1).predict(x)
    covered = []
    for seed in range(4):
        pred = mcdrop.MCDropout(net, n_samples="auto", tolerance=0.02, min_samples=20, seed=seed).predict(x)
        truth = ref.probs.gather(1, pred.predicted[:, None])[:, 0]
        err = (pred.confidence - truth).abs()
        covered.append((err <= 2 * pred.standard_error("confidence")).float().mean())
        assert bool((err <= 5 * 0.02 + 5 * ref.std.amax(1) / 20000**0.5).all())  # no row is another's
    # the standard errors are honest after adaptive stopping too (nominal 95%; 240 inputs)
    assert float(torch.stack(covered).mean()) >= 0.88


def test_seeded_adaptive_runs_are_reproducible_and_seeds_differ():
    x = spread_inputs(40)
    net = mlp(4, 3, hidden=32, p=0.3, act=nn.ReLU)
    runs = [mcdrop.MCDropout(net, n_samples="auto", tolerance=0.02, seed=s).predict(x) for s in (5, 5, 6)]
    assert torch.equal(runs[0].probs, runs[1].probs)
    assert torch.equal(runs[0].samples_per_input, runs[1].samples_per_input)
    assert not torch.equal(runs[0].probs, runs[2].probs)


@pytest.mark.parametrize(
    "target", ["probs", "predictive_entropy", "mutual_information", "expected_entropy", "std"]
)
def test_every_classification_target_is_met(target):
    x = spread_inputs(30)
    net = mlp(4, 3, hidden=32, p=0.3, act=nn.ReLU)
    pred = mcdrop.MCDropout(net, n_samples="auto", tolerance=0.03, max_samples=300, target=target,
                            seed=0).predict(x)  # fmt: skip
    se = pred.standard_error(target)
    worst = se.reshape(len(x), -1).amax(1)
    assert bool(((worst <= 0.03) | (pred.samples_per_input == 300)).all())


@pytest.mark.parametrize("target", ["mean", "variance", "std"])
def test_regression_targets_with_several_outputs_use_the_largest_standard_error(target):
    x = spread_inputs(30)
    net = mlp(4, 2, hidden=32, p=0.3, act=nn.ReLU)
    mc = mcdrop.MCDropout(net, n_samples="auto", task="regression", tolerance=0.02, max_samples=400,
                          target=target, seed=0)  # fmt: skip
    pred = mc.predict(x)
    worst = pred.standard_error(target).amax(1)
    assert bool(((worst <= 0.02) | (pred.samples_per_input == 400)).all())
    frame = pred.to_frame()
    assert frame["n_samples"].tolist() == pred.samples_per_input.tolist()


def test_aleatoric_regression_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)).eval()
    mc = mcdrop.MCDropout(net, n_samples="auto", aleatoric="log_variance", target="aleatoric_variance",
                          tolerance=0.05, max_samples=200, seed=0)  # fmt: skip
    pred = mc.predict(torch.randn(10, 3))
    se = pred.standard_error("aleatoric_variance").reshape(10, -1).amax(1)
    assert bool(((se <= 0.05) | (pred.samples_per_input == 200)).all())


class BatchMean(nn.Module):
    """Rows mix: every output depends on the batch mean; records the batch sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(4, 3, hidden=16, p=0.3, act=nn.ReLU)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x - x.mean(0, keepdim=True))


def test_a_model_whose_rows_mix_always_gets_the_whole_batch():
    x = spread_inputs(12)
    model = BatchMean().eval()
    mc = mcdrop.MCDropout(model, n_samples="auto", tolerance=0.02, min_samples=4, max_samples=60,
                          strategy="loop", seed=0)  # fmt: skip
    mc.predict(x)
    model.sizes.clear()
    pred = mc.predict(x)
    assert set(model.sizes) == {12}  # no round fed a subset, which would change every output
    assert int(pred.samples_per_input.min()) < int(pred.samples_per_input.max())  # but counts differ
    assert bool(((pred.standard_error("confidence") <= 0.02) | (pred.samples_per_input == 60)).all())


def test_predict_loader_concatenates_and_streams_adaptive_predictions():
    x = spread_inputs(30)
    y = torch.randint(0, 3, (30,))
    net = mlp(4, 3, hidden=32, p=0.3, act=nn.ReLU)
    make = lambda: mcdrop.MCDropout(net, n_samples="auto", tolerance=0.03, seed=0)  # noqa: E731
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    pred = make().predict_loader(loader, progress=False)
    assert pred.samples_per_input.shape == (30,) and pred.max_samples == 1000
    assert pred.n_samples == int(pred.samples_per_input.max())
    assert torch.equal(pred.targets, y)
    by_batch = [make().predict(x[:8])]
    assert torch.equal(pred.probs[:8], by_batch[0].probs)
    metrics = make().predict_loader(loader, keep="metrics", progress=False).summary()
    assert metrics["n_inputs"] == 30
    assert metrics["accuracy"] == pytest.approx(float((pred.predicted == y).float().mean()))


def test_concat_refuses_to_mix_adaptive_and_fixed_predictions():
    x = spread_inputs(6)
    net = mlp(4, 3, hidden=32, p=0.3, act=nn.ReLU)
    fixed = mcdrop.MCDropout(net, n_samples=10, seed=0).predict(x)
    adaptive = mcdrop.MCDropout(net, n_samples="auto", seed=0).predict(x)
    with pytest.raises(InvalidInputError, match="adaptive"):
        mcdrop.concat_predictions([fixed, adaptive])
    both = mcdrop.concat_predictions([adaptive, adaptive])
    assert both.samples_per_input.shape == (12,)


def test_options_are_checked_and_name_what_settles_them():
    net = mlp(4, 3, hidden=8, p=0.3, act=nn.ReLU)
    with pytest.raises(InvalidInputError, match="n_samples='auto'"):
        mcdrop.MCDropout(net, n_samples=20, tolerance=0.01)
    with pytest.raises(InvalidInputError, match="keep_samples"):
        mcdrop.MCDropout(net, n_samples="auto", keep_samples=True)
    with pytest.raises(InvalidInputError, match="max_samples"):
        mcdrop.MCDropout(net, n_samples="auto", min_samples=50, max_samples=20)
    with pytest.raises(InvalidInputError, match="tolerance"):
        mcdrop.MCDropout(net, n_samples="auto", tolerance=-1)
    with pytest.raises(InvalidInputError, match="'auto'"):
        mcdrop.MCDropout(net, n_samples="many")
    mc = mcdrop.MCDropout(net, n_samples="auto")
    with pytest.raises(InvalidInputError, match="sample\\(\\)"):
        mc.sample(torch.randn(2, 4))
    wrong = mcdrop.MCDropout(net, n_samples="auto", target="mean")  # a classifier's output
    with pytest.raises(InvalidInputError, match="target='mean'"):
        wrong.predict(torch.randn(2, 4))


def test_identical_samples_stop_at_min_samples_with_the_usual_warning():
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.zeros(5, 4)
    net[0].weight.data.zero_()
    net[0].bias.data.zero_()  # dropout of zeros: nothing changes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = mcdrop.MCDropout(net, n_samples="auto", min_samples=5, seed=0).predict(x)
    assert torch.equal(pred.samples_per_input, torch.full((5,), 5))
    assert any(issubclass(w.category, mcdrop.errors.NoRandomnessWarning) for w in caught)


def test_a_target_without_standard_errors_for_the_output_names_the_ones_that_have_them():
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.3), nn.Conv2d(4, 3, 1)).eval()
    mc = mcdrop.MCDropout(seg, n_samples="auto", target="mutual_information", max_samples=30, seed=0)
    with pytest.raises(InvalidInputError, match="target='mutual_information'.*'confidence' or 'probs'"):
        mc.predict(torch.randn(2, 1, 5, 5))
    assert not any(m.training for m in seg.modules())
    pred = mcdrop.MCDropout(seg, n_samples="auto", max_samples=30, seed=0).predict(torch.randn(2, 1, 5, 5))
    assert pred.samples_per_input.shape == (2,)


def test_kept_samples_are_asked_of_an_integer_n_when_a_prediction_is_adaptive():
    net = mlp(4, 3, hidden=16, p=0.3, act=nn.ReLU)
    pred = mcdrop.MCDropout(net, n_samples="auto", max_samples=40, seed=0).predict(spread_inputs(6))
    with pytest.raises(InvalidInputError, match="adaptive sampling.*keep_samples=True"):
        mcdrop.TemperatureScaling().fit(pred, torch.zeros(6, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="adaptive sampling.*keep_samples=True"):
        mcdrop.acquisition.select(pred, 2, method="batch_bald")
