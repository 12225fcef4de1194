"""The sampling engine: N stochastic forward passes drawn in batch, in chunks, on the model's device.

Three ways to draw ``k`` samples of a batch of ``b`` rows in one go (:data:`STRATEGIES`):

* ``"vmap"`` -- :func:`torch.func.vmap` with ``randomness="different"`` over ``k`` samples, closing
  over the unreplicated inputs. Whatever precedes the first random draw (the deterministic trunk:
  a CNN's convolutions before a dropout head, an MLP's first layer) runs once at batch size ``b``;
  only what depends on a draw runs for the ``k`` samples. Works on arbitrary ``forward`` code as
  long as its operations have batching rules.
* ``"replicate"`` -- the inputs repeated ``k`` times along their batch dimension (sample-major rows
  ``s * b + i``), one pass of ``k * b`` rows; dropout masks are drawn independently per row.
* ``"loop"`` -- one pass per sample, for models that only take their own batch size.

``"auto"`` observes the first pass (:mod:`mcdrop._probe`) and chooses, trying vmap first when it
pays, checking that it draws fresh randomness for every sample, and falling back to replication,
then to the loop; reasons are logged at DEBUG level on the ``mcdrop.sampling`` logger. Chunks are
sized from the input, output and activation sizes (or ``max_batch_size``) and each is handed to the
caller as a samples-first tensor ``(k, b, ...)`` to be reduced to running statistics at once
(:mod:`mcdrop._statistics`), so memory does not grow with N. On the CPU, dropout masks are drawn by
the faster (same-law) paths of :mod:`mcdrop._fastdropout`.

Everything here is private to mcdrop; the public face is :class:`mcdrop.MCDropout`.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import logging
import math
import random
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mcdrop._checks import check_choice, user_stacklevel
from mcdrop.engine.fastdropout import FastContext, accelerated
from mcdrop.engine.checks import (
    CHECK_QUANTILES,
    CHECK_ROWS,
    NoRandomness,
    cuda_devices,
    eager_module,
    rng_untouched,
)
from mcdrop.engine.probe import (
    PeakBytesMode,
    ProbeMode,
    ProbeReport,
    RngState,
    rng_restore,
    rng_snapshot,
    unmetered,
)
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropError,
    NonFiniteError,
    RowCheckWarning,
    UnsupportedModelError,
)

OutputSelector = Callable[[Any], Any] | str | int | None

#: Default bound on the number of activation bytes one forward pass may touch, for choosing chunk
#: sizes automatically (inputs and outputs times a safety factor for intermediate activations).
DEFAULT_MEMORY_BUDGET = 256 * 2**20
_ACTIVATION_FACTOR = 16
#: Margin on a measured peak (tensor storage of an observed pass, per row) when sizing passes.
_PEAK_MARGIN = 1.25
#: Extra margin on the peak of the row check's pass, which ran with dropout as the identity (a
#: sampling pass also holds the masks and the dropped copies).
CHECK_MARGIN = 2.0


def model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Return the device of the model's first parameter or buffer, and its floating dtype."""
    device = None
    dtype = None
    for tensor in _model_tensors(model):
        if device is None:
            device = tensor.device
        if dtype is None and tensor.is_floating_point():
            dtype = tensor.dtype
        if device is not None and dtype is not None:
            break
    return device, dtype


def _model_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


@dataclass
class Inputs:
    """Positional and keyword inputs of one call, with the batch dimension of every tensor leaf."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    batch_size: int
    dims: dict[tuple[Any, ...], int | None]

    def map(
        self, fn: Callable[[torch.Tensor, int], torch.Tensor], *, fresh: bool = False
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Apply ``fn(tensor, batch_dim)`` to every batched tensor leaf.

        With ``fresh`` (the inputs of one forward pass), the other leaves that the model could
        change in place are copies too: tensors that are not batched are cloned, and mutable
        objects (see :func:`is_plain_value`), such as a Hugging Face ``DynamicCache``, are deep
        copies, made with one memo per call, so objects shared between leaves stay shared within
        the pass. ``fn`` should then copy the batched tensors as well.
        """
        memo: dict[int, Any] = {}

        def visit(obj: Any, path: tuple[Any, ...]) -> Any:
            if isinstance(obj, torch.Tensor):
                dim = self.dims.get(path)
                if dim is None:
                    if not fresh:
                        return obj
                    with unmetered():  # one copy per pass, whatever its rows: not a row's memory
                        return obj.clone()
                return fn(obj, dim)
            if isinstance(obj, Mapping):
                return {k: visit(v, (*path, k)) for k, v in obj.items()}
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):
                return type(obj)(*(visit(v, (*path, i)) for i, v in enumerate(obj)))
            if isinstance(obj, (list, tuple)):
                return type(obj)(visit(v, (*path, i)) for i, v in enumerate(obj))
            if fresh and not is_plain_value(obj):
                with unmetered():
                    return fresh_copy(obj, path, memo)
            return obj

        args = tuple(visit(a, (i,)) for i, a in enumerate(self.args))
        kwargs = {k: visit(v, (k,)) for k, v in self.kwargs.items()}
        return args, kwargs


#: How to read, set and seed a random generator's state.
_GeneratorHandlers = tuple[Callable[[Any], Any], Callable[[Any, Any], None], Callable[[Any, int], None]]

#: The random generators a model may take as inputs, passed to every forward pass by reference
#: (see :func:`is_plain_value`), and their handlers (:func:`input_generators_untouched`).
_GENERATOR_STATE: dict[type, _GeneratorHandlers] = {
    torch.Generator: (
        lambda g: g.get_state(),
        lambda g, s: g.set_state(s),
        lambda g, seed: g.manual_seed(seed),
    ),
    np.random.Generator: (
        lambda g: g.bit_generator.state,
        lambda g, s: setattr(g.bit_generator, "state", s),
        lambda g, seed: setattr(g.bit_generator, "state", type(g.bit_generator)(seed).state),
    ),
    np.random.RandomState: (
        lambda g: g.get_state(),
        lambda g, s: g.set_state(s),
        lambda g, seed: g.seed(seed),
    ),
    random.Random: (lambda g: g.getstate(), lambda g, s: g.setstate(s), lambda g, seed: g.seed(seed)),
}
_GENERATOR_TYPES = tuple(_GENERATOR_STATE)

#: Leaf types handed to every forward pass as they are: values that cannot change, and code.
_PLAIN_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    range,
    slice,
    type(Ellipsis),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    enum.Enum,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    functools.partial,
    nn.Module,
    *_GENERATOR_TYPES,
)


def is_plain_value(obj: Any) -> bool:
    """Whether a non-tensor input leaf can be handed to every forward pass as it is.

    True for values no pass can change (``None``, numbers, strings, bytes, ``torch.dtype`` and
    ``torch.device``, enums, ...) and for code (functions, methods, classes, ``functools.partial``)
    and modules (``nn.Module``, whose parameters a copy per pass would duplicate), and random
    generators (``torch.Generator``, numpy's and Python's: a copy per pass would draw the same
    numbers in every pass), which are passed by reference. Any other object (a Hugging Face ``DynamicCache``, a numpy array,
    a user object) may be changed in place by the model, so every pass gets its own deep copy.
    Tuples, lists and dicts are not leaves: mcdrop walks into them.
    """
    return isinstance(obj, _PLAIN_TYPES)


def fresh_copy(obj: Any, path: tuple[Any, ...], memo: dict[int, Any] | None = None) -> Any:
    """A deep copy of the mutable input leaf ``obj`` at ``path``, for one forward pass.

    Raises:
        InvalidInputError: ``obj`` cannot be deep-copied.
    """
    try:
        return copy.deepcopy(obj, memo)
    except Exception as err:  # noqa: BLE001 - whatever the object's copy raises, say which input
        raise InvalidInputError(
            f"{_path_name(path)} is a {type(obj).__name__}, a mutable object that cannot be deep-copied "
            f"({type(err).__name__}: {err}). mcdrop gives every forward pass (checks, probe, each MC "
            "sample) its own copy of such an input, because a model may change it in place (a Hugging "
            "Face cache grows with every pass); without a copy every pass would share, and change, "
            "the same object, and yours. Pass an object that copy.deepcopy can copy (e.g. a cache built "
            "under torch.no_grad(), whose tensors are graph leaves), or pass tensors instead."
        ) from err


def _leaves(obj: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _objects(
    obj: Any, path: tuple[Any, ...], wanted: Callable[[Any], bool] | None = None
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """The leaves of ``obj`` that are neither tensors nor plain values (see :func:`is_plain_value`).

    With ``wanted``: the non-tensor leaves it accepts.
    """
    if isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _objects(v, (*path, k), wanted)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _objects(v, (*path, i), wanted)
    elif wanted(obj) if wanted is not None else not is_plain_value(obj):
        yield path, obj


def _is_generator(obj: Any) -> bool:
    return isinstance(obj, _GENERATOR_TYPES)


def _generator_state(g: Any) -> _GeneratorHandlers:
    """How to read, set and seed the state of the random generator ``g``."""
    return next(handlers for kind, handlers in _GENERATOR_STATE.items() if isinstance(g, kind))


@contextlib.contextmanager
def input_generators_untouched(inputs: Inputs, seed: int | None = None) -> Iterator[None]:
    """Put the random generators given as inputs (torch's, numpy's, Python's) back as they were.

    For the check passes, which are not samples: only the sampling passes advance a generator the
    caller passed to the model (by reference, see :func:`is_plain_value`). With ``seed``, they
    draw from that seed meanwhile, as :func:`~mcdrop._gatecheck.rng_untouched` makes the global
    generators do: passes from one seed draw alike, passes from two seeds differ.
    """
    found = [g for _, g in _object_leaves(inputs.args, inputs.kwargs, _is_generator)]
    handlers = [_generator_state(g) for g in found]
    states = [get(g) for g, (get, _, _) in zip(found, handlers, strict=True)]
    try:
        if seed is not None:
            for g, (_, _, reseed) in zip(found, handlers, strict=True):
                reseed(g, seed)
        yield
    finally:
        for g, (_, put, _), state in zip(found, handlers, states, strict=True):
            put(g, state)


def _object_leaves(
    args: tuple[Any, ...], kwargs: dict[str, Any], wanted: Callable[[Any], bool] | None = None
) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, object)`` for every leaf of the inputs that is neither a tensor nor a plain value.

    With ``wanted``: every non-tensor leaf it accepts.
    """
    found = [(p, o) for i, a in enumerate(args) for p, o in _objects(a, (i,), wanted)]
    return found + [(p, o) for k, v in kwargs.items() for p, o in _objects(v, (k,), wanted)]


def _holds_batch(obj: Any, batch: int, depth: int = 0, seen: set[int] | None = None) -> bool:
    """Whether ``obj`` (a cache, walked a few attributes deep) holds a tensor of ``batch`` rows."""
    seen = set() if seen is None else seen
    if depth > 5 or id(obj) in seen or len(seen) > 10_000:
        return False
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.dim() > 0 and obj.shape[0] == batch
    if isinstance(obj, Mapping):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__") and not is_plain_value(obj):
        children = vars(obj).values()
    else:
        return False
    return any(_holds_batch(c, batch, depth + 1, seen) for c in children)


@contextlib.contextmanager
def split_errors_named(inputs: Inputs, max_batch_size: int | None) -> Iterator[None]:
    """Re-raise a model's failure on a split batch as the input object it no longer matches.

    With ``max_batch_size`` below the batch size the tensor inputs are split, but an object (a KV
    cache) is given whole to every pass; if it holds tensors of the batch's rows, a failure of the
    model on a part is that mismatch: an :class:`~mcdrop.errors.InvalidInputError` names it.
    Anything else (mcdrop's own errors, out-of-memory errors, other objects) passes as it is.
    """
    try:
        yield
    except (RuntimeError, ValueError, IndexError) as err:
        batch = inputs.batch_size
        if (
            max_batch_size is None
            or max_batch_size >= batch
            or isinstance(err, (McdropError, torch.OutOfMemoryError))
        ):
            raise
        objects = [(p, o) for p, o in _object_leaves(inputs.args, inputs.kwargs) if _holds_batch(o, batch)]
        if not objects:
            raise
        named = ", ".join(f"{_path_name(p)} ({type(o).__name__})" for p, o in objects[:3])
        raise InvalidInputError(
            f"the model failed on a part of the batch ({type(err).__name__}: {err}). With "
            f"max_batch_size={max_batch_size} the {batch} input rows are split into passes of at most "
            f"{max_batch_size}, but {named} is not a tensor and is given whole to every pass, never "
            f"split, and it holds tensors of {batch} rows (a KV cache does), which no longer match the "
            "rows of a pass. Pass max_batch_size >= the batch size (or None), or feed smaller batches "
            "with their own cache."
        ) from err


def _path_name(path: tuple[Any, ...]) -> str:
    head, *rest = path
    text = f"argument {head}" if isinstance(head, int) else f"keyword {head!r}"
    for p in rest:
        text += f"[{p!r}]"
    return text


def _dim_for(path: tuple[Any, ...], batch_dim: int | Mapping[Any, int | None]) -> int | None:
    """The batch dim of the leaf at ``path``.

    String keys name keywords or dict keys (innermost first); int keys name positional arguments
    only (never list elements).
    """
    if isinstance(batch_dim, Mapping):
        for key in reversed(path):
            if isinstance(key, str) and key in batch_dim:
                return batch_dim[key]
        if isinstance(path[0], int) and path[0] in batch_dim:
            return batch_dim[path[0]]
        return batch_dim.get("*", 0)
    return batch_dim


def prepare_inputs(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    batch_dim: int | Mapping[Any, int | None],
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> Inputs:
    """Move tensor inputs to the model's device and floating dtype, and check their batch sizes.

    ``batch_dim`` is one int for every tensor, or a mapping from keyword/dict-key names or
    positional indices to a dim, with ``None`` marking a tensor that is not batched (shared by all
    rows, like an attention mask of shape ``(T, T)``) and ``"*"`` the default for the rest.

    Other leaves that are mutable objects (a Hugging Face ``DynamicCache``) are kept as they are and
    deep-copied for every forward pass (:meth:`Inputs.map` with ``fresh``), never handed to
    the model themselves; one copy is tried here, so an object that cannot be copied is refused
    before any pass runs (:class:`~mcdrop.errors.InvalidInputError`).
    """
    for path, obj in _object_leaves(args, kwargs):
        fresh_copy(obj, path)
    leaves = [(p, t) for i, a in enumerate(args) for p, t in _leaves(a, (i,))]
    leaves += [(p, t) for k, v in kwargs.items() for p, t in _leaves(v, (k,))]
    if not leaves:
        raise InvalidInputError(
            "No tensor among the inputs: MC dropout needs at least one batched tensor to replicate. "
            "Pass the model's inputs as tensors (positional, keyword, or a dict of tensors)."
        )
    dims: dict[tuple[Any, ...], int | None] = {}
    sizes: dict[tuple[Any, ...], int] = {}
    for path, tensor in leaves:
        if tensor.device.type == "meta":
            raise InvalidInputError(
                f"{_path_name(path)} is on the 'meta' device: it has a shape but no values, so there is "
                "nothing to sample. Pass real tensors (on the CPU or the model's device)."
            )
        dim = _dim_for(path, batch_dim)
        if dim is None:
            dims[path] = None
            continue
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise InvalidTypeError(f"batch_dim for {_path_name(path)} must be an int or None; got {dim!r}.")
        if tensor.dim() == 0:
            raise InvalidInputError(
                f"{_path_name(path)} is a 0-d tensor, so it has no batch dimension {dim}. Mark it as "
                "not batched with batch_dim={name: None}, or give it a batch dimension."
            )
        if not -tensor.dim() <= dim < tensor.dim():
            raise InvalidInputError(
                f"batch_dim={dim} is out of range for {_path_name(path)} of shape {tuple(tensor.shape)}."
            )
        dims[path] = dim % tensor.dim()
        sizes[path] = tensor.shape[dim]
    if not sizes:
        raise InvalidInputError("Every tensor input is marked as not batched; at least one must be batched.")
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{_path_name(p)}: {s}" for p, s in sizes.items())
        raise InvalidInputError(
            f"Inputs disagree on the batch size ({listing}). Every batched input must have the same "
            "size along its batch dimension; mark shared tensors (e.g. an attention mask of shape "
            "(T, T)) as not batched with batch_dim={'name': None, '*': 0}."
        )
    batch_size = distinct.pop()
    if batch_size == 0:
        raise InvalidInputError("The batch is empty (batch size 0): there is nothing to predict.")

    def convert(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            target_dtype = dtype if (dtype is not None and obj.is_floating_point()) else obj.dtype
            if device is not None or target_dtype != obj.dtype:
                return obj.to(device=device if device is not None else obj.device, dtype=target_dtype)
            return obj
        if isinstance(obj, Mapping):
            return {k: convert(v) for k, v in obj.items()}
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(convert(v) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(convert(v) for v in obj)
        return obj

    converted = Inputs(
        args=tuple(convert(a) for a in args),
        kwargs={k: convert(v) for k, v in kwargs.items()},
        batch_size=batch_size,
        dims=dims,
    )
    # Checked after the cast to the model's dtype too, so a float64 value that overflows float32 is caught.
    after = [(p, t) for i, a in enumerate(converted.args) for p, t in _leaves(a, (i,))]
    after += [(p, t) for k, v in converted.kwargs.items() for p, t in _leaves(v, (k,))]
    for (path, original), (_, cast) in zip(leaves, after, strict=True):
        _check_finite_input(path, original, cast)
    return converted


def _check_finite_input(path: tuple[Any, ...], original: torch.Tensor, cast: torch.Tensor) -> None:
    """Refuse NaN and +inf, and values the cast to the model's dtype overflowed; allow -inf.

    ``-inf`` is what additive attention masks hold where attention is not allowed (e.g.
    ``nn.Transformer.generate_square_subsequent_mask``); a ``-inf`` that makes outputs NaN or +inf
    is refused on the outputs.
    """
    if not cast.is_floating_point() or bool(torch.isfinite(cast).all()):
        return
    if bool(torch.isnan(cast).any()) or bool((cast == float("inf")).any()):
        raise NonFiniteError(
            f"{_path_name(path)} contains NaN or +infinity (after casting to the model's dtype "
            f"{cast.dtype}); inputs must be finite, or -inf where an additive mask blocks a position."
        )
    created = (cast == float("-inf")) & ~(original.to(cast.device) == float("-inf"))
    if bool(created.any()):
        raise NonFiniteError(
            f"{_path_name(path)} holds values beyond the range of the model's dtype {cast.dtype}: "
            f"casting them from {original.dtype} made them -infinity. Scale the inputs, or run the "
            "model in a wider dtype."
        )


def holds_objects(inputs: Inputs) -> bool:
    """Whether some input leaf is a mutable non-tensor object, such as a KV cache.

    Such an object is given whole (a fresh copy) to every pass, never sliced or replicated.
    """
    return bool(_object_leaves(inputs.args, inputs.kwargs))


def input_bytes_per_row(inputs: Inputs) -> int:
    """Bytes one batch row occupies across all batched tensor inputs."""
    total = 0
    for i, a in enumerate(inputs.args):
        for path, t in _leaves(a, (i,)):
            if inputs.dims.get(path) is not None:
                total += t.numel() * t.element_size() // max(inputs.batch_size, 1)
    for k, v in inputs.kwargs.items():
        for path, t in _leaves(v, (k,)):
            if inputs.dims.get(path) is not None:
                total += t.numel() * t.element_size() // max(inputs.batch_size, 1)
    return max(total, 1)


def slice_batch(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Rows ``start:stop`` of every batched input."""
    if start == 0 and stop == inputs.batch_size:
        return inputs
    args, kwargs = inputs.map(lambda t, d: t.narrow(d, start, stop - start))
    return Inputs(args, kwargs, stop - start, inputs.dims)


def replicate(inputs: Inputs, k: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat every batched input ``k`` times along its batch dim, sample-major (``s * b + i``).

    The result is the input of one forward pass, and a copy of every input the model could change
    in place: with ``k == 1`` the batched tensors are clones, tensors that are not batched are
    clones and mutable objects deep copies (see :meth:`Inputs.map`), so a model that changes an
    input (an in-place op on it, a Hugging Face cache it appends to) changes neither the caller's
    input nor what the other passes see.
    """
    if k == 1:
        # A copy all the same: a model that modifies its input in place (e.g. an in-place dropout
        # on the input) must neither change the caller's tensors nor compound across passes.
        return inputs.map(lambda t, d: t.clone(), fresh=True)

    def rep(t: torch.Tensor, d: int) -> torch.Tensor:
        shape = list(t.shape)
        expanded = t.unsqueeze(d).expand(*shape[:d], k, *shape[d:])
        return expanded.reshape(*shape[:d], k * shape[d], *shape[d + 1 :])

    return inputs.map(rep, fresh=True)


def select_output(out: Any, output: OutputSelector, pair: bool) -> Any:
    """Pick the tensor (or ``(mean, variance)`` pair when ``pair``) to analyse from a model output."""
    if callable(output):
        chosen = output(out)
    elif output is None:
        chosen = _auto_output(out, pair)
    elif isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            chosen = out[output]
        elif hasattr(out, output):
            chosen = getattr(out, output)
        else:
            raise InvalidInputError(
                f"output={output!r}: the model output ({type(out).__name__}) has no key or attribute "
                f"{output!r}. Available: {_describe_keys(out)}."
            )
    elif isinstance(output, int) and not isinstance(output, bool):
        if not isinstance(out, Sequence) or isinstance(out, (str, bytes)):
            raise InvalidInputError(
                f"output={output}: the model output is a {type(out).__name__}, not a tuple."
            )
        if not -len(out) <= output < len(out):
            raise InvalidInputError(f"output={output}: the model returned only {len(out)} outputs.")
        chosen = out[output]
    else:
        raise InvalidTypeError(
            f"output must be None, a key/attribute name, a tuple index or a callable; got {output!r}."
        )
    if pair:
        if isinstance(chosen, torch.Tensor):
            if chosen.shape[-1] % 2:
                raise InvalidInputError(
                    "A heteroscedastic model must output (mean, variance): a pair of tensors, or one "
                    f"tensor whose last dim holds both halves; got one tensor of shape {tuple(chosen.shape)} "
                    "with an odd last dim."
                )
            return tuple(chosen.chunk(2, dim=-1))
        if (
            isinstance(chosen, (tuple, list))
            and len(chosen) == 2
            and all(isinstance(c, torch.Tensor) for c in chosen)
        ):
            return tuple(chosen)
        raise InvalidInputError(
            "A heteroscedastic model must output (mean, variance) as a pair of tensors; got "
            f"{type(chosen).__name__}. Use output= to pick them."
        )
    if not isinstance(chosen, torch.Tensor):
        raise InvalidInputError(
            f"The selected model output is a {type(chosen).__name__}, not a tensor. Pass output= (a key, "
            "an index or a callable) to pick the tensor to analyse."
        )
    return chosen


def _auto_output(out: Any, pair: bool) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out:
        if pair and len(out) == 2:
            return out
        return out[0]
    if isinstance(out, Mapping) and len(out) == 1:
        return next(iter(out.values()))
    raise InvalidInputError(
        f"Cannot tell which part of the model output ({type(out).__name__}: {_describe_keys(out)}) to "
        "analyse. Pass output= with a key, an index or a callable, e.g. output=lambda o: o['scores']."
    )


def _describe_keys(out: Any) -> str:
    if isinstance(out, Mapping):
        return ", ".join(map(repr, out.keys())) or "nothing"
    names = [n for n in dir(out) if not n.startswith("_")]
    return ", ".join(names[:20]) or "nothing"


def to_samples_first(t: torch.Tensor, k: int, b: int, out_dim: int) -> torch.Tensor:
    """Reshape an output of ``k * b`` rows at ``out_dim`` to ``(k, b, ...)``."""
    if t.dim() == 0 or not -t.dim() <= out_dim < t.dim():
        raise InvalidInputError(
            f"The model output has shape {tuple(t.shape)}, which has no batch dimension {out_dim}. "
            "Set output_batch_dim= to where the batch is, or choose another output with output=."
        )
    out_dim %= t.dim()
    if t.shape[out_dim] != k * b:
        raise InvalidInputError(
            f"The model output has shape {tuple(t.shape)}; expected {k * b} rows ({k} samples x batch {b}) "
            f"along output_batch_dim={out_dim}. If the batch sits elsewhere in the output (e.g. "
            "nn.LSTM with batch_first=False), set output_batch_dim=; if the output is not batched, "
            "choose another output with output=."
        )
    shape = list(t.shape)
    t = t.reshape(*shape[:out_dim], k, b, *shape[out_dim + 1 :])
    if out_dim != 0:
        t = t.movedim((out_dim, out_dim + 1), (0, 1))
    return t


def plan_work(start: int, stop: int, n_samples: int, max_rows: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(start, stop, k)`` forward passes covering rows ``start:stop`` ``n_samples`` times.

    Each pass has at most ``max_rows`` rows: ``k`` replicas of a slice of the batch.
    """
    size = stop - start
    if size <= 0 or n_samples <= 0:
        return
    if size >= max_rows:
        for s in range(start, stop, max_rows):
            e = min(s + max_rows, stop)
            for _ in range(n_samples):
                yield s, e, 1
        return
    k = max(1, min(n_samples, max_rows // size))
    done = 0
    while done < n_samples:
        kk = min(k, n_samples - done)
        yield start, stop, kk
        done += kk


def auto_max_batch_size(
    inputs: Inputs,
    out_bytes_per_row: int | None,
    memory_budget: int,
    n_samples: int,
    measured_bytes_per_row: float | None = None,
) -> int:
    """Rows per forward pass that fit ``memory_budget``.

    With ``measured_bytes_per_row`` (the peak of what an observed pass held, per row): that with a
    margin, plus the copy of the inputs a pass makes. Without: inputs and outputs times a safety
    factor for the activations in between.
    """
    in_bytes = input_bytes_per_row(inputs)
    if measured_bytes_per_row is not None and measured_bytes_per_row > 0:
        per_row = measured_bytes_per_row * _PEAK_MARGIN + in_bytes
    else:
        per_row = (in_bytes + (out_bytes_per_row or 0)) * _ACTIVATION_FACTOR
    rows = int(memory_budget // max(per_row, 1.0))
    return int(max(1, min(rows, n_samples * inputs.batch_size)))


def check_row_count(
    inputs: Inputs,
    max_batch_size: int | None,
    memory_budget: int | None,
    n_samples: int,
    row_bytes: float | None,
) -> int:
    """Rows of a check pass (row check, gate check): at most :data:`~mcdrop._gatecheck.CHECK_ROWS`.

    No more than ``max_batch_size`` and than fit ``memory_budget`` with ``row_bytes`` per row
    (measured on one row; the default budget when ``None``), but at least two rows where the batch
    and ``max_batch_size`` have them (batch statistics need two). The whole batch (or
    ``max_batch_size`` rows) when the inputs hold a non-tensor object (:func:`holds_objects`): it
    goes whole to every pass, and its batch, e.g. a KV cache's, cannot follow a slice of the rows.
    """
    if holds_objects(inputs):
        return min(inputs.batch_size, max_batch_size or inputs.batch_size)
    fit = auto_max_batch_size(inputs, None, _budget(memory_budget), n_samples, row_bytes)
    return min(inputs.batch_size, CHECK_ROWS, max_batch_size or CHECK_ROWS, max(2, fit))


def sample_chunks(
    model: nn.Module,
    inputs: Inputs,
    *,
    n_samples: int,
    max_batch_size: int | None,
    memory_budget: int | None,
    output: OutputSelector,
    output_batch_dim: int,
    pair: bool,
    check_finite: bool = True,
    strategy: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    cache: dict[Any, Any] | None = None,
    fast_masks: bool = True,
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, stop, chunk)`` with ``chunk`` samples-first ``(k, stop - start, ...)``.

    Every batch row receives exactly ``n_samples`` samples over all chunks. ``chunk`` is one
    tensor, or a ``(mean, variance)`` pair when ``pair``. The model is called in whatever mode it
    is in: callers wrap this in :func:`mcdrop.enable_dropout` (and ``torch.no_grad``).

    How the passes are drawn (``strategy``, see :data:`STRATEGIES`): ``"vmap"`` runs the model under
    ``torch.func.vmap(randomness="different")`` over ``k`` samples of the unreplicated batch, so
    everything that precedes the first random draw (the deterministic trunk) runs once per chunk
    and only what follows it runs per sample; ``"replicate"`` repeats the batch ``k`` times along
    its batch dimension; ``"loop"`` makes one pass per sample. ``"auto"`` observes the first pass
    (one sample; :mod:`mcdrop._probe`), picks ``"vmap"`` when the trunk holds at least
    :data:`HOIST_MIN_FRACTION` of the FLOPs, tries it on the next chunk and keeps it only if it
    runs and draws fresh random numbers for every sample, else ``"replicate"``, else ``"loop"``;
    the reasons are logged at DEBUG level (logger ``mcdrop.sampling``). A failed attempt leaves no
    trace in the random streams. With ``cache`` (a dict the caller keeps), the decision and the
    chunk sizes are remembered per input signature and later calls skip the probe.

    Chunk sizes: with ``max_batch_size`` every pass holds at most that many rows (replicas times
    inputs; for vmap, samples times inputs). Otherwise a pass may use ``memory_budget`` bytes, as
    estimated from the input and output sizes (256 MiB by default); on the CPU, without an explicit
    budget, passes are also kept small enough for their largest activation to stay near
    :data:`CPU_PASS_BYTES`, which measures faster than large passes there.

    Args:
        model: The model, with its dropout switched on.
        inputs: Prepared inputs (:func:`prepare_inputs`).
        n_samples: Samples per row.
        max_batch_size: Most rows per pass, or ``None`` for the automatic choice.
        memory_budget: Bytes one pass may use for the automatic choice; ``None`` for the default.
        output: Which part of the model output to keep (:func:`select_output`).
        output_batch_dim: Batch dimension of the selected output.
        pair: The selected output is a ``(mean, variance)`` pair.
        check_finite: Raise :class:`~mcdrop.errors.NonFiniteError` on NaN or +inf outputs.
        strategy: ``"auto"``, ``"vmap"``, ``"replicate"`` or ``"loop"``.
        autocast_dtype: Run the model under ``torch.autocast`` with this dtype (float16 or
            bfloat16); the chunks come back in float32.
        cache: Where to remember decisions between calls (``None``: decide afresh).
        fast_masks: Swap in the faster dropout of :mod:`mcdrop._fastdropout` on the CPU.

    Yields:
        ``(start, stop, chunk)`` for every pass (or group of passes) in turn.

    Raises:
        UnsupportedModelError: ``strategy="vmap"`` was asked for and cannot sample this model.
    """
    check_choice(strategy, STRATEGIES, "strategy")
    if n_samples <= 0:
        return
    device, _ = model_device_dtype(model)
    device = device if device is not None else torch.device("cpu")
    key = _signature(
        inputs, output, output_batch_dim, pair, strategy, autocast_dtype, max_batch_size, memory_budget
    )
    decision: _Decision | None = cache.get(key) if cache is not None else None
    fast = fast_masks and device.type == "cpu"
    seed = int(torch.randint(0, 2**62, (1,)).item()) if fast else None
    engine = _Engine(
        model,
        inputs,
        n_samples=n_samples,
        output=output,
        output_batch_dim=output_batch_dim,
        pair=pair,
        check_finite=check_finite,
        autocast_dtype=autocast_dtype,
        device=device,
    )
    with split_errors_named(inputs, max_batch_size), accelerated(model, seed=seed, enabled=fast) as ctx:
        engine.ctx = ctx
        if decision is None:
            decision = yield from engine.decide(strategy, max_batch_size, memory_budget)
            if cache is not None:
                cache[key] = decision
        else:
            engine.apply_verdict(decision.rows_verdict, strategy, max_batch_size)
            plan = engine.plan(decision, max_batch_size, memory_budget, probed=False)
            yield from engine.run_plan(decision, plan, first_is_head=True)
    engine.raise_if_bad_rows()


#: The sampling strategies (see :func:`sample_chunks`).
STRATEGIES = ("auto", "vmap", "replicate", "loop")
#: ``"auto"`` hoists with vmap when the deterministic trunk holds at least this share of the FLOPs.
HOIST_MIN_FRACTION = 0.2
#: On the CPU, the largest activation of one pass is kept near this many bytes (faster than larger).
CPU_PASS_BYTES = 4 * 2**20
#: With vmap, chunks hold enough samples for the recomputed trunk to cost at most 1/this of them.
_TRUNK_AMORTIZATION = 10

#: The logger of the sampling decisions (name kept from earlier versions: users filter on it).
_log = logging.getLogger("mcdrop.sampling")


@dataclass
class _Decision:
    """How a given input signature is sampled, and what its probe pass measured."""

    strategy: str
    report: ProbeReport | None
    out_row_bytes: int
    reason: str
    mixes_rows: bool = False
    head_samples: int = 1
    first_row_bytes: float | None = None
    #: What the row check said (see :meth:`_Engine.rows_mix`): rows mix, do not, or no verdict.
    rows_verdict: bool | None = False


def _signature(inputs: Inputs, *rest: Any) -> tuple[Any, ...]:
    leaves = []
    for i, a in enumerate(inputs.args):
        leaves += [(p, t) for p, t in _leaves(a, (i,))]
    for k, v in inputs.kwargs.items():
        leaves += [(p, t) for p, t in _leaves(v, (k,))]
    parts = []
    for path, t in leaves:
        dim = inputs.dims.get(path)
        shape = tuple(-1 if d == dim else s for d, s in enumerate(t.shape))
        parts.append((path, t.dtype, str(t.device), shape, dim))
    options = tuple(id(r) if callable(r) else r for r in rest)
    return (tuple(parts), options)


def autocast_context(device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` in ``dtype`` on ``device`` (the CPU when ``None``); a no-op for ``None`` dtype."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type if device is not None else "cpu", dtype=dtype)


class _Engine:
    """One call of :func:`sample_chunks`: runs chunks with a strategy, decides, plans."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        *,
        n_samples: int,
        output: OutputSelector,
        output_batch_dim: int,
        pair: bool,
        check_finite: bool,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.n = n_samples
        self.output = output
        self.output_batch_dim = output_batch_dim
        self.pair = pair
        self.check_finite = check_finite
        self.autocast_dtype = autocast_dtype
        self.device = device
        # Inputs holding an object (e.g. a KV cache) go whole to every pass, never sliced: the
        # automatic pass sizes do not split such a batch (max_batch_size still may).
        self.whole_batch = holds_objects(inputs)
        self.ctx: FastContext | None = None
        # Peak bytes per row of the row check's first pass (see rows_mix), for sizing the first pass.
        self.measured_row_bytes: float | None = None
        # Off the CPU, bad rows are flagged on the device and checked once after the last chunk,
        # so the loop never waits for the device (no host-device synchronisation per chunk).
        self.bad_rows: list[torch.Tensor] = []

    # ------------------------------------------------------------------ running one chunk
    def _autocast(self) -> Any:
        return autocast_context(self.device, self.autocast_dtype)

    def _finish(self, chunk: Any, s: int, e: int) -> Any:
        if self.autocast_dtype is not None:
            chunk = tuple(_upcast(c) for c in chunk) if isinstance(chunk, tuple) else _upcast(chunk)
        if self.check_finite:
            first = chunk[0] if isinstance(chunk, tuple) else chunk
            if first.device.type == "cpu":
                _check_finite(chunk)
            else:
                _flag_bad_rows(chunk, s, e, self.inputs.batch_size, self.bad_rows)
        return chunk

    def replicate(self, s: int, e: int, k: int) -> Any:
        """``k`` samples of rows ``s:e`` from one pass over the replicated rows."""
        part = slice_batch(self.inputs, s, e)
        args, kwargs = replicate(part, k)
        if self.ctx is not None:
            self.ctx.replicas = k
        try:
            with self._autocast():
                out = self.model(*args, **kwargs)
        finally:
            if self.ctx is not None:
                self.ctx.replicas = 1
        chosen = select_output(out, self.output, self.pair)
        if self.pair:
            chunk = tuple(to_samples_first(c, k, e - s, self.output_batch_dim) for c in chosen)
        else:
            chunk = to_samples_first(chosen, k, e - s, self.output_batch_dim)
        return self._finish(chunk, s, e)

    def vmap(self, s: int, e: int, k: int) -> Any:
        """``k`` samples of rows ``s:e`` from one ``vmap`` over samples of the unreplicated rows."""
        part = slice_batch(self.inputs, s, e)
        # One pass of the model (run once for the k samples): copies of every input, as replicate makes.
        args, kwargs = part.map(lambda t, d: t.clone(), fresh=True)

        ctx = self.ctx

        def one_sample(_: torch.Tensor) -> Any:
            if ctx is not None:  # the fast masks draw all k samples' masks at once at this level
                ctx.vmap_level, ctx.vmap_size = torch._C._functorch.maybe_current_level(), k
            return select_output(self.model(*args, **kwargs), self.output, self.pair)

        try:
            with self._autocast():
                out = torch.func.vmap(one_sample, randomness="different")(torch.zeros(k))
        finally:
            if ctx is not None:
                ctx.vmap_level, ctx.vmap_size = None, 0
        if self.pair:
            chunk = tuple(_vmapped_samples_first(c, e - s, self.output_batch_dim) for c in out)
        else:
            chunk = _vmapped_samples_first(out, e - s, self.output_batch_dim)
        return self._finish(chunk, s, e)

    def run(self, strategy: str, s: int, e: int, k: int) -> Iterator[tuple[int, int, Any]]:
        """Yield the chunks of work item ``(s, e, k)`` drawn with ``strategy``."""
        if strategy == "vmap" and k > 1:
            yield s, e, self.vmap(s, e, k)
        elif strategy == "loop":
            for _ in range(k):
                yield s, e, self.replicate(s, e, 1)
        else:
            yield s, e, self.replicate(s, e, k)

    @contextlib.contextmanager
    def _hash_masks(self, mode: ProbeMode | None = None) -> Iterator[None]:
        """Masks from SplitMix64 (seeded by torch's generator), with ``mode`` told of the seed draws."""
        ctx = self.ctx
        if ctx is None:
            yield
            return
        saved = ctx.hash_only, ctx.on_own_draw
        ctx.hash_only = True
        if mode is not None:
            ctx.on_own_draw = mode.own_draw
        try:
            yield
        finally:
            ctx.hash_only, ctx.on_own_draw = saved

    def run_plan(
        self, decision: _Decision, plan: list[tuple[int, int, int]], *, first_is_head: bool
    ) -> Iterator[tuple[int, int, Any]]:
        """Yield every chunk of ``plan`` drawn with the decided strategy.

        ``first_is_head``: the first work item is the head pass that the probe also makes, and
        draws its masks the way the probe does, so a call draws the same samples whether or not
        its decision was cached. Errors propagate: a strategy is only ever abandoned on its trial
        chunk (in :meth:`decide`), so a model that fails later fails the call, as it would when
        sampled one pass at a time.
        """
        for i, (s, e, k) in enumerate(plan):
            if i == 0 and first_is_head and decision.strategy != "vmap":
                with self._hash_masks():
                    yield from self.run(decision.strategy, s, e, k)
            else:
                yield from self.run(decision.strategy, s, e, k)

    def _snapshot(self) -> RngState:
        return rng_snapshot(self.ctx.generator if self.ctx else None)

    def _restore(self, state: RngState) -> None:
        rng_restore(state, self.ctx.generator if self.ctx else None)

    # ------------------------------------------------------------------ deciding
    def decide(
        self, strategy: str, max_batch_size: int | None, memory_budget: int | None
    ) -> Iterator[tuple[int, int, Any]]:
        """Probe, choose a strategy (trying it on its first chunk), and yield every chunk.

        The probe is the head pass of the replicate and loop plans (one sample of the first rows,
        or the first work item under ``max_batch_size``); when vmap is chosen, the probe's draws
        are undone and the vmap plan runs from its start, as it does once the decision is cached.
        Returns the :class:`_Decision`.
        """
        batch = self.inputs.batch_size
        verdict = self.rows_mix(max_batch_size, memory_budget)
        mixes = self.apply_verdict(verdict, strategy, max_batch_size)
        if max_batch_size is not None:
            s0, e0, k0 = next(plan_work(0, batch, self.n, max_batch_size))
        else:
            s0, e0, k0 = 0, self.first_rows(memory_budget, mixes, self.measured_row_bytes), 1
        if strategy == "loop" or mixes:
            k0 = 1  # the head pass holds no replicas
        before_probe = self._snapshot()
        report, head, forced = self._probe(strategy, s0, e0, k0)
        after_probe = self._snapshot()
        tensors = head if isinstance(head, tuple) else (head,)
        out_row = sum(c[0, 0].numel() * c.element_size() for c in tensors)
        candidates, reason = self._candidates(forced or strategy, report)
        if mixes:
            candidates = [c for c in candidates if c != "replicate"] or ["loop"]
            reason += (
                "; a row's output depends on the other rows of its pass"
                if verdict
                else "; the row check gave no verdict"
            ) + ": every pass holds the whole batch once, never replicas"
        decision = _Decision(
            candidates[0], report, out_row, reason, mixes, k0, self.measured_row_bytes, verdict
        )
        head_yielded = False
        for position, candidate in enumerate(candidates):
            decision.strategy = candidate
            last = position == len(candidates) - 1
            if candidate == "vmap":
                plan = self.plan(decision, max_batch_size, memory_budget, probed=False)
                s, e, k = plan[0]
                if k < 2 and last:
                    # One sample per pass throughout (plans never grow k later): plain passes.
                    self._restore(before_probe)
                    decision.reason = reason + "; one sample per pass"
                    yield from self.run_plan(decision, plan, first_is_head=False)
                    return decision
                if k < 2 or (s, e) != (s0, e0):
                    why_not = f"its first chunk would hold {k} sample(s) of rows {s}:{e}"
                else:
                    self._restore(before_probe)
                    chunk, why_not = self._attempt_trial("vmap", s, e, k, report, k0)
                if why_not is None:
                    decision.reason = reason
                    _log.debug("mcdrop: sampling with strategy 'vmap' (%s).", reason)
                    yield s, e, chunk
                    yield from self.run_plan(decision, plan[1:], first_is_head=False)
                    return decision
                self._restore(after_probe)
            else:
                if not head_yielded:
                    yield s0, e0, head
                    head_yielded = True
                plan = self.plan(decision, max_batch_size, memory_budget, probed=True)
                if not plan:
                    decision.reason = reason
                    return decision
                s, e, k = plan[0]
                if candidate == "loop" or k == 1:
                    decision.reason = reason
                    _log.debug("mcdrop: sampling with strategy %r (%s).", candidate, reason)
                    yield from self.run_plan(decision, plan, first_is_head=False)
                    return decision
                state = self._snapshot()
                chunk, why_not = self._attempt_trial(
                    candidate, s, e, k, report if (s, e) == (s0, e0) else None, k0
                )
                if why_not is None:
                    decision.reason = reason
                    _log.debug("mcdrop: sampling with strategy %r (%s).", candidate, reason)
                    yield s, e, chunk
                    yield from self.run_plan(decision, plan[1:], first_is_head=False)
                    return decision
                self._restore(state)
            reason += f"; {candidate} rejected ({why_not})"
            _log.debug("mcdrop: strategy %r rejected: %s", candidate, why_not)
            if last:
                raise UnsupportedModelError(
                    f"strategy={candidate!r} cannot sample this model correctly: {why_not.rstrip('.')}. "
                    f"{_objects_hint(self.inputs) if candidate == 'replicate' else ''}Use "
                    "strategy='auto' to fall back to another strategy automatically."
                )
        return decision  # pragma: no cover - the loop always returns or raises

    def apply_verdict(self, verdict: bool | None, strategy: str, max_batch_size: int | None) -> bool:
        """Refuse, or warn about, what the call asks for, given the row check's verdict.

        Returns whether passes must hold the whole batch once, never replicas (see
        :meth:`rows_mix` for the verdict).

        Run when a decision is made and again whenever a remembered one is used: whether
        ``max_batch_size`` splits the batch depends on the batch size, which the remembered
        decision does not.

        Raises:
            UnsupportedModelError: The rows mix, and replicas or a split batch were asked for.
        """
        batch = self.inputs.batch_size
        replicas = strategy == "replicate" and self.n > 1
        split = max_batch_size is not None and max_batch_size < batch
        if verdict is True:
            if replicas:
                raise UnsupportedModelError(
                    "strategy='replicate' cannot sample this model correctly: the output of a row depends "
                    "on the other rows of its forward pass (e.g. a mean over the batch), so replicas of the "
                    "batch in one pass would mix the MC samples. Use strategy='auto', 'vmap' or 'loop', which "
                    "give every pass the whole batch once."
                )
            if split:
                raise UnsupportedModelError(
                    f"max_batch_size={max_batch_size} would split this batch of {batch} rows, but the output "
                    "of a row depends on the other rows of its forward pass (e.g. a mean over the batch), so a "
                    "split batch gives other numbers than the whole one. Pass max_batch_size >= the batch "
                    "size (or None), or feed smaller batches yourself."
                )
            return True
        if verdict is None:
            asked = []
            if replicas:
                asked.append("strategy='replicate' (replicas of the batch in one pass)")
            if split:
                asked.append(f"max_batch_size={max_batch_size} (a split batch of {batch} rows)")
            if asked and not self.whole_batch:  # with a cache the check cannot split it: no news
                warnings.warn(
                    "mcdrop could not check whether the output of a row depends on the other rows of its "
                    "forward pass (the model fails on the check's rows, or draws randomness other than "
                    "dropout, drop-path and noise ops, such as randint or randperm: see the debug log). "
                    f"Sampling as asked, with {' and '.join(asked)}, which is only correct if the rows of "
                    "this model are independent; leave strategy='auto' and max_batch_size=None for passes "
                    "that hold the whole batch once.",
                    RowCheckWarning,
                    stacklevel=user_stacklevel(),
                )
            return not replicas  # else sampled the safe way: the whole batch once per pass
        return False

    def rows_mix(self, max_batch_size: int | None, memory_budget: int | None) -> bool | None:
        """Whether the output of a row depends on the other rows of its forward pass.

        Such a model (a mean or a normalisation over the batch, attention across rows) cannot have
        replicas of the batch in one pass, which would mix MC samples, nor a batch split into
        chunks, which would change every row's neighbours. The check runs once per decision with
        the modules in the modes they sample in, every dropout operation the identity, the common
        random ops drawing one constant quantile of their distribution (see
        :class:`~mcdrop._gatecheck.NoRandomness`) and every RNG left as it was: the output of a few
        rows together must equal, row by row, the outputs of their two halves run apart. Where
        the model drew such constants, the check is made at a low and at a high quantile
        (:data:`~mcdrop._gatecheck.CHECK_QUANTILES`), so that a hand-made mask that drops
        everything at one of them cannot hide the rows from each other. A batch of one row (or
        of identical rows) is checked against a changed copy of that row (float inputs scaled and
        shifted; integer ones rolled along their last dimension, or, where that changes nothing,
        such as ids of shape ``(batch,)``, moved to a neighbouring value).

        Returns:
            ``True`` when the rows mix, ``False`` when they do not, and ``None`` when the check
            gives no verdict: the model fails on the check's rows, or its output still varies
            from one seed to another (randomness the check cannot make constant, e.g.
            ``torch.randperm``). The engine treats ``None`` as ``True`` unless the
            call asks for replicas or a split batch (:meth:`decide`).

        Its passes stay within the limits of the call: a first pass of one row measures what a row
        holds at the peak, then at most :data:`~mcdrop._gatecheck.CHECK_ROWS` rows, no more than
        ``max_batch_size`` and than fit ``memory_budget`` (at least two; see
        :func:`check_row_count`). The most a row held in either pass is kept in
        :attr:`measured_row_bytes`, which sizes the first sampling pass. With ``max_batch_size=1``
        there is no check (every pass holds one row of one sample anyway).
        """
        batch = self.inputs.batch_size
        if batch == 0 or (max_batch_size is not None and max_batch_size < 2):
            return False
        model = eager_module(self.model)
        _, dtype = model_device_dtype(model)
        eps = [
            torch.finfo(d).eps for d in (dtype, self.autocast_dtype) if d is not None and d.is_floating_point
        ]
        tolerance = max([1e-4] + [4 * e for e in eps])  # bfloat16: 3%, float16: 0.4%
        cuda = cuda_devices(self.device)
        enabled = self.ctx.enabled if self.ctx is not None else None
        draws = 0

        def run(part: Inputs, u: float, meter: PeakBytesMode | None = None, seed: int = 0) -> Any:
            nonlocal draws
            constants = NoRandomness(u)
            with (
                input_generators_untouched(part, seed),
                rng_untouched(seed, cuda),
                constants,
                self._autocast(),
            ):
                with meter if meter is not None else contextlib.nullcontext():
                    args, kwargs = replicate(part, 1)
                    out = select_output(model(*args, **kwargs), self.output, self.pair)
            draws += constants.draws
            return _rows_first(out, self.output_batch_dim)

        def no_verdict(why: str) -> None:
            _log.debug("mcdrop: row-independence check gives no verdict: %s.", why)

        try:
            if self.ctx is not None:
                self.ctx.enabled = False  # the engine's faster dropout would ignore eval mode
            low = CHECK_QUANTILES[0]
            first = slice_batch(self.inputs, 0, 1)
            meter = PeakBytesMode()
            try:
                first_out = run(first, low, meter)
                self.measured_row_bytes = float(meter.meter.peak) * CHECK_MARGIN
            except Exception:  # noqa: BLE001 - e.g. batch statistics need two rows: check on more rows
                first_out = None
            cap = check_row_count(self.inputs, max_batch_size, memory_budget, self.n, self.measured_row_bytes)
            rows = slice_batch(self.inputs, 0, cap)
            if rows.batch_size < 2 or _all_rows_alike(rows):
                other = _other_row(first)
                if other is None:
                    return False  # no other row at hand: every row is the same
                rows = _concat_rows(first, other)
            split = rows.batch_size // 2
            for u in CHECK_QUANTILES:
                if u != low and not draws:
                    break  # no draw was made constant: another quantile gives the same passes
                meter = PeakBytesMode()
                whole = run(rows, u, meter if u == low else None)
                if u == low:
                    # The most a row held in either pass (a row's activations may depend on its data).
                    self.measured_row_bytes = max(
                        self.measured_row_bytes or 0.0,
                        float(meter.meter.peak) * CHECK_MARGIN / rows.batch_size,
                    )
                if u == low and split == 1 and first_out is not None:
                    head = first_out
                else:
                    head = run(slice_batch(rows, 0, split), u)
                # Compared where both are finite (see _row_gap).
                if not (
                    _row_gap(whole, head, 0, tolerance)
                    or _row_gap(whole, run(slice_batch(rows, split, rows.batch_size), u), split, tolerance)
                ):
                    continue
                if _row_gap(whole, run(rows, u, seed=1), 0, tolerance):
                    no_verdict(
                        "the check passes still draw randomness that torch's dropout and draw ops do not "
                        "explain (e.g. randint, randperm, multinomial, numpy or Python's random)"
                    )
                    return None
                _log.debug("mcdrop: a row's output depends on the other rows of its pass.")
                return True
            return False
        except Exception as err:  # noqa: BLE001 - the model fails on the check rows: no verdict
            no_verdict(f"the model fails on the check rows ({type(err).__name__}: {err})")
            return None
        finally:
            if self.ctx is not None and enabled is not None:
                self.ctx.enabled = enabled

    def _attempt_trial(
        self, strategy: str, s: int, e: int, k: int, report: ProbeReport | None, k0: int
    ) -> tuple[Any, str | None]:
        try:
            return self._trial(strategy, s, e, k, report, k0)
        except McdropError:
            raise
        except Exception as err:  # noqa: BLE001 - the model does not support this strategy
            return None, f"{type(err).__name__}: {err}"

    def _probe(self, strategy: str, s: int, e: int, k: int) -> tuple[ProbeReport | None, Any, str | None]:
        """Run the head pass (replicated rows, SplitMix64 masks) under :class:`ProbeMode`."""
        if strategy == "loop" or self.n == 1:
            with self._hash_masks():
                return None, self.replicate(s, e, k), None
        state = self._snapshot()
        mode = ProbeMode(rows=k * (e - s))
        try:
            with self._hash_masks(mode), mode:
                chunk = self.replicate(s, e, k)
        except McdropError:
            raise
        except Exception as err:  # noqa: BLE001 - the probe itself is not supported: sample plainly
            _log.debug("mcdrop: probe pass failed (%s: %s); sampling without it.", type(err).__name__, err)
            self._restore(state)
            with self._hash_masks():
                chunk = self.replicate(s, e, k)
            return None, chunk, ("replicate" if strategy == "auto" else strategy)
        return mode.report(), chunk, None

    def _candidates(self, strategy: str, report: ProbeReport | None) -> tuple[list[str], str]:
        if strategy != "auto":
            return [strategy], f"strategy={strategy!r} requested"
        if report is None:
            return ["replicate", "loop"], "no probe of the model"
        fraction = report.trunk_fraction
        if fraction >= HOIST_MIN_FRACTION:
            return ["vmap", "replicate", "loop"], f"deterministic trunk holds {fraction:.0%} of the FLOPs"
        return ["replicate", "loop"], (
            f"deterministic trunk holds {fraction:.0%} of the FLOPs (< {HOIST_MIN_FRACTION:.0%}): no hoisting"
        )

    def _trial(
        self, strategy: str, s: int, e: int, k: int, report: ProbeReport | None, k0: int
    ) -> tuple[Any, str | None]:
        """Run a first chunk with ``strategy`` and check that every sample drew afresh.

        The probe saw ``report.foreign_draws`` random numbers drawn by torch operations (other
        than mcdrop's own masks) for ``k0`` samples of the same rows; ``k`` samples must draw
        ``k / k0`` times as many, or some randomness would be shared between samples (an op that
        vmap runs once for all samples, or a draw per forward pass rather than per row).
        """
        if report is None:
            if strategy == "vmap":
                return None, "the probe pass could not observe the model"
            return self.replicate(s, e, k), None
        if strategy == "vmap" and report.foreign_draws == 0 and report.own_draws == 0:
            return None, (
                "no torch random draw observed in the probe pass, so vmap's per-sample randomness "
                "cannot be checked"
            )
        mode = ProbeMode(rows=k * (e - s))
        fallback_warnings = torch._C._functorch._set_vmap_fallback_warning_enabled
        saved = self.ctx.on_own_draw if self.ctx is not None else None
        if self.ctx is not None:
            self.ctx.on_own_draw = mode.own_draw
        try:
            fallback_warnings(strategy == "vmap")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with mode:
                    chunk = self.vmap(s, e, k) if strategy == "vmap" else self.replicate(s, e, k)
        finally:
            fallback_warnings(False)
            if self.ctx is not None:
                self.ctx.on_own_draw = saved
        slow = [w for w in caught if "performance drop" in str(w.message)]
        for w in caught:
            if w not in slow:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if slow:
            return None, f"an operation has no vmap batching rule ({slow[0].message})"
        if mode.foreign_draws * k0 != report.foreign_draws * k:
            ops = ", ".join(sorted(mode.random_ops | set(report.random_ops))) or "none seen"
            return None, (
                f"random operations ({ops}) drew {mode.foreign_draws} numbers for {k} samples "
                f"({strategy}) against {report.foreign_draws} for {k0} sample(s) in the probe: their "
                "randomness would be shared between samples"
            )
        return chunk, None

    # ------------------------------------------------------------------ planning
    def first_rows(
        self, memory_budget: int | None, mixes_rows: bool = False, row_bytes: float | None = None
    ) -> int:
        """Rows of the first pass (one sample each) when chunks are sized automatically.

        Sized from ``row_bytes`` (what the row check's pass held at its peak, per row) where it was
        measured. The whole batch when ``mixes_rows`` (see :meth:`rows_mix`) or when the inputs hold
        a non-tensor object that every pass gets whole (a KV cache, whose batch cannot be sliced),
        whatever the budget.
        """
        if mixes_rows or self.whole_batch:
            return self.inputs.batch_size
        rows = auto_max_batch_size(self.inputs, None, _budget(memory_budget), self.n, row_bytes)
        return min(self.inputs.batch_size, rows)

    def plan(
        self, decision: _Decision, max_batch_size: int | None, memory_budget: int | None, *, probed: bool
    ) -> list[tuple[int, int, int]]:
        """The work items ``(start, stop, k)`` of a call, after the first one when ``probed``.

        The plan depends only on the decision and the batch, not on whether the decision was just
        made: the replicate and loop plans always start with one sample of the first rows, as the
        probe does, so a batch meets the model in the same pass shapes on every call. A vmap plan
        that was decided earlier starts directly with many samples, so that the trunk is not run
        once more for that first sample alone.
        """
        batch = self.inputs.batch_size
        if max_batch_size is not None:
            work = list(plan_work(0, batch, self.n, max_batch_size))
            if decision.strategy == "vmap" and not probed:
                return work
            s0, e0, k0 = work[0]
            h = decision.head_samples
            if h < k0:  # the head pass (loop, or a model mixing rows) has fewer samples
                work = [(s0, e0, h), (s0, e0, k0 - h), *work[1:]]
            return work[1:] if probed else work
        r0 = self.first_rows(memory_budget, decision.mixes_rows, decision.first_row_bytes)
        rows = self._rows_per_pass(decision, memory_budget, r0)
        if decision.strategy == "vmap" and not probed:
            return list(plan_work(0, batch, self.n, rows))
        head = [] if probed else [(0, r0, 1)]
        return head + list(plan_work(0, r0, self.n - 1, rows)) + list(plan_work(r0, batch, self.n, rows))

    def _rows_per_pass(self, decision: _Decision, memory_budget: int | None, r0: int) -> int:
        report = decision.report
        if decision.strategy == "vmap" and report is not None:
            # Only what follows the first random draw grows with the samples of a vmap pass: what
            # that part held at its peak in the probe, per row, with a margin (or, unmeasured, its
            # largest activation times a safety factor).
            budget = _budget(memory_budget)
            if report.peak_stochastic_bytes > 0:
                # A pass of k samples of b rows holds the trunk of b rows once and the rest k times.
                per_row = report.peak_stochastic_bytes * _PEAK_MARGIN + decision.out_row_bytes
                trunk_row = max(report.peak_bytes - report.peak_stochastic_bytes, 0.0) * _PEAK_MARGIN
                batch = self.inputs.batch_size
                if budget >= batch * (per_row + trunk_row):
                    rows_memory = int((budget - batch * trunk_row) // max(per_row, 1.0))
                else:
                    rows_memory = int(max(1, budget // max(per_row + trunk_row, 1.0)))
            else:
                per_row = (report.max_stochastic_bytes + decision.out_row_bytes) * _ACTIVATION_FACTOR
                rows_memory = int(max(1, budget // max(per_row, 1.0)))
        else:
            rows_memory = auto_max_batch_size(
                self.inputs,
                decision.out_row_bytes,
                _budget(memory_budget),
                self.n,
                report.peak_bytes if report is not None else decision.first_row_bytes,
            )
        rows = rows_memory
        if memory_budget is None and self.device.type == "cpu" and report is not None:
            per_row = report.max_stochastic_bytes if decision.strategy == "vmap" else report.max_bytes
            rows = max(1, min(rows_memory, int(CPU_PASS_BYTES // max(per_row, 1.0))))
        if decision.strategy == "vmap" and report is not None:
            # Enough samples per chunk for the trunk, run once per chunk, to cost little.
            if report.stochastic_flops > 0:
                k_min = math.ceil(_TRUNK_AMORTIZATION * report.trunk_flops / report.stochastic_flops)
            else:
                k_min = self.n
            rows = max(rows, min(rows_memory, r0 * min(k_min, self.n)))
        if decision.mixes_rows or self.whole_batch:
            rows = max(rows, self.inputs.batch_size)  # never split the batch of such a model (or input)
        return max(1, rows)

    def raise_if_bad_rows(self) -> None:
        """Raise on rows flagged non-finite on the device (checked once, after the last chunk)."""
        _raise_if_bad_rows(self.bad_rows)


def _budget(memory_budget: int | None) -> int:
    return DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _rows_first(out: Any, out_dim: int) -> Any:
    """The selected output (or pair) with its batch dim first, detached, in float64 on the CPU."""
    if isinstance(out, tuple):
        return tuple(_rows_first(o, out_dim) for o in out)
    return out.detach().movedim(out_dim, 0).to("cpu", torch.float64)


def _row_gap(whole: Any, part: Any, start: int, tolerance: float) -> bool:
    """Whether rows ``start:`` of ``whole`` differ from ``part`` by more than ``tolerance`` (relative).

    Not where either is NaN or +inf, which say nothing of the rows' neighbours (the masked mean of
    an all-masked row is NaN whatever they are) and which sampling refuses anyway. A -inf (a masked
    logit, which sampling accepts) is a value like any other: equal only to a -inf.
    """
    if isinstance(whole, tuple):
        return any(_row_gap(w, q, start, tolerance) for w, q in zip(whole, part, strict=True))
    rows = whole[start : start + part.shape[0]]
    if rows.shape != part.shape:
        return True
    inf = float("inf")
    compared = ~(rows.isnan() | part.isnan() | (rows == inf) | (part == inf))
    minus_inf = (rows == -inf) | (part == -inf)
    if bool((compared & minus_inf & (rows != part)).any()):
        return True  # a -inf on one side only
    finite = compared & ~minus_inf
    rows, part = torch.where(finite, rows, 0.0), torch.where(finite, part, 0.0)
    scale = max(1.0, float(rows.abs().max())) if rows.numel() else 1.0
    return bool(((rows - part).abs() > tolerance * scale).any())


def _other_row(inputs: Inputs) -> Inputs | None:
    """A one-row input that differs from the one row of ``inputs``, or ``None`` if none is at hand.

    Float leaves become ``1.25 x + 0.5``; integer and boolean leaves are rolled by one along their
    last non-batch dimension (token ids stay valid ids, masks stay aligned with their tokens). An
    integer leaf that rolling leaves as it was (ids of shape ``(batch,)``, a row of one repeated
    id) moves to a neighbouring value (``x - 1`` where positive, else ``x + 1``); a boolean one is
    negated.
    """

    def change(t: torch.Tensor, d: int) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex():
            return t * 1.25 + 0.5
        dims = [i for i in range(t.dim()) if i != d and t.shape[i] > 1]
        rolled = t.roll(1, dims[-1]) if dims else t
        if not torch.equal(rolled, t):
            return rolled
        if t.dtype == torch.bool:
            return ~t
        return torch.where(t > 0, t - 1, t + 1)  # a neighbouring id: valid wherever 0 and 1 are

    args, kwargs = inputs.map(change)
    other = Inputs(args, kwargs, inputs.batch_size, inputs.dims)
    return None if _same_rows(inputs, other) else other


def _objects_hint(inputs: Inputs) -> str:
    """Why replication may fail when non-tensor inputs are mutable objects (else ``""``)."""
    objects = _object_leaves(inputs.args, inputs.kwargs)
    if not objects:
        return ""
    named = ", ".join(f"{_path_name(p)} ({type(o).__name__})" for p, o in objects[:3])
    return (
        f"Only tensor inputs are replicated along their batch dimension; {named} is given whole (a "
        "fresh copy) to every pass, so its batch (e.g. a cache's) does not grow with the replicas. "
    )


def _batched_leaves(inputs: Inputs) -> list[tuple[torch.Tensor, int]]:
    found: list[tuple[torch.Tensor, int]] = []
    inputs.map(lambda t, d: found.append((t, d)) or t)
    return found


def _same_rows(a: Inputs, b: Inputs) -> bool:
    """Whether every batched leaf of ``a`` equals that of ``b`` (same row count)."""
    return all(
        x.shape == y.shape and bool((x == y).all())
        for (x, _), (y, _) in zip(_batched_leaves(a), _batched_leaves(b), strict=True)
    )


def _concat_rows(a: Inputs, b: Inputs) -> Inputs:
    """The rows of ``a`` followed by those of ``b`` (inputs of the same structure)."""
    rest = iter(_batched_leaves(b))
    args, kwargs = a.map(lambda t, d: torch.cat([t, next(rest)[0]], dim=d))
    return Inputs(args, kwargs, a.batch_size + b.batch_size, a.dims)


def _all_rows_alike(inputs: Inputs) -> bool:
    """Whether every row of ``inputs`` equals its first row."""
    return all(bool((t == t.narrow(d, 0, 1)).all()) for t, d in _batched_leaves(inputs))


def _vmapped_samples_first(t: torch.Tensor, b: int, out_dim: int) -> torch.Tensor:
    """Move the batch dim of a vmap output ``(k, *one_sample)`` to dim 1."""
    per_sample = t.dim() - 1
    if per_sample == 0 or not -per_sample <= out_dim < per_sample:
        raise InvalidInputError(
            f"The model output has shape {tuple(t.shape[1:])}, which has no batch dimension {out_dim}. "
            "Set output_batch_dim= to where the batch is, or choose another output with output=."
        )
    out_dim %= per_sample
    if t.shape[out_dim + 1] != b:
        raise InvalidInputError(
            f"The model output has shape {tuple(t.shape[1:])}; expected {b} rows along "
            f"output_batch_dim={out_dim}. If the batch sits elsewhere in the output, set "
            "output_batch_dim=; if the output is not batched, choose another output with output=."
        )
    return t if out_dim == 0 else t.movedim(out_dim + 1, 1)


def _flag_bad_rows(chunk: Any, start: int, stop: int, batch: int, flags: list[torch.Tensor]) -> None:
    """Mark (on the chunk's device, without a sync) the rows whose outputs hold NaN or +inf."""
    for t in chunk if isinstance(chunk, tuple) else (chunk,):
        if t.is_floating_point():
            if not flags:
                flags.append(torch.zeros(batch, dtype=torch.bool, device=t.device))
            bad = torch.isnan(t) | (t == float("inf"))
            flags[0][start:stop] |= bad.reshape(t.shape[0], t.shape[1], -1).any(-1).any(0)


def _raise_if_bad_rows(flags: list[torch.Tensor]) -> None:
    if flags and bool(flags[0].any()):
        rows = torch.nonzero(flags[0]).flatten()[:5].tolist()
        raise NonFiniteError(
            f"The model produced NaN or infinity in its output (batch rows {rows} among others) "
            "while dropout was on. Check the model in train-mode dropout (e.g. a log of 0, an "
            "overflow in float16) and the inputs of those rows."
        )


def _check_finite(chunk: Any) -> None:
    """Raise on NaN or +inf anywhere.

    -inf is allowed here (a masked logit, or a log-probability of 0) and checked by the statistics
    that cannot take it.
    """
    tensors = chunk if isinstance(chunk, tuple) else (chunk,)
    for t in tensors:
        if t.is_floating_point() and bool((torch.isnan(t) | (t == float("inf"))).any()):
            finite = ~(torch.isnan(t) | (t == float("inf")))
            bad = (~finite).flatten(2).any(-1) if t.dim() > 2 else ~finite
            rows = torch.nonzero(bad.any(0)).flatten()[:5].tolist()
            raise NonFiniteError(
                f"The model produced NaN or infinity in its output (batch rows {rows} among others) "
                "while dropout was on. Check the model in train-mode dropout (e.g. a log of 0, an "
                "overflow in float16) and the inputs of those rows."
            )
