"""The sampling strategies: drawing ``k`` samples of a batch's rows in one go (vmap, replicate, loop).

* ``"vmap"`` -- :func:`torch.func.vmap` with ``randomness="different"`` over ``k`` samples, closing
  over the unreplicated inputs. Whatever precedes the first random draw (the deterministic trunk:
  a CNN's convolutions before a dropout head, an MLP's first layer) runs once at batch size ``b``;
  only what depends on a draw runs for the ``k`` samples. Works on arbitrary ``forward`` code as
  long as its operations have batching rules.
* ``"replicate"`` -- the inputs repeated ``k`` times along their batch dimension (sample-major rows
  ``s * b + i``), one pass of ``k * b`` rows; dropout masks are drawn independently per row.
* ``"loop"`` -- one pass per sample, for models that only take their own batch size.

:class:`Runner` runs work items ``(start, stop, k)`` with one of them and hands back samples-first
chunks ``(k, stop - start, ...)``, finished (upcast from autocast, checked for NaN and +inf). Which
strategy to use is decided in :mod:`mcdrop.engine.choose`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mcdrop.engine.fastdropout import FastContext
from mcdrop.engine.inputs import Inputs, replicate, slice_batch
from mcdrop.engine.outputs import (
    OutputSelector,
    check_finite_chunk,
    flag_bad_rows,
    infer_output_batch_dim,
    raise_if_bad_rows,
    select_output,
    to_samples_first,
    upcast,
    vmapped_samples_first,
)
from mcdrop.engine.probe import ProbeMode
from mcdrop.engine.rng import RngState, rng_restore, rng_snapshot
from mcdrop.engine.state import EscapedTensorsError, HeldTensors

_log = logging.getLogger("mcdrop.sampling")

#: The sampling strategies (see :func:`mcdrop.engine.sample.sample_chunks`).
STRATEGIES = ("auto", "vmap", "replicate", "loop")


def autocast_context(device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` in ``dtype`` on ``device`` (the CPU when ``None``); a no-op for ``None`` dtype."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type if device is not None else "cpu", dtype=dtype)


class Runner:
    """Runs the forward passes of one call's work items with a strategy, and finishes their chunks.

    Args:
        model: The model, with its dropout switched on.
        inputs: Prepared inputs (:func:`~mcdrop.engine.inputs.prepare_inputs`).
        n_samples: Samples per row over the whole call.
        output: Which part of the model output to keep.
        output_batch_dim: Batch dimension of the selected output; ``None`` where it was not given
            and ``batch_dim`` is a mapping: then the batch dimension every batched input has, else
            inferred from the first output of the call (see :meth:`output_dim`).
        pair: The selected output is a ``(mean, variance)`` pair.
        check_finite: Refuse NaN and +inf outputs.
        autocast_dtype: Run the model under ``torch.autocast`` in this dtype (``None``: as it is).
        device: The model's device.
        ctx: The faster dropout masks' context (:func:`~mcdrop.engine.fastdropout.accelerated`), or
            ``None`` where they are off.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        *,
        n_samples: int,
        output: OutputSelector,
        output_batch_dim: int | None,
        pair: bool,
        check_finite: bool,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
        ctx: FastContext | None,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.n = n_samples
        self.output = output
        if output_batch_dim is None:
            shared = {d for d in inputs.dims.values() if d is not None}
            output_batch_dim = shared.pop() if len(shared) == 1 else None
        self.output_batch_dim = output_batch_dim
        self.pair = pair
        self.check_finite = check_finite
        self.autocast_dtype = autocast_dtype
        self.device = device
        self.ctx = ctx
        # Off the CPU, bad rows are flagged on the device and checked once after the last chunk,
        # so the loop never waits for the device (no host-device synchronisation per chunk).
        self.bad_rows: list[torch.Tensor] = []
        #: Why vmap was given up during this call (a pass left functorch tensors on the model or
        #: its hooks), else ``None``; its work items then run one pass per sample.
        self.vmap_refused: str | None = None

    def output_dim(self, out: Any, rows: int, *, vmapped: bool = False) -> int:
        """The batch dimension of the selected output ``out`` (or pair) of a pass of ``rows`` rows.

        ``output_batch_dim``; where that is ``None``, inferred from ``out`` (one sample's
        dimensions: without the leading sample dimension of a vmap output when ``vmapped``) by
        :func:`~mcdrop.engine.outputs.infer_output_batch_dim`, and kept for the rest of the call.
        Only the output's batch has a size that a pass's rows set, so any pass that tells it tells it
        right.

        Raises:
            InvalidInputError: ``out`` has no dimension, or several, of size ``rows``.
        """
        if self.output_batch_dim is None:
            first = out[0] if isinstance(out, tuple) else out
            shape = tuple(getattr(first, "shape", ()))
            self.output_batch_dim = infer_output_batch_dim(shape[1:] if vmapped else shape, rows)
        return self.output_batch_dim

    def autocast(self) -> Any:
        """The autocast context of the call's passes (a no-op without ``autocast_dtype``)."""
        return autocast_context(self.device, self.autocast_dtype)

    def _finish(self, chunk: Any, s: int, e: int) -> Any:
        if self.autocast_dtype is not None:
            chunk = tuple(upcast(c) for c in chunk) if isinstance(chunk, tuple) else upcast(chunk)
        if self.check_finite:
            first = chunk[0] if isinstance(chunk, tuple) else chunk
            if first.device.type == "cpu":
                check_finite_chunk(chunk)
            else:
                flag_bad_rows(chunk, s, e, self.inputs.batch_size, self.bad_rows)
        return chunk

    def replicate(self, s: int, e: int, k: int) -> Any:
        """``k`` samples of rows ``s:e`` from one pass over the replicated rows."""
        part = slice_batch(self.inputs, s, e)
        args, kwargs = replicate(part, k)
        if self.ctx is not None:
            self.ctx.replicas = k
        try:
            with self.autocast():
                out = self.model(*args, **kwargs)
        finally:
            if self.ctx is not None:
                self.ctx.replicas = 1
        chosen = select_output(out, self.output, self.pair)
        dim = self.output_dim(chosen, k * (e - s))
        if self.pair:
            chunk = tuple(to_samples_first(c, k, e - s, dim) for c in chosen)
        else:
            chunk = to_samples_first(chosen, k, e - s, dim)
        return self._finish(chunk, s, e)

    def vmap(self, s: int, e: int, k: int) -> Any:
        """``k`` samples of rows ``s:e`` from one ``vmap`` over samples of the unreplicated rows.

        Raises:
            EscapedTensorsError: The pass left functorch tensors in the model's or its hooks'
                state (found by :class:`~mcdrop.engine.state.HeldTensors`, and put back as it was).
        """
        part = slice_batch(self.inputs, s, e)
        # One pass of the model (run once for the k samples): copies of every input, as replicate makes.
        args, kwargs = part.map(lambda t, d: t.clone(), fresh=True)

        ctx = self.ctx

        def one_sample(_: torch.Tensor) -> Any:
            if ctx is not None:  # the fast masks draw all k samples' masks at once at this level
                ctx.vmap_level, ctx.vmap_size = torch._C._functorch.maybe_current_level(), k
            return select_output(self.model(*args, **kwargs), self.output, self.pair)

        held = HeldTensors(self.model)
        try:
            with self.autocast():
                out = torch.func.vmap(one_sample, randomness="different")(torch.zeros(k))
        except BaseException:
            held.escaped()  # put back what the failed pass left
            raise
        finally:
            if ctx is not None:
                ctx.vmap_level, ctx.vmap_size = None, 0
        held.check()
        dim = self.output_dim(out, e - s, vmapped=True)
        if self.pair:
            chunk = tuple(vmapped_samples_first(c, e - s, dim) for c in out)
        else:
            chunk = vmapped_samples_first(out, e - s, dim)
        return self._finish(chunk, s, e)

    def run(self, strategy: str, s: int, e: int, k: int) -> Iterator[tuple[int, int, Any]]:
        """Yield the chunks of work item ``(s, e, k)`` drawn with ``strategy``.

        A vmap pass that leaves functorch tensors on the model or its hooks (a model or hook that
        began to store them after the decision) is dropped, and this and the remaining vmap work
        items run one pass per sample (:attr:`vmap_refused` says why).
        """
        if strategy == "vmap" and k > 1 and self.vmap_refused is None:
            try:
                chunk = self.vmap(s, e, k)
            except EscapedTensorsError as err:
                self.vmap_refused = str(err)
                _log.debug("mcdrop: vmap given up for the rest of the call, one pass per sample: %s.", err)
            else:
                yield s, e, chunk
                return
        if strategy == "loop" or (strategy == "vmap" and k > 1):
            for _ in range(k):
                yield s, e, self.replicate(s, e, 1)
        else:
            yield s, e, self.replicate(s, e, k)

    @contextlib.contextmanager
    def hash_masks(self, mode: ProbeMode | None = None) -> Iterator[None]:
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
        self, strategy: str, plan: list[tuple[int, int, int]], *, first_is_head: bool
    ) -> Iterator[tuple[int, int, Any]]:
        """Yield every chunk of ``plan`` drawn with ``strategy``.

        ``first_is_head``: the first work item is the head pass that the probe also makes, and
        draws its masks the way the probe does, so a call draws the same samples whether or not
        its decision was remembered. Errors propagate: a strategy is only ever abandoned on its
        trial chunk (in :func:`mcdrop.engine.choose.decide`), so a model that fails later fails
        the call, as it would when sampled one pass at a time.
        """
        for i, (s, e, k) in enumerate(plan):
            if i == 0 and first_is_head and strategy != "vmap":
                with self.hash_masks():
                    yield from self.run(strategy, s, e, k)
            else:
                yield from self.run(strategy, s, e, k)

    def snapshot(self) -> RngState:
        """Every generator a pass may draw from (torch's, the fast masks'), to undo an attempt."""
        return rng_snapshot(self.ctx.generator if self.ctx else None)

    def restore(self, state: RngState) -> None:
        """Put the generators back as :meth:`snapshot` found them."""
        rng_restore(state, self.ctx.generator if self.ctx else None)

    def raise_if_bad_rows(self) -> None:
        """Raise on rows flagged non-finite on the device (checked once, after the last chunk)."""
        raise_if_bad_rows(self.bad_rows)
