"""The stochastic policy's activation: the sampled sites switched on, everything else as it was.

``enable_dropout`` (and ``MCDropout``, which uses it) puts exactly the sampled sites in train mode:
each kind of randomness alone varies the output, BatchNorm stays in eval with bit-identical buffers,
a train-only buffer update is caught, and every training flag, parameter and buffer comes back
exactly, after an exception or a ``KeyboardInterrupt`` too and from nested contexts;
``StochasticPolicy.describe`` shows the rates of the model as it is now. Which modules are sampled is
in ``tests/test_policy_classify.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import INPUTS, cnn_bn, mlp, only, transformer

import mcdrop
from mcdrop.engine.checks import checking
from mcdrop.errors import ModelStateError, UnsupportedModelError


# ----------------------------------------------------------------------------- models and helpers
class StatefulGate(nn.Module):
    """Reads self.training to update a buffer: not dropout, must not be silently sampled."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        return x


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- every kind of randomness, switched on alone
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_only_source_of_randomness_is_sampled(kind: str) -> None:
    torch.manual_seed(0)
    model = only(kind).eval()
    x = torch.randn(*INPUTS[kind])
    with torch.no_grad():
        reference = _first(model(x))
        with mcdrop.enable_dropout(model) as policy:
            a = _first(model(x))
            b = _first(model(x))
        assert policy.sampled_sites, kind
        assert not torch.equal(a, b), f"{kind}: samples do not vary"
        # Eval again afterwards: deterministic and equal to the eval output before.
        assert torch.equal(_first(model(x)), reference)
    assert all(not flag for flag in _flags(model).values())


def test_naive_tool_is_fooled_by_the_transformer_fast_path() -> None:
    """Switching on only nn.Dropout leaves nn.TransformerEncoder on its fused fast path: no randomness."""
    torch.manual_seed(0)
    model = transformer().eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.train()
        naive = [model(x) for _ in range(3)]
        model.eval()
        assert torch.equal(naive[0], naive[1]) and torch.equal(naive[1], naive[2])
        with mcdrop.enable_dropout(model):
            ours = [model(x) for _ in range(3)]
    assert not torch.equal(ours[0], ours[1])


# ---------------------------------------------------------------------- the rest of the model stays as it was
def test_batchnorm_stays_in_eval_and_buffers_are_bit_identical() -> None:
    torch.manual_seed(0)
    model = cnn_bn()
    model.train()
    model(torch.randn(16, 3, 8, 8))  # give BatchNorm non-trivial running statistics
    model.eval()
    before = _state(model)
    flags = _flags(model)
    x = torch.randn(4, 3, 8, 8)
    with mcdrop.enable_dropout(model), torch.no_grad():
        assert not model[1].training
        assert model[3].training and model[6].training
        outs = [model(x) for _ in range(4)]
    assert not torch.equal(outs[0], outs[1])
    _assert_same_state(before, model)
    assert _flags(model) == flags


def test_model_in_train_mode_is_sampled_with_batchnorm_in_eval_and_restored() -> None:
    torch.manual_seed(0)
    model = cnn_bn().train()
    before = _state(model)
    with mcdrop.enable_dropout(model):
        assert not model[1].training
        with torch.no_grad():
            model(torch.randn(4, 3, 8, 8))
    _assert_same_state(before, model)
    assert all(_flags(model).values())


def test_mixed_flags_are_restored_exactly() -> None:
    model = cnn_bn().eval()
    model[1].train()
    model[6].train()
    flags = _flags(model)
    with mcdrop.enable_dropout(model):
        pass
    assert _flags(model) == flags


class Boom(RuntimeError):
    pass


class ExplodesOnCall(nn.Module):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.calls = 0
        self.at = at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += not checking()  # mcdrop's check passes do not count
        if self.calls == self.at:
            raise Boom("interrupted")
        return x


@pytest.mark.parametrize("interrupt", [Boom, KeyboardInterrupt])
def test_flags_and_state_restored_after_exception_mid_sampling(interrupt) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), ExplodesOnCall(3), nn.Linear(8, 2)
    )
    model.eval()
    model[3].at = 3
    if interrupt is KeyboardInterrupt:

        def raise_kbi(module, args):
            if module.calls == 2:
                raise KeyboardInterrupt

        handle = model[3].register_forward_pre_hook(raise_kbi)
    before = _state(model)
    flags = _flags(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(4, 6)
    rng = torch.get_rng_state()
    with pytest.raises(interrupt):
        mcdrop.MCDropout(model, n_samples=10, max_batch_size=4, seed=0).predict(x)
    assert _flags(model) == flags
    _assert_same_state(before, model)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert torch.equal(rng, torch.get_rng_state())
    if interrupt is KeyboardInterrupt:
        handle.remove()


def test_stateful_gate_is_caught_and_buffers_restored() -> None:
    model = nn.Sequential(nn.Linear(4, 4), StatefulGate(), nn.Dropout(0.2)).eval()
    with pytest.raises(ModelStateError, match="exclude="), mcdrop.enable_dropout(model), torch.no_grad():
        model(torch.randn(2, 4))
    assert model[1].seen.item() == 0.0
    assert not model[1].training
    # The suggested fix works.
    with mcdrop.enable_dropout(model, exclude=["1"]), torch.no_grad():
        model(torch.randn(2, 4))
    assert model[1].seen.item() == 0.0


def test_exception_in_body_is_not_masked_by_the_buffer_check() -> None:
    model = nn.Sequential(nn.Linear(4, 4), StatefulGate(), nn.Dropout(0.2)).eval()
    with pytest.raises(Boom), mcdrop.enable_dropout(model), torch.no_grad():
        model(torch.randn(2, 4))
        raise Boom
    assert model[1].seen.item() == 0.0


def test_nested_contexts_restore_the_outermost_state() -> None:
    model = cnn_bn().eval()
    flags = _flags(model)
    with mcdrop.enable_dropout(model):
        inner_flags = _flags(model)
        with mcdrop.enable_dropout(model):
            assert _flags(model) == inner_flags
        assert _flags(model) == inner_flags
    assert _flags(model) == flags


def test_deepcopy_is_not_needed_model_object_identity_kept() -> None:
    model = mlp(6, 2, hidden=16, p=0.3, act=nn.ReLU, seed=None)
    copy_before = copy.deepcopy(model)
    mc = mcdrop.MCDropout(model, n_samples=3)
    assert mc.model is model
    mc.predict(torch.randn(2, 6))
    _assert_same_state(copy_before.state_dict(), model)


# ----------------------------------------------------------------------------- describe
def test_policy_describe_shows_the_rates_of_the_model_as_it_is_now() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    policy = mcdrop.StochasticPolicy(net)
    with mcdrop.set_dropout_rate(net, 0.45):
        assert [row["rate"] for row in policy.describe()] == [0.45]
    assert [row["rate"] for row in policy.describe()] == [0.2]
    assert policy.describe() == mcdrop.describe(policy).to_dict("records")


# ----------------------------------------------------------------------------- frozen TorchScript
def _scripted_mlp() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    return torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval())


class _ScriptedGate(nn.Module):
    """No parameters, no children: scripted, it must not be mistaken for a frozen module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.5, self.training)


@pytest.mark.parametrize(
    "freeze",
    [
        torch.jit.freeze,
        torch.jit.optimize_for_inference,
        lambda m: torch.jit.freeze(m, preserved_attrs=["training"]),
    ],
    ids=["freeze", "optimize_for_inference", "freeze-keeping-training"],
)
@pytest.mark.parametrize("part", [False, True], ids=["whole-model", "part"])
@pytest.mark.filterwarnings("ignore:`torch.jit.freeze` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.optimize_for_inference` is deprecated:DeprecationWarning")
def test_frozen_scripted_modules_are_refused_not_sampled_without_their_dropout(freeze, part: bool) -> None:
    frozen = freeze(_scripted_mlp())
    model = nn.Sequential(frozen, nn.Dropout(0.2)) if part else frozen
    with pytest.raises(UnsupportedModelError, match=r"torch\.jit\.freeze.*unfrozen torch\.jit\.script"):
        mcdrop.MCDropout(model, n_samples=3)
    with pytest.raises(UnsupportedModelError, match=r"\(0\) made by" if part else "is a module made by"):
        mcdrop.StochasticPolicy(model)


def test_scripted_modules_that_are_not_frozen_are_still_sampled() -> None:
    gate = torch.jit.script(_ScriptedGate())
    for model in (_scripted_mlp(), gate, nn.Sequential(nn.Linear(4, 4), gate)):
        samples = mcdrop.MCDropout(model, n_samples=4, seed=0).sample(torch.randn(3, 4))
        assert not torch.equal(samples[0], samples[1])


def test_an_activation_that_finds_nothing_to_sample_leaves_the_policy_whole():
    """Regression: a NoDropoutError from activate() (every rate set to 0 since) left ``sites`` and
    ``sampled_sites`` updated but the paths it switches stale."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    policy = mcdrop.StochasticPolicy(net)
    net[1].p = 0.0
    with pytest.raises(mcdrop.NoDropoutError):
        with policy.activate():
            pass
    assert [s.path for s in policy.sampled_sites] == ["1"] and policy.sampled_sites[0].rate == 0.5
    assert net.training and net[1].training  # a fresh nn.Sequential is in train mode: untouched
    net[1].p = 0.3
    with policy.activate():
        assert net[1].training and not net[0].training
    assert [s.rate for s in policy.sampled_sites] == [0.3]
