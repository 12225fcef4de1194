"""The stochastic policy's classification: which modules are sources of dropout randomness.

Every kind of dropout layer, attention and RNN dropout, functional gates found by scanning the
bytecode of a user's ``forward`` (and of the helpers it reaches) for reads of ``self.training``,
TorchScript modules, drop path (found but off by default), registration of user classes, and the
validation of the options that select sites (``include=``, ``exclude=``, ``drop_path=``). What
switching the sites on does to the model is in ``tests/test_policy_activate.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import INPUTS, FunctionalDropoutNet, cnn_bn, mlp, only, transformer

import mcdrop
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    NoDropoutError,
    NoRandomnessWarning,
)


# ----------------------------------------------------------------------------- models under test
class DropPath(nn.Module):
    """Shaped like timm's DropPath."""

    def __init__(self, drop_prob: float = 0.2) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


# ----------------------------------------------------------------------------- every kind of randomness
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_wrapper_samples_vary_for_each_kind(kind: str) -> None:
    torch.manual_seed(1)
    model = only(kind).eval()
    x = torch.randn(*INPUTS[kind])
    out = mcdrop.MCDropout(model, n_samples=6, task="regression", seed=3).sample(x)
    assert out.shape[:2] == (6, 2)
    assert (out.std(0) > 0).any(), kind


def test_transformer_sites_are_listed() -> None:
    sites = {(s.path, s.kind) for s in mcdrop.find_stochastic_sites(transformer())}
    assert ("layers.0.self_attn", "attention_dropout") in sites
    assert ("layers.0", "fast_path_gate") in sites
    assert ("layers.1.dropout1", "dropout") in sites


def test_no_dropout_raises_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(NoDropoutError, match="nn.Dropout"):
        mcdrop.MCDropout(model)
    with pytest.raises(NoDropoutError), mcdrop.enable_dropout(model):
        pass
    # LSTM with a single layer: its dropout argument does nothing, so nothing can be sampled.
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(nn.LSTM(3, 3, num_layers=1))


class AlwaysOn(nn.Module):
    """Functional dropout not gated on ``self.training``: random in eval mode too."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "positional":
            return F.dropout(self.fc(x), 0.3, True)
        if self.how == "keyword":
            return torch.nn.functional.dropout(self.fc(x), p=0.3, training=True)
        if self.how == "default":
            return _drop(self.fc(x))
        return torch.dropout(self.fc(x), 0.3, True)


def _drop(x: torch.Tensor) -> torch.Tensor:
    return F.dropout1d(x.unsqueeze(-1), 0.3).squeeze(-1)  # training= defaults to True


@pytest.mark.parametrize(
    "how, call",
    [
        ("positional", r"F\.dropout\(\.\.\., training=True\) in AlwaysOn\.forward"),
        ("keyword", r"F\.dropout\(\.\.\., training=True\)"),
        ("default", r"F\.dropout1d\(\.\.\.\) without training= \(its default is True\) in _drop"),
        ("torch.dropout", r"torch\.dropout\(\.\.\., train=True\)"),
    ],
    ids=["F.dropout(x, p, True)", "training=True", "default-training", "torch.dropout"],
)
def test_always_on_functional_dropout_is_named_not_called_no_randomness(how: str, call: str) -> None:
    model = nn.Sequential(nn.Linear(3, 3), AlwaysOn(how)).eval()
    x = torch.randn(4, 3)
    assert not torch.equal(model(x), model(x))  # random in eval mode: it is there, and always on
    with pytest.raises(NoDropoutError, match=rf"always on.*1: {call}.*training=self\.training") as caught:
        mcdrop.MCDropout(model)
    assert "no source of dropout randomness" not in str(caught.value)


def test_functional_dropout_switched_off_by_a_constant_is_not_called_always_on() -> None:
    class Off(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(F.alpha_dropout(x, 0.3), 0.3, training=False)  # alpha_dropout: off by default

    with pytest.raises(NoDropoutError, match="no source of dropout randomness"):
        mcdrop.MCDropout(nn.Sequential(nn.Linear(3, 3), Off()))


# ------------------------------------------------------------------- functional gates: reads of self.training
class ReadsTrainingOutsideForward(nn.Module):
    """Reads ``self.training`` only in a configuration method no forward pass calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def kernel_mode(self) -> str:  # like a Hugging Face model choosing kernels by mode
        return "training" if self.training else "inference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ReadsTrainingInAHelper(ReadsTrainingOutsideForward):
    """The forward reaches the read through a helper method of a base class's forward."""

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.5, training=self.training))


def test_only_reads_a_forward_pass_can_reach_make_a_gate() -> None:
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(ReadsTrainingOutsideForward())
    sites = mcdrop.find_stochastic_sites(ReadsTrainingInAHelper())
    assert [(s.path, s.kind, s.sampled) for s in sites] == [("", "functional", True)]
    samples = mcdrop.MCDropout(ReadsTrainingInAHelper(), n_samples=8, seed=0).sample(torch.randn(4, 3))
    assert not torch.allclose(samples[0], samples[1])


def _dropout_by_module_flag(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A module-level helper that reads the flag of the module it is given."""
    return F.dropout(x, 0.5, training=module.training)


class ReadsTrainingWithGetattr(ReadsTrainingOutsideForward):
    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.5, training=getattr(self, "training")))  # noqa: B009


class ReadsTrainingInAModuleFunction(ReadsTrainingOutsideForward):
    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_dropout_by_module_flag(self, x))


class ReadsTrainingNextToCheckpointing(ReadsTrainingOutsideForward):
    gradient_checkpointing = False

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.gradient_checkpointing
        y = F.dropout(x, 0.5, training=self.training)  # a read of its own, next to the other one
        return self.fc(y) if not use_checkpoint else self.fc(y)


class ChecksCheckpointingOnly(ReadsTrainingOutsideForward):
    """Hugging Face style: the flag only decides gradient checkpointing (in both orders)."""

    gradient_checkpointing = False

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "gradient_checkpointing", False) and self.training:
            return self.fc(x)
        if self.training and self.gradient_checkpointing:
            return self.fc(x)
        return self.fc(x)


@pytest.mark.parametrize(
    "cls", [ReadsTrainingWithGetattr, ReadsTrainingInAModuleFunction, ReadsTrainingNextToCheckpointing]
)
def test_every_way_of_reading_the_flag_makes_a_gate(cls) -> None:
    sites = mcdrop.find_stochastic_sites(cls())
    assert [(s.path, s.kind, s.sampled) for s in sites] == [("", "functional", True)]
    samples = mcdrop.MCDropout(cls(), n_samples=8, seed=0).sample(torch.randn(4, 3))
    assert not torch.allclose(samples[0], samples[1])


def test_a_flag_read_only_for_gradient_checkpointing_makes_no_gate() -> None:
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(ChecksCheckpointingOnly())


# ----------------------------------------------------------------- rates, drop path, registration and options
def test_rate_zero_everywhere_warns_and_gives_identical_samples() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.Linear(4, 2)).eval()
    sites = mcdrop.find_stochastic_sites(model)
    assert [(s.kind, s.rate, s.sampled) for s in sites] == [("dropout", 0.0, False)]
    with pytest.raises(NoDropoutError, match="rate is 0"):
        mcdrop.MCDropout(model)


def test_drop_path_found_but_off_by_default() -> None:
    model = nn.Sequential(nn.Linear(4, 4), DropPath(0.3), nn.Dropout(0.1))
    sites = {s.path: s for s in mcdrop.find_stochastic_sites(model)}
    assert sites["1"].kind == "drop_path" and not sites["1"].sampled and sites["1"].rate == 0.3
    with mcdrop.enable_dropout(model):
        assert not model[1].training and model[2].training
    with mcdrop.enable_dropout(model, drop_path=True):
        assert model[1].training


def test_include_exclude_and_registration() -> None:
    model = mlp(6, 2, hidden=16, p=0.3, act=nn.ReLU, seed=None, eval_mode=False)
    with mcdrop.enable_dropout(model, include=["0"]):
        assert model[0].training and model[2].training
    with pytest.raises(NoDropoutError):
        mcdrop.StochasticPolicy(model, exclude=[nn.Dropout])

    class MyNoise(nn.Module):
        def forward(self, x):
            return x

    mcdrop.register_stochastic(MyNoise, rate_attr=None)
    try:
        sites = mcdrop.find_stochastic_sites(nn.Sequential(MyNoise()))
        assert [(s.kind, s.sampled) for s in sites] == [("dropout", True)]
        mcdrop.register_deterministic(MyNoise)
        assert mcdrop.find_stochastic_sites(nn.Sequential(MyNoise())) == []
    finally:
        from mcdrop.policy import classify

        classify._REGISTERED_DETERMINISTIC.discard(MyNoise)
        classify._REGISTERED_STOCHASTIC.pop(MyNoise, None)


def test_register_stochastic_validates_its_arguments_up_front() -> None:
    from mcdrop.policy import classify

    class Noise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sigma = 0.1

        def forward(self, x):
            return x + self.sigma * torch.randn_like(x) if self.training else x

    before = dict(classify._REGISTERED_STOCHASTIC)
    for bad in (5, b"sigma", ["sigma"]):
        with pytest.raises(
            InvalidTypeError, match=r"rate_attr must be the name \(a str\).*e.g. rate_attr='p'"
        ):
            mcdrop.register_stochastic(Noise, rate_attr=bad)
    for bad in ("", "sig ma", "drop.p", "1p", "class"):
        with pytest.raises(InvalidInputError, match="not a valid Python identifier"):
            mcdrop.register_stochastic(Noise, rate_attr=bad)
    for bad in ("attention_dropout", "Dropout", 5, None, ["dropout"]):
        with pytest.raises(InvalidInputError, match=r"kind must be 'dropout' .* or 'drop_path'"):
            mcdrop.register_stochastic(Noise, kind=bad)
    with pytest.raises(InvalidTypeError, match="nn.Module subclass"):
        mcdrop.register_stochastic(Noise(), rate_attr="sigma")
    assert classify._REGISTERED_STOCHASTIC == before  # nothing was registered
    mcdrop.find_stochastic_sites(nn.Sequential(Noise()))  # and describing does not crash
    try:
        mcdrop.register_stochastic(Noise, rate_attr="sigma")
        [site] = mcdrop.find_stochastic_sites(nn.Sequential(Noise()))
        assert (site.kind, site.rate, site.rate_attr) == ("dropout", 0.1, "sigma")
    finally:
        classify._REGISTERED_STOCHASTIC.pop(Noise, None)


def test_drop_path_must_be_a_bool() -> None:
    model = mlp(6, 2, hidden=16, p=0.3, act=nn.ReLU, seed=None, eval_mode=False)
    for bad in ("yes", 1, None, "False"):
        for call in (
            mcdrop.find_stochastic_sites,
            mcdrop.StochasticPolicy,
            mcdrop.MCDropout,
            mcdrop.describe,
        ):
            with pytest.raises(InvalidTypeError, match=r"drop_path must be True or False; got"):
                call(model, drop_path=bad)
    assert [s.path for s in mcdrop.find_stochastic_sites(model, drop_path=True)] == ["2"]


def test_callables_of_the_wrong_signature_in_include_or_exclude_are_refused() -> None:
    model = mlp(6, 2, hidden=16, p=0.3, act=nn.ReLU, seed=None, eval_mode=False)
    for option in ("include", "exclude"):
        for bad in (lambda module: True, lambda: True, lambda path, module, extra: True):
            with pytest.raises(InvalidTypeError, match=rf"{option}= is called as fn\(path, module\) -> bool"):
                mcdrop.find_stochastic_sites(model, **{option: bad})
            with pytest.raises(InvalidTypeError, match=r"fn\(path, module\)"):
                mcdrop.MCDropout(model, **{option: [bad]})
    assert [
        s.path for s in mcdrop.find_stochastic_sites(model, include=lambda path, module: path == "0")
    ] == [
        "0",
        "2",
    ]


def test_inactive_sites_warn() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), FunctionalDropoutNet(0.0).fc1)
    # A functional gate of unknown rate counts as randomness; a p=0 nn.Dropout alone does not.
    with pytest.raises(NoDropoutError):
        mcdrop.StochasticPolicy(model)
    model = nn.Sequential(nn.Linear(6, 6), FunctionalDropoutNet(0.0))
    with pytest.warns(NoRandomnessWarning, match="identical"):
        mcdrop.MCDropout(model, n_samples=4).predict(torch.randn(3, 6))


# ----------------------------------------------------------------------------- TorchScript
def test_scripted_model_is_sampled() -> None:
    torch.manual_seed(0)
    scripted = torch.jit.script(cnn_bn().eval())
    kinds = sorted(s.kind for s in mcdrop.find_stochastic_sites(scripted))
    assert kinds == ["dropout", "dropout"]
    x = torch.randn(2, 3, 8, 8)
    out = mcdrop.MCDropout(scripted, n_samples=5, seed=0).sample(x)
    assert (out.std(0) > 0).any()
    assert not scripted.training and not any(m.training for m in scripted.modules())


def test_a_scripted_attribute_named_like_training_is_not_a_gate() -> None:
    """Only a read of the ``training`` attribute makes a scripted user module a gate."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.training_scale = 2.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.training_scale

    class Gated(Scaled):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = self.training_scale if getattr(self, "training") else 1.0  # noqa: B009 - the form under test
            return F.dropout(self.fc(x), 0.1, self.fc.training) * scale

    assert mcdrop.find_stochastic_sites(Scaled()) == []
    assert mcdrop.find_stochastic_sites(torch.jit.script(Scaled().eval())) == []
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(torch.jit.script(Scaled().eval()))
    [site] = mcdrop.find_stochastic_sites(torch.jit.script(Gated().eval()))
    assert (site.path, site.kind, site.sampled) == ("", "functional", True)


def test_a_scripted_helper_method_reading_training_makes_a_gate() -> None:
    """``module.code`` is ``forward`` alone: the flag read in a helper method counts too, as in eager."""

    class Helper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def drop(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, 0.5, self.training)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(x))

    eager = [(s.path, s.kind) for s in mcdrop.find_stochastic_sites(Helper())]
    scripted = torch.jit.script(Helper().eval())
    assert [(s.path, s.kind) for s in mcdrop.find_stochastic_sites(scripted)] == eager == [("", "functional")]
    samples = mcdrop.MCDropout(scripted, n_samples=4, seed=0, task="regression").sample(torch.randn(2, 4))
    assert not torch.equal(samples[0], samples[1])
