"""Models without dropout, and rates at inference: add_dropout, set_dropout_rate, describe."""

from __future__ import annotations

import copy
import importlib
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mcdrop
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropWarning,
    NoDropoutError,
    UnsupportedModelError,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def pretrained() -> nn.Module:
    """A "pretrained" classifier trained without dropout: BatchNorm, no dropout anywhere."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    model.train()
    model(torch.randn(32, 6))  # non-trivial running statistics
    return model.eval()


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "flags": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: len(m._forward_pre_hooks) for name, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


X = torch.randn(5, 6)


# ----------------------------------------------------------------------------- add_dropout
def test_last_layer_recipe_end_to_end_and_the_original_is_unchanged() -> None:
    model = pretrained()
    with pytest.raises(NoDropoutError, match="last nn.Linear"):
        mcdrop.MCDropout(model)
    before = snapshot(model)
    with torch.no_grad():
        reference = model(X)

    mc_model = mcdrop.add_dropout(model, 0.3)
    assert mc_model is not model
    assert_unchanged(model, before)
    assert mcdrop.find_stochastic_sites(model) == []
    sites = mcdrop.find_stochastic_sites(mc_model)
    assert [(s.path, s.kind, s.rate, s.sampled) for s in sites] == [
        ("5.mcdrop_dropout", "dropout", 0.3, True)
    ]

    # same function in eval mode, same weights, same state_dict keys (checkpoints still load)
    with torch.no_grad():
        assert torch.equal(mc_model(X), reference)
    assert mc_model.state_dict().keys() == model.state_dict().keys()
    mc_model.load_state_dict(model.state_dict(), strict=True)

    pred = mcdrop.MCDropout(mc_model, n_samples=20, seed=0, keep_samples=True).predict(X)
    assert pred.probs.shape == (5, 3)
    assert bool((pred.mutual_information > 0).all())
    assert not torch.equal(pred.samples[0], pred.samples[1])
    assert_unchanged(model, before)


def test_where_chooses_the_layers() -> None:
    model = pretrained()
    paths = lambda m: sorted(s.path for s in mcdrop.find_stochastic_sites(m))  # noqa: E731
    assert paths(mcdrop.add_dropout(model, 0.1, where="all")) == [
        "0.mcdrop_dropout",
        "3.mcdrop_dropout",
        "5.mcdrop_dropout",
    ]
    assert paths(mcdrop.add_dropout(model, 0.1, where=None)) == paths(
        mcdrop.add_dropout(model, 0.1, where="all")
    )
    assert paths(mcdrop.add_dropout(model, 0.1, where="3")) == ["3.mcdrop_dropout"]
    assert paths(mcdrop.add_dropout(model, 0.1, where=["0", "[35]"])) == [
        "0.mcdrop_dropout",
        "3.mcdrop_dropout",
        "5.mcdrop_dropout",
    ]
    assert paths(mcdrop.add_dropout(model, 0.1, where=lambda path, m: m.in_features == 16)) == [
        "3.mcdrop_dropout",
        "5.mcdrop_dropout",
    ]
    assert paths(mcdrop.add_dropout(model, 0.1, before=nn.ReLU, where="all")) == [
        "2.mcdrop_dropout",
        "4.mcdrop_dropout",
    ]
    with pytest.raises(InvalidInputError, match=r"where='head' matches none of the Linear layers.*0, 3, 5"):
        mcdrop.add_dropout(model, 0.1, where="head")
    with pytest.raises(InvalidInputError, match="no Conv2d layer"):
        mcdrop.add_dropout(model, 0.1, before=nn.Conv2d)


def test_in_place_and_idempotent() -> None:
    model = pretrained()
    same = mcdrop.add_dropout(model, 0.2, inplace=True)
    assert same is model
    assert model[5].mcdrop_dropout.p == 0.2
    mcdrop.add_dropout(model, 0.4, inplace=True)  # a second call changes the rate, adds nothing
    assert model[5].mcdrop_dropout.p == 0.4
    assert len(model[5]._forward_pre_hooks) == 1
    assert [s.path for s in mcdrop.find_stochastic_sites(model)] == ["5.mcdrop_dropout"]
    # the added dropout layers are never themselves targets
    with pytest.raises(InvalidInputError, match="no Dropout layer"):
        mcdrop.add_dropout(model, 0.1, before=nn.Dropout)


def test_dropout_is_applied_once_at_the_layer_input() -> None:
    torch.manual_seed(0)
    head = nn.Linear(400, 400, bias=False)
    nn.init.eye_(head.weight)
    model = mcdrop.add_dropout(nn.Sequential(head), 0.5)
    x = torch.ones(1, 400)
    with mcdrop.enable_dropout(model), torch.no_grad():
        y = model(x)
    values = set(y.unique().tolist())
    assert values <= {0.0, 2.0} and values == {0.0, 2.0}  # one inverted-dropout mask, not two
    assert 0.35 < (y == 0).float().mean() < 0.65


def test_channel_dropout_before_convolutions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 2)
    )
    mc_model = mcdrop.add_dropout(model.eval(), 0.5, before=nn.Conv2d, where="last", layer=nn.Dropout2d)
    site = mcdrop.find_stochastic_sites(mc_model)[0]
    assert (site.path, site.module_type) == ("2.mcdrop_dropout", "Dropout2d")
    x = torch.randn(2, 3, 8, 8)
    seen = []
    mc_model[2].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with mcdrop.enable_dropout(mc_model), torch.no_grad():
        mc_model(x)
    dropped_channels = (seen[0].flatten(2) == 0).all(-1)
    assert dropped_channels.any() and not dropped_channels.all()
    samples = mcdrop.MCDropout(mc_model, n_samples=4, seed=0, task="regression").sample(x)
    assert not torch.equal(samples[0], samples[1])


def test_added_dropout_trains_copies_and_pickles() -> None:
    model = mcdrop.add_dropout(pretrained(), 0.5)
    model.train()
    y1, y2 = model(torch.randn(8, 6).repeat(2, 1)).chunk(2)
    assert not torch.equal(y1, y2)  # active while fine-tuning too
    model.eval()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [s.path for s in mcdrop.find_stochastic_sites(clone)] == ["5.mcdrop_dropout"]
        samples = mcdrop.MCDropout(clone, n_samples=4, seed=0).sample(X)
        assert not torch.equal(samples[0], samples[1])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("with_kwargs", [True, False], ids=["keyword-hook", "two-argument-hook"])
def test_a_model_saved_with_an_earlier_hook_still_loads_samples_and_can_be_scripted(with_kwargs) -> None:
    """Earlier versions registered ``stochastic._dropout_before_hook``, first with
    ``with_kwargs=True``, then as a two-argument hook; a model pickled then refers to that function
    by name. It must still run and be sampled, and add_dropout on it gives a model TorchScript can
    compile."""
    from mcdrop.stochastic import ADDED_DROPOUT_NAME, _dropout_before_hook

    old = pretrained()
    layer = old[5]
    layer.add_module(ADDED_DROPOUT_NAME, nn.Dropout(0.5))
    layer.register_forward_pre_hook(_dropout_before_hook, with_kwargs=with_kwargs)
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), pretrained()(X))  # eval: dropout off, the original numbers
    samples = mcdrop.MCDropout(loaded, n_samples=4, seed=0).sample(X)
    assert not torch.equal(samples[0], samples[1])
    again = mcdrop.add_dropout(loaded, 0.2)  # the same layer: its rate changes, the hook is renewed
    assert len(again[5]._forward_pre_hooks) == 1 and again[5].mcdrop_dropout.p == 0.2
    assert not again[5]._forward_pre_hooks_with_kwargs
    assert len(loaded[5]._forward_pre_hooks) == 1 and loaded[5].mcdrop_dropout.p == 0.5  # a copy was changed
    scripted = torch.jit.script(again)
    with torch.no_grad():
        assert torch.equal(scripted(X), again(X))


def test_add_dropout_to_a_hugging_face_model_without_dropout() -> None:
    try:
        transformers = importlib.import_module("transformers")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"transformers cannot be imported here ({err})")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(model)
    before = snapshot(model)
    mc_model = mcdrop.add_dropout(model, 0.2)  # "last" Linear: the classifier head
    assert [s.path for s in mcdrop.find_stochastic_sites(mc_model) if s.sampled] == [
        "classifier.mcdrop_dropout"
    ]
    pred = mcdrop.MCDropout(mc_model, n_samples=10, seed=0).predict(**batch)
    assert pred.probs.shape == (4, 3) and bool((pred.mutual_information > 0).all())
    assert_unchanged(model, before)
    deep = mcdrop.add_dropout(
        model, 0.2, where="bert.encoder.layer.?.output.dense"
    )  # fnmatch: * would cross dots
    assert len([s for s in mcdrop.find_stochastic_sites(deep) if s.sampled]) == 2


class KeywordHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(input=x)


def test_add_dropout_errors_say_what_to_do() -> None:
    model = pretrained()
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InvalidInputError, match=r"p must"):
            mcdrop.add_dropout(model, bad)
    with pytest.raises(InvalidTypeError):
        mcdrop.add_dropout(model, "0.1")
    with pytest.raises(InvalidTypeError, match="before must be an nn.Module subclass"):
        mcdrop.add_dropout(model, 0.1, before="Linear")
    with pytest.raises(InvalidTypeError, match="model must be a torch.nn.Module"):
        mcdrop.add_dropout(lambda x: x, 0.1)
    with pytest.raises(InvalidTypeError, match="not an nn.Module"):
        mcdrop.add_dropout(model, 0.1, layer=lambda p: None)
    with pytest.raises(UnsupportedModelError, match="torch.jit.script the result"):
        mcdrop.add_dropout(torch.jit.script(model), 0.1)
    clash = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    clash[1].add_module("mcdrop_dropout", nn.Identity())
    with pytest.raises(InvalidInputError, match="1 \\(Linear\\) already has a child"):
        mcdrop.add_dropout(clash, 0.1, where="all", inplace=True)
    assert not clash[0]._forward_pre_hooks and "mcdrop_dropout" not in clash[0]._modules  # untouched
    keyword = mcdrop.add_dropout(KeywordHead(), 0.1)
    with pytest.raises(InvalidInputError, match="first positional argument"):
        keyword(torch.randn(2, 6))


def test_a_model_with_added_dropout_can_be_scripted_and_is_sampled(tmp_path) -> None:
    """The pre-hook compiles with the layer, so "add the dropout first, then script" holds."""
    model = pretrained()
    x = torch.randn(8, 6)
    mc_model = mcdrop.add_dropout(model, 0.3)
    scripted = torch.jit.script(mc_model)
    assert scripted.state_dict().keys() == model.state_dict().keys()  # checkpoints still load
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)  # eval: the dropout is the identity
    assert [(s.path, s.kind, s.rate) for s in mcdrop.find_stochastic_sites(scripted)] == [
        ("5.mcdrop_dropout", "dropout", pytest.approx(0.3))
    ]
    samples = mcdrop.MCDropout(scripted, n_samples=6, seed=0, task="regression").sample(x)
    assert all(not torch.equal(samples[0], samples[i]) for i in range(1, 6))
    assert not any(m.training for m in scripted.modules())
    # saved and loaded, the hook is part of the compiled module
    torch.jit.save(scripted, str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    again = mcdrop.MCDropout(loaded, n_samples=4, seed=0, task="regression").sample(x)
    assert not torch.equal(again[0], again[1])

    # at p = 0 the sampled passes (forced with include=) equal the eval output: only dropout differs
    quiet = torch.jit.script(mcdrop.add_dropout(model, 0.0))
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(quiet)
    with pytest.warns(mcdrop.NoRandomnessWarning, match="rate 0"):
        forced = mcdrop.MCDropout(quiet, n_samples=3, task="regression", include="*.mcdrop_dropout")
        out = forced.sample(x)
    with torch.no_grad():
        reference = quiet(x)
    assert all(torch.allclose(s, reference, atol=1e-6) for s in out)


def test_added_dropout_before_a_layer_with_several_inputs_cannot_be_scripted() -> None:
    """The documented limit: TorchScript types the pre-hook for a forward that takes one tensor."""
    model = mcdrop.add_dropout(nn.Bilinear(3, 3, 2), 0.2, before=nn.Bilinear)
    with torch.no_grad():
        assert model(torch.ones(2, 3), torch.ones(2, 3)).shape == (2, 2)  # eager: first input only
    with pytest.raises(RuntimeError, match="added_dropout_hook"):
        torch.jit.script(model)


# ----------------------------------------------------------------------------- set_dropout_rate
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.own = mcdrop.nn.Dropout(0.2)
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.rnn = nn.GRU(8, 8, num_layers=2, dropout=0.1, batch_first=True)
        self.single = nn.GRU(8, 8, num_layers=1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.own(self.drop(self.fc(x)))
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.single(self.rnn(x)[0])[0]


def rates(model: nn.Module) -> dict[str, float | None]:
    return {s.path: s.rate for s in mcdrop.find_stochastic_sites(model, drop_path=True)}


def test_set_dropout_rate_changes_every_kind_and_restores_on_exit() -> None:
    model = Mixed()
    before = rates(model)
    with mcdrop.set_dropout_rate(model, 0.5) as change:
        assert rates(model) == {"drop": 0.5, "own": 0.5, "attn": 0.5, "rnn": 0.5, "single": 0.0}
        assert sorted(c[0] for c in change.changes) == ["attn", "drop", "own", "rnn"]
        assert ("attn", "dropout", 0.1, 0.5) in change.changes
    assert rates(model) == before
    assert repr(change) == "RateChange(4 rates, restored)"
    with mcdrop.set_dropout_rate(model, 0.0, where=[nn.MultiheadAttention, "rnn"]):
        assert rates(model) == {**before, "attn": 0.0, "rnn": 0.0}
    with mcdrop.set_dropout_rate(model, 0.3, kinds="rnn_dropout"):
        assert rates(model) == {**before, "rnn": 0.3}
    assert rates(model) == before


def test_rates_are_restored_when_the_body_raises_and_restore_is_idempotent() -> None:
    model = Mixed()
    before = rates(model)
    with pytest.raises(RuntimeError, match="boom"), mcdrop.set_dropout_rate(model, 0.9):
        raise RuntimeError("boom")
    assert rates(model) == before
    change = mcdrop.set_dropout_rate(model, 0.7)  # no context manager: the change stays
    assert rates(model)["drop"] == 0.7
    change.restore()
    change.restore()
    assert rates(model) == before


@settings(max_examples=25, deadline=None)
@given(
    p=st.floats(0.0, 1.0),
    chosen=st.sets(st.sampled_from(["drop", "own", "attn", "rnn"]), min_size=1),
)
def test_any_rate_on_any_subset_is_restored_exactly(p: float, chosen: set[str]) -> None:
    model = Mixed()
    originals = {
        "drop": model.drop.p,
        "own": model.own.p,
        "attn": model.attn.dropout,
        "rnn": model.rnn.dropout,
    }
    with mcdrop.set_dropout_rate(model, p, where=sorted(chosen)) as change:
        assert {c[0] for c in change.changes} == chosen
        assert all(rates(model)[path] == p for path in chosen)
    assert {
        "drop": model.drop.p,
        "own": model.own.p,
        "attn": model.attn.dropout,
        "rnn": model.rnn.dropout,
    } == originals
    assert type(model.drop.p) is type(originals["drop"])


def test_a_wrapper_built_before_a_rate_change_samples_the_new_rates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 500), nn.Dropout(0.0), nn.Dropout(0.1)).eval()
    mc = mcdrop.MCDropout(model, n_samples=4, seed=0, task="regression")
    assert [s.path for s in mc.policy.sampled_sites] == ["2"]
    x = torch.randn(3, 4)
    assert (mc.sample(x) == 0).float().mean() < 0.15  # only the 0.1 dropout
    with mcdrop.set_dropout_rate(model, 0.5, where="1"):
        zeros = (mc.sample(x) == 0).float().mean()  # 1 - 0.5 * 0.9 = 0.55 expected
        assert sorted(s.path for s in mc.policy.sampled_sites) == ["1", "2"]
        assert mcdrop.describe(mc).set_index("path").loc["1", "sampled"]
    assert 0.45 < zeros < 0.65
    with mcdrop.set_dropout_rate(model, 0.0):
        with pytest.raises(NoDropoutError):
            mc.sample(x)
        assert not mcdrop.describe(mc).sampled.any()
    assert (mc.sample(x) == 0).float().mean() < 0.15
    assert [s.path for s in mc.policy.sampled_sites] == ["2"]


def test_set_dropout_rate_on_hugging_face_attention() -> None:
    try:
        transformers = importlib.import_module("transformers")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"transformers cannot be imported here ({err})")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        attention_probs_dropout_prob=0.0,
    )
    vit = transformers.ViTForImageClassification(config).eval()
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(vit)
    with mcdrop.set_dropout_rate(vit, 0.4, kinds=["attention_dropout"]) as change:
        assert {c[1] for c in change.changes} <= {"attention_dropout", "dropout", "dropout_prob", "dropout.p"}
        table = mcdrop.describe(vit)
        attention = table[table.kind == "attention_dropout"]
        assert len(attention) == 2 and (attention.rate == 0.4).all() and attention.sampled.all()
        samples = mcdrop.MCDropout(vit, n_samples=4, seed=0).sample(pixel_values=torch.randn(2, 3, 8, 8))
        assert not torch.equal(samples[0], samples[1])
    assert set(mcdrop.describe(vit).rate) == {0.0}


def test_set_dropout_rate_errors_and_warnings() -> None:
    model = Mixed()
    with pytest.raises(InvalidInputError, match=r"p must be in \[0.0, 1.0\]"):
        mcdrop.set_dropout_rate(model, 1.5)
    with pytest.raises(InvalidInputError, match="kinds must be"):
        mcdrop.set_dropout_rate(model, 0.1, kinds=["functional"])
    with pytest.raises(
        InvalidInputError, match=r"No site .* matches where='nothing\*'.*Sites found: drop \(dropout\)"
    ):
        mcdrop.set_dropout_rate(model, 0.1, where="nothing*")
    with pytest.raises(InvalidInputError, match="add_dropout"):
        mcdrop.set_dropout_rate(nn.Linear(2, 2), 0.1)
    with pytest.raises(InvalidInputError):
        mcdrop.set_dropout_rate(model, 0.1, kinds=["drop_path"])

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rate = 0.2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(x, self.rate, self.training)

    gated = nn.Sequential(nn.Linear(2, 2), Gate(), nn.Dropout(0.1))
    with pytest.warns(McdropWarning, match=r"cannot change the rate of 1\b"):
        change = mcdrop.set_dropout_rate(gated, 0.5)
    assert gated[2].p == 0.5 and gated[1].rate == 0.2
    change.restore()

    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    with pytest.raises(UnsupportedModelError, match="set the rate on the eager model"):
        mcdrop.set_dropout_rate(scripted, 0.5)
    assert scripted[1].p == pytest.approx(0.1)


@pytest.fixture
def registry():
    """Undo registrations made by a test."""
    from mcdrop.policy import classify

    before = dict(classify._REGISTERED_STOCHASTIC)
    yield
    classify._REGISTERED_STOCHASTIC.clear()
    classify._REGISTERED_STOCHASTIC.update(before)


class ReadOnlyNoise(nn.Module):
    """Gaussian noise whose registered rate attribute is a read-only property."""

    def __init__(self) -> None:
        super().__init__()
        self._sigma = 0.1

    @property
    def sigma(self) -> float:
        return self._sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.training else x


class Interrupted(BaseException):
    """Stands for a KeyboardInterrupt arriving while a rate is set."""


class InterruptingNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._sigma = 0.1

    @property
    def sigma(self) -> float:
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        raise Interrupted


def test_set_dropout_rate_changes_nothing_when_a_rate_cannot_be_set(registry) -> None:
    mcdrop.register_stochastic(ReadOnlyNoise, rate_attr="sigma")
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), mcdrop.nn.Dropout(0.2), ReadOnlyNoise())
    with pytest.raises(
        UnsupportedModelError, match=r"'sigma' of 3 \(ReadOnlyNoise\) cannot be changed.*read-only property"
    ) as caught:
        mcdrop.set_dropout_rate(model, 0.5)
    assert isinstance(caught.value.__cause__, AttributeError)
    assert "Nothing was changed" in str(caught.value)
    assert (model[1].p, model[2].p, model[3].sigma) == (0.1, 0.2, 0.1)  # the earlier ones rolled back

    # any exception, even one that is not an Exception, rolls back and propagates as it is
    mcdrop.register_stochastic(InterruptingNoise, rate_attr="sigma")
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), InterruptingNoise(), nn.Dropout(0.3))
    with pytest.raises(Interrupted):
        mcdrop.set_dropout_rate(model, 0.5)
    assert (model[1].p, model[3].p) == (0.1, 0.3)


def test_a_registered_rate_attribute_missing_on_an_instance_is_named(registry) -> None:
    class Noise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn_like(x) if self.training else x

    mcdrop.register_stochastic(Noise, rate_attr="sigma")
    model = nn.Sequential(nn.Linear(2, 2), Noise(), nn.Dropout(0.1))
    row = mcdrop.describe(model).set_index("path").loc["1"]
    assert row["sampled"] and row["rate"] != row["rate"]  # NaN
    assert "registered with rate_attr='sigma', but this Noise has no attribute 'sigma'" in row["note"]
    with pytest.warns(McdropWarning, match=r"1 \(Noise\): registered with rate_attr='sigma'") as caught:
        change = mcdrop.set_dropout_rate(model, 0.4)
    assert "register their class" not in str(caught[0].message)  # it is registered already
    assert model[2].p == 0.4
    change.restore()
    model[1].sigma = "0.3"  # there, but not a number
    assert "holds '0.3' (str), not a number" in mcdrop.describe(model).set_index("path").loc["1", "note"]


def test_set_dropout_rate_refuses_an_empty_where_and_callables_of_the_wrong_signature() -> None:
    model = Mixed()
    before = rates(model)
    for empty in ([], ()):
        with pytest.raises(InvalidInputError, match=r"names no site.*leave where= out"):
            mcdrop.set_dropout_rate(model, 0.5, where=empty)
    assert rates(model) == before
    for bad in (lambda module: True, lambda path, module, extra: True, len):
        with pytest.raises(InvalidTypeError, match=r"called as fn\(path, module\) -> bool"):
            mcdrop.set_dropout_rate(model, 0.5, where=bad)
        with pytest.raises(InvalidTypeError, match=r"where= is called as fn\(path, module\)"):
            mcdrop.add_dropout(pretrained(), 0.1, where=bad)
    assert rates(model) == before
    # the right signatures, keyword defaults and *args included, are accepted
    for good in (lambda path, module: path == "drop", lambda *args: args[0] == "drop"):
        with mcdrop.set_dropout_rate(model, 0.5, where=good) as change:
            assert [c[0] for c in change.changes] == ["drop"]


def test_restoring_an_outer_rate_change_first_restores_the_rates_from_before_it() -> None:
    model = Mixed()
    before = rates(model)
    outer = mcdrop.set_dropout_rate(model, 0.2)
    inner = mcdrop.set_dropout_rate(model, 0.5, where=["drop", "attn"])
    assert (model.drop.p, model.own.p, model.attn.dropout) == (0.5, 0.2, 0.5)
    outer.restore()  # before the inner one: every rate it touched is back to before it
    assert rates(model) == before
    inner.restore()  # must not bring back the outer rate (0.2) it replaced
    assert rates(model) == before

    # the same with context managers, and in order it is as before
    with mcdrop.set_dropout_rate(model, 0.2) as outer:
        with mcdrop.set_dropout_rate(model, 0.5, where="drop"):
            outer.restore()
            assert rates(model) == before
        assert rates(model) == before
    with mcdrop.set_dropout_rate(model, 0.2):
        with mcdrop.set_dropout_rate(model, 0.5, where="drop"):
            assert model.drop.p == 0.5
        assert model.drop.p == 0.2 and model.own.p == 0.2
    assert rates(model) == before

    # an inner change of other rates than the outer one keeps those when the outer is restored
    outer = mcdrop.set_dropout_rate(model, 0.3, where="drop")
    inner = mcdrop.set_dropout_rate(model, 0.6, where="own")
    outer.restore()
    assert (model.drop.p, model.own.p) == (0.1, 0.6)
    inner.restore()
    assert rates(model) == before


def test_drop_path_rates_are_changed_only_when_asked() -> None:
    class DropPath(nn.Module):
        def __init__(self, drop_prob: float) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Linear(2, 2), DropPath(0.1), nn.Dropout(0.1))
    with mcdrop.set_dropout_rate(model, 0.3):
        assert (model[1].drop_prob, model[2].p) == (0.1, 0.3)
    with mcdrop.set_dropout_rate(model, 0.3, kinds=["drop_path"]):
        assert (model[1].drop_prob, model[2].p) == (0.3, 0.1)
    assert (model[1].drop_prob, model[2].p) == (0.1, 0.1)


# ----------------------------------------------------------------------------- describe
def test_describe_is_a_table_of_every_site() -> None:
    pd = pytest.importorskip("pandas")
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.Dropout(0.2),
        nn.Dropout(0.0),
        nn.MultiheadAttention(8, 2, dropout=0.1),
    )
    table = mcdrop.describe(model)
    assert isinstance(table, pd.DataFrame)
    assert table.to_dict("records") == [
        {"path": "2", "kind": "dropout", "module_type": "Dropout", "rate": 0.2, "sampled": True, "note": ""},
        {
            "path": "3",
            "kind": "dropout",
            "module_type": "Dropout",
            "rate": 0.0,
            "sampled": False,
            "note": "rate is 0: nothing to sample",
        },
        {
            "path": "4",
            "kind": "attention_dropout",
            "module_type": "MultiheadAttention",
            "rate": 0.1,
            "sampled": True,
            "note": "",
        },
    ]
    excluded = mcdrop.describe(model, exclude=["2"]).set_index("path")
    assert not excluded.loc["2", "sampled"] and excluded.loc["2", "note"] == "excluded by the user"
    empty = mcdrop.describe(nn.Linear(2, 2))
    assert empty.empty and list(empty.columns) == ["path", "kind", "module_type", "rate", "sampled", "note"]
    assert empty["rate"].dtype == "float64" and empty["sampled"].dtype == bool


def test_describe_shows_unknown_rates_as_nan_in_a_float_column() -> None:
    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(x, 0.1, self.training)

    only_unknown = mcdrop.describe(nn.Sequential(nn.Linear(2, 2), Gate()))
    assert only_unknown["rate"].dtype == "float64"
    assert only_unknown["rate"].isna().tolist() == [True]
    mixed = mcdrop.describe(nn.Sequential(nn.Linear(2, 2), Gate(), nn.Dropout(0.2)))
    assert mixed["rate"].dtype == "float64"
    assert mixed["rate"].isna().tolist() == [True, False] and mixed["rate"].iloc[1] == 0.2


def test_describe_of_a_wrapper_or_policy_uses_their_options() -> None:
    class DropPath(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop_prob = 0.1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Linear(2, 2), DropPath(), nn.Dropout(0.1))
    mc = mcdrop.MCDropout(model, drop_path=True)
    assert mcdrop.describe(mc).sampled.tolist() == [True, True]
    assert mcdrop.describe(mc.policy).sampled.tolist() == [True, True]
    assert mcdrop.describe(model).sampled.tolist() == [False, True]
    with pytest.raises(InvalidInputError, match="leave drop_path="):
        mcdrop.describe(mc, drop_path=True)
    with pytest.raises(InvalidTypeError):
        mcdrop.describe("model")


def test_public_functions_are_exported_documented_and_their_examples_run() -> None:
    import doctest
    from pathlib import Path

    from mcdrop import stochastic
    from mcdrop.policy import activate, edit

    support = (Path(__file__).resolve().parents[1] / "docs" / "support.md").read_text()
    for name in ("describe", "add_dropout", "set_dropout_rate", "RateChange"):
        assert name in mcdrop.__all__ and name in stochastic.__all__
        doc = getattr(mcdrop, name).__doc__
        assert doc and "Example:" in doc and ">>>" in doc, name
        assert f"`{name}" in support or name == "RateChange", name
    for module in (activate, edit):  # where they live now (mcdrop.stochastic re-exports them)
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0


class AttentionLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.attn(h, h, h, need_weights=False)[0].mean(1)


def test_add_dropout_never_chooses_a_layer_its_parent_does_not_call() -> None:
    """nn.MultiheadAttention reads out_proj.weight directly: dropout before it would never run."""
    torch.manual_seed(0)
    net = AttentionLast().eval()
    added = mcdrop.add_dropout(net, 0.5)  # "last" skips attn.out_proj
    assert [s.path for s in mcdrop.find_stochastic_sites(added) if s.sampled] == ["inp.mcdrop_dropout"]
    calls: list[int] = []
    added.inp.mcdrop_dropout.register_forward_hook(lambda *a: calls.append(1))
    s = mcdrop.MCDropout(added, n_samples=4, seed=0, task="regression").sample(torch.randn(3, 5, 4))
    assert calls and not torch.equal(s[0], s[1])
    with pytest.raises(InvalidInputError, match="matches none"):
        mcdrop.add_dropout(net, 0.5, where="attn.out_proj")
