"""Tests for mcdrop/wrapper.py: ``MCDropout`` ties policy, engine and predictions together.

Covered here: argument validation (every error an ``McdropError`` with a helpful message; the
inputs' and outputs' own checks are in ``tests/test_engine_inputs.py`` and
``tests/test_engine_outputs.py``), seeding and the global RNG, the model's state before/after (and
during) sampling, ``predict_loader`` and a hypothesis property test of the sample/predict contract.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import mlp, randn_rows

import mcdrop
from mcdrop import (
    ClassificationPrediction,
    InvalidInputError,
    InvalidTypeError,
    McdropError,
    MCDropout,
    NoDropoutError,
    NonFiniteError,
    NoRandomnessWarning,
    RegressionPrediction,
    concat_predictions,
)
from mcdrop.engine.checks import checking

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_net(seed=0, p=0.3) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, with non-trivial running statistics.

    ``p=None`` leaves the dropout out (an ``nn.Identity`` in its place).
    """
    torch.manual_seed(seed)
    drop = nn.Identity() if p is None else nn.Dropout(p)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), drop, nn.Linear(16, 3))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 4) * 3 + 1)
    return net.eval()


def fields_equal(a, b) -> bool:
    names = (
        ("probs", "std", "predictive_entropy", "expected_entropy", "variation_ratio")
        if isinstance(a, ClassificationPrediction)
        else ("mean", "variance")
    )
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)


# --------------------------------------------------------------------------- construction errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_samples": 0}, InvalidInputError, "n_samples must be at least 1; got 0"),
        ({"n_samples": -1}, InvalidInputError, "n_samples must be at least 1; got -1"),
        ({"n_samples": 2.5}, InvalidTypeError, "n_samples must be an integer; got 2.5"),
        ({"n_samples": True}, InvalidTypeError, "n_samples must be an integer"),
        (
            {"task": "foo"},
            InvalidInputError,
            "task must be one of 'auto', 'classification', 'regression'; got 'foo'",
        ),
        (
            {"output_type": "foo"},
            InvalidInputError,
            "output_type must be one of 'logits', 'probs', 'log_probs'",
        ),
        ({"aleatoric": "std"}, InvalidInputError, "aleatoric must be one of 'variance', 'log_variance'"),
        ({"aleatoric": "variance", "task": "classification"}, InvalidInputError, "applies to regression"),
        ({"max_batch_size": 0}, InvalidInputError, "max_batch_size must be at least 1"),
        ({"memory_budget": 0}, InvalidInputError, "memory_budget must be at least 1"),
        ({"seed": -3}, InvalidInputError, "seed must be at least 0"),
        ({"seed": 1.5}, InvalidTypeError, "seed must be an integer"),
        ({"seed": 2**64}, InvalidInputError, "seed must be at most 18446744073709551615"),
        (
            {"output": 1.5},
            InvalidTypeError,
            "output must be None, a key/attribute name, a tuple index or a callable",
        ),
        ({"batch_dim": "0"}, InvalidTypeError, "batch_dim must be an integer"),
        ({"keep_samples": "no"}, InvalidTypeError, "keep_samples must be True or False; got 'no'"),
        ({"keep_samples": None}, InvalidTypeError, "keep_samples must be True or False"),
    ],
)
def test_bad_arguments_are_rejected_up_front(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        MCDropout(mlp(4, 3), **kwargs)
    assert isinstance(info.value, McdropError)


def test_model_must_be_a_module():
    with pytest.raises(InvalidTypeError, match="model must be a torch.nn.Module; got function"):
        MCDropout(lambda x: x)


def test_model_without_dropout_fails_at_construction():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(NoDropoutError, match=r"Sequential has no source of dropout randomness.*nn\.Dropout"):
        MCDropout(net)
    with pytest.raises(NoDropoutError, match=r"rate is 0"):
        MCDropout(nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.0)))
    assert issubclass(NoDropoutError, McdropError)


# --------------------------------------------------------------------------- seeds and the global RNG


def test_same_seed_gives_identical_predictions_in_fresh_wrappers():
    x = randn_rows()
    a, b = MCDropout(mlp(4, 3), n_samples=10, seed=7), MCDropout(mlp(4, 3), n_samples=10, seed=7)
    torch.manual_seed(1)
    pa1, pa2 = a.predict(x), a.predict(x)
    torch.manual_seed(2)  # a seeded wrapper ignores the global RNG
    pb1, pb2 = b.predict(x), b.predict(x)
    assert fields_equal(pa1, pb1) and fields_equal(pa2, pb2)
    assert not torch.equal(pa1.probs, pa2.probs)  # successive calls draw new samples
    assert torch.equal(
        MCDropout(mlp(4, 3), n_samples=4, seed=7).sample(x),
        MCDropout(mlp(4, 3), n_samples=4, seed=7).sample(x),
    )
    assert not torch.equal(
        MCDropout(mlp(4, 3), n_samples=4, seed=7).sample(x),
        MCDropout(mlp(4, 3), n_samples=4, seed=8).sample(x),
    )


def test_seeded_calls_leave_the_global_rng_untouched():
    x = randn_rows()
    mc = MCDropout(mlp(4, 3), n_samples=6, seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    mc.predict(x)
    mc.sample(x)
    mc.predict_loader([x, x], progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_unseeded_calls_draw_from_the_global_rng():
    x = randn_rows()
    mc = MCDropout(mlp(4, 3), n_samples=6)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = mc.sample(x)
    assert not torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)
    assert torch.equal(mc.sample(x), first)


def test_seeded_call_that_raises_leaves_the_global_rng_untouched():
    mc = MCDropout(RaisesOnCall(3), n_samples=8, seed=0, max_batch_size=2)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom on call 3"):
        mc.predict(randn_rows())
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- model state


class RaisesOnCall(nn.Module):
    """An MLP with BatchNorm that raises on its n-th forward call."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.net = bn_net()
        self.n = n
        self.calls = 0

    def forward(self, x):
        self.calls += not checking()  # mcdrop's check passes do not count
        if self.calls == self.n:
            raise RuntimeError(f"boom on call {self.n}")
        return self.net(x)


def snapshot(model: nn.Module) -> dict:
    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
        assert after["state"][k].dtype == v.dtype


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    if mode == "eval":
        model.eval()
    elif mode == "train":
        model.train()
    else:  # mixed: BatchNorm in train mode, dropout in eval mode, the rest mixed
        model.eval()
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.BatchNorm1d) or i % 2:
                m.train()
    return model


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_predict_leaves_the_model_exactly_as_it_was(mode):
    model = set_mode(bn_net(), mode)
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    mc = MCDropout(model, n_samples=7, max_batch_size=4)
    pred = mc.predict(randn_rows(b=6))
    mc.sample(randn_rows(b=6))
    mc.predict_loader([randn_rows(b=3)], progress=False)
    assert_same_state(model, before)
    assert not pred.probs.requires_grad


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
@pytest.mark.parametrize("call", ["predict", "sample", "predict_loader"])
def test_state_is_restored_after_an_exception_mid_sampling(mode, call):
    model = set_mode(RaisesOnCall(3), mode)
    before = snapshot(model)
    mc = MCDropout(model, n_samples=8, max_batch_size=4, seed=0)
    x = randn_rows(b=2)  # two samples per pass: the third pass raises half way through
    with pytest.raises(RuntimeError, match="boom on call 3"):
        if call == "predict_loader":
            mc.predict_loader([x, x], progress=False)
        else:
            getattr(mc, call)(x)
    assert model.calls == 3
    assert_same_state(model, before)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_only_dropout_is_in_train_mode_during_sampling(mode):
    model = set_mode(bn_net(), mode)
    seen: dict[str, list[bool]] = {}
    for name, m in model.named_modules():
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.setdefault(name, []).append(mod.training)
        )
    MCDropout(model, n_samples=5, max_batch_size=6).predict(randn_rows(b=4))
    assert seen["3"] and all(seen["3"])  # the dropout
    for name in ("", "0", "1", "2", "4"):
        assert seen[name] and not any(seen[name]), name


class SideBranch(nn.Module):
    """BatchNorm model whose dropout sits on a branch that does not reach the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_net(p=None)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return {"logits": self.body(x), "unused": self.drop(x)}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batchnorm_runs_in_eval_mode_so_the_mean_equals_the_eval_output(mode):
    model = SideBranch()
    x = randn_rows(b=6) * 2
    with torch.no_grad():
        expected = model.eval()(x)["logits"].softmax(-1)
    set_mode(model, mode)
    before = snapshot(model)
    mc = MCDropout(model, n_samples=4, max_batch_size=8)
    with pytest.warns(NoRandomnessWarning, match="samples are identical"):
        pred = mc.predict(x)
    torch.testing.assert_close(pred.probs, expected, atol=1e-6, rtol=0)
    assert torch.equal(pred.std, torch.zeros_like(pred.std))
    assert torch.equal(pred.mutual_information, torch.zeros(6))
    with pytest.warns(NoRandomnessWarning):
        samples = mc.sample(x)
    torch.testing.assert_close(samples.softmax(-1), expected.expand(4, 6, 3), atol=1e-6, rtol=0)
    assert_same_state(model, before)


def test_rows_do_not_influence_each_other_through_batchnorm():
    """With BatchNorm in eval mode, a row's samples do not depend on the other rows of the batch."""
    model = SideBranch()
    x = randn_rows(b=4)
    mc = MCDropout(model, n_samples=3, max_batch_size=3)
    with pytest.warns(NoRandomnessWarning):
        full = mc.sample(x)
    with pytest.warns(NoRandomnessWarning):
        single = mc.sample(x[2:3])
    torch.testing.assert_close(full[:, 2:3], single, atol=1e-6, rtol=0)


def test_included_dropout_with_rate_zero_warns_that_samples_are_identical():
    """Every sampled site at rate 0: the user is warned when building the wrapper, not left with zeros."""
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.0))
    with pytest.warns(NoRandomnessWarning, match="rate 0"):
        mc = MCDropout(net, n_samples=5, include=[nn.Dropout], task="classification")
    pred = mc.predict(randn_rows())
    # zero up to the float rounding of passes at different batch sizes
    assert pred.mutual_information.abs().max() < 1e-6


# --------------------------------------------------------------------------- predict_loader


def test_predict_loader_with_tuple_batches_equals_concatenated_predictions():
    x, y = randn_rows(b=10), torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(0))
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]
    pred = MCDropout(mlp(4, 3), n_samples=6, seed=3, max_batch_size=5).predict_loader(batches, progress=False)
    assert isinstance(pred, ClassificationPrediction)
    assert len(pred) == 10 and pred.probs.shape == (10, 3)
    assert torch.equal(pred.targets, y)
    other = MCDropout(mlp(4, 3), n_samples=6, seed=3, max_batch_size=5)
    parts = concat_predictions([other.predict(bx) for bx, _ in batches])
    assert fields_equal(pred, parts)  # one seeded stream over the calls: the very same draws
    assert parts.targets is None


def test_predict_loader_with_a_dataloader():
    x, y = randn_rows(b=10), torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    mc = MCDropout(mlp(4, 3), n_samples=40, seed=3)
    pred = mc.predict_loader(loader, progress=False)
    assert len(pred) == 10 and pred.probs.shape == (10, 3) and pred.n_samples == 40
    assert torch.equal(pred.targets, y)
    again = MCDropout(mlp(4, 3), n_samples=40, seed=3).predict_loader(loader, progress=False)
    assert fields_equal(pred, again)
    # In distribution, the same as one prediction of the whole batch (5 standard errors).
    whole = MCDropout(mlp(4, 3), n_samples=40, seed=4, keep_samples=True).predict(x)
    se = (2 * whole.std.square() / 40).sqrt()
    assert bool(((pred.probs - whole.probs).abs() <= 5 * se + 1e-6).all())


def test_dataloader_randomness_is_not_drawn_from_the_wrappers_stream():
    """A seeded predict_loader iterates the loader outside its own RNG stream.

    The loader's random draws (a shuffling sampler's seed, random augmentations in the dataset) come
    from the global RNG as usual, and the dropout draws do not depend on where the batches came from.
    """
    x = randn_rows(b=10)
    loader = DataLoader(TensorDataset(x, torch.arange(10)), batch_size=4, shuffle=True)
    orders = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        expected_order = [int(i) for batch in loader for i in batch[1]]
        model = mlp(4, 3)  # built before seeding: its initialisation draws from the global RNG too
        torch.manual_seed(global_seed)
        pred = MCDropout(model, n_samples=2, seed=3).predict_loader(loader, progress=False)
        assert pred.targets.tolist() == expected_order
        orders.append(expected_order)
    assert orders[0] != orders[1]

    plain = DataLoader(TensorDataset(x), batch_size=4)
    from_loader = MCDropout(mlp(4, 3), n_samples=6, seed=3).predict_loader(plain, progress=False)
    mc = MCDropout(mlp(4, 3), n_samples=6, seed=3)
    assert fields_equal(from_loader, concat_predictions([mc.predict(b) for (b,) in plain]))


def test_predict_loader_with_dict_batches_takes_labels_out():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(4, 3)

        def forward(self, features, offset):
            return {"logits": self.net(features + offset)}

    data = [
        {"features": f, "offset": torch.ones(1), "labels": torch.tensor(i % 3)}
        for i, f in enumerate(randn_rows(b=7))
    ]
    loader = DataLoader(data, batch_size=3)
    pred = MCDropout(Keyword(), n_samples=5, seed=0).predict_loader(loader, progress=False)
    assert len(pred) == 7
    assert torch.equal(pred.targets, torch.tensor([i % 3 for i in range(7)]))


@pytest.mark.parametrize("key", ["label", "targets", "target", "y"])
def test_predict_loader_other_target_keys(key):
    batches = [
        {"input": randn_rows(b=2), key: torch.tensor([1, 2])},
        {"input": randn_rows(b=1), key: torch.tensor([0])},
    ]
    pred = MCDropout(mlp(4, 3), n_samples=3, seed=0).predict_loader(batches, progress=False)
    assert torch.equal(pred.targets, torch.tensor([1, 2, 0]))


def test_predict_loader_with_custom_unpack():
    x, y = randn_rows(b=6), torch.randn(6)
    batches = [{"data": (x[:4], y[:4])}, {"data": (x[4:], y[4:])}]
    mc = MCDropout(mlp(4, 1), n_samples=5, seed=0)
    pred = mc.predict_loader(batches, unpack=lambda b: b["data"], progress=False)
    assert isinstance(pred, RegressionPrediction) and pred.mean.shape == (6, 1)
    assert torch.equal(pred.targets, y)

    two_args = [(x[:3], x[:3] * 0), (x[3:], x[3:] * 0)]

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(4, 3)

        def forward(self, a, b):
            return self.net(a + b)

    pred = MCDropout(Pair(), n_samples=3, seed=0).predict_loader(
        two_args, unpack=lambda b: (tuple(b), None), progress=False
    )
    assert len(pred) == 6 and pred.targets is None


def test_predict_loader_plain_tensor_batches_have_no_targets():
    pred = MCDropout(mlp(4, 3), n_samples=3, seed=0).predict_loader(
        [randn_rows(b=2), randn_rows(b=3)], progress=False
    )
    assert len(pred) == 5 and pred.targets is None
    pred = MCDropout(mlp(4, 3), n_samples=3, seed=0).predict_loader([(randn_rows(b=2),)], progress=False)
    assert len(pred) == 2 and pred.targets is None


def test_predict_loader_with_progress_bar(capsys):
    pred = MCDropout(mlp(4, 3), n_samples=2, seed=0).predict_loader([randn_rows(b=2)], progress=True)
    assert len(pred) == 2


def test_predict_loader_errors():
    mc = MCDropout(mlp(4, 3), n_samples=2)
    with pytest.raises(InvalidInputError, match="yielded no batches"):
        mc.predict_loader([], progress=False)
    with pytest.raises(InvalidInputError, match="empty batch tuple"):
        mc.predict_loader([()], progress=False)
    with pytest.raises(InvalidTypeError, match=r"Cannot unpack a batch of type int.*unpack=lambda"):
        mc.predict_loader([3], progress=False)
    with pytest.raises(InvalidInputError, match="targets have 3 rows for 2 inputs"):
        mc.predict_loader([(randn_rows(b=2), torch.tensor([0, 1, 2]))], progress=False)


@pytest.mark.parametrize("loader", [5, 2.5, None, "data/test.pt"])
def test_predict_loader_refuses_what_is_not_a_loader_by_name(loader):
    mc = MCDropout(mlp(4, 3), n_samples=2)
    for keep in ("predictions", "metrics"):
        with pytest.raises(InvalidTypeError, match=r"loader must be an iterable of batches.*DataLoader.*predict\(inputs\)"):
            mc.predict_loader(loader, progress=False, keep=keep)


# --------------------------------------------------------------------------- misc public surface


def test_sites_describe_and_repr():
    mc = MCDropout(bn_net(), n_samples=9)
    assert [(s.path, s.kind, s.rate, s.sampled) for s in mc.sites] == [("3", "dropout", 0.3, True)]
    df = mc.describe()
    assert df[["path", "kind", "rate", "sampled"]].values.tolist() == [["3", "dropout", 0.3, True]]
    assert repr(mc) == "MCDropout(Sequential, n_samples=9, task='auto', sampled_sites=1)"


def test_sites_and_describe_show_rates_changed_after_the_wrapper_was_built():
    import mcdrop

    net = bn_net()
    mc = MCDropout(net, n_samples=4, seed=0)
    mc.predict(randn_rows())  # an activation before the change
    with mcdrop.set_dropout_rate(net, 0.05):
        assert [s.rate for s in mc.sites] == [0.05]
        assert mc.describe()["rate"].tolist() == [0.05]
        assert mc.describe().equals(mcdrop.describe(mc))
    assert [s.rate for s in mc.sites] == [0.3]
    assert mc.describe()["rate"].tolist() == [0.3]


def test_the_largest_seed_is_accepted_and_reproducible():
    x = randn_rows()
    a = MCDropout(mlp(4, 3), n_samples=3, seed=2**64 - 1, keep_samples=True).predict(x).samples
    b = MCDropout(mlp(4, 3), n_samples=3, seed=2**64 - 1, keep_samples=True).predict(x).samples
    assert torch.equal(a, b)


def test_task_auto_and_forced():
    x = randn_rows()
    assert MCDropout(mlp(4, 3), n_samples=3).predict(x).task == "classification"
    assert MCDropout(mlp(4, 1), n_samples=3).predict(x).task == "regression"
    assert MCDropout(mlp(4, 3), n_samples=3, task="regression").predict(x).task == "regression"

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(4, 1)

        def forward(self, x):
            return self.net(x)[:, 0]

    pred = MCDropout(Flat(), n_samples=3).predict(x)
    assert pred.task == "regression" and pred.mean.shape == (5,)


def test_n_samples_one_gives_zero_spread():
    pred = MCDropout(mlp(4, 3), n_samples=1, seed=0, keep_samples=True).predict(randn_rows())
    assert torch.equal(pred.std, torch.zeros_like(pred.std))
    assert torch.equal(pred.variation_ratio, torch.zeros(5))
    torch.testing.assert_close(pred.probs, pred.samples[0].softmax(-1), atol=1e-6, rtol=0)


class MeanAndNoise(nn.Module):
    """A dropout mean head and a noise head (no dropout on it) of variance 4 exp(x[:, :1] / 2)."""

    def __init__(self, log: bool) -> None:
        super().__init__()
        self.mean = mlp(4, 1)
        self.log = log

    def forward(self, x):
        log_variance = torch.log(torch.tensor(4.0)) + 0.5 * x[:, :1]
        return self.mean(x), log_variance if self.log else log_variance.exp()


@pytest.mark.parametrize("aleatoric", ["variance", "log_variance"])
def test_sample_returns_variances_for_either_aleatoric_output(aleatoric):
    x = randn_rows()
    expected = 4.0 * torch.exp(0.5 * x[:, :1])  # the variance the model's second output stands for
    mc = MCDropout(MeanAndNoise(log=aleatoric == "log_variance"), n_samples=6, seed=0, aleatoric=aleatoric)
    means, variances = mc.sample(x)
    assert means.shape == variances.shape == (6, 5, 1)
    torch.testing.assert_close(variances, expected.expand(6, 5, 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(mc.predict(x).aleatoric_variance, variances.mean(0), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- how outputs are read
def softmax_mlp() -> nn.Module:
    """A classifier that ends in nn.Softmax: it returns probabilities."""
    return mlp(4, 3, head=nn.Softmax(-1))


def test_probabilities_read_as_logits_by_default_are_refused_naming_output_type():
    """Issue 18, item 6a: a softmax of probabilities flattened every distribution, silently."""
    x = randn_rows(8)
    with pytest.raises(InvalidInputError, match=r"look like probabilities.*output_type='probs'"):
        MCDropout(softmax_mlp(), n_samples=10, seed=0).predict(x)
    probs = MCDropout(softmax_mlp(), n_samples=10, seed=0, output_type="probs", keep_samples=True).predict(x)
    torch.testing.assert_close(probs.probs, probs.samples.mean(0), atol=1e-6, rtol=0)
    # said explicitly, they are read as logits: the user's call
    logits = MCDropout(softmax_mlp(), n_samples=10, seed=0, output_type="logits").predict(x)
    assert float(logits.confidence.mean()) < float(probs.confidence.mean())
    # one call whose rows are not all probabilities is read as logits, as it says
    ok = MCDropout(mlp(4, 3, head=nn.ReLU()), n_samples=10, seed=0).predict(x)  # non-negative logits
    assert ok.task == "classification"


@pytest.fixture
def token_classifier(T):
    """A tiny Hugging Face token classifier: logits (batch, T, num_labels), num_labels=5."""

    def build(seq: int = 8) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        config = T.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=5,
            hidden_dropout_prob=0.3,
        )
        return T.BertForTokenClassification(config).eval(), torch.randint(0, 64, (3, seq))

    return build


def test_token_classification_logits_take_their_class_dim_from_the_config(token_classifier):
    """Issue 18, item 6b: class_dim=1 took a softmax over the positions of (batch, T, K) logits."""
    model, ids = token_classifier()
    pred = MCDropout(model, n_samples=6, seed=0, keep_samples=True).predict(input_ids=ids)
    assert pred.probs.shape == (3, 8, 5) and pred.predictive_entropy.shape == (3, 8)
    torch.testing.assert_close(pred.probs, pred.samples.softmax(-1).mean(0), atol=1e-6, rtol=0)
    # the old explicit value keeps its meaning
    old = MCDropout(model, n_samples=6, seed=0, class_dim=1, keep_samples=True).predict(input_ids=ids)
    torch.testing.assert_close(old.probs, old.samples.softmax(2).mean(0), atol=1e-6, rtol=0)


def test_token_classification_logits_whose_class_dim_is_ambiguous_are_refused(token_classifier):
    model, ids = token_classifier(seq=5)  # T == num_labels: the config names both dimensions
    with pytest.raises(InvalidInputError, match=r"num_labels=5.*class_dim=-1"):
        MCDropout(model, n_samples=3, seed=0).predict(input_ids=ids)
    pred = MCDropout(model, n_samples=3, seed=0, class_dim=-1).predict(input_ids=ids)
    assert pred.probs.shape == (3, 5, 5) and pred.class_dim == 2


def test_a_hugging_face_regression_head_is_read_as_regression(T):
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        problem_type="regression",
        hidden_dropout_prob=0.3,
    )
    model = T.BertForSequenceClassification(config).eval()
    pred = MCDropout(model, n_samples=4, seed=0).predict(input_ids=torch.randint(0, 64, (2, 6)))
    assert pred.task == "regression" and pred.mean.shape == (2, 3)


class SqueezedMap(nn.Module):
    """A binary segmentation head whose one logit per pixel is squeezed: (batch, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Dropout2d(0.3), nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


def test_task_auto_never_reads_an_output_with_two_non_batch_dims_as_classes_silently():
    """Issue 18, item 6c: a (batch, H, W) map got a softmax over its rows."""
    torch.manual_seed(0)
    model, x = SqueezedMap().eval(), torch.randn(2, 3, 6, 7)
    with pytest.raises(InvalidInputError, match=r"\(batch, 6, 7\).*class_dim=.*task='regression'.*unsqueeze"):
        MCDropout(model, n_samples=4, seed=0).predict(x)
    with pytest.raises(InvalidInputError, match="class_dim="):  # classification, but where?
        MCDropout(model, n_samples=4, seed=0, task="classification").predict(x)
    assert MCDropout(model, n_samples=4, seed=0, task="regression").predict(x).mean.shape == (2, 6, 7)
    per_pixel = MCDropout(model, n_samples=4, seed=0, output=lambda out: out.unsqueeze(1), class_dim=1)
    assert per_pixel.predict(x).probs.shape == (2, 2, 6, 7)  # one binary classifier per pixel
    # a (batch, K, H, W) map keeps PyTorch's convention, with nothing to say
    maps = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Dropout2d(0.3), nn.Conv2d(8, 4, 1)).eval()
    assert MCDropout(maps, n_samples=4, seed=0).predict(x).probs.shape == (2, 4, 6, 7)


# --------------------------------------------------------------------------- property test


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 7),
    n=st.integers(1, 12),
    max_batch_size=st.integers(1, 20),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    task=st.sampled_from(["regression", "classification"]),
    seed=st.integers(0, 2**16),
)
def test_sample_shape_and_kept_samples_reproduce_predict(b, n, max_batch_size, d_in, d_out, task, seed):
    net = mlp(d_in=d_in, d_out=d_out, hidden=24, seed=seed % 7)
    x = torch.randn(b, d_in, generator=torch.Generator().manual_seed(seed))
    kw = {"n_samples": n, "seed": seed, "max_batch_size": max_batch_size, "task": task}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRandomnessWarning)  # e.g. N=2 drawing the same mask twice
        samples = MCDropout(net, **kw).sample(x)
        pred = MCDropout(net, keep_samples=True, **kw).predict(x)
    assert samples.shape == (n, b, d_out)
    assert torch.equal(pred.samples, samples)  # same seed, same plan: the very same draws
    if task == "regression":
        torch.testing.assert_close(pred.mean, samples.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pred.variance, samples.var(0, correction=0), atol=1e-5, rtol=1e-4)
    else:
        p = samples.double()
        p = torch.cat([1 - p.sigmoid(), p.sigmoid()], -1) if d_out == 1 else p.softmax(-1)
        assert pred.probs.shape == (b, max(d_out, 2))
        torch.testing.assert_close(pred.probs.double(), p.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(pred.std.double(), p.std(0, correction=0), atol=1e-5, rtol=0)


def test_errors_are_all_mcdrop_errors():
    for cls in (
        InvalidInputError,
        InvalidTypeError,
        NoDropoutError,
        NonFiniteError,
        mcdrop.ModelStateError,
        mcdrop.UnsupportedModelError,
    ):
        assert issubclass(cls, McdropError)


# --------------------------------------------------------------------------- dropout off: the baseline


def test_predict_deterministic_is_the_eval_mode_output_and_leaves_every_mode() -> None:
    net = bn_net(seed=3)
    x = randn_rows(7, 4, seed=5)
    with torch.no_grad():
        expected = torch.softmax(net(x), 1)
    net.train()  # the user left it in train mode: the baseline is the eval-mode output all the same
    net[1].eval()
    modes = [m.training for m in net.modules()]
    running = net[1].running_mean.clone()
    mc = MCDropout(net, n_samples=10, seed=0, keep_samples=True)
    base = mc.predict_deterministic(x)
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(net[1].running_mean, running)
    assert isinstance(base, ClassificationPrediction) and base.n_samples == 1
    torch.testing.assert_close(base.probs, expected, rtol=0, atol=1e-6)
    assert torch.equal(base.mutual_information, torch.zeros(7))
    assert torch.equal(base.std, torch.zeros(7, 3)) and torch.equal(base.variation_ratio, torch.zeros(7))
    assert base.samples.shape == (1, 7, 3) and base.output_type == "logits"
    with torch.no_grad():
        torch.testing.assert_close(base.samples[0], net.eval()(x), rtol=0, atol=1e-6)
    for name in ("probs", "std", "predictive_entropy", "mutual_information"):
        assert torch.equal(base.standard_error(name), torch.zeros_like(base.standard_error(name)))


def test_predict_deterministic_regression_split_and_dict_inputs() -> None:
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp(d_in=4, d_out=2, p=0.4, seed=2)

        def forward(self, *, features):
            out = self.body(features)
            return {"mu": out[:, :1], "var": out[:, 1:].exp()}

    model = Dict().eval()
    x = randn_rows(9, 4, seed=2)
    mc = MCDropout(model, n_samples=8, output=lambda o: (o["mu"], o["var"]), aleatoric="variance", seed=0)
    whole = mc.predict_deterministic(features=x)
    parts = MCDropout(
        model, n_samples=8, output=lambda o: (o["mu"], o["var"]), aleatoric="variance", max_batch_size=4
    ).predict_deterministic(features=x)
    with torch.no_grad():
        out = model(features=x)
    assert isinstance(whole, RegressionPrediction)
    torch.testing.assert_close(whole.mean, out["mu"], rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.aleatoric_variance, out["var"], rtol=0, atol=1e-6)
    assert torch.equal(whole.variance, torch.zeros(9, 1))
    torch.testing.assert_close(parts.mean, whole.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.aleatoric_variance, whole.aleatoric_variance, rtol=0, atol=1e-6)


def test_deterministic_passes_draw_nothing_from_any_random_stream() -> None:
    net = mlp(seed=4)
    x = randn_rows(6, 5, seed=4)
    alone = MCDropout(net, n_samples=12, seed=7)
    first, second = alone.predict(x), alone.predict(x)
    mixed = MCDropout(net, n_samples=12, seed=7)
    mixed.predict_deterministic(x)
    first_mixed = mixed.predict(x)
    mixed.predict_deterministic(x)
    assert fields_equal(first, first_mixed) and fields_equal(second, mixed.predict(x))
    state = torch.get_rng_state()
    MCDropout(net, n_samples=12).predict_deterministic(x)  # unseeded: the global generator untouched
    assert torch.equal(torch.get_rng_state(), state)


def test_predict_loader_deterministic_baseline() -> None:
    net = mlp(seed=5)
    data = TensorDataset(randn_rows(10, 5, seed=6), torch.arange(10) % 4)
    loader = DataLoader(data, batch_size=4)
    plain = MCDropout(net, n_samples=6, seed=1).predict_loader(loader, progress=False)
    both = MCDropout(net, n_samples=6, seed=1).predict_loader(loader, progress=False, deterministic=True)
    assert plain.deterministic is None
    assert fields_equal(plain, both)  # the extra passes change no MC sample
    base = both.deterministic
    assert isinstance(base, ClassificationPrediction) and len(base) == 10 and base.n_samples == 1
    assert torch.equal(base.targets, both.targets)
    with torch.no_grad():
        torch.testing.assert_close(base.probs, torch.softmax(net(data.tensors[0]), 1), rtol=0, atol=1e-6)
    with pytest.raises(InvalidInputError, match="deterministic=True needs keep='predictions'"):
        MCDropout(net, n_samples=6).predict_loader(loader, progress=False, keep="metrics", deterministic=True)
    with pytest.raises(InvalidTypeError, match="deterministic"):
        MCDropout(net, n_samples=6).predict_loader(loader, progress=False, deterministic="yes")


def test_predict_deterministic_warns_for_dropout_no_flag_switches_off() -> None:
    class AlwaysOn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 8)
            self.drop = nn.Dropout(0.2)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.drop(nn.functional.dropout(self.fc(x), 0.5, True)))

    net = AlwaysOn().eval()
    x = randn_rows(4, 5, seed=7)
    mc = MCDropout(net, n_samples=4)
    with pytest.warns(mcdrop.McdropWarning, match="drew random numbers in eval mode"):
        one = mc.predict_deterministic(x)
    with pytest.warns(mcdrop.McdropWarning, match="drew random numbers in eval mode"):
        again = mc.predict_deterministic(x)
    assert torch.equal(one.probs, again.probs)  # one draw, from a fixed seed
    assert bool(one.standard_error("probs").isnan().all())


def test_predict_deterministic_puts_every_mode_back_when_the_forward_raises():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:  # the deterministic pass runs in eval mode
                raise RuntimeError("boom")
            return self.net(x)

    model = Failing().train()
    model.net[1].eval()  # a user's own mix of modes
    before = {name: m.training for name, m in model.named_modules()}
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    mc = mcdrop.MCDropout(model, n_samples=3, seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        mc.predict_deterministic(torch.randn(5, 4))
    assert {name: m.training for name, m in model.named_modules()} == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
