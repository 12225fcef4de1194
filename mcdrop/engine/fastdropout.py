"""Faster dropout for MC sampling on the CPU (private; used by :mod:`mcdrop.engine.strategies`).

On the CPU, drawing dropout masks dominates the cost of many MC passes: ``F.dropout`` fills a
tensor with ``bernoulli_`` (about 8-15 ns per element on a 2-core machine), while the matrix
products around it cost a fraction of that per element. While the engine samples, it swaps the
``forward`` of the model's sampled dropout layers, attention modules and multi-layer RNNs (instance
attributes, put back afterwards, also on error) for versions that draw the *same law* faster:

* every element is kept independently with probability ``q = 1 - p`` and kept elements are scaled
  by ``1 / q`` exactly as ``F.dropout`` scales them (the same float of the tensor's dtype);
* the keep decision compares random bits with ``q``: one random byte per element, compared with
  ``floor(256 q)``, and for the 1/256 of elements whose byte equals it, 32 more bits compared with
  the remainder (:func:`_numpy_keep`), so the keep probability is ``q`` to within 2**-40 and
  exactly ``q`` when ``256 q`` is an integer (p = 0.5, 0.25, ...) -- finer than the float32
  resolution of ``q`` itself, and a quarter of the random bits of a 32-bit comparison;
* the random bits come from numpy's SFC64 generator, seeded once per engine call from torch's
  generator (so ``torch.manual_seed`` and mcdrop's ``seed=`` make runs reproducible, and the global
  torch RNG advances by one draw); inside the engine's own :func:`torch.func.vmap` the masks of all
  ``k`` samples are drawn at once and given the vmap's batch dimension; only the engine's first
  (probe) pass and foreign vmaps use SplitMix64 instead, computed with torch integer ops on a
  counter keyed by a seed from ``torch.randint`` (one 8-bit or 32-bit comparison per element, so
  exact for ``256 q`` integer and within 2**-33 otherwise).

``nn.MultiheadAttention`` in train mode gets an attention path that applies this dropout to the
attention weights (the math of ``F.multi_head_attention_forward``; uncommon options fall back to
the original), and a multi-layer ``nn.LSTM``/``nn.GRU`` with inter-layer dropout runs layer by
layer with this dropout in between, computing its first (deterministic) layer once when its input
rows are exact replicas of each other, as they are when the engine replicates a batch.

Nothing here changes results beyond the random draws themselves: outputs are distributed exactly
as with torch's own dropout. On other devices than the CPU the original modules run unchanged.
"""

from __future__ import annotations

import contextlib
import math
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FastContext", "accelerated", "current_context", "dropout", "keep_mask"]

# SplitMix64 (Steele, Lea & Flood 2014): the golden-ratio increment and the two mixing multipliers,
# as signed 64-bit integers.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

#: Below this many mask elements per call, ``F.dropout`` is as fast (fixed costs dominate).
MIN_FAST_ELEMENTS = 2048


@dataclass
class FastContext:
    """State of one engine call, read by the replacement ``forward`` methods.

    Attributes:
        generator: numpy generator for the random words outside vmap (``None``: use SplitMix64).
        hash_only: Draw every mask with SplitMix64 (during the engine's probe pass).
        replicas: How many exact replicas of the batch the current forward pass holds
            (sample-major along the batch dimension), so that a deterministic first RNN layer can
            run once.
        vmap_level: The functorch level of the engine's ``vmap`` over samples while it runs.
        vmap_size: The number of samples of that ``vmap``.
        on_own_draw: Called around the seed draws of this module (the probe does not count them
            as foreign randomness); ``None`` outside the probe.
        enabled: Use the faster paths at all.
    """

    generator: np.random.Generator | None = None
    hash_only: bool = False
    replicas: int = 1
    on_own_draw: Callable[[bool], None] | None = None
    enabled: bool = True
    vmap_level: int | None = None
    vmap_size: int = 0
    patched: list[str] = field(default_factory=list)


_LOCAL = threading.local()


def current_context() -> FastContext | None:
    """The context of the innermost :func:`accelerated` block of this thread, if any."""
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


# --------------------------------------------------------------------------- masks


def _splitmix_words(n_words: int, device: torch.device, ctx: FastContext | None) -> Tensor:
    """``n_words`` random 64-bit words: SplitMix64 outputs at a random position of its sequence.

    The seed comes from ``torch.randint``, so under ``vmap(randomness="different")`` every sample
    gets its own seed and the result is batched.
    """
    if ctx is not None and ctx.on_own_draw is not None:
        ctx.on_own_draw(True)
    try:
        seed = torch.randint(_INT64_MIN, _INT64_MAX, (), dtype=torch.int64, device=device)
    finally:
        if ctx is not None and ctx.on_own_draw is not None:
            ctx.on_own_draw(False)
    z = torch.arange(n_words, dtype=torch.int64, device=device).mul_(_GOLDEN) + seed
    z.bitwise_xor_(torch.bitwise_right_shift(z, 30).bitwise_and_((1 << 34) - 1))
    z.mul_(_MIX1)
    z.bitwise_xor_(torch.bitwise_right_shift(z, 27).bitwise_and_((1 << 37) - 1))
    z.mul_(_MIX2)
    z.bitwise_xor_(torch.bitwise_right_shift(z, 31).bitwise_and_((1 << 33) - 1))
    return z


def _mask_width(q: float) -> int:
    return 8 if (q * 256).is_integer() else 32


def _is_batched(x: Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_batchedtensor(x))
    except AttributeError:  # pragma: no cover - functorch is part of every supported torch
        return False


def _threshold(q: float) -> tuple[int, int, torch.dtype, Any]:
    """Mask width in bits, the comparison threshold and the word dtypes (torch, numpy) for ``q``."""
    width = _mask_width(q)
    threshold = round(q * (1 << width))
    if width == 8:
        return width, threshold, torch.uint8, np.uint8
    return width, min(threshold - (1 << 31), (1 << 31) - 1), torch.int32, np.int32


def _numpy_words(ctx: FastContext, count: int, width: int, np_dtype: Any) -> np.ndarray:
    """The next ``count`` ``width``-bit words of the context's SFC64 stream."""
    per_word = 64 // width
    raw = ctx.generator.bit_generator.random_raw((count + per_word - 1) // per_word)  # type: ignore[union-attr]
    return raw.view(np_dtype)[:count]


def _numpy_keep(ctx: FastContext, count: int, q: float, out: np.ndarray | None = None) -> np.ndarray:
    """``count`` independent Bernoulli(``q``) draws (a bool array) from the context's SFC64 stream.

    One random byte per element decides unless it equals ``t = floor(256 q)``: below ``t`` keeps,
    above drops, and the 1/256 of elements that tie compare 32 more random bits with the
    remainder ``256 q - t``. The keep probability is ``q`` to within 2**-40 (exactly ``q`` when
    ``256 q`` is an integer), at about a quarter of the random bits of a 32-bit comparison.
    """
    words = _numpy_words(ctx, count, 8, np.uint8)
    scaled = q * 256
    low = math.floor(scaled)
    keep = np.less(words, low, out=out)
    remainder = scaled - low
    if remainder > 0:
        ties = np.flatnonzero(words == low)
        if ties.size:
            extra = _numpy_words(ctx, int(ties.size), 32, np.uint32)
            keep[ties] = extra < min(round(remainder * 2**32), 2**32 - 1)
    return keep


def _numpy_mode(x: Tensor, ctx: FastContext | None) -> str | None:
    """``"plain"``, ``"vmap"`` (the engine's own vmap over samples) or ``None`` (use SplitMix64)."""
    if ctx is None or ctx.generator is None or ctx.hash_only or x.device.type != "cpu":
        return None
    functorch = torch._C._functorch
    level = functorch.maybe_current_level()
    if level is None:
        return None if _is_batched(x) else "plain"
    if (
        level == ctx.vmap_level
        and ctx.vmap_size > 0
        and (not _is_batched(x) or functorch.maybe_get_level(x) == level)
    ):
        return "vmap"
    return None


def _vmap_keep(x: Tensor, q: float, ctx: FastContext) -> Tensor:
    """The keep mask (in ``x``'s dtype) for every sample of the engine's vmap, as a batched tensor.

    The physical ``(k, *x.shape)`` mask is drawn from the numpy words like outside vmap and given
    the vmap's batch dimension (``k`` different masks, one per sample).
    """
    k = ctx.vmap_size
    keep = torch.from_numpy(_numpy_keep(ctx, k * x.numel(), q))
    keep = keep.view(torch.uint8).to(x.dtype).view(k, *x.shape)
    return torch._C._functorch._add_batch_dim(keep, 0, ctx.vmap_level)


def keep_mask(x: Tensor, q: float, ctx: FastContext | None = None) -> Tensor:
    """A boolean tensor shaped like ``x``: each element independently True with probability ``q``.

    Args:
        x: The tensor to be masked (only its shape and device are used).
        q: Keep probability, in ``(0, 1)``.
        ctx: The engine's context (numpy generator, probe hooks); ``None`` uses SplitMix64.

    Returns:
        The mask (batched like the current vmap level when called inside one).
    """
    n = x.numel()
    if _numpy_mode(x, ctx) == "plain":
        assert ctx is not None
        return torch.from_numpy(_numpy_keep(ctx, n, q)).view(x.shape)
    width, threshold, dtype, _ = _threshold(q)
    per_word = 64 // width
    words = _splitmix_words((n + per_word - 1) // per_word, x.device, ctx).view(dtype)
    if words.shape[-1] != n:
        words = words.narrow(-1, 0, n)
    return (words < threshold).view(x.shape)


_SCALES: dict[tuple[torch.dtype, float], float] = {}


def _scale(x: Tensor, q: float) -> float:
    """``1 / q`` rounded to ``x``'s dtype, as ``F.dropout`` computes its scale."""
    key = (x.dtype, q)
    scale = _SCALES.get(key)
    if scale is None:
        if len(_SCALES) > 256:
            _SCALES.clear()
        scale = _SCALES[key] = float(torch.ones((), dtype=x.dtype).div_(q))
    return scale


#: Elements per block of the blocked CPU path (its scratch buffers stay in the L2 cache).
BLOCK_ELEMENTS = 1 << 19


def dropout(x: Tensor, p: float, inplace: bool = False, ctx: FastContext | None = None) -> Tensor:
    """Inverted dropout (train mode) with the faster masks, falling back to ``F.dropout``.

    The fallback (the same law) is taken where the fast paths do not apply: small tensors, other
    devices, rates 0 and 1, and inputs that autograd records (``x.requires_grad`` with grad mode
    on, as in a model that differentiates inside its ``forward``): the blocked path's ``out=``
    products have no backward.

    Args:
        x: Input tensor.
        p: Drop probability.
        inplace: Overwrite ``x``.
        ctx: The engine's context (``None``: the thread's current one).

    Returns:
        ``x`` with each element zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)``.
    """
    ctx = current_context() if ctx is None else ctx
    if (
        ctx is None
        or not ctx.enabled
        or not (0.0 < p < 1.0)
        or not x.is_floating_point()
        or x.device.type != "cpu"
        or x.is_nested
        or x.numel() < MIN_FAST_ELEMENTS
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        if ctx is not None and ctx.on_own_draw is not None:
            ctx.on_own_draw(True)  # torch's own draws, but made for a dropout site mcdrop manages
            try:
                return F.dropout(x, p, True, inplace)
            finally:
                ctx.on_own_draw(False)
        return F.dropout(x, p, True, inplace)
    q = 1.0 - p
    scale = _scale(x, q)
    mode = _numpy_mode(x, ctx)
    if mode == "plain" and (x.is_contiguous() or not inplace):
        return _blocked_dropout(x, q, scale, ctx, inplace)  # type: ignore[arg-type]
    if mode == "vmap" and not inplace:
        return (x * _vmap_keep(x, q, ctx)).mul_(scale)  # type: ignore[arg-type]
    # bool -> uint8 (a free view) -> x's dtype is a fast conversion; multiplying by a bool tensor
    # directly makes torch promote it through a slow path (several times the cost of the rest).
    keep = keep_mask(x, q, ctx).view(torch.uint8).to(x.dtype)
    if inplace:
        return x.mul_(keep).mul_(scale)
    return (x * keep).mul_(scale)


def _blocked_dropout(x: Tensor, q: float, scale: float, ctx: FastContext, inplace: bool) -> Tensor:
    """The numpy-word path, a cache-sized block at a time (same words, same order as unblocked).

    Masks and their float conversion live in scratch buffers reused across blocks, so besides the
    output nothing large is allocated: on the CPU, fresh large allocations (page faults) and extra
    passes over memory cost more than the arithmetic.
    """
    src = x.contiguous().view(-1)
    out = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dst = out.view(-1)
    n = src.numel()
    block = min(BLOCK_ELEMENTS, n)
    keep = torch.empty(block, dtype=torch.bool)
    keep_np = keep.numpy()  # the same memory: numpy compares, torch converts and multiplies
    keep_f = torch.empty(block, dtype=x.dtype)
    for start in range(0, n, block):
        stop = min(start + block, n)
        m = stop - start
        _numpy_keep(ctx, m, q, out=keep_np[:m])
        kf = keep_f[:m]
        kf.copy_(keep[:m].view(torch.uint8))
        torch.mul(src[start:stop], kf, out=dst[start:stop]).mul_(scale)
    return out


# --------------------------------------------------------------------------- replacement forwards


def _dropout_forward(self: nn.Module, input: Tensor) -> Tensor:
    return dropout(input, float(self.p), bool(self.inplace))


def _mha_forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    original = type(self).forward
    supported = (
        self.training
        and self.dropout > 0.0
        and query.dim() == 3
        and not query.is_nested
        and query.device.type == "cpu"
        and self._qkv_same_embed_dim
        and self.in_proj_weight is not None
        and self.bias_k is None
        and self.bias_v is None
        and not self.add_zero_attn
        and not (is_causal and attn_mask is None)
    )
    if not supported:
        return original(
            self,
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
    return attention_forward(
        self,
        query,
        key,
        value,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        drop=lambda t: dropout(t, float(self.dropout)),
    )


def attention_forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    drop: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention with a pluggable dropout on the attention weights.

    The math of ``F.multi_head_attention_forward`` for batched inputs with a packed in-projection
    and no ``bias_k``/``bias_v``/``add_zero_attn``: softmax of the scaled scores plus the merged
    masks (a safe softmax, zero on fully masked rows, when the weights are not returned, as
    ``F.scaled_dot_product_attention`` does), ``drop`` on the weights, then the value product and
    the out-projection. The returned weights are the dropped ones, as torch returns them.
    """
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    bsz, tgt_len, embed = query.shape
    src_len = key.shape[1]
    heads = self.num_heads
    head_dim = embed // heads
    weight, bias = self.in_proj_weight, self.in_proj_bias
    if query is key and key is value:
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:
        w_q, w_k, w_v = weight.chunk(3)
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q = q.reshape(bsz, tgt_len, heads, head_dim).transpose(1, 2)
    k = k.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
    v = v.reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=q.dtype,
        check_other=False,
    )
    scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores + (
            attn_mask.view(bsz, heads, tgt_len, src_len) if attn_mask.dim() == 3 else attn_mask
        )
    if key_padding_mask is not None:
        scores = scores + key_padding_mask.view(bsz, 1, 1, src_len)
    masked = attn_mask is not None or key_padding_mask is not None
    if masked and not need_weights and hasattr(torch, "_safe_softmax"):
        weights = torch._safe_softmax(scores, -1)
    else:
        weights = torch.softmax(scores, -1)
    weights = drop(weights)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(bsz, tgt_len, embed)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
    if not self.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, (weights.mean(1) if average_attn_weights else weights)


def _rnn_forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
    original = type(self).forward
    supported = (
        isinstance(input, Tensor)
        and input.dim() == 3
        and input.device.type == "cpu"
        and self.training
        and self.dropout > 0.0
        and self.num_layers > 1
        and getattr(self, "proj_size", 0) == 0
    )
    if not supported:
        return original(self, input, hx)
    return rnn_layers_forward(self, input, hx, drop=lambda t: dropout(t, float(self.dropout)))


def rnn_layers_forward(
    self: nn.RNNBase, input: Tensor, hx: Any, *, drop: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Any]:
    """A multi-layer ``nn.LSTM``/``nn.GRU`` run layer by layer with ``drop`` between layers.

    When the engine's current pass holds ``k`` exact replicas of a batch and the input rows are
    indeed ``k`` identical blocks (checked), the first layer, which no dropout precedes, runs on
    one block and its outputs are repeated.
    """
    is_lstm = isinstance(self, nn.LSTM)
    layers, dirs, hidden = self.num_layers, 2 if self.bidirectional else 1, self.hidden_size
    batch_dim = 0 if self.batch_first else 1
    rows = input.shape[batch_dim]
    if hx is None:
        zeros = input.new_zeros(layers * dirs, rows, hidden)
        hx = (zeros, zeros) if is_lstm else zeros
    per_layer = len(self._flat_weights) // layers
    ctx = current_context()
    replicas = ctx.replicas if ctx is not None else 1
    dedup = replicas > 1 and rows % replicas == 0 and _is_replicated(input, hx, replicas, batch_dim, is_lstm)
    out = input
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    for layer in range(layers):
        weights = self._flat_weights[layer * per_layer : (layer + 1) * per_layer]
        sl = slice(layer * dirs, (layer + 1) * dirs)
        h0 = hx[0][sl] if is_lstm else hx[sl]
        c0 = hx[1][sl] if is_lstm else None
        inp = out
        block = rows // replicas if (dedup and layer == 0) else rows
        if block != rows:
            inp = inp.narrow(batch_dim, 0, block)
            h0 = h0.narrow(1, 0, block)
            c0 = c0.narrow(1, 0, block) if c0 is not None else None
        if is_lstm:
            out, h, c = torch._VF.lstm(
                inp, (h0, c0), weights, self.bias, 1, 0.0, False, self.bidirectional, self.batch_first
            )
        else:
            out, h = torch._VF.gru(
                inp, h0, weights, self.bias, 1, 0.0, False, self.bidirectional, self.batch_first
            )
            c = None
        if block != rows:
            reps = [1] * out.dim()
            reps[batch_dim] = replicas
            out = out.repeat(*reps)
            h = h.repeat(1, replicas, 1)
            c = c.repeat(1, replicas, 1) if c is not None else None
        h_n.append(h)
        if c is not None:
            c_n.append(c)
        if layer < layers - 1:
            out = drop(out)
    if is_lstm:
        return out, (torch.cat(h_n, 0), torch.cat(c_n, 0))
    return out, torch.cat(h_n, 0)


def _is_replicated(input: Tensor, hx: Any, k: int, batch_dim: int, is_lstm: bool) -> bool:
    """True if ``input`` (and ``hx``) are ``k`` identical blocks along the batch dimension."""
    if _is_batched(input):
        return False

    def same(t: Tensor, dim: int) -> bool:
        shape = list(t.shape)
        blocks = t.reshape(*shape[:dim], k, shape[dim] // k, *shape[dim + 1 :])
        first = blocks.narrow(dim, 0, 1)
        return bool(torch.equal(blocks.narrow(dim, 1, k - 1), first.expand_as(blocks.narrow(dim, 1, k - 1))))

    if not same(input, batch_dim):
        return False
    states = hx if is_lstm else (hx,)
    return all(same(s, 1) for s in states)


# --------------------------------------------------------------------------- patching


def _replacement(module: nn.Module) -> Callable[..., Any] | None:
    cls = type(module)
    if isinstance(module, torch.jit.ScriptModule) or "forward" in module.__dict__:
        return None
    if isinstance(module, nn.Dropout) and cls.forward is nn.Dropout.forward:
        return _dropout_forward
    mcdrop_dropout = _mcdrop_dropout_class()
    if (
        mcdrop_dropout is not None
        and isinstance(module, mcdrop_dropout)
        and cls.forward is mcdrop_dropout.forward
    ):
        return _dropout_forward
    if isinstance(module, nn.MultiheadAttention) and cls.forward is nn.MultiheadAttention.forward:
        return _mha_forward
    if isinstance(module, (nn.LSTM, nn.GRU)) and cls.forward in (nn.LSTM.forward, nn.GRU.forward):
        return _rnn_forward
    return None


def _mcdrop_dropout_class() -> type[nn.Module] | None:
    try:
        from mcdrop.nn import Dropout
    except ImportError:  # pragma: no cover - part of the package
        return None
    return Dropout


@contextlib.contextmanager
def accelerated(model: nn.Module, *, seed: int | None = None, enabled: bool = True) -> Iterator[FastContext]:
    """Swap in the faster ``forward`` of the model's train-mode dropout sites, then put them back.

    Only modules in train mode are touched (call this inside the policy's ``activate``), only on
    the CPU do the replacements change anything, and a module whose instance already carries its
    own ``forward`` is left alone.

    Args:
        model: The model being sampled.
        seed: Seed of the numpy generator for the masks; ``None`` uses SplitMix64 only.
        enabled: ``False`` yields a context that changes nothing (for comparisons).

    Yields:
        The :class:`FastContext` the replacements read.
    """
    ctx = FastContext(
        generator=None if seed is None else np.random.Generator(np.random.SFC64(seed)), enabled=enabled
    )
    patched: list[nn.Module] = []
    if enabled and type(model).__name__ != "OptimizedModule":
        for name, module in model.named_modules():
            if not module.training:
                continue
            fn = _replacement(module)
            if fn is not None:
                module.forward = types.MethodType(fn, module)
                patched.append(module)
                ctx.patched.append(name or "<model>")
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()
        for module in patched:
            module.__dict__.pop("forward", None)
