"""Adaptive sampling: as many passes per input as its Monte Carlo standard error needs.

With ``MCDropout(model, n_samples="auto", tolerance=..., min_samples=..., max_samples=...,
target=...)`` a batch is sampled in rounds. Every input first gets ``min_samples`` passes; after
each round the prediction of the inputs still being sampled is finished from the streamed
statistics and each input's standard error of the target statistic is read with
:meth:`mcdrop.Prediction.standard_error` (the same estimator the user reads afterwards; the
largest element for a statistic with several values per input, such as ``probs``). An input
stops when that standard error is at most ``tolerance``, or when it has ``max_samples`` passes;
the others go on to the next round, and only they are fed to the model. So a data set whose
inputs settle quickly costs fewer forward rows than a fixed N of the same precision: on the demo's
digits, ``tolerance=0.05`` gave fixed N = 100's accuracy, ECE and NLL with about 4x fewer rows
(``docs/performance.md``). The default ``tolerance=0.01`` is stricter than N = 100 for any input
whose top-class probability varies (an input with a per-pass standard deviation ``s`` needs about
``(s / 0.01)²`` passes, up to ``max_samples``).

The statistics of the inputs still being sampled are kept as one contiguous block of rows (the
running statistics are re-ordered after every round, :meth:`~mcdrop._statistics.RunningMoments.take_rows`),
so the rounds use the engine unchanged. The inputs that stopped after the same round share their
number of samples and are finished together; the result is put back in input order, with the
number of samples of each input in ``Prediction.samples_per_input``.

The size of the next round follows from the standard errors just read: an input at standard error
``s`` after ``n`` passes needs about ``n (s / tolerance)²`` in all (the standard error falls as
``1/sqrt(n)``); the next round draws the median of what the remaining inputs still need, at least
``min_samples // 2`` (at least 1) and at most as many as they have (so N at most doubles per
round) and never past ``max_samples``.

The stopping rule reads the standard error from the same samples that make the estimate, so an
input whose first passes happen to spread little stops early, with an estimate nudged towards
where such runs lie (for a top-class probability near 1: a little higher). On the demo's digits
MLP (``benchmarks/adaptive_n.py``) the mean top-class probability came out higher than a
4000-pass reference by about 0.008 with ``min_samples=10``, 0.005 with 20 (the default) and 0.003
with 30, against 0.001 for a fixed N = 100; a larger ``min_samples`` shrinks it. The standard
errors themselves stay honest (about 94% of inputs within two standard errors of the reference
in the tests).

A model whose rows affect each other's outputs (the engine's row check, e.g. a mean over the
batch) is never given a subset of its batch: every round feeds the whole batch, and only the rows
still being sampled take the new passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mcdrop._statistics import ClassificationStats, GroupedSums
from mcdrop.engine.choose import Decision
from mcdrop.engine.inputs import Inputs, take_rows
from mcdrop.errors import InvalidInputError
from mcdrop.options import ADAPTIVE_TARGETS, DEFAULT_TARGETS, SamplingOptions
from mcdrop.predictions import Prediction, concat_predictions, select_rows

__all__ = ["predict_adaptively"]

#: The targets whose standard errors come from the grouped jackknife (the other ones' do not).
_JACKKNIFED = ("predictive_entropy", "mutual_information")

#: ``draw(inputs, k, on_decision)`` yields the engine's ``(start, stop, chunk)`` for ``k`` passes.
Draw = Callable[[Inputs, int, Callable[[Decision], None]], Iterator[tuple[int, int, Any]]]


def _target_of(options: SamplingOptions, task: str) -> str:
    """The statistic adaptive sampling drives below the tolerance, for a prediction of ``task``.

    Raises:
        InvalidInputError: ``target=`` names a statistic of the other task.
    """
    target = options.target or DEFAULT_TARGETS[task]
    if target not in ADAPTIVE_TARGETS[task]:
        raise InvalidInputError(
            f"target={target!r} is not a statistic of this model's {task} predictions; choose one of "
            f"{', '.join(repr(t) for t in ADAPTIVE_TARGETS[task])} (or give task= to say how to read it)."
        )
    return target


def _per_input_standard_error(pred: Prediction, target: str) -> torch.Tensor:
    """The standard error of ``target`` per input: the largest over the statistic's elements.

    NaN (fewer than two samples) counts as infinitely large.
    """
    se = pred.standard_error(target)
    se = torch.nan_to_num(se.double(), nan=math.inf)
    return se.reshape(se.shape[0], -1).amax(1) if se.dim() > 1 else se


def _next_round(se: torch.Tensor, drawn: int, options: SamplingOptions) -> int:
    """Passes of the next round for the inputs still being sampled (see the module docs)."""
    assert (
        options.tolerance is not None and options.max_samples is not None and options.min_samples is not None
    )
    ratio = (se / options.tolerance).clamp(max=1e6)  # an infinite standard error: as far as can be
    need = torch.ceil(drawn * ratio.square()) - drawn
    step = int(need.median().item()) if need.numel() else 1
    step = max(step, options.min_samples // 2, 1)
    return max(1, min(step, drawn, options.max_samples - drawn))


def predict_adaptively(
    inputs: Inputs,
    options: SamplingOptions,
    *,
    draw: Draw,
    start: Callable[[Any], Any],
    finish: Callable[[Any, int], Prediction],
) -> Prediction:
    """Sample ``inputs`` in rounds until every input's standard error meets the tolerance.

    What :class:`mcdrop.MCDropout` runs for ``n_samples="auto"`` (see the module docs for the rule,
    the size of the rounds and the bias of the stopping rule); users call ``MCDropout.predict``.

    Args:
        inputs: The prepared batch.
        options: Adaptive options (``options.adaptive`` is true).
        draw: Draws ``k`` passes of some inputs: ``draw(inputs, k, on_decision)`` yields the
            engine's samples-first ``(start, stop, chunk)`` and calls ``on_decision`` with the
            engine's decision.
        start: Makes the running statistics from the first chunk (how the output is read).
        finish: ``finish(stats, n)`` finishes statistics whose rows all hold ``n`` samples into a
            prediction.

    Returns:
        The prediction of every input in input order, with ``samples_per_input`` and ``max_samples``;
        ``n_samples`` is the largest number of samples an input received.

    Raises:
        InvalidInputError: ``target`` names a statistic of the other task, or one these predictions
            carry no standard error for (e.g. the mutual information of a segmentation map).

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        ...                           torch.nn.Linear(32, 3)).eval()
        >>> mc = mcdrop.MCDropout(net, n_samples="auto", tolerance=0.02, max_samples=200, seed=0)
        >>> pred = mc.predict(torch.randn(8, 4))  # predict_adaptively, through the wrapper
        >>> se = pred.standard_error("confidence")
        >>> bool(((se <= 0.02) | (pred.samples_per_input == 200)).all()), pred.max_samples
        (True, 200)
    """
    assert options.adaptive and options.max_samples is not None and options.tolerance is not None
    n = inputs.batch_size
    order = torch.arange(n)  # row r of the statistics holds input order[r]
    active = n  # rows 0:active are still being sampled
    drawn = 0  # samples each of them holds
    step = options.first_round
    stats: Any = None
    mixes = False
    target = ""
    segments: list[tuple[int, int, int]] = []  # (first row, stop row, samples) of rows that stopped

    def note(decision: Decision) -> None:
        nonlocal mixes
        mixes = mixes or decision.mixes_rows

    while active:
        fed = order if mixes else order[:active]
        for lo, hi, chunk in draw(take_rows(inputs, fed), step, note):
            hi = min(hi, active)
            if lo >= hi:
                continue  # rows that stopped, fed only because the model's rows mix
            part = tuple(c[:, : hi - lo] for c in chunk) if isinstance(chunk, tuple) else chunk[:, : hi - lo]
            if stats is None:
                stats = start(part)
            stats.update(lo, hi, part, n)
        drawn += step
        assert stats is not None
        if not target:
            target = _target_of(
                options, "classification" if isinstance(stats, ClassificationStats) else "regression"
            )
        still = stats.take_rows(torch.arange(active))
        if isinstance(still, ClassificationStats) and target not in _JACKKNIFED:
            # the jackknife of the entropy terms is not what this target's standard error reads
            still.probs_groups, still.entropy_groups = GroupedSums(), GroupedSums()
        view = finish(still, drawn)
        try:
            se = _per_input_standard_error(view, target).cpu()
        except InvalidInputError as err:
            raise InvalidInputError(
                f"adaptive sampling watches the standard error of target={target!r}, which this model's "
                f"predictions do not carry ({err}). Choose target='confidence' or 'probs' (or 'mean' for "
                "regression), whose standard errors every prediction has."
            ) from err
        done = (se <= options.tolerance) | (drawn >= options.max_samples)
        going = torch.nonzero(~done).flatten()
        stopped = torch.nonzero(done).flatten()
        perm = torch.cat([going, stopped, torch.arange(active, n)])
        stats = stats.take_rows(perm)
        order = order[perm]
        if stopped.numel():
            segments.append((active - stopped.numel(), active, drawn))
        active = going.numel()
        if active:
            step = _next_round(se[going], drawn, options)
    parts = []
    for lo, hi, count in sorted(segments):
        part = finish(stats.take_rows(torch.arange(lo, hi)), count)
        part.samples_per_input = torch.full((hi - lo,), count, dtype=torch.int64)
        part.max_samples = options.max_samples
        parts.append(part)
    joined = concat_predictions(parts)
    return select_rows(joined, torch.argsort(order))
