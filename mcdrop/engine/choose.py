"""Choosing a strategy: the probe pass, trials on a first chunk, and the decision they give.

``strategy="auto"`` observes the first pass (one sample of the first rows, under
:class:`~mcdrop.engine.probe.ProbeMode`) and picks vmap when the deterministic trunk holds at least
:data:`HOIST_MIN_FRACTION` of the FLOPs, tries it on the next chunk and keeps it only if it runs and
draws fresh random numbers for every sample, else replication (tried the same way), else the
loop. A failed attempt restores every generator, so it leaves no trace in the samples; reasons are
logged at DEBUG level on the ``mcdrop.sampling`` logger. :func:`decide` returns the
:class:`Decision` with the chunks that deciding drew (real samples: the head pass and the
successful trial) and the work items left; :func:`apply_verdict` refuses or warns about what a call
asks for given the row check's verdict, and runs again whenever a remembered decision is used.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mcdrop._checks import user_stacklevel
from mcdrop.engine.inputs import holds_objects, objects_hint
from mcdrop.engine.plan import first_rows, plan_passes, plan_work
from mcdrop.engine.probe import ProbeMode, ProbeReport
from mcdrop.engine.strategies import Runner
from mcdrop.errors import McdropError, RowCheckWarning, UnsupportedModelError

#: ``"auto"`` hoists with vmap when the deterministic trunk holds at least this share of the FLOPs.
HOIST_MIN_FRACTION = 0.2

#: The logger of the sampling decisions (named ``mcdrop.sampling`` since the first version: users
#: filter on it).
log = logging.getLogger("mcdrop.sampling")

Chunk = tuple[int, int, Any]


@dataclass
class Decision:
    """How a given input signature is sampled, and what its probe pass measured."""

    strategy: str
    report: ProbeReport | None
    out_row_bytes: int
    reason: str
    mixes_rows: bool = False
    head_samples: int = 1
    first_row_bytes: float | None = None
    #: What the row check said (see :func:`mcdrop.engine.checks.rows_mix`): rows mix, do not, or no verdict.
    rows_verdict: bool | None = False


def plan_for(
    runner: Runner,
    decision: Decision,
    max_batch_size: int | None,
    memory_budget: int | None,
    *,
    probed: bool,
) -> list[tuple[int, int, int]]:
    """The work items of ``runner``'s call under ``decision`` (see :func:`~mcdrop.engine.plan.plan_passes`)."""
    return plan_passes(
        runner.inputs,
        runner.n,
        strategy=decision.strategy,
        head_samples=decision.head_samples,
        max_batch_size=max_batch_size,
        memory_budget=memory_budget,
        report=decision.report,
        out_row_bytes=decision.out_row_bytes,
        first_row_bytes=decision.first_row_bytes,
        mixes_rows=decision.mixes_rows,
        on_cpu=runner.device.type == "cpu",
        probed=probed,
    )


def apply_verdict(runner: Runner, verdict: bool | None, strategy: str, max_batch_size: int | None) -> bool:
    """Refuse, or warn about, what the call asks for, given the row check's verdict.

    Returns whether passes must hold the whole batch once, never replicas (see
    :func:`mcdrop.engine.checks.rows_mix` for the verdict).

    Run when a decision is made and again whenever a remembered one is used: whether
    ``max_batch_size`` splits the batch depends on the batch size, which the remembered
    decision does not.

    Raises:
        UnsupportedModelError: The rows mix, and replicas or a split batch were asked for.
    """
    batch = runner.inputs.batch_size
    replicas = strategy == "replicate" and runner.n > 1
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
        if asked and not holds_objects(runner.inputs):  # with a cache the check cannot split it: no news
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


def decide(
    runner: Runner,
    strategy: str,
    max_batch_size: int | None,
    memory_budget: int | None,
    *,
    verdict: bool | None,
    mixes: bool,
    row_bytes: float | None,
) -> tuple[Decision, list[Chunk], list[tuple[int, int, int]]]:
    """Probe, choose a strategy (trying it on its first chunk), and say what is left to run.

    The probe is the head pass of the replicate and loop plans (one sample of the first rows,
    or the first work item under ``max_batch_size``); when vmap is chosen, the probe's draws
    are undone and the vmap plan runs from its start, as it does once the decision is remembered.

    Args:
        runner: The call's runner.
        strategy: What the call asks for (``"auto"`` or one strategy).
        max_batch_size: Most rows per pass, or ``None``.
        memory_budget: Bytes one pass may use (``None``: the default).
        verdict: The row check's verdict.
        mixes: Whether passes must hold the whole batch once (:func:`apply_verdict`).
        row_bytes: What a row held at the peak of the row check's passes, when measured.

    Returns:
        ``(decision, drawn, rest)``: the :class:`Decision`, the chunks drawn while deciding (in
        order: they are samples of the call), and the work items still to run with
        ``decision.strategy`` (none of them a head pass).

    Raises:
        UnsupportedModelError: The one strategy asked for cannot sample the model correctly.
    """
    inputs = runner.inputs
    if max_batch_size is not None:
        s0, e0, k0 = next(plan_work(0, inputs.batch_size, runner.n, max_batch_size))
    else:
        s0, e0, k0 = 0, first_rows(inputs, runner.n, memory_budget, mixes_rows=mixes, row_bytes=row_bytes), 1
    if strategy == "loop" or mixes:
        k0 = 1  # the head pass holds no replicas
    before_probe = runner.snapshot()
    report, head, forced = _probe(runner, strategy, s0, e0, k0)
    after_probe = runner.snapshot()
    tensors = head if isinstance(head, tuple) else (head,)
    out_row = sum(c[0, 0].numel() * c.element_size() for c in tensors)
    candidates, reason = _candidates(forced or strategy, report)
    if mixes:
        candidates = [c for c in candidates if c != "replicate"] or ["loop"]
        reason += (
            "; a row's output depends on the other rows of its pass"
            if verdict
            else "; the row check gave no verdict"
        ) + ": every pass holds the whole batch once, never replicas"
    decision = Decision(candidates[0], report, out_row, reason, mixes, k0, row_bytes, verdict)
    drawn: list[Chunk] = []
    for position, candidate in enumerate(candidates):
        decision.strategy = candidate
        last = position == len(candidates) - 1
        if candidate == "vmap":
            plan = plan_for(runner, decision, max_batch_size, memory_budget, probed=False)
            s, e, k = plan[0]
            if k < 2 and last:
                # One sample per pass throughout (plans never grow k later): plain passes.
                runner.restore(before_probe)
                decision.reason = reason + "; one sample per pass"
                return decision, drawn, plan
            if k < 2 or (s, e) != (s0, e0):
                why_not = f"its first chunk would hold {k} sample(s) of rows {s}:{e}"
            else:
                runner.restore(before_probe)
                chunk, why_not = _attempt_trial(runner, "vmap", s, e, k, report, k0)
            if why_not is None:
                decision.reason = reason
                log.debug("mcdrop: sampling with strategy 'vmap' (%s).", reason)
                return decision, [(s, e, chunk)], plan[1:]
            runner.restore(after_probe)
        else:
            if not drawn:
                drawn.append((s0, e0, head))
            plan = plan_for(runner, decision, max_batch_size, memory_budget, probed=True)
            if not plan:
                decision.reason = reason
                return decision, drawn, []
            s, e, k = plan[0]
            if candidate == "loop" or k == 1:
                decision.reason = reason
                log.debug("mcdrop: sampling with strategy %r (%s).", candidate, reason)
                return decision, drawn, plan
            state = runner.snapshot()
            chunk, why_not = _attempt_trial(
                runner, candidate, s, e, k, report if (s, e) == (s0, e0) else None, k0
            )
            if why_not is None:
                decision.reason = reason
                log.debug("mcdrop: sampling with strategy %r (%s).", candidate, reason)
                return decision, [*drawn, (s, e, chunk)], plan[1:]
            runner.restore(state)
        reason += f"; {candidate} rejected ({why_not})"
        log.debug("mcdrop: strategy %r rejected: %s", candidate, why_not)
        if last:
            raise UnsupportedModelError(
                f"strategy={candidate!r} cannot sample this model correctly: {why_not.rstrip('.')}. "
                f"{objects_hint(inputs) if candidate == 'replicate' else ''}Use "
                "strategy='auto' to fall back to another strategy automatically."
            )
    raise AssertionError("unreachable: the last candidate returns or raises")  # pragma: no cover


def _attempt_trial(
    runner: Runner, strategy: str, s: int, e: int, k: int, report: ProbeReport | None, k0: int
) -> tuple[Any, str | None]:
    try:
        return _trial(runner, strategy, s, e, k, report, k0)
    except McdropError:
        raise
    except Exception as err:  # noqa: BLE001 - the model does not support this strategy
        return None, f"{type(err).__name__}: {err}"


def _probe(runner: Runner, strategy: str, s: int, e: int, k: int) -> tuple[ProbeReport | None, Any, str | None]:
    """Run the head pass (replicated rows, SplitMix64 masks) under :class:`ProbeMode`."""
    if strategy == "loop" or runner.n == 1:
        with runner.hash_masks():
            return None, runner.replicate(s, e, k), None
    state = runner.snapshot()
    mode = ProbeMode(rows=k * (e - s))
    try:
        with runner.hash_masks(mode), mode:
            chunk = runner.replicate(s, e, k)
    except McdropError:
        raise
    except Exception as err:  # noqa: BLE001 - the probe itself is not supported: sample plainly
        log.debug("mcdrop: probe pass failed (%s: %s); sampling without it.", type(err).__name__, err)
        runner.restore(state)
        with runner.hash_masks():
            chunk = runner.replicate(s, e, k)
        return None, chunk, ("replicate" if strategy == "auto" else strategy)
    return mode.report(), chunk, None


def _candidates(strategy: str, report: ProbeReport | None) -> tuple[list[str], str]:
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
    runner: Runner, strategy: str, s: int, e: int, k: int, report: ProbeReport | None, k0: int
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
        return runner.replicate(s, e, k), None
    if strategy == "vmap" and report.foreign_draws == 0 and report.own_draws == 0:
        return None, (
            "no torch random draw observed in the probe pass, so vmap's per-sample randomness "
            "cannot be checked"
        )
    mode = ProbeMode(rows=k * (e - s))
    fallback_warnings = torch._C._functorch._set_vmap_fallback_warning_enabled
    saved = runner.ctx.on_own_draw if runner.ctx is not None else None
    if runner.ctx is not None:
        runner.ctx.on_own_draw = mode.own_draw
    try:
        fallback_warnings(strategy == "vmap")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mode:
                chunk = runner.vmap(s, e, k) if strategy == "vmap" else runner.replicate(s, e, k)
    finally:
        fallback_warnings(False)
        if runner.ctx is not None:
            runner.ctx.on_own_draw = saved
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
