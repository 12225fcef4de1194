"""Inputs of the engine: preparing, replicating and slicing them, copies of objects, generator inputs.

A call's inputs (positional and keyword, nested in tuples, lists and dicts) are moved to the
model's device and floating dtype and their batch dimension found (:func:`prepare_inputs`); every
forward pass then gets its own rows (:func:`slice_batch`), replicas (:func:`replicate`) and copies
of what it could change in place (:meth:`Inputs.map` with ``fresh``: tensors cloned, mutable
objects such as a Hugging Face cache deep-copied), while values that cannot change, code, modules
and random generators are passed by reference (:func:`is_plain_value`). The row check's helpers
(another row, rows concatenated, rows alike) and the input signature that decisions are
remembered by live here too.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import random
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mcdrop.engine.probe import unmetered
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropError, NonFiniteError


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
    draw from that seed meanwhile, as :func:`~mcdrop.engine.rng.rng_untouched` makes the global
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


def take_rows(inputs: Inputs, rows: torch.Tensor) -> Inputs:
    """The rows ``rows`` (indices along the batch, in that order) of every batched input."""
    if rows.numel() == inputs.batch_size and bool(
        (rows.cpu() == torch.arange(inputs.batch_size)).all()
    ):
        return inputs
    args, kwargs = inputs.map(lambda t, d: t.index_select(d, rows.to(t.device)))
    return Inputs(args, kwargs, int(rows.numel()), inputs.dims)


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


def signature(inputs: Inputs, *rest: Any) -> tuple[Any, ...]:
    """The key that decisions and checks are remembered by.

    Every tensor leaf's path, dtype, device, shape (the batch dim left open) and batch dim, with
    ``rest`` (options; callables by identity).
    """
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


def other_row(inputs: Inputs) -> Inputs | None:
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


def objects_hint(inputs: Inputs) -> str:
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


def concat_rows(a: Inputs, b: Inputs) -> Inputs:
    """The rows of ``a`` followed by those of ``b`` (inputs of the same structure)."""
    rest = iter(_batched_leaves(b))
    args, kwargs = a.map(lambda t, d: torch.cat([t, next(rest)[0]], dim=d))
    return Inputs(args, kwargs, a.batch_size + b.batch_size, a.dims)


def all_rows_alike(inputs: Inputs) -> bool:
    """Whether every row of ``inputs`` equals its first row."""
    return all(bool((t == t.narrow(d, 0, 1)).all()) for t, d in _batched_leaves(inputs))
