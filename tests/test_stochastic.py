"""The stochastic policy: every source of dropout randomness is switched on, nothing else is."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mcdrop
from mcdrop._gatecheck import checking
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    ModelStateError,
    NoDropoutError,
    NoRandomnessWarning,
)


# ----------------------------------------------------------------------------- models under test
class FunctionalDropoutNet(nn.Module):
    """Dropout written as F.dropout(x, p, training=self.training) in a custom forward."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 2)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(F.dropout(h, self.p, training=self.training))


class SdpaAttention(nn.Module):
    """Hugging Face style: dropout_p = p if self.training else 0.0, passed to SDPA."""

    def __init__(self, dim: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attention_dropout = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        dropout_p = self.attention_dropout if self.training else 0.0
        return self.out(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p))


class MhaOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class LstmNet(nn.Module):
    def __init__(self, p: float = 0.5, batch_first: bool = True) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2, dropout=p, batch_first=batch_first)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


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


class StatefulGate(nn.Module):
    """Reads self.training to update a buffer: not dropout, must not be silently sampled."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        return x


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8, 4),
    )


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def only(module_name: str) -> nn.Module:
    """A small model whose *only* source of randomness is the named module type."""
    makers = {
        "Dropout": lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3)),
        "Dropout1d": lambda: nn.Sequential(nn.Conv1d(3, 4, 1), nn.Dropout1d(0.3)),
        "Dropout2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.3)),
        "Dropout3d": lambda: nn.Sequential(nn.Conv3d(3, 4, 1), nn.Dropout3d(0.3)),
        "AlphaDropout": lambda: nn.Sequential(nn.Linear(6, 8), nn.SELU(), nn.AlphaDropout(0.3)),
        "FeatureAlphaDropout": lambda: nn.Sequential(
            nn.Conv2d(3, 4, 1), nn.SELU(), nn.FeatureAlphaDropout(0.3)
        ),
        "mcdrop.nn.Dropout": lambda: nn.Sequential(nn.Linear(6, 8), mcdrop.nn.Dropout(0.3)),
        "mcdrop.nn.Dropout2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), mcdrop.nn.Dropout2d(0.3)),
        "MultiheadAttention": MhaOnly,
        "LSTM": LstmNet,
        "GRU": lambda: nn.GRU(4, 8, num_layers=3, dropout=0.4, batch_first=True),
        "RNN": lambda: nn.RNN(4, 8, num_layers=2, dropout=0.4, batch_first=True),
        "F.dropout": FunctionalDropoutNet,
        "sdpa dropout_p": SdpaAttention,
        "TransformerEncoderLayer attention only": lambda: _attention_only_encoder(),
        "TransformerDecoderLayer": lambda: _decoder_only_layer(),
    }
    return makers[module_name]()


def _attention_only_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer.self_attn.dropout = 0.3  # the only randomness: dropout on the attention weights
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


class _DecoderWrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.25, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x)


def _decoder_only_layer() -> nn.Module:
    return _DecoderWrap()


INPUTS = {
    "Dropout": (2, 6),
    "Dropout1d": (2, 3, 5),
    "Dropout2d": (2, 3, 4, 4),
    "Dropout3d": (2, 3, 2, 3, 3),
    "AlphaDropout": (2, 6),
    "FeatureAlphaDropout": (2, 3, 4, 4),
    "mcdrop.nn.Dropout": (2, 6),
    "mcdrop.nn.Dropout2d": (2, 3, 4, 4),
    "MultiheadAttention": (2, 5, 8),
    "LSTM": (2, 5, 4),
    "GRU": (2, 5, 4),
    "RNN": (2, 5, 4),
    "F.dropout": (2, 6),
    "sdpa dropout_p": (2, 5, 8),
    "TransformerEncoderLayer attention only": (2, 5, 8),
    "TransformerDecoderLayer": (2, 5, 8),
}


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


# ----------------------------------------------------------------------------- the matrix
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


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_wrapper_samples_vary_for_each_kind(kind: str) -> None:
    torch.manual_seed(1)
    model = only(kind).eval()
    x = torch.randn(*INPUTS[kind])
    out = mcdrop.MCDropout(model, n_samples=6, task="regression", seed=3).sample(x)
    assert out.shape[:2] == (6, 2)
    assert (out.std(0) > 0).any(), kind


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


def test_transformer_sites_are_listed() -> None:
    sites = {(s.path, s.kind) for s in mcdrop.find_stochastic_sites(transformer())}
    assert ("layers.0.self_attn", "attention_dropout") in sites
    assert ("layers.0", "fast_path_gate") in sites
    assert ("layers.1.dropout1", "dropout") in sites


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


def test_no_dropout_raises_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(NoDropoutError, match="nn.Dropout"):
        mcdrop.MCDropout(model)
    with pytest.raises(NoDropoutError), mcdrop.enable_dropout(model):
        pass
    # LSTM with a single layer: its dropout argument does nothing, so nothing can be sampled.
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(nn.LSTM(3, 3, num_layers=1))


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


def test_include_exclude_and_registration() -> None:
    model = mlp()
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
        from mcdrop import stochastic

        stochastic._REGISTERED_DETERMINISTIC.discard(MyNoise)
        stochastic._REGISTERED_STOCHASTIC.pop(MyNoise, None)


def test_register_stochastic_validates_its_arguments_up_front() -> None:
    from mcdrop import stochastic

    class Noise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sigma = 0.1

        def forward(self, x):
            return x + self.sigma * torch.randn_like(x) if self.training else x

    before = dict(stochastic._REGISTERED_STOCHASTIC)
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
    assert stochastic._REGISTERED_STOCHASTIC == before  # nothing was registered
    mcdrop.find_stochastic_sites(nn.Sequential(Noise()))  # and describing does not crash
    try:
        mcdrop.register_stochastic(Noise, rate_attr="sigma")
        [site] = mcdrop.find_stochastic_sites(nn.Sequential(Noise()))
        assert (site.kind, site.rate, site.rate_attr) == ("dropout", 0.1, "sigma")
    finally:
        stochastic._REGISTERED_STOCHASTIC.pop(Noise, None)


def test_drop_path_must_be_a_bool() -> None:
    model = mlp()
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
    model = mlp()
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


def test_nested_contexts_restore_the_outermost_state() -> None:
    model = cnn_bn().eval()
    flags = _flags(model)
    with mcdrop.enable_dropout(model):
        inner_flags = _flags(model)
        with mcdrop.enable_dropout(model):
            assert _flags(model) == inner_flags
        assert _flags(model) == inner_flags
    assert _flags(model) == flags


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


def test_deepcopy_is_not_needed_model_object_identity_kept() -> None:
    model = mlp().eval()
    copy_before = copy.deepcopy(model)
    mc = mcdrop.MCDropout(model, n_samples=3)
    assert mc.model is model
    mc.predict(torch.randn(2, 6))
    _assert_same_state(copy_before.state_dict(), model)


def test_inactive_sites_warn() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), FunctionalDropoutNet(0.0).fc1)
    # A functional gate of unknown rate counts as randomness; a p=0 nn.Dropout alone does not.
    with pytest.raises(NoDropoutError):
        mcdrop.StochasticPolicy(model)
    model = nn.Sequential(nn.Linear(6, 6), FunctionalDropoutNet(0.0))
    with pytest.warns(NoRandomnessWarning, match="identical"):
        mcdrop.MCDropout(model, n_samples=4).predict(torch.randn(3, 6))


def test_policy_describe_shows_the_rates_of_the_model_as_it_is_now() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    policy = mcdrop.StochasticPolicy(net)
    with mcdrop.set_dropout_rate(net, 0.45):
        assert [row["rate"] for row in policy.describe()] == [0.45]
    assert [row["rate"] for row in policy.describe()] == [0.2]
    assert policy.describe() == mcdrop.describe(policy).to_dict("records")
