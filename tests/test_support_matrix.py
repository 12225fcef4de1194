"""The support matrix of docs/support.md: architecture x kind of randomness x sampled or not.

Every row is checked both ways: with only that kind of randomness switched on (rate > 0) MC samples
vary, and with its rate at 0 there is nothing to sample (``NoDropoutError``) and, even with every
module forced into train mode, two forward passes are bit-identical (no hidden randomness the policy
does not know about).

Hugging Face models are built from tiny configs with random weights (nothing is downloaded); the
tests that need ``transformers``, ``timm`` or ``torchvision`` are skipped when they cannot be
imported. The models shared with ``tests/test_interruptions.py`` are in ``tests/support_models.py``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support_models import (
    HF_ARCHS,
    LAYERS,
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

import mcdrop
from mcdrop.engine.checks import checking
from mcdrop.errors import InvalidInputError, NoDropoutError, NoRandomnessWarning, UnsupportedModelError
from mcdrop.policy import classify

N = 6  # MC samples per check
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registry():
    """Undo registrations made by a test."""
    stochastic_before = dict(classify._REGISTERED_STOCHASTIC)
    deterministic_before = set(classify._REGISTERED_DETERMINISTIC)
    yield
    classify._REGISTERED_STOCHASTIC.clear()
    classify._REGISTERED_STOCHASTIC.update(stochastic_before)
    classify._REGISTERED_DETERMINISTIC.clear()
    classify._REGISTERED_DETERMINISTIC.update(deterministic_before)


# ----------------------------------------------------------------------------- shared checks
def draw(model: nn.Module, *args: Any, drop_path: bool = False, output: Any = None, **kwargs: Any):
    mc = mcdrop.MCDropout(model, n_samples=N, seed=0, task="regression", drop_path=drop_path, output=output)
    return mc.sample(*args, **kwargs)


def assert_varies(samples: torch.Tensor) -> None:
    assert samples.shape[0] == N
    assert torch.isfinite(samples).all()
    assert any(not torch.equal(samples[0], samples[i]) for i in range(1, N)), "MC samples do not vary"


def not_norm(path: str, module: nn.Module) -> bool:
    """Every module but BatchNorm-like ones (whose train mode would update running statistics)."""
    name = getattr(module, "original_name", type(module).__name__)  # scripted modules too
    return not isinstance(module, nn.modules.batchnorm._NormBase) and "BatchNorm" not in name


def assert_nothing_to_sample(model: nn.Module, call: Callable[[], torch.Tensor], **options: Any) -> None:
    """No site to sample, and no hidden randomness: forced train mode gives identical passes."""
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(model, **options)
    flags = {name: m.training for name, m in model.named_modules()}
    with (
        mcdrop.enable_dropout(model, include=not_norm, drop_path=True, warn_if_inactive=False),
        torch.no_grad(),
    ):
        assert all(m.training for p, m in model.named_modules() if not_norm(p, m))
        first, second = call(), call()
    assert torch.equal(first, second)
    assert flags == {name: m.training for name, m in model.named_modules()}


def sites(model: nn.Module, **options: Any) -> dict[str, classify.StochasticSite]:
    return {s.path: s for s in mcdrop.find_stochastic_sites(model, **options)}


# ----------------------------------------------------------------------------- Hugging Face models
# The classes that hold attention dropout (the innermost one where a version nests two).
ATTENTION_CLASSES = {
    "bert": ("BertSelfAttention", "BertSdpaSelfAttention"),
    "gpt2": ("GPT2Attention", "GPT2SdpaAttention"),
    "vit": ("ViTSelfAttention", "ViTSdpaSelfAttention", "ViTAttention"),
}


def select(out: Any, output: Any) -> torch.Tensor:
    return out.logits if output is None else output(out)


def attention_paths(model: nn.Module, family: str) -> set[str]:
    names = ATTENTION_CLASSES[family]
    found = {p for p, m in model.named_modules() if type(m).__name__ in names}
    # keep the innermost where one attention class wraps another
    return {p for p in found if not any(q.startswith(p + ".") for q in found)}


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("kind", ["dropout", "attention_dropout"])
def test_hf_samples_vary_exactly_where_there_is_randomness(T, arch: str, kind: str) -> None:
    model, inputs, output = hf_model(T, arch, **{kind: RATE})
    assert_varies(draw(model, output=output, **inputs))
    found = sites(model)
    sampled = {p for p, s in found.items() if s.sampled}
    family = arch.split("-")[0]
    if kind == "attention_dropout":
        # the attention modules gate their dropout on self.training; the nn.Dropout they hold for
        # the rate (or call in the eager path) is sampled too, nothing else
        assert attention_paths(model, family) <= sampled
        assert all(
            found[p].kind == "attention_dropout" and found[p].rate == RATE
            for p in attention_paths(model, family)
        )
    else:
        assert not attention_paths(model, family) & sampled
        assert sampled and all(found[p].kind == "dropout" and found[p].rate == RATE for p in sampled)

    quiet, inputs, output = hf_model(T, arch)  # every rate 0
    assert not any(s.sampled for s in sites(quiet).values())
    assert_nothing_to_sample(quiet, lambda: select(quiet(**inputs), output))


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_attention_dropout_reaches_the_attention_kernel(T, arch: str, monkeypatch) -> None:
    """The rate arrives where attention is computed: SDPA's dropout_p, or F.dropout on the weights."""
    model, inputs, output = hf_model(T, arch, attention_dropout=RATE)
    seen: list[float] = []
    if arch.endswith("sdpa"):
        real_sdpa = F.scaled_dot_product_attention

        def spy_sdpa(*args, **kwargs):
            seen.append(float(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)))
            return real_sdpa(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    else:
        real_dropout = F.dropout

        def spy_dropout(x, p=0.5, training=True, inplace=False):
            if x.dim() == 4 and x.shape[-1] == x.shape[-2]:  # (batch, heads, T, T) attention weights
                seen.append(float(p) if training else 0.0)
            return real_dropout(x, p, training, inplace)

        monkeypatch.setattr(torch.nn.functional, "dropout", spy_dropout)
    mc = mcdrop.MCDropout(model, n_samples=N, seed=0, task="regression", output=output)
    mc.sample(**inputs)  # the first call also runs the gate check (eval and neutralised passes)
    seen.clear()
    assert_varies(mc.sample(**inputs))
    assert len(seen) >= LAYERS and set(seen) == {RATE}
    seen.clear()
    with torch.no_grad():
        first = select(model(**inputs), output)
        assert torch.equal(first, select(model(**inputs), output))  # eval again afterwards
    assert len(seen) >= LAYERS and set(seen) == {0.0}


def cache_keyword(model: nn.Module) -> str:
    """The keyword of the key/value cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def gpt2_with_cache(T: ModuleType, impl: str = "eager", batch: int = 3, **rates: float):
    """GPT-2 (n_positions=16), a DynamicCache of an 8-token prefix, the inputs of the next token
    (``input_ids`` and the cache), and the reference: the deterministic next-token logits, computed
    on a copy of the cache. The cache is built under ``no_grad`` (as in generation).
    """
    model, _, output = hf_model(T, f"gpt2-{impl}", **rates)
    g = torch.Generator().manual_seed(1)
    prefix, token = (
        torch.randint(0, 64, (batch, 8), generator=g),
        torch.randint(0, 64, (batch, 1), generator=g),
    )
    key = cache_keyword(model)
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        reference = output(model(input_ids=token, **{key: copy.deepcopy(cache)}))
    assert isinstance(cache, T.DynamicCache) and cache.get_seq_length() == 8
    return model, cache, {"input_ids": token, key: cache}, reference, output


def assert_cache_unchanged(cache: Any, before: Any) -> None:
    assert cache.get_seq_length() == 8, "the user's cache was changed"
    assert len(cache.layers) == len(before.layers)
    for now, then in zip(cache.layers, before.layers, strict=True):
        assert torch.equal(now.keys, then.keys) and torch.equal(now.values, then.values)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_hf_gpt2_kv_cache_every_pass_sees_the_users_cache_unchanged(T, impl: str, strategy: str) -> None:
    """Regression: every pass (checks, probe, samples) got the same DynamicCache, which GPT-2 appends
    to in place, so each MC sample saw a longer, wrong context, the user's cache grew from 8 to 20
    positions, and with n_positions=16 the position embedding raised an IndexError. Now each pass
    gets its own copy: at a negligible rate the samples equal the deterministic next-token logits.
    """
    model, cache, inputs, reference, output = gpt2_with_cache(T, impl, dropout=RATE, attention_dropout=RATE)
    before = copy.deepcopy(cache)
    with mcdrop.set_dropout_rate(model, 1e-7), warnings.catch_warnings():  # ~no dropout: samples = reference
        warnings.simplefilter("ignore", NoRandomnessWarning)
        mc = mcdrop.MCDropout(model, n_samples=4, seed=0, task="regression", strategy=strategy, output=output)
        samples = mc.sample(**inputs)
        assert_cache_unchanged(cache, before)
        assert torch.allclose(samples, reference.expand_as(samples), atol=1e-5)
        pred = mc.predict(**inputs)  # the decision remembered for this signature, again
        assert_cache_unchanged(cache, before)
        assert torch.allclose(pred.mean, reference, atol=1e-5)
        # a tiny memory budget would split the batch, which the cache's batch cannot follow
        tiny = mcdrop.MCDropout(
            model, n_samples=4, seed=0, task="regression", strategy=strategy, output=output, memory_budget=1
        )
        samples = tiny.sample(**inputs)
        assert_cache_unchanged(cache, before)
        assert torch.allclose(samples, reference.expand_as(samples), atol=1e-5)
    mc = mcdrop.MCDropout(model, n_samples=N, seed=0, task="regression", strategy=strategy, output=output)
    assert_varies(mc.sample(**inputs))
    assert_cache_unchanged(cache, before)


def test_hf_gpt2_kv_cache_batch_is_never_split_by_the_checks_or_the_pass_sizes(T) -> None:
    """The gate check and the row check run on at most 8 rows, and automatic pass sizes may split a
    batch: a cache's batch cannot follow, so a batch holding one goes whole to every pass."""
    model, cache, inputs, reference, output = gpt2_with_cache(T, batch=11, attention_dropout=RATE)
    before = copy.deepcopy(cache)
    with mcdrop.set_dropout_rate(model, 1e-7), warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRandomnessWarning)
        for budget in (None, 1):
            mc = mcdrop.MCDropout(
                model, n_samples=3, seed=0, task="regression", output=output, memory_budget=budget
            )
            samples = mc.sample(**inputs)
            assert_cache_unchanged(cache, before)
            assert torch.allclose(samples, reference.expand_as(samples), atol=1e-5)


def test_hf_gpt2_kv_cache_is_not_replicated_and_replicate_says_so(T) -> None:
    """A cache's batch is not replicated with the input rows: strategy='replicate' is refused with a
    message naming the cache, the cache untouched; 'auto' falls back to a strategy that works."""
    model, cache, inputs, _, output = gpt2_with_cache(T, attention_dropout=RATE)
    before = copy.deepcopy(cache)
    mc = mcdrop.MCDropout(model, n_samples=4, seed=0, task="regression", strategy="replicate", output=output)
    key = cache_keyword(model)
    with pytest.raises(UnsupportedModelError, match=rf"keyword '{key}' \(DynamicCache\) is given whole"):
        mc.sample(**inputs)
    assert_cache_unchanged(cache, before)


def test_hf_gpt2_kv_cache_with_a_split_batch_is_refused_naming_the_cache(T) -> None:
    """A batch split by max_batch_size no longer matches the cache's batch: an InvalidInputError
    naming the cache and the fix, not the model's own shape error."""
    model, cache, inputs, _, output = gpt2_with_cache(T, attention_dropout=RATE, batch=4)
    before = copy.deepcopy(cache)
    mc = mcdrop.MCDropout(model, n_samples=4, seed=0, task="regression", max_batch_size=2, output=output)
    key = cache_keyword(model)
    with pytest.raises(
        InvalidInputError, match=rf"max_batch_size=2 .*keyword '{key}' \(DynamicCache\) is not a tensor"
    ):
        mc.sample(**inputs)
    assert_cache_unchanged(cache, before)


class Interrupt(Exception):
    pass


def test_hf_gpt2_kv_cache_is_unchanged_after_an_exception_mid_sampling(T) -> None:
    model, cache, inputs, _, output = gpt2_with_cache(T, attention_dropout=RATE)
    before = copy.deepcopy(cache)
    passes = []

    def stop_at_third_sampling_pass(module, args, kwargs):
        if not checking():
            passes.append(1)
            if len(passes) == 3:
                raise Interrupt

    handle = model.register_forward_pre_hook(stop_at_third_sampling_pass, with_kwargs=True)
    try:
        mc = mcdrop.MCDropout(model, n_samples=N, seed=0, task="regression", output=output)
        with pytest.raises(Interrupt):
            mc.predict(**inputs)
    finally:
        handle.remove()
    assert len(passes) == 3
    assert_cache_unchanged(cache, before)


def test_hf_gpt2_kv_cache_that_cannot_be_copied_is_refused_before_any_pass(T) -> None:
    """A cache built with autograd on holds non-leaf tensors, which copy.deepcopy refuses: mcdrop
    says so, naming the argument, rather than hand the same object to every pass."""
    model, _, inputs, _, output = gpt2_with_cache(T, attention_dropout=RATE)
    key = cache_keyword(model)
    inputs[key] = cache = model(input_ids=torch.randint(0, 64, (3, 8)), use_cache=True).past_key_values
    passes = []
    handle = model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        mc = mcdrop.MCDropout(model, n_samples=4, seed=0, task="regression", output=output)
        with pytest.raises(InvalidInputError, match=rf"keyword '{key}' is a DynamicCache.*deep-copied"):
            mc.sample(**inputs)
    finally:
        handle.remove()
    assert not passes and cache.get_seq_length() == 8


@pytest.mark.parametrize("arch", ["bert-eager", "bert-sdpa"])
def test_switching_on_only_nn_dropout_misses_hf_attention_dropout(T, arch: str) -> None:
    """What naive MC dropout code does: train() on every nn.Dropout. Attention dropout never runs."""
    model, inputs, _ = hf_model(T, arch, attention_dropout=RATE)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.eval()
    with mcdrop.enable_dropout(model), torch.no_grad():
        assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_describe_lists_every_dropout_site_of_hf_models(T, arch: str) -> None:
    model, _, _ = hf_model(T, arch, dropout=0.1, attention_dropout=0.2)
    table = mcdrop.describe(model)
    assert list(table.columns) == ["path", "kind", "module_type", "rate", "sampled", "note"]
    rows = {row.path: row for row in table.itertuples()}
    dropout = {p for p, m in model.named_modules() if isinstance(m, nn.Dropout)}
    attention = attention_paths(model, arch.split("-")[0])
    assert len(attention) == LAYERS
    # every dropout site is listed, and nothing else (no spurious "functional" gates: Hugging Face
    # models read self.training for gradient checkpointing too, which is not randomness)
    assert set(rows) == dropout | attention
    for path in attention:
        assert rows[path].kind == "attention_dropout" and rows[path].rate == 0.2 and rows[path].sampled
        assert "attention weights" in rows[path].note
    # an nn.Dropout whose p an attention module reads as its rate (BERT's attention.self.dropout,
    # never called itself) is listed as that attention dropout, sampled with it
    rate_attrs = {site.path: site.rate_attr for site in mcdrop.find_stochastic_sites(model)}
    holders = {f"{p}.{rate_attrs[p][:-2]}" for p in attention if rate_attrs[p].endswith(".p")}
    assert holders <= dropout
    for path in holders:
        assert rows[path].kind == "attention_dropout" and rows[path].rate == 0.2 and rows[path].sampled
        assert "holds the rate of" in rows[path].note
    for path in dropout - holders:
        assert rows[path].kind == "dropout" and rows[path].sampled == (rows[path].rate > 0)


@pytest.mark.parametrize("arch", ["bert-eager", "bert-sdpa", "gpt2-eager", "gpt2-sdpa"])
def test_excluding_attention_or_its_rate_holder_keeps_attention_dropout_off(T, arch: str) -> None:
    """The nn.Dropout an attention module reads its rate from and the module are one site."""
    model, inputs, output = hf_model(T, arch, attention_dropout=RATE)  # attention dropout only
    assert_varies(draw(model, output=output, **inputs))
    attention = sorted(attention_paths(model, arch.split("-")[0]))
    holder = next(s for s in mcdrop.find_stochastic_sites(model) if s.path == attention[0]).rate_attr[:-2]
    for excluded in (attention, [f"{a}.{holder}" for a in attention]):
        table = mcdrop.describe(model, exclude=excluded)
        assert not table[table.kind == "attention_dropout"].sampled.any(), excluded
        with pytest.raises(NoDropoutError):
            mcdrop.MCDropout(model, n_samples=N, exclude=excluded)


def test_attention_that_applies_other_dropout_rates_is_sampled_as_a_gate(T) -> None:
    """Starcoder2's attention also applies residual_dropout: not one rate, and not off when one is 0."""
    torch.manual_seed(0)
    config = T.Starcoder2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_dropout=0.0,
        residual_dropout=RATE,
        embedding_dropout=0.0,
    )
    model = T.Starcoder2ForCausalLM(config).eval()
    found = sites(model)
    attn = found["model.layers.0.self_attn"]
    assert attn.kind == "functional" and attn.sampled and attn.rate is None
    assert "attention_dropout=0, residual_dropout=0.3" in attn.note
    ids = torch.randint(0, 64, (2, 6))
    mc = mcdrop.MCDropout(model, n_samples=N, seed=0, task="regression", output=lambda o: o.logits[:, -1])
    assert_varies(mc.sample(input_ids=ids))
    # only the attention module's own residual dropout: still sampled
    only_attention = mcdrop.MCDropout(
        model,
        n_samples=N,
        seed=0,
        task="regression",
        output=lambda o: o.logits[:, -1],
        exclude=["*.mlp", "model"],
    )
    assert_varies(only_attention.sample(input_ids=ids))


def test_bert_training_flags_and_state_are_restored_exactly(T) -> None:
    model, inputs, _ = hf_model(T, "bert-sdpa", dropout=0.1, attention_dropout=0.1)
    model.eval()
    model.bert.encoder.layer[1].train()  # mixed flags must come back as they were
    model.classifier.train()
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    assert any(k.endswith("position_ids") for k in state)  # buffers are part of it
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def assert_restored() -> None:
        assert {name: m.training for name, m in model.named_modules()} == flags
        after = dict([*model.named_parameters(), *model.named_buffers()])
        assert after.keys() == state.keys()
        for key, value in state.items():
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
        assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
        assert all(p.grad is None for p in model.parameters())

    mc = mcdrop.MCDropout(model, n_samples=5, seed=0, max_batch_size=6)
    pred = mc.predict(**inputs)
    assert pred.probs.shape == (3, 3) and bool((pred.mutual_information > 0).all())
    assert_restored()

    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = model.bert.encoder.layer[0].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            mc.predict(**inputs)
    finally:
        handle.remove()
    assert_restored()


def test_hf_convnext_drop_path_is_off_by_default_and_sampled_on_request(T) -> None:
    def convnext(rate: float) -> nn.Module:
        torch.manual_seed(0)
        config = T.ConvNextConfig(
            num_channels=3,
            hidden_sizes=[8, 16],
            depths=[2, 2],
            num_stages=2,
            drop_path_rate=rate,
            layer_scale_init_value=1.0,
            num_labels=3,
            image_size=16,
            patch_size=2,
        )
        return T.ConvNextForImageClassification(config).eval()

    x = torch.randn(2, 3, 16, 16)
    model = convnext(RATE)
    found = sites(model)
    assert found and all(s.kind == "drop_path" and not s.sampled for s in found.values())
    assert {type(m).__name__ for m in model.modules()} >= {"ConvNextDropPath"}
    with pytest.raises(NoDropoutError, match="drop_path=True"):
        mcdrop.MCDropout(model)
    assert all(s.sampled for s in sites(model, drop_path=True).values() if s.rate)
    assert_varies(draw(model, drop_path=True, pixel_values=x))
    quiet = convnext(0.0)
    assert_nothing_to_sample(quiet, lambda: quiet(pixel_values=x).logits, drop_path=True)


# ----------------------------------------------------------------------------- timm / torchvision
@pytest.mark.parametrize(
    "depth", [DropPath, StochasticDepth], ids=["timm-DropPath", "torchvision-StochasticDepth"]
)
def test_drop_path_styles_are_found_off_by_default_and_sampled_on_request(depth) -> None:
    model = vision_like(depth, drop_path=RATE)
    found = {p: s for p, s in sites(model).items() if s.kind == "drop_path"}
    assert set(found) == {"0.drop_path", "1.drop_path"}
    assert all(s.rate == RATE and not s.sampled for s in found.values())
    with pytest.raises(NoDropoutError, match="drop_path=True"):
        mcdrop.MCDropout(model)
    assert_varies(draw(model, STYLE_X, drop_path=True))
    quiet = vision_like(depth)
    assert_nothing_to_sample(quiet, lambda: quiet(STYLE_X), drop_path=True)


def test_timm_style_attention_dropout_is_sampled_with_its_rate() -> None:
    model = vision_like(DropPath, attn_drop=RATE)
    found = sites(model)
    assert found["0.attn"].kind == "attention_dropout" and found["0.attn"].rate == RATE
    assert found["0.attn"].rate_attr == "attn_drop.p"
    assert_varies(draw(model, STYLE_X))
    quiet = vision_like(DropPath)
    assert not found.keys() - sites(quiet).keys()
    assert_nothing_to_sample(quiet, lambda: quiet(STYLE_X))


def test_user_registered_drop_path_and_noise_classes(registry) -> None:
    mcdrop.register_stochastic(RandomDepth, kind="drop_path", rate_attr="rate")
    mcdrop.register_stochastic(GaussianNoise, kind="dropout", rate_attr="sigma")

    def model(rate: float, sigma: float) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), RandomDepth(rate), GaussianNoise(sigma), nn.Linear(8, 2)).eval()

    x = torch.randn(16, 4)
    depth_only = model(0.5, 0.0)
    found = sites(depth_only)
    assert (found["1"].kind, found["1"].rate, found["1"].sampled) == ("drop_path", 0.5, False)
    assert (found["2"].kind, found["2"].rate, found["2"].sampled) == ("dropout", 0.0, False)
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(depth_only)
    assert_varies(draw(depth_only, x, drop_path=True))
    assert_varies(draw(model(0.0, 0.5), x))
    quiet = model(0.0, 0.0)
    assert_nothing_to_sample(quiet, lambda: quiet(x), drop_path=True)


def test_real_timm_vision_transformer() -> None:
    optional_import("timm")
    from timm.models.vision_transformer import VisionTransformer

    def vit(**rates: float) -> nn.Module:
        torch.manual_seed(0)
        kwargs = {"drop_rate": 0.0, "proj_drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0}
        kwargs.update(rates)
        return VisionTransformer(
            img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3, **kwargs
        ).eval()

    x = torch.randn(2, 3, 16, 16)
    model = vit(attn_drop_rate=RATE)
    attention = {p for p, s in sites(model).items() if s.kind == "attention_dropout"}
    assert len(attention) == 2 and all(sites(model)[p].rate == RATE for p in attention)
    assert_varies(draw(model, x))
    deep = vit(drop_path_rate=RATE)
    depth_sites = [s for s in sites(deep, drop_path=True).values() if s.kind == "drop_path"]
    assert depth_sites and all(s.module_type == "DropPath" for s in depth_sites)
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(deep)
    assert_varies(draw(deep, x, drop_path=True))
    head = vit(drop_rate=RATE, proj_drop_rate=RATE)
    assert_varies(draw(head, x))
    quiet = vit()
    assert_nothing_to_sample(quiet, lambda: quiet(x), drop_path=True)


def test_real_torchvision_efficientnet() -> None:
    optional_import("torchvision")
    from torchvision.models import efficientnet_b0

    def effnet(dropout: float, depth: float) -> nn.Module:
        torch.manual_seed(0)
        return efficientnet_b0(num_classes=3, dropout=dropout, stochastic_depth_prob=depth).eval()

    x = torch.randn(2, 3, 32, 32)
    deep = effnet(0.0, RATE)
    depth_sites = [s for s in sites(deep, drop_path=True).values() if s.kind == "drop_path"]
    assert depth_sites and all(s.module_type == "StochasticDepth" for s in depth_sites)
    with pytest.raises(NoDropoutError):
        mcdrop.MCDropout(deep)
    assert_varies(draw(deep, x, drop_path=True))
    assert_varies(draw(effnet(RATE, 0.0), x))
    quiet = effnet(0.0, 0.0)
    assert_nothing_to_sample(quiet, lambda: quiet(x), drop_path=True)


# ----------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name", sorted(SCRIPTED))
def test_torchscript_models_honour_the_flags(name: str) -> None:
    make, shape, kind = SCRIPTED[name]
    torch.manual_seed(0)
    scripted = torch.jit.script(make(RATE).eval())
    x = torch.randn(*shape)
    with torch.no_grad():
        before = scripted(x)
    assert kind in {s.kind for s in mcdrop.find_stochastic_sites(scripted) if s.sampled}
    mc = mcdrop.MCDropout(scripted, n_samples=N, seed=0, task="regression")
    assert_varies(mc.sample(x))
    if kind == "functional":  # the gate check cannot switch compiled dropout off: it says so
        note = mcdrop.describe(mc).note.tolist()[0]
        assert note.startswith("TorchScript: its compiled dropout cannot be made the identity"), note
    with torch.no_grad():
        assert torch.equal(scripted(x), before)
    assert not any(m.training for m in scripted.modules())

    quiet = torch.jit.script(make(0.0).eval())
    if kind == "functional":
        # a scripted gate's rate is unknown: mcdrop samples it and says when nothing varied
        with pytest.warns(NoRandomnessWarning, match="identical"):
            samples = draw(quiet, x)
        # identical up to the float rounding of TorchScript's optimised graph at other batch sizes
        assert all(torch.allclose(samples[0], s, rtol=0, atol=1e-6) for s in samples)
    else:
        assert_nothing_to_sample(quiet, lambda: quiet(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_traced_models_are_refused_with_a_clear_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(RATE), nn.Linear(8, 2)).eval()
    traced = torch.jit.trace(model, torch.randn(3, 4))
    with pytest.raises(UnsupportedModelError, match=r"torch\.jit\.trace.*torch\.jit\.script"):
        mcdrop.MCDropout(traced)
    with pytest.raises(UnsupportedModelError), mcdrop.enable_dropout(traced):
        pass
    table = mcdrop.describe(traced)
    assert table.path.tolist() == ["1"] and not table.sampled.any() and "traced" in table.note[0]


class HandMadeMask(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.rand_like(x) > 0.5)


def test_a_traced_part_without_dropout_runs_as_recorded_and_the_rest_is_sampled() -> None:
    torch.manual_seed(0)
    encoder = torch.jit.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), torch.randn(3, 4))
    model = nn.Sequential(encoder, nn.Dropout(RATE), nn.Linear(8, 2)).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        features = encoder(x)
    with pytest.warns(mcdrop.McdropWarning, match=r"torch\.jit\.trace \(0\) with no dropout layer inside"):
        mc = mcdrop.MCDropout(model, n_samples=N, seed=0, keep_samples=True)
    seen: list[torch.Tensor] = []
    handle = model[1].register_forward_pre_hook(
        lambda module, args: None if checking() else seen.append(args[0].clone())
    )
    try:
        samples = mc.sample(x)
    finally:
        handle.remove()
    assert_varies(samples)
    # the traced encoder runs as recorded: the dropout after it gets the same features every pass
    rows = torch.cat(seen).reshape(-1, 5, 8)
    assert len(rows) >= 1 and all(torch.allclose(r, features, atol=1e-6, rtol=0) for r in rows)
    assert [(s.path, s.sampled) for s in mc.sites] == [("1", True)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.jit.trace(
            nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2)).train(), torch.randn(3, 4), check_trace=False
        ),
        lambda: torch.jit.trace(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2)).eval(), torch.randn(3, 4)),
        lambda: nn.Sequential(
            nn.Linear(4, 8), torch.jit.trace(HandMadeMask(), torch.randn(3, 8), check_trace=False)
        ),
    ],
    ids=["dropout-traced-in-train-mode", "dropout-layer-inside", "random-op-in-graph"],
)
def test_a_traced_part_with_dropout_or_randomness_is_refused(make) -> None:
    model = nn.Sequential(make(), nn.Dropout(RATE), nn.Linear(8, 2)).eval()
    with pytest.raises(UnsupportedModelError, match=r"torch\.jit\.trace"):
        mcdrop.MCDropout(model)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize(
    "make",
    [lambda p: nn.Sequential(nn.Linear(6, 16), nn.Dropout(p), nn.Linear(16, 2)), FunctionalDropout],
    ids=["nn.Dropout", "F.dropout-gate"],
)
def test_compiled_models_are_sampled_and_go_back_to_eval(make) -> None:
    torch.manual_seed(0)
    eager = make(RATE).eval()
    model = compiled(eager)
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = model(x)
    assert all(
        s.path.startswith("_orig_mod.") or s.path == "_orig_mod" for s in mcdrop.find_stochastic_sites(model)
    )
    # the compiled graph is guarded on the training flags: switching them recompiles
    assert_varies(draw(model, x))
    with torch.no_grad():
        assert torch.equal(model(x), before)
        assert torch.equal(eager(x), before)
    assert not any(m.training for m in model.modules())


def test_compile_in_place_and_rate_changes_are_honoured() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(RATE), nn.Linear(16, 2)).eval()
    model.compile(backend="aot_eager")
    x = torch.randn(4, 6)
    assert_varies(draw(model, x))
    with mcdrop.set_dropout_rate(model, 0.0):
        assert_nothing_to_sample(model, lambda: model(x))
    assert model[1].p == RATE
    assert_varies(draw(model, x))


def test_compiled_model_cannot_get_dropout_added() -> None:
    model = compiled(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)))
    with pytest.raises(UnsupportedModelError, match="before|original model"):
        mcdrop.add_dropout(model, 0.1)


def _wav2vec2(T, mask_time_prob: float) -> nn.Module:
    config = T.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(8, 8),
        conv_stride=(4, 4),
        conv_kernel=(8, 8),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=mask_time_prob,
        mask_time_length=2,
        layerdrop=0.0,
        hidden_dropout=RATE,
        num_labels=3,
    )
    torch.manual_seed(0)
    return T.Wav2Vec2ForSequenceClassification(config).eval()


def test_hf_wav2vec2_spec_augment_is_flagged_as_randomness_outside_dropout(T) -> None:
    """wav2vec2 gates SpecAugment time masking (drawn with numpy) on self.training."""
    audio = torch.randn(3, 800, generator=torch.Generator().manual_seed(0))
    masked = _wav2vec2(T, mask_time_prob=0.3)
    mc = mcdrop.MCDropout(masked, n_samples=4, seed=0)
    with pytest.warns(
        mcdrop.GateRandomnessWarning, match=r"wav2vec2 draw from numpy's.*exclude=\['wav2vec2'\]"
    ):
        mc.predict(audio)
    assert "numpy" in mc.describe().set_index("path").loc["wav2vec2", "note"]
    # kept in eval as the warning says: no warning, and its dropout children are still sampled
    kept = mcdrop.MCDropout(masked, n_samples=N, seed=0, exclude=["wav2vec2"], keep_samples=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_varies(kept.predict(audio).samples)
    plain = mcdrop.MCDropout(_wav2vec2(T, mask_time_prob=0.0), n_samples=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.predict(audio)
