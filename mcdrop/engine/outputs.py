"""Outputs of the engine: choosing the analysed output, samples-first reshaping, finite checks.

From whatever the model returns (a tensor, a tuple, a dict, a Hugging Face output object) the
output to analyse is chosen (:func:`select_output`), reshaped samples-first ``(k, b, ...)``
(:func:`to_samples_first` for replicated rows, :func:`vmapped_samples_first` for vmap; where the
batch sits in it is inferred only when that is unambiguous, :func:`infer_output_batch_dim`), and
checked for NaN and +inf (on the CPU at once, on a device flagged per row without a sync and
checked after the last chunk). The row check compares outputs row by row (:func:`row_gap`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mcdrop.errors import InvalidInputError, InvalidTypeError, NonFiniteError

OutputSelector = Callable[[Any], Any] | str | int | None


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


def infer_output_batch_dim(shape: Sequence[int], rows: int) -> int:
    """The batch dimension of one sample's output of ``shape``, from a pass of ``rows`` rows.

    For ``batch_dim`` mappings whose batched inputs have different batch dimensions, with no
    ``output_batch_dim`` given: the batch of a batched output has size ``rows``, so the output's
    only dimension of that size is its batch. None, or several (a sequence-first ``(T, B, ...)``
    output with ``T == B``), are refused rather than guessed.

    Raises:
        InvalidInputError: No dimension, or more than one, of ``shape`` has size ``rows``.
    """
    dims = [d for d, size in enumerate(shape) if size == rows]
    if len(dims) == 1:
        return dims[0]
    where = "no dimension has" if not dims else f"dimensions {dims} all have"
    raise InvalidInputError(
        f"The model output has shape {tuple(shape)} for a pass of {rows} rows: {where} that size, so "
        "where its batch is cannot be told. batch_dim= gives the inputs different batch dimensions, so "
        "the output's is not taken from them: set output_batch_dim= to the output's batch dimension "
        "(e.g. output_batch_dim=1 for a (T, B, ...) output of a sequence-first model)."
    )


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


def upcast(t: torch.Tensor) -> torch.Tensor:
    """A float16 or bfloat16 tensor in float32 (statistics are kept in float32); others as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rows_first(out: Any, out_dim: int) -> Any:
    """The selected output (or pair) with its batch dim first, detached, in float64 on the CPU."""
    if isinstance(out, tuple):
        return tuple(rows_first(o, out_dim) for o in out)
    return out.detach().movedim(out_dim, 0).to("cpu", torch.float64)


def row_gap(whole: Any, part: Any, start: int, tolerance: float) -> bool:
    """Whether rows ``start:`` of ``whole`` differ from ``part`` by more than ``tolerance`` (relative).

    Not where either is NaN or +inf, which say nothing of the rows' neighbours (the masked mean of
    an all-masked row is NaN whatever they are) and which sampling refuses anyway. A -inf (a masked
    logit, which sampling accepts) is a value like any other: equal only to a -inf.
    """
    if isinstance(whole, tuple):
        return any(row_gap(w, q, start, tolerance) for w, q in zip(whole, part, strict=True))
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


def vmapped_samples_first(t: torch.Tensor, b: int, out_dim: int) -> torch.Tensor:
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


def flag_bad_rows(chunk: Any, start: int, stop: int, batch: int, flags: list[torch.Tensor]) -> None:
    """Mark (on the chunk's device, without a sync) the rows whose outputs hold NaN or +inf."""
    for t in chunk if isinstance(chunk, tuple) else (chunk,):
        if t.is_floating_point():
            if not flags:
                flags.append(torch.zeros(batch, dtype=torch.bool, device=t.device))
            bad = torch.isnan(t) | (t == float("inf"))
            flags[0][start:stop] |= bad.reshape(t.shape[0], t.shape[1], -1).any(-1).any(0)


def raise_if_bad_rows(flags: list[torch.Tensor]) -> None:
    """Raise :class:`~mcdrop.errors.NonFiniteError` naming the rows that :func:`flag_bad_rows` flagged."""
    if flags and bool(flags[0].any()):
        rows = torch.nonzero(flags[0]).flatten()[:5].tolist()
        raise NonFiniteError(
            f"The model produced NaN or infinity in its output (batch rows {rows} among others) "
            "while dropout was on. Check the model in train-mode dropout (e.g. a log of 0, an "
            "overflow in float16) and the inputs of those rows."
        )


def check_finite_chunk(chunk: Any) -> None:
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
