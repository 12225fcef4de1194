"""The sampling engine: N stochastic forward passes drawn in batch, in chunks, on the model's device.

The engine replicates the inputs along their batch dimension, ``k`` samples at a time, so that one
forward pass of ``k * b`` rows yields ``k`` independent samples for ``b`` inputs (dropout masks are
drawn independently per row). Chunks are bounded by ``max_batch_size`` rows per forward pass; an
input batch larger than that is split. Each chunk is handed to the caller as a samples-first tensor
``(k, b, ...)`` and can be reduced to running statistics at once, so memory does not grow with N.

Everything here is private to mcdrop; the public face is :class:`mcdrop.MCDropout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcdrop.errors import InvalidInputError, InvalidTypeError, NonFiniteError

OutputSelector = Callable[[Any], Any] | str | int | None

#: Default bound on the number of activation bytes one forward pass may touch, for choosing chunk
#: sizes automatically (inputs and outputs times a safety factor for intermediate activations).
DEFAULT_MEMORY_BUDGET = 256 * 2**20
_ACTIVATION_FACTOR = 16


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

    def map(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Apply ``fn(tensor, batch_dim)`` to every batched tensor leaf."""

        def visit(obj: Any, path: tuple[Any, ...]) -> Any:
            if isinstance(obj, torch.Tensor):
                dim = self.dims.get(path)
                return obj if dim is None else fn(obj, dim)
            if isinstance(obj, Mapping):
                return {k: visit(v, (*path, k)) for k, v in obj.items()}
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):
                return type(obj)(*(visit(v, (*path, i)) for i, v in enumerate(obj)))
            if isinstance(obj, (list, tuple)):
                return type(obj)(visit(v, (*path, i)) for i, v in enumerate(obj))
            return obj

        args = tuple(visit(a, (i,)) for i, a in enumerate(self.args))
        kwargs = {k: visit(v, (k,)) for k, v in self.kwargs.items()}
        return args, kwargs


def _leaves(obj: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


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
    """
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
    # Checked after the cast to the model's dtype, so a float64 value that overflows float32 is caught.
    for i, a in enumerate(converted.args):
        _check_finite_inputs(_leaves(a, (i,)))
    for k, v in converted.kwargs.items():
        _check_finite_inputs(_leaves(v, (k,)))
    return converted


def _check_finite_inputs(leaves: Iterator[tuple[tuple[Any, ...], torch.Tensor]]) -> None:
    for path, tensor in leaves:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"{_path_name(path)} contains NaN or infinity (after casting to the model's dtype "
                f"{tensor.dtype}); inputs must be finite."
            )


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
    """Repeat every batched input ``k`` times along its batch dim, sample-major (``s * b + i``)."""
    if k == 1:
        # A copy all the same: a model that modifies its input in place (e.g. an in-place dropout
        # on the input) must neither change the caller's tensors nor compound across passes.
        return inputs.map(lambda t, d: t.clone())

    def rep(t: torch.Tensor, d: int) -> torch.Tensor:
        shape = list(t.shape)
        expanded = t.unsqueeze(d).expand(*shape[:d], k, *shape[d:])
        return expanded.reshape(*shape[:d], k * shape[d], *shape[d + 1 :])

    return inputs.map(rep)


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
    inputs: Inputs, out_bytes_per_row: int | None, memory_budget: int, n_samples: int
) -> int:
    """Rows per forward pass so that inputs and outputs times a safety factor fit ``memory_budget``."""
    per_row = input_bytes_per_row(inputs) + (out_bytes_per_row or 0)
    rows = memory_budget // (per_row * _ACTIVATION_FACTOR)
    return int(max(1, min(rows, n_samples * inputs.batch_size)))


def sample_chunks(
    model: nn.Module,
    inputs: Inputs,
    *,
    n_samples: int,
    max_batch_size: int | None,
    memory_budget: int,
    output: OutputSelector,
    output_batch_dim: int,
    pair: bool,
    check_finite: bool = True,
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, stop, chunk)`` with ``chunk`` samples-first ``(k, stop - start, ...)``.

    Every batch row receives exactly ``n_samples`` samples over all chunks. ``chunk`` is one
    tensor, or a ``(mean, variance)`` pair when ``pair``. The model is called in whatever mode it
    is in: callers wrap this in :func:`mcdrop.enable_dropout`.

    Without ``max_batch_size`` the first pass draws one sample for as many rows as the inputs alone
    allow; its output size then fixes the row budget for the rest.
    """
    batch = inputs.batch_size
    # Off the CPU, bad rows are flagged on the device and checked once after the last chunk, so the
    # loop never waits for the device (no host-device synchronisation per chunk).
    bad_rows: list[torch.Tensor] = []

    def run(s: int, e: int, k: int) -> Any:
        part = slice_batch(inputs, s, e)
        args, kwargs = replicate(part, k)
        out = model(*args, **kwargs)
        chosen = select_output(out, output, pair)
        if pair:
            chunk = tuple(to_samples_first(c, k, e - s, output_batch_dim) for c in chosen)
        else:
            chunk = to_samples_first(chosen, k, e - s, output_batch_dim)
        if check_finite:
            first = chunk[0] if isinstance(chunk, tuple) else chunk
            if first.device.type == "cpu":
                _check_finite(chunk)
            else:
                _flag_bad_rows(chunk, s, e, batch, bad_rows)
        return chunk

    if max_batch_size is not None:
        for s, e, k in plan_work(0, batch, n_samples, max_batch_size):
            yield s, e, run(s, e, k)
        _raise_if_bad_rows(bad_rows)
        return
    first_rows = min(batch, auto_max_batch_size(inputs, None, memory_budget, n_samples))
    chunk = run(0, first_rows, 1)
    yield 0, first_rows, chunk
    tensors = chunk if isinstance(chunk, tuple) else (chunk,)
    out_row = sum(c[0, 0].numel() * c.element_size() for c in tensors)
    rows = auto_max_batch_size(inputs, out_row, memory_budget, n_samples)
    work = list(plan_work(0, first_rows, n_samples - 1, rows)) + list(
        plan_work(first_rows, batch, n_samples, rows)
    )
    for s, e, k in work:
        yield s, e, run(s, e, k)
    _raise_if_bad_rows(bad_rows)


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
