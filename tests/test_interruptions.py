"""Interruptions and misuse never corrupt the user's model: every model of the support matrix.

For every model of ``docs/support.md`` (built by the helpers of ``tests/support_models.py``, plus
the one-layer models of ``tests/zoo.py``), sampling is interrupted by ``KeyboardInterrupt``
or by an exception raised inside ``forward``: before a pass, in the middle of one (a hook on a
dropout module deep inside), after one, and in the output selection; at the first, a middle and the
last pass; in ``predict``, ``sample``, ``predict_loader`` and an ``enable_dropout`` block. After
each, every module's ``training`` flag, every parameter and buffer (the same objects, same dtype,
device and values), every ``requires_grad`` flag and ``.grad``, the global RNG state (the wrapper is
seeded), grad mode and the default dtype are exactly as before, and the model can be sampled again
(from another thread too). The model starts with mixed flags (some submodules in train mode) and one
frozen parameter, so "restored" cannot mean "put back to eval".

Two wrappers on one model, a wrapper used inside another's forward or inside an ``enable_dropout``
block, and two threads sampling one model either work or raise a clear error.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
import torch
from support_models import (
    HF_ARCHS,
    RATE,
    SCRIPTED,
    STYLE_X,
    DropPath,
    FunctionalDropout,
    GaussianNoise,
    RandomDepth,
    StochasticDepth,
    compiled,
    hf_model,
    optional_import,
    vision_like,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import INPUTS as LAYER_INPUTS
from zoo import only

import mcdrop
from mcdrop.errors import ModelStateError, NoRandomnessWarning, UnsupportedModelError
from mcdrop.policy import activate, classify

pytestmark = pytest.mark.usefixtures("one_thread")


class Boom(RuntimeError):
    """An error raised by the user's model in the middle of sampling."""


# ----------------------------------------------------------------------------- the state to keep
def capture(model: nn.Module) -> dict[str, Any]:
    tensors = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        tensors[name] = (t, t.detach().clone(), t.requires_grad, t.grad)
    return {
        "flags": {name: m.training for name, m in model.named_modules()},
        # instance attributes: nothing patched onto a module (a swapped ``forward``) may stay behind
        "attributes": {
            name: {k: id(v) for k, v in vars(m).items() if not k.startswith("_")}
            for name, m in model.named_modules()
        },
        "tensors": tensors,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
    }


def assert_restored(model: nn.Module, before: dict[str, Any], what: str, rng: bool = True) -> None:
    flags = {name: m.training for name, m in model.named_modules()}
    changed = {k: (before["flags"].get(k), v) for k, v in flags.items() if before["flags"].get(k) != v}
    assert not changed, f"{what}: training flags changed {changed}"
    for name, m in model.named_modules():
        now_attrs = {k: id(v) for k, v in vars(m).items() if not k.startswith("_")}
        was = before["attributes"][name]
        diff = sorted(
            k for k in set(now_attrs) | set(was) if now_attrs.get(k) != was.get(k) and k != "training"
        )
        assert not diff, f"{what}: instance attributes of {name or '<model>'} changed: {diff}"
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == before["tensors"].keys(), f"{what}: parameters or buffers added or removed"
    for name, (obj, value, requires_grad, grad) in before["tensors"].items():
        t = now[name]
        assert t is obj, f"{what}: {name} was replaced by another tensor"
        assert t.dtype == value.dtype and t.device == value.device, f"{what}: {name} moved or was cast"
        assert torch.equal(t.detach(), value), f"{what}: {name} changed"
        assert t.requires_grad == requires_grad, f"{what}: requires_grad of {name} changed"
        assert t.grad is grad, f"{what}: .grad of {name} changed"
    if rng:
        assert torch.equal(torch.get_rng_state(), before["rng"]), f"{what}: the global RNG state changed"
        if before["cuda_rng"] is not None:
            now_cuda = torch.cuda.get_rng_state_all()
            assert all(torch.equal(a, b) for a, b in zip(now_cuda, before["cuda_rng"], strict=True)), what
    assert torch.is_grad_enabled() == before["grad_enabled"], f"{what}: grad mode changed"
    assert torch.get_default_dtype() == before["default_dtype"], what
    claimed = [p for p, m in model.named_modules() if m in activate._ACTIVE]
    assert not claimed, f"{what}: modules still marked as being sampled: {claimed[:5]}"


# ----------------------------------------------------------------------------- the support matrix
@dataclass
class Entry:
    """A model of the support matrix, its inputs and the wrapper options it needs."""

    model: nn.Module
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    hookable: bool = True  # eager: forward hooks can be put on the model and its submodules


class Outer(nn.Module):
    """An eager shell for models that take no Python hooks (scripted, compiled in place)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _hf(arch: str) -> Callable[[ModuleType], Entry]:
    def build(T: ModuleType) -> Entry:
        model, inputs, output = hf_model(T, arch, dropout=RATE, attention_dropout=RATE)
        return Entry(model, kwargs=inputs, options={"output": output})

    return build


def _convnext(T: ModuleType) -> Entry:
    torch.manual_seed(0)
    config = T.ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16],
        depths=[2, 2],
        num_stages=2,
        drop_path_rate=RATE,
        layer_scale_init_value=1.0,
        num_labels=3,
        image_size=16,
        patch_size=2,
    )
    model = T.ConvNextForImageClassification(config).eval()
    return Entry(model, kwargs={"pixel_values": torch.randn(2, 3, 16, 16)}, options={"drop_path": True})


def _vision(depth: type) -> Callable[[ModuleType | None], Entry]:
    def build(_: Any) -> Entry:
        model = vision_like(depth, drop_path=RATE, attn_drop=RATE, drop=RATE)
        # token features (batch, tokens, dim): not classes, and task="auto" refuses to guess
        return Entry(model, args=(STYLE_X,), options={"drop_path": True, "task": "regression"})

    return build


def _registered(_: Any) -> Entry:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), RandomDepth(0.5), GaussianNoise(0.5), nn.Linear(8, 2)).eval()
    return Entry(model, args=(torch.randn(5, 4),), options={"drop_path": True})


def _timm(_: Any) -> Entry:
    optional_import("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
        drop_rate=RATE,
        proj_drop_rate=RATE,
        attn_drop_rate=RATE,
        drop_path_rate=RATE,
    ).eval()
    return Entry(model, args=(torch.randn(2, 3, 16, 16),), options={"drop_path": True})


def _efficientnet(_: Any) -> Entry:
    optional_import("torchvision")
    from torchvision.models import efficientnet_b0

    torch.manual_seed(0)
    model = efficientnet_b0(num_classes=3, dropout=RATE, stochastic_depth_prob=RATE).eval()
    return Entry(model, args=(torch.randn(2, 3, 32, 32),), options={"drop_path": True})


def _scripted(name: str) -> Callable[[Any], Entry]:
    def build(_: Any) -> Entry:
        make, shape, _kind = SCRIPTED[name]
        torch.manual_seed(0)
        model = Outer(torch.jit.script(make(RATE).eval()))
        return Entry(model, args=(torch.randn(*shape),), options={"task": "regression"}, hookable=False)

    return build


def _compiled(make: Callable[[float], nn.Module]) -> Callable[[Any], Entry]:
    def build(_: Any) -> Entry:
        torch.manual_seed(0)
        model = compiled(make(RATE).eval())
        # hooks go on the OptimizedModule itself (outside the compiled graph), not inside it
        return Entry(model, args=(torch.randn(4, 6),), hookable=False)

    return build


def _compiled_in_place(_: Any) -> Entry:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(RATE), nn.Linear(16, 2)).eval()
    model.compile(backend="aot_eager")
    return Entry(Outer(model), args=(torch.randn(4, 6),), hookable=False)


def _added_dropout(_: Any) -> Entry:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return Entry(mcdrop.add_dropout(plain, RATE), args=(torch.randn(5, 4),))


def _layer(name: str) -> Callable[[Any], Entry]:
    def build(_: Any) -> Entry:
        torch.manual_seed(0)
        return Entry(
            only(name).eval(), args=(torch.randn(*LAYER_INPUTS[name]),), options={"task": "regression"}
        )

    return build


MATRIX: dict[str, Callable[[Any], Entry]] = {
    **{f"hf-{arch}": _hf(arch) for arch in HF_ARCHS},
    "hf-convnext-drop-path": _convnext,
    "timm-style-DropPath": _vision(DropPath),
    "torchvision-style-StochasticDepth": _vision(StochasticDepth),
    "user-registered-classes": _registered,
    "timm-VisionTransformer": _timm,
    "torchvision-efficientnet_b0": _efficientnet,
    **{f"torchscript-{name}": _scripted(name) for name in sorted(SCRIPTED)},
    "compiled-nn.Dropout": _compiled(
        lambda p: nn.Sequential(nn.Linear(6, 16), nn.Dropout(p), nn.Linear(16, 2))
    ),
    "compiled-F.dropout-gate": _compiled(FunctionalDropout),
    "compiled-in-place": _compiled_in_place,
    "add_dropout": _added_dropout,
    **{f"layer-{name}": _layer(name) for name in sorted(LAYER_INPUTS)},
}
NEEDS_TRANSFORMERS = {name for name in MATRIX if name.startswith("hf-")}


@pytest.fixture
def registered():
    """Register the user classes of the matrix for one test, then undo it."""
    saved = dict(classify._REGISTERED_STOCHASTIC), set(classify._REGISTERED_DETERMINISTIC)
    mcdrop.register_stochastic(RandomDepth, kind="drop_path", rate_attr="rate")
    mcdrop.register_stochastic(GaussianNoise, kind="dropout", rate_attr="sigma")
    yield
    classify._REGISTERED_STOCHASTIC.clear()
    classify._REGISTERED_STOCHASTIC.update(saved[0])
    classify._REGISTERED_DETERMINISTIC.clear()
    classify._REGISTERED_DETERMINISTIC.update(saved[1])


def mix_flags(model: nn.Module) -> None:
    """Eval everywhere but a few submodules in train mode, and one parameter frozen."""
    model.eval()
    for i, (_, m) in enumerate(model.named_modules()):
        if i % 3 == 2:
            m.training = True
    params = list(model.parameters())
    if params:
        params[0].requires_grad_(False)


def _select(output: Any) -> Callable[[Any], torch.Tensor]:
    """An output selector doing what mcdrop's default (or the given one) does."""

    def select(out: Any) -> torch.Tensor:
        if callable(output):
            return output(out)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "logits"):
            return out.logits
        return out[0]

    return select


class Trigger:
    """Raises ``exc`` at the ``at``-th call (1-based); counts calls otherwise."""

    def __init__(self, exc: type[BaseException] | None = None, at: int = 0) -> None:
        self.exc, self.at, self.calls = exc, at, 0

    def __call__(self, *_: Any) -> None:
        self.calls += 1
        if self.exc is not None and self.calls == self.at:
            raise (
                self.exc("interrupted by the test")
                if self.exc is not KeyboardInterrupt
                else KeyboardInterrupt
            )


def deep_candidates(model: nn.Module, options: dict[str, Any]) -> dict[str, Trigger]:
    """Counting hooks on the sampled sites inside the model (eager submodules only)."""
    sites = [
        s for s in mcdrop.find_stochastic_sites(model, drop_path=options.get("drop_path", False)) if s.sampled
    ]
    modules = dict(model.named_modules())
    return {
        s.path: Trigger() for s in sites if s.path and not isinstance(modules[s.path], torch.jit.ScriptModule)
    }


def deep_module(model: nn.Module, counts: dict[str, Trigger], passes: int) -> nn.Module | None:
    """A site in the middle of the model that runs once per pass: its hook fires mid-pass.

    (Some sites are never called: an SDPA attention module's ``nn.Dropout`` only holds the rate.)
    """
    once = [path for path, counter in counts.items() if counter.calls == passes]
    return dict(model.named_modules())[once[len(once) // 2]] if once else None


SCENARIOS = [
    # (api, where the exception is raised, at which pass, exception)
    ("predict", "before_pass", "first", KeyboardInterrupt),
    ("predict", "mid_pass", "middle", Boom),
    ("sample", "after_pass", "last", KeyboardInterrupt),
    ("predict", "output_selection", "middle", KeyboardInterrupt),
    ("predict_loader", "before_pass", "middle", KeyboardInterrupt),
    ("predict_loader_metrics", "after_pass", "last", Boom),
    ("sample", "mid_pass", "first", KeyboardInterrupt),
]


def run_api(entry: Entry, api: str, options: dict[str, Any], target_shape: tuple[int, ...] = ()) -> Any:
    if api == "predict_loader_metrics":
        options = {**options, "task": "regression"}  # any output can be scored as a regression
    mc = mcdrop.MCDropout(entry.model, n_samples=4, seed=0, **options)
    if api == "predict":
        return mc.predict(*entry.args, **entry.kwargs)
    if api == "sample":
        return mc.sample(*entry.args, **entry.kwargs)
    batch = entry.args[0] if entry.args else entry.kwargs
    if api == "predict_loader":
        return mc.predict_loader([batch, batch], progress=False)
    targets = torch.zeros(target_shape)  # keep="metrics" needs targets
    with_targets = {**entry.kwargs, "labels": targets} if entry.kwargs else (entry.args[0], targets)
    return mc.predict_loader([with_targets, with_targets], progress=False, keep="metrics")


@pytest.mark.parametrize("name", list(MATRIX))
def test_interruptions_leave_every_model_of_the_support_matrix_exactly_as_before(name: str, request) -> None:
    T = request.getfixturevalue("T") if name in NEEDS_TRANSFORMERS else None
    if name == "hf-convnext-drop-path":
        T = request.getfixturevalue("T")
    if name == "user-registered-classes":
        request.getfixturevalue("registered")
    entry = MATRIX[name](T)
    model = entry.model
    mix_flags(model)
    base_options = {**entry.options, "max_batch_size": None}
    output = base_options.pop("output", None)
    first_input = entry.args[0] if entry.args else next(iter(entry.kwargs.values()))
    base_options["max_batch_size"] = first_input.shape[0]  # one replica per pass: 4 passes per batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRandomnessWarning)
        counter = Trigger()
        handles = [model.register_forward_pre_hook(counter)]
        modules = dict(model.named_modules())
        counts = deep_candidates(model, entry.options) if entry.hookable else {}
        handles += [modules[path].register_forward_pre_hook(c) for path, c in counts.items()]
        mc = mcdrop.MCDropout(entry.model, n_samples=4, seed=0, **{**base_options, "output": output})
        try:
            samples = mc.sample(*entry.args, **entry.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        target_shape = tuple(samples.shape[1:])
        passes = counter.calls
        # A wrapper's first call per input signature also runs the gate check (see
        # mcdrop.engine.checks): its passes come first, then the sampling passes.
        again = Trigger()
        handle = model.register_forward_pre_hook(again)
        try:
            mc.sample(*entry.args, **entry.kwargs)
        finally:
            handle.remove()
        checks = passes - again.calls
        deep = deep_module(model, counts, passes)
        assert passes >= 2, f"{name}: expected several passes, got {passes}"
        before = capture(model)
        totals: dict[str, int] = {}
        for api, where, when, exc in SCENARIOS:
            if api not in totals:  # forward calls of one uninterrupted run (gate checks included)
                count = Trigger()
                handle = model.register_forward_pre_hook(count)
                try:
                    run_api(entry, api, {**base_options, "output": output}, target_shape)
                finally:
                    handle.remove()
                totals[api] = count.calls
            total = totals[api]
            at = {"first": 1, "middle": checks + (total - checks + 1) // 2, "last": total}[when]
            trigger = Trigger(exc, at)
            options = {**base_options, "output": output}
            handle = None
            if where == "mid_pass" and deep is not None:
                handle = deep.register_forward_pre_hook(trigger)
            elif where == "after_pass":
                handle = model.register_forward_hook(trigger)
            elif where == "output_selection":
                select = _select(output)

                def selecting(out: Any, select=select, trigger=trigger) -> torch.Tensor:
                    trigger()
                    return select(out)

                options["output"] = selecting
            else:  # before_pass, and mid_pass where the model takes no deep hooks
                handle = model.register_forward_pre_hook(trigger)
            what = f"{name}: {exc.__name__} {where} at pass {at} of {total} in {api}"
            try:
                with pytest.raises(exc):
                    run_api(entry, api, options, target_shape)
            finally:
                if handle is not None:
                    handle.remove()
            assert trigger.calls == at, f"{what}: sampling went on after the interruption"
            assert_restored(model, before, what)

        # an exception in the body of an enable_dropout block
        with pytest.raises(KeyboardInterrupt):
            with (
                mcdrop.enable_dropout(model, drop_path=entry.options.get("drop_path", False)),
                torch.no_grad(),
            ):
                model(*entry.args, **entry.kwargs)
                raise KeyboardInterrupt
        assert_restored(model, before, f"{name}: KeyboardInterrupt in an enable_dropout block", rng=False)
        before["rng"] = torch.get_rng_state()  # that block's own forward drew from the global RNG

        # the model is still usable, from another thread too, and a fresh run draws what the first did
        results: list[Any] = []
        worker = threading.Thread(
            target=lambda: results.append(run_api(entry, "sample", {**base_options, "output": output}))
        )
        worker.start()
        worker.join()
        assert results and results[0].shape == samples.shape and not results[0].isnan().any()
        again = run_api(entry, "sample", {**base_options, "output": output})
        assert torch.equal(samples, again), f"{name}: a fresh seeded wrapper drew other samples"
        assert_restored(model, before, f"{name}: after a normal run")


def test_traced_models_are_refused_without_touching_them() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 8), nn.Dropout(RATE), nn.Linear(8, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(eager, torch.randn(3, 4))
    before = capture(traced)
    with pytest.raises(UnsupportedModelError):
        mcdrop.MCDropout(traced)
    with pytest.raises(UnsupportedModelError), mcdrop.enable_dropout(traced):
        pass
    assert_restored(traced, before, "traced model refused")


# ----------------------------------------------------------------------------- several wrappers
def _mlp_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(4, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 8),
        nn.Dropout(0.2),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    return net.eval()


def test_two_wrappers_on_one_model_draw_what_they_would_draw_alone() -> None:
    model = _mlp_bn()
    x = torch.randn(6, 4)
    before = capture(model)
    a, b = (
        mcdrop.MCDropout(model, n_samples=5, seed=1),
        mcdrop.MCDropout(model, n_samples=5, seed=2, exclude="3"),
    )
    interleaved = [a.predict(x).probs, b.predict(x).probs, a.predict(x).probs, b.predict(x).probs]
    a2, b2 = (
        mcdrop.MCDropout(model, n_samples=5, seed=1),
        mcdrop.MCDropout(model, n_samples=5, seed=2, exclude="3"),
    )
    alone = [a2.predict(x).probs, a2.predict(x).probs, b2.predict(x).probs, b2.predict(x).probs]
    for got, want in zip(interleaved, [alone[0], alone[2], alone[1], alone[3]], strict=True):
        assert torch.equal(got, want)
    assert_restored(model, before, "two wrappers")


def test_a_wrapper_inside_an_enable_dropout_block_restores_the_blocks_flags() -> None:
    model = _mlp_bn()
    before = capture(model)
    x = torch.randn(6, 4)
    with mcdrop.enable_dropout(model):
        inside = {n: m.training for n, m in model.named_modules()}
        pred = mcdrop.MCDropout(model, n_samples=4, seed=0).predict(x)
        assert {n: m.training for n, m in model.named_modules()} == inside
    assert torch.equal(pred.probs, mcdrop.MCDropout(model, n_samples=4, seed=0).predict(x).probs)
    assert_restored(model, before, "nested in enable_dropout", rng=False)


def test_a_wrapper_called_inside_another_wrappers_sampling_works() -> None:
    """Re-entrant use: wrapper B predicts inside wrapper A's output selection, on the same model."""
    model = _mlp_bn()
    x = torch.randn(6, 4)
    before = capture(model)
    inner = mcdrop.MCDropout(model, n_samples=3, seed=5, exclude="5")
    inner_results: list[torch.Tensor] = []

    def select(out: torch.Tensor) -> torch.Tensor:
        inner_results.append(inner.predict(x).probs)
        assert model[3].training and model[5].training  # the outer wrapper's dropout is on again
        return out

    outer = mcdrop.MCDropout(model, n_samples=4, seed=4, output=select, max_batch_size=6)
    pred = outer.predict(x)
    assert len(inner_results) >= 4
    for probs in [pred.probs, *inner_results]:
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(1), torch.ones(6))
    assert pred.mutual_information.gt(0).all()  # the outer wrapper's dropout stayed on
    assert_restored(model, before, "re-entrant wrappers")


def test_two_threads_sampling_one_model_get_a_clear_error_not_a_corrupted_model() -> None:
    model = _mlp_bn()
    x = torch.randn(6, 4)
    before = capture(model)
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):
        inside.set()
        assert release.wait(30)

    handle = model[0].register_forward_pre_hook(hold)
    results: list[Any] = []
    first = threading.Thread(
        target=lambda: results.append(mcdrop.MCDropout(model, n_samples=3, seed=0).predict(x))
    )
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(ModelStateError, match="another thread") as info:
            mcdrop.MCDropout(model, n_samples=3, seed=0).predict(x)
        assert "deepcopy" in str(info.value) and "Lock" in str(info.value)
        with pytest.raises(ModelStateError), mcdrop.enable_dropout(model[3:]):  # a part of it too
            pass
    finally:
        release.set()
        first.join()
        handle.remove()
    assert len(results) == 1 and torch.isfinite(results[0].probs).all()
    assert_restored(model, before, "two threads", rng=False)
    # and with the calls serialised, both threads work
    lock = threading.Lock()
    outputs: list[torch.Tensor] = []

    def serial(seed: int) -> None:
        with lock:
            outputs.append(mcdrop.MCDropout(model, n_samples=3, seed=seed).predict(x).probs)

    threads = [threading.Thread(target=serial, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) == 4
    assert_restored(model, before, "serialised threads", rng=False)


def test_independent_models_sample_in_parallel_threads() -> None:
    models = [_mlp_bn(seed) for seed in range(3)]
    befores = [capture(m) for m in models]
    x = torch.randn(6, 4)
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                got[i] = mcdrop.MCDropout(models[i], n_samples=20).predict(x).mutual_information
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(3):
        assert got[i].gt(0).all()
        assert_restored(models[i], befores[i], f"model {i} sampled in a thread", rng=False)


@pytest.mark.parametrize("layer", ["Dropout", "MultiheadAttention", "sdpa dropout_p", "LSTM"])
def test_a_seeded_wrapper_draws_the_same_samples_in_any_thread(layer: str) -> None:
    """The same seed gives the same dropout masks in another thread.

    ``torch.set_num_threads`` is per thread, and torch's own matrix products round differently
    with another intra-op thread count (``nn.Linear`` on a (2, 5, 8) batch differs by one ulp
    between 1 and 2 threads, with no dropout anywhere). So: with the thread count matched the
    samples are bit-identical, and with whatever count the new thread has they agree to float
    rounding -- a different mask would change them by orders of magnitude more.
    """
    torch.manual_seed(0)
    model, x = only(layer).eval(), torch.randn(*LAYER_INPUTS[layer])
    threads = torch.get_num_threads()

    def draw() -> torch.Tensor:
        return mcdrop.MCDropout(model, n_samples=4, seed=0, task="regression", max_batch_size=2).sample(x)

    def in_a_thread(match_threads: bool) -> torch.Tensor:
        result: list[torch.Tensor] = []

        def work() -> None:
            if match_threads:
                torch.set_num_threads(threads)
            result.append(draw())

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        return result[0]

    here = draw()
    assert here.std(0).gt(0).any()  # the samples do vary
    assert torch.equal(here, in_a_thread(match_threads=True))
    torch.testing.assert_close(here, in_a_thread(match_threads=False), rtol=1e-5, atol=1e-6)


class _Gate:
    """Forward pre-hooks that pause each model's first pass until the test lets it go."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.entered = {k: threading.Event() for k in models}
        self.go = {k: threading.Event() for k in models}
        self.handles = [models[k][0].register_forward_pre_hook(self._hook(k)) for k in models]

    def _hook(self, key: str):
        def hook(module, args):
            if not self.entered[key].is_set():
                self.entered[key].set()
                assert self.go[key].wait(30)

        return hook

    def close(self) -> None:
        for event in self.go.values():
            event.set()
        for handle in self.handles:
            handle.remove()


def test_seeded_wrappers_in_two_threads_stay_reproducible_and_leave_the_global_rng() -> None:
    """A seeded wrapper holds torch's process-wide generator alone while it samples.

    The second seeded wrapper (another thread, another model) waits until the first is done
    instead of interleaving its draws with the first one's stream; both draw what they draw alone.
    """
    models = {"a": _mlp_bn(0), "b": _mlp_bn(1)}
    x = torch.randn(6, 4)
    alone = {
        k: mcdrop.MCDropout(m, n_samples=4, seed=i).predict(x).probs
        for i, (k, m) in enumerate(models.items())
    }
    rng = torch.get_rng_state()
    gate = _Gate(models)
    got: dict[str, torch.Tensor] = {}

    def work(i: int, key: str) -> None:
        got[key] = mcdrop.MCDropout(models[key], n_samples=4, seed=i).predict(x).probs

    threads = {k: threading.Thread(target=work, args=(i, k)) for i, k in enumerate(models)}
    try:
        threads["a"].start()
        assert gate.entered["a"].wait(30)  # a is inside its seeded stream ...
        threads["b"].start()
        assert not gate.entered["b"].wait(0.5)  # ... so b waits for it, not entering its forward
        gate.go["a"].set()
        threads["a"].join(30)
        assert gate.entered["b"].wait(30)  # a is done: b goes on
        gate.go["b"].set()
        threads["b"].join(30)
    finally:
        gate.close()
    assert not threads["a"].is_alive() and not threads["b"].is_alive()
    assert torch.equal(got["a"], alone["a"]) and torch.equal(got["b"], alone["b"])
    assert torch.equal(torch.get_rng_state(), rng)


def test_unseeded_wrappers_share_the_generator_and_wait_for_a_seeded_one() -> None:
    models = {"a": _mlp_bn(0), "b": _mlp_bn(1), "seeded": _mlp_bn(2)}
    x = torch.randn(6, 4)
    alone = mcdrop.MCDropout(models["seeded"], n_samples=4, seed=5).predict(x).probs
    gate = _Gate(models)
    got: dict[str, torch.Tensor] = {}

    def work(key: str) -> None:
        seed = 5 if key == "seeded" else None
        got[key] = mcdrop.MCDropout(models[key], n_samples=4, seed=seed).predict(x).probs

    threads = {k: threading.Thread(target=work, args=(k,)) for k in models}
    try:
        threads["a"].start()
        threads["b"].start()
        assert gate.entered["a"].wait(30) and gate.entered["b"].wait(30)  # two unseeded at once
        threads["seeded"].start()
        assert not gate.entered["seeded"].wait(0.5)  # the seeded one waits for both
        gate.go["a"].set()
        gate.go["b"].set()
        assert gate.entered["seeded"].wait(30)
        gate.go["seeded"].set()
        for t in threads.values():
            t.join(30)
    finally:
        gate.close()
    assert not any(t.is_alive() for t in threads.values())
    assert torch.equal(got["seeded"], alone)  # no unseeded draw got into its stream
    assert got["a"].shape == got["b"].shape == (6, 3)


def test_an_interrupted_wait_for_the_generator_leaves_no_lock_behind(monkeypatch) -> None:
    from mcdrop.engine import rng as _rnglock

    idle = {"readers": 0, "writer": False, "writers_waiting": 0}
    # nested access in one thread (a wrapper inside another's sampling) goes on, not deadlocking
    with _rnglock.rng_access(exclusive=False), _rnglock.rng_access(exclusive=True):
        pass
    assert _rnglock._STATE == idle
    # a seeded call interrupted while it waits for an unseeded one in another thread
    inside, leave = threading.Event(), threading.Event()

    def reader() -> None:
        with _rnglock.rng_access(exclusive=False):
            inside.set()
            assert leave.wait(30)

    t = threading.Thread(target=reader)
    t.start()
    assert inside.wait(30)

    def interrupted_wait(timeout=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(_rnglock._CONDITION, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            with _rnglock.rng_access(exclusive=True):
                pass
    assert _rnglock._STATE == {"readers": 1, "writer": False, "writers_waiting": 0}
    leave.set()
    t.join(30)
    assert not t.is_alive() and _rnglock._STATE == idle
    # an exception in the body releases access
    with pytest.raises(RuntimeError, match="stop"):
        with _rnglock.rng_access(exclusive=True):
            raise RuntimeError("stop")
    assert _rnglock._STATE == idle
    model = _mlp_bn(0)
    assert mcdrop.MCDropout(model, n_samples=2, seed=0).predict(torch.randn(3, 4)).probs.shape == (3, 3)


# ----------------------------------------------------------------------------- results are not lost
def test_an_interrupted_predict_loader_resumes_from_its_checkpoint_to_the_same_result(tmp_path) -> None:
    torch.manual_seed(0)
    model = _mlp_bn()
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    loader = DataLoader(data, batch_size=5)
    whole = mcdrop.MCDropout(model, n_samples=4, seed=3).predict_loader(
        loader, progress=False, keep="metrics"
    )
    before = capture(model)
    checkpoint = tmp_path / "run.ckpt"
    trigger = Trigger(KeyboardInterrupt, at=21)  # inside the sixth batch (4 passes per batch)
    handle = model.register_forward_pre_hook(trigger)
    start = torch.get_rng_state()
    iter(loader)  # iterating a DataLoader draws its base seed from the global RNG, as always ...
    before["rng"] = torch.get_rng_state()
    torch.set_rng_state(start)
    try:
        with pytest.raises(KeyboardInterrupt):
            mcdrop.MCDropout(model, n_samples=4, seed=3, max_batch_size=5).predict_loader(
                loader, progress=False, keep="metrics", checkpoint=checkpoint, checkpoint_every=1
            )
    finally:
        handle.remove()
    assert_restored(model, before, "interrupted predict_loader")  # ... and the sampling draws nothing
    assert checkpoint.exists() and not list(tmp_path.glob(".*.tmp"))
    resumed = mcdrop.MCDropout(model, n_samples=4, seed=3, max_batch_size=5).predict_loader(
        loader, progress=False, keep="metrics", checkpoint=checkpoint, checkpoint_every=1
    )
    uninterrupted = mcdrop.MCDropout(model, n_samples=4, seed=3, max_batch_size=5).predict_loader(
        loader, progress=False, keep="metrics"
    )
    assert resumed.summary() == uninterrupted.summary()
    assert resumed.n == whole.n == 40
