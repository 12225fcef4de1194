"""Sampling one batch: N stochastic forward passes drawn in batch, in chunks, on the model's device.

:func:`sample_chunks` is the engine's entry point. For one call it checks whether the model's rows
mix (:func:`~mcdrop.engine.checks.rows_mix`), decides how to draw the passes
(:func:`~mcdrop.engine.choose.decide`, or a decision remembered for the input signature), and
yields samples-first chunks ``(k, b, ...)`` as the :class:`~mcdrop.engine.strategies.Runner` draws
them, to be reduced to running statistics at once, so memory does not grow with N. On the CPU,
dropout masks are drawn by the faster (same-law) paths of :mod:`mcdrop.engine.fastdropout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_choice
from mcdrop.engine.checks import rows_mix
from mcdrop.engine.choose import Decision, apply_verdict, decide, plan_for
from mcdrop.engine.fastdropout import accelerated
from mcdrop.engine.inputs import Inputs, model_device_dtype, signature, split_errors_named
from mcdrop.engine.outputs import OutputSelector
from mcdrop.engine.strategies import STRATEGIES, Runner


def sample_chunks(
    model: nn.Module,
    inputs: Inputs,
    *,
    n_samples: int,
    max_batch_size: int | None,
    memory_budget: int | None,
    output: OutputSelector,
    output_batch_dim: int | None,
    pair: bool,
    check_finite: bool = True,
    strategy: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    cache: dict[Any, Any] | None = None,
    fast_masks: bool = True,
    on_decision: Callable[[Decision], None] | None = None,
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, stop, chunk)`` with ``chunk`` samples-first ``(k, stop - start, ...)``.

    Every batch row receives exactly ``n_samples`` samples over all chunks. ``chunk`` is one
    tensor, or a ``(mean, variance)`` pair when ``pair``. The model is called in whatever mode it
    is in: callers wrap this in :func:`mcdrop.enable_dropout` (and ``torch.no_grad``).

    How the passes are drawn (``strategy``, see :mod:`mcdrop.engine.strategies`): ``"vmap"`` runs
    the model under ``torch.func.vmap(randomness="different")`` over ``k`` samples of the
    unreplicated batch, so everything that precedes the first random draw (the deterministic trunk)
    runs once per chunk and only what follows it runs per sample; ``"replicate"`` repeats the batch
    ``k`` times along its batch dimension; ``"loop"`` makes one pass per sample. ``"auto"`` observes
    the first pass and chooses (:mod:`mcdrop.engine.choose`); the reasons are logged at DEBUG level
    (logger ``mcdrop.sampling``). A failed attempt leaves no trace in the random streams. With
    ``cache`` (a dict the caller keeps), the decision and the chunk sizes are remembered per input
    signature and later calls skip the probe.

    Chunk sizes (:mod:`mcdrop.engine.plan`): with ``max_batch_size`` every pass holds at most that
    many rows (replicas times inputs; for vmap, samples times inputs). Otherwise a pass may use
    ``memory_budget`` bytes (256 MiB by default), as measured on check and probe passes; on the
    CPU, without an explicit budget, passes are also kept small enough for their largest
    activation to stay near :data:`~mcdrop.engine.plan.CPU_PASS_BYTES`, which measures faster.

    Args:
        model: The model, with its dropout switched on.
        inputs: Prepared inputs (:func:`~mcdrop.engine.inputs.prepare_inputs`).
        n_samples: Samples per row.
        max_batch_size: Most rows per pass, or ``None`` for the automatic choice.
        memory_budget: Bytes one pass may use for the automatic choice; ``None`` for the default.
        output: Which part of the model output to keep (:func:`~mcdrop.engine.outputs.select_output`).
        output_batch_dim: Batch dimension of the selected output; ``None``: inferred (see
            :class:`~mcdrop.engine.strategies.Runner`).
        pair: The selected output is a ``(mean, variance)`` pair.
        check_finite: Raise :class:`~mcdrop.errors.NonFiniteError` on NaN or +inf outputs.
        strategy: ``"auto"``, ``"vmap"``, ``"replicate"`` or ``"loop"``.
        autocast_dtype: Run the model under ``torch.autocast`` with this dtype (float16 or
            bfloat16); the chunks come back in float32.
        cache: Where to remember decisions between calls (``None``: decide afresh).
        fast_masks: Swap in the faster dropout of :mod:`mcdrop.engine.fastdropout` on the CPU.
        on_decision: Called with the call's :class:`~mcdrop.engine.choose.Decision` once it is
            made or recalled (e.g. to learn whether the model's rows mix: ``decision.mixes_rows``).

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
    key = signature(
        inputs, output, output_batch_dim, pair, strategy, autocast_dtype, max_batch_size, memory_budget
    )
    decision: Decision | None = cache.get(key) if cache is not None else None
    fast = fast_masks and device.type == "cpu"
    seed = int(torch.randint(0, 2**62, (1,)).item()) if fast else None
    with split_errors_named(inputs, max_batch_size), accelerated(model, seed=seed, enabled=fast) as ctx:
        runner = Runner(
            model,
            inputs,
            n_samples=n_samples,
            output=output,
            output_batch_dim=output_batch_dim,
            pair=pair,
            check_finite=check_finite,
            autocast_dtype=autocast_dtype,
            device=device,
            ctx=ctx,
        )
        if decision is None:
            verdict, row_bytes = rows_mix(runner, max_batch_size, memory_budget)
            mixes = apply_verdict(runner, verdict, strategy, max_batch_size)
            decision, drawn, rest = decide(
                runner, strategy, max_batch_size, memory_budget, verdict=verdict, mixes=mixes, row_bytes=row_bytes
            )
            if on_decision is not None:
                on_decision(decision)
            yield from drawn
            yield from runner.run_plan(decision.strategy, rest, first_is_head=False)
            if cache is not None:  # remembered once every chunk of the call was drawn
                cache[key] = decision
        else:
            apply_verdict(runner, decision.rows_verdict, strategy, max_batch_size)
            plan = plan_for(runner, decision, max_batch_size, memory_budget, probed=False)
            if on_decision is not None:
                on_decision(decision)
            yield from runner.run_plan(decision.strategy, plan, first_is_head=True)
        if runner.vmap_refused is not None and cache is not None:
            cache.pop(key, None)  # the next call decides afresh (and its vmap trial is refused)
    runner.raise_if_bad_rows()
