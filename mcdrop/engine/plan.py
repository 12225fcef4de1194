"""Sizing the engine's forward passes: every rule and constant, as pure functions.

A call's work is a list of *work items* ``(start, stop, k)``: ``k`` samples of rows
``start:stop`` in one forward pass (``k`` replicas, or a vmap over ``k`` samples). How many rows a
pass may hold is decided here, from ``max_batch_size`` when the user gives one, else from a memory
budget and what passes were measured to hold (the row check's first pass of one row, the probe
pass), and on the CPU from the size of the largest activation, which measures faster when small
(``docs/performance.md``). Nothing here runs the model: the functions take the sizes and return
the rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from mcdrop.engine.inputs import Inputs, holds_objects, input_bytes_per_row
from mcdrop.engine.probe import ProbeReport

#: Default bound on the number of activation bytes one forward pass may touch, for choosing chunk
#: sizes automatically (inputs and outputs times a safety factor for intermediate activations).
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: Safety factor on the input and output bytes of a row when nothing was measured.
ACTIVATION_FACTOR = 16
#: Margin on a measured peak (tensor storage of an observed pass, per row) when sizing passes.
PEAK_MARGIN = 1.25
#: Extra margin on the peak of a check pass, which ran with dropout as the identity (a sampling
#: pass also holds the masks and the dropped copies).
CHECK_MARGIN = 2.0
#: Most input rows a check pass (the row check, the gate check) runs on.
CHECK_ROWS = 8
#: On the CPU, the largest activation of one pass is kept near this many bytes (faster than larger).
CPU_PASS_BYTES = 4 * 2**20
#: With vmap, chunks hold enough samples for the recomputed trunk to cost at most 1/this of them.
TRUNK_AMORTIZATION = 10


def budget_or_default(memory_budget: int | None) -> int:
    """``memory_budget``, or :data:`DEFAULT_MEMORY_BUDGET` for ``None``."""
    return DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget


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
        per_row = measured_bytes_per_row * PEAK_MARGIN + in_bytes
    else:
        per_row = (in_bytes + (out_bytes_per_row or 0)) * ACTIVATION_FACTOR
    rows = int(memory_budget // max(per_row, 1.0))
    return int(max(1, min(rows, n_samples * inputs.batch_size)))


def check_row_count(
    inputs: Inputs,
    max_batch_size: int | None,
    memory_budget: int | None,
    n_samples: int,
    row_bytes: float | None,
) -> int:
    """Rows of a check pass (row check, gate check): at most :data:`CHECK_ROWS`.

    No more than ``max_batch_size`` and than fit ``memory_budget`` with ``row_bytes`` per row
    (measured on one row; the default budget when ``None``), but at least two rows where the batch
    and ``max_batch_size`` have them (batch statistics need two). The whole batch (or
    ``max_batch_size`` rows) when the inputs hold a non-tensor object (:func:`holds_objects`): it
    goes whole to every pass, and its batch, e.g. a KV cache's, cannot follow a slice of the rows.
    """
    if holds_objects(inputs):
        return min(inputs.batch_size, max_batch_size or inputs.batch_size)
    fit = auto_max_batch_size(inputs, None, budget_or_default(memory_budget), n_samples, row_bytes)
    return min(inputs.batch_size, CHECK_ROWS, max_batch_size or CHECK_ROWS, max(2, fit))


def gate_check_measures_a_row(inputs: Inputs, max_batch_size: int | None) -> bool:
    """Whether the gate check first measures one row (to size its pass): when it could hold > 2 rows.

    Not for inputs holding an object (a KV cache), which need the whole batch in every pass.
    """
    few_rows = min(inputs.batch_size, CHECK_ROWS, max_batch_size or CHECK_ROWS) > 2
    return few_rows and not holds_objects(inputs)


def first_rows(
    inputs: Inputs,
    n_samples: int,
    memory_budget: int | None,
    *,
    mixes_rows: bool = False,
    row_bytes: float | None = None,
) -> int:
    """Rows of the first pass (one sample each) when chunks are sized automatically.

    Sized from ``row_bytes`` (what the row check's pass held at its peak, per row) where it was
    measured. The whole batch when ``mixes_rows`` (the row check found, or could not rule out, that
    rows affect each other) or when the inputs hold a non-tensor object that every pass gets whole
    (a KV cache, whose batch cannot be sliced), whatever the budget.
    """
    if mixes_rows or holds_objects(inputs):
        return inputs.batch_size
    rows = auto_max_batch_size(inputs, None, budget_or_default(memory_budget), n_samples, row_bytes)
    return min(inputs.batch_size, rows)


def rows_per_pass(
    inputs: Inputs,
    n_samples: int,
    *,
    strategy: str,
    report: ProbeReport | None,
    out_row_bytes: int,
    first_row_bytes: float | None,
    mixes_rows: bool,
    memory_budget: int | None,
    on_cpu: bool,
    first: int,
) -> int:
    """Rows (samples times inputs) of the passes after the first, when sized automatically.

    For vmap, only what follows the first random draw grows with the samples of a pass: what that
    part held at its peak in the probe, per row, with a margin (or, unmeasured, its largest
    activation times a safety factor); chunks also hold enough samples for the trunk, run once per
    chunk, to cost little (:data:`TRUNK_AMORTIZATION`). For replication and the loop: the probe's
    peak per row (or the row check's). On the CPU without an explicit budget, the largest
    activation stays near :data:`CPU_PASS_BYTES`. A model whose rows mix, or inputs holding an
    object, never have their batch split. ``first`` is the row count of the first pass.
    """
    budget = budget_or_default(memory_budget)
    if strategy == "vmap" and report is not None:
        if report.peak_stochastic_bytes > 0:
            # A pass of k samples of b rows holds the trunk of b rows once and the rest k times.
            per_row = report.peak_stochastic_bytes * PEAK_MARGIN + out_row_bytes
            trunk_row = max(report.peak_bytes - report.peak_stochastic_bytes, 0.0) * PEAK_MARGIN
            batch = inputs.batch_size
            if budget >= batch * (per_row + trunk_row):
                rows_memory = int((budget - batch * trunk_row) // max(per_row, 1.0))
            else:
                rows_memory = int(max(1, budget // max(per_row + trunk_row, 1.0)))
        else:
            per_row = (report.max_stochastic_bytes + out_row_bytes) * ACTIVATION_FACTOR
            rows_memory = int(max(1, budget // max(per_row, 1.0)))
    else:
        rows_memory = auto_max_batch_size(
            inputs,
            out_row_bytes,
            budget,
            n_samples,
            report.peak_bytes if report is not None else first_row_bytes,
        )
    rows = rows_memory
    if memory_budget is None and on_cpu and report is not None:
        per_row = report.max_stochastic_bytes if strategy == "vmap" else report.max_bytes
        rows = max(1, min(rows_memory, int(CPU_PASS_BYTES // max(per_row, 1.0))))
    if strategy == "vmap" and report is not None:
        if report.stochastic_flops > 0:
            k_min = math.ceil(TRUNK_AMORTIZATION * report.trunk_flops / report.stochastic_flops)
        else:
            k_min = n_samples
        rows = max(rows, min(rows_memory, first * min(k_min, n_samples)))
    if mixes_rows or holds_objects(inputs):
        rows = max(rows, inputs.batch_size)  # never split the batch of such a model (or input)
    return max(1, rows)


def plan_passes(
    inputs: Inputs,
    n_samples: int,
    *,
    strategy: str,
    head_samples: int,
    max_batch_size: int | None,
    memory_budget: int | None,
    report: ProbeReport | None,
    out_row_bytes: int,
    first_row_bytes: float | None,
    mixes_rows: bool,
    on_cpu: bool,
    probed: bool,
) -> list[tuple[int, int, int]]:
    """The work items ``(start, stop, k)`` of a call, after the first one when ``probed``.

    The plan depends only on the decision and the batch, not on whether the decision was just
    made: the replicate and loop plans always start with ``head_samples`` sample(s) of the first
    rows, as the probe does, so a batch meets the model in the same pass shapes on every call. A
    vmap plan that was decided earlier starts directly with many samples, so that the trunk is not
    run once more for that first sample alone.
    """
    batch = inputs.batch_size
    if max_batch_size is not None:
        work = list(plan_work(0, batch, n_samples, max_batch_size))
        if strategy == "vmap" and not probed:
            return work
        s0, e0, k0 = work[0]
        h = head_samples
        if h < k0:  # the head pass (loop, or a model mixing rows) has fewer samples
            work = [(s0, e0, h), (s0, e0, k0 - h), *work[1:]]
        return work[1:] if probed else work
    r0 = first_rows(inputs, n_samples, memory_budget, mixes_rows=mixes_rows, row_bytes=first_row_bytes)
    rows = rows_per_pass(
        inputs,
        n_samples,
        strategy=strategy,
        report=report,
        out_row_bytes=out_row_bytes,
        first_row_bytes=first_row_bytes,
        mixes_rows=mixes_rows,
        memory_budget=memory_budget,
        on_cpu=on_cpu,
        first=r0,
    )
    if strategy == "vmap" and not probed:
        return list(plan_work(0, batch, n_samples, rows))
    head = [] if probed else [(0, r0, 1)]
    return head + list(plan_work(0, r0, n_samples - 1, rows)) + list(plan_work(r0, batch, n_samples, rows))
