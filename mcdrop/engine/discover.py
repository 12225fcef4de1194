"""Run-time discovery: randomness that train mode switches on and the static policy did not see.

The policy (:mod:`mcdrop.policy`) decides from module classes and from a scan of their code which
modules to put in train mode. The scan cannot follow every way code reads ``self.training``: a
helper called through its module (``dropout_utils.apply_dropout(self, x)``), a helper object
holding the module (``self.dropper(x)`` reading ``self.module.training``), a child's method other
than ``forward`` (``self.enc.embed(x)``), ``getattr(self, "_apply_" + mode)`` dispatch. So on the
first call per input signature, on a few rows, the random operations of two passes are recorded
and attributed to the module running them (forward hooks; a dispatch mode sees every aten op that
draws, ``torch.Tag.nondeterministic_seeded``):

1. the policy's pass: the modes the model is sampled in;
2. the same with every *unclassified* user module (no rule made it a site: see
   :func:`mcdrop.policy.classify.unclassified_user_modules`) in train mode too.

Draws only the second pass makes were gated on a flag the policy left off. For each module making
them, the smallest set of unclassified modules whose train mode reproduces them is found (the
module itself, then with its unclassified descendants, then all). If every such draw is a dropout
mask (a dropout op, a Bernoulli draw, a uniform draw of more than one number) and the gate check
(:func:`mcdrop.engine.checks.check_gates`) finds that their train mode changes nothing but
randomness, and no buffer, they are returned to be sampled from then on. Otherwise -- noise
(normal draws), a coin for the whole pass (one uniform number: a random flip), integers, a
permutation, or a train mode that changes more than randomness -- they are returned to be warned
about, with the ``include=``/``exclude=`` that settles it.

The policy's own pass also shows what the sampled gates draw: a gate found by the scan whose train
mode draws noise rather than masks is sampled as it is, and reported too.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mcdrop.engine.checks import CheckSettings, check_gates, check_pass, check_rows
from mcdrop.engine.inputs import (
    Inputs,
)
from mcdrop.engine.rng import rng_untouched

__all__ = ["Findings", "discover", "discover_on", "draw_kind"]

#: What a module draws, by kind: ``"mask"`` (dropout ops, Bernoulli draws, uniform draws of more
#: than one number), ``"coin"`` (one uniform number for the whole pass: a random flip or skip),
#: ``"noise"`` (normal, log-normal, Cauchy, exponential, geometric draws), ``"integers"`` (randint,
#: randperm, multinomial, random_).
DRAW_KINDS = ("mask", "coin", "noise", "integers")
_NOISE = {"randn", "randn_like", "normal", "normal_", "log_normal_", "cauchy_", "exponential_", "geometric_"}
_INTEGERS = {"randint", "randint_like", "randperm", "multinomial", "random_"}
_UNIFORM = {"rand", "rand_like", "uniform_"}


def draw_kind(func: Any, out: Any) -> str | None:
    """The kind of draw an aten op makes (see :data:`DRAW_KINDS`), or ``None`` when it draws nothing."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return None
    name = func.overloadpacket.__name__
    if name in _NOISE:
        return "noise"
    if name in _INTEGERS:
        return "integers"
    if name in _UNIFORM:
        numel = out.numel() if isinstance(out, torch.Tensor) else 2
        return "coin" if numel == 1 else "mask"
    return "mask"  # dropout ops, Bernoulli draws, fused kernels with a dropout rate


class _DrawRecorder(TorchDispatchMode):
    """Counts the random draws of a pass by ``(module path, kind)``, with the op names seen."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = [""]
        self.counts: Counter[tuple[str, str]] = Counter()
        self.ops: dict[tuple[str, str], set[str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = draw_kind(func, out)
        if kind is not None:
            key = (self.stack[-1], kind)
            self.counts[key] += 1
            self.ops.setdefault(key, set()).add(func.overloadpacket.__name__)
        return out


@contextlib.contextmanager
def _recording(model: nn.Module) -> Iterator[_DrawRecorder]:
    """Record a pass's draws, attributed to the innermost module running (hooks removed after)."""
    recorder = _DrawRecorder()
    handles = []

    def enter(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            recorder.stack.append(path)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if len(recorder.stack) > 1:
            recorder.stack.pop()

    try:
        for path, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # its draws are counted in its parent (scripted code takes no Python hooks)
            handles.append(module.register_forward_pre_hook(enter(path)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        with recorder:
            yield recorder
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Findings:
    """What discovery found (paths are module paths, ``""`` for the model itself)."""

    #: Modules to sample from now on (their train mode draws dropout masks only), with their notes.
    sample: dict[str, str] = field(default_factory=dict)
    #: Train-gated randomness left as it is, to warn about: ``(module, paths that settle it,
    #: what it draws, whether it is sampled)``.
    report: list[tuple[str, list[str], str, bool]] = field(default_factory=list)


def _describe_draws(kinds: dict[str, set[str]]) -> str:
    words = {"mask": "dropout masks", "coin": "a coin for the whole pass", "noise": "noise", "integers": "integers"}
    return ", ".join(f"{words[k]} ({', '.join(sorted(ops))})" for k, ops in sorted(kinds.items()))


def discover(
    model: nn.Module,
    *,
    candidates: list[str],
    gates: list[str],
    sampled: set[str],
    run: Callable[[], Any],
    cuda_devices: list[int],
) -> Findings:
    """Find the train-gated randomness of the module docstring.

    Args:
        model: The model, inside the policy's activation (its modes are the sampled ones; flags
            changed here are put back).
        candidates: Unclassified user modules, switched on to look for missed randomness.
        gates: The sampled gates the static scan found, whose draws are judged too.
        sampled: Paths of every sampled site.
        run: One forward pass on the check rows.
        cuda_devices: CUDA devices whose generators the passes may draw from.

    Returns:
        The :class:`Findings`.
    """
    findings = Findings()
    if not candidates and not gates:
        return findings
    modules = dict(model.named_modules())
    buffers = {
        (path, name): buf.detach().clone()
        for path in candidates
        for name, buf in modules[path]._buffers.items()
        if buf is not None
    }
    saved = {path: m.training for path, m in modules.items()}

    def put_back_buffers() -> set[str]:
        changed = set()
        for (path, name), before in buffers.items():
            now = modules[path]._buffers.get(name)
            if now is None or now.shape != before.shape or not torch.equal(now, before):
                changed.add(path)
                if now is not None and now.shape == before.shape:
                    with torch.no_grad():
                        now.copy_(before)
                else:
                    modules[path]._buffers[name] = before.clone()
        return changed

    def draws(train: set[str]) -> tuple[_DrawRecorder, set[str]]:
        try:
            for path in train:
                modules[path].training = True
            with rng_untouched(0, cuda_devices), check_pass(), _recording(model) as recorder:
                run()
            return recorder, put_back_buffers()
        finally:
            for path in train:
                modules[path].training = saved[path]

    base, _ = draws(set())
    for gate in gates:  # what the sampled gates draw: anything but masks is reported
        kinds = {
            kind: base.ops[(path, kind)]
            for (path, kind) in base.counts
            if kind != "mask" and (path == gate or (path.startswith(f"{gate}.") and path not in sampled))
        }
        if kinds:
            findings.report.append((gate, [gate], _describe_draws(kinds), True))
    if not candidates:
        return findings
    full, stateful = draws(set(candidates))
    extra: dict[str, dict[str, set[str]]] = {}
    for key, n in full.counts.items():
        if n > base.counts.get(key, 0):
            extra.setdefault(key[0], {})[key[1]] = full.ops[key]
    for where, kinds in extra.items():
        inside = [c for c in candidates if where == "" or c == where or c.startswith(f"{where}.")]
        tries = ([[where]] if where in candidates else []) + [inside, list(candidates)]
        found: list[str] | None = None
        for attempt in tries:
            if not attempt:
                continue
            recorder, changed = draws(set(attempt))
            stateful |= changed
            if all(recorder.counts.get((where, k), 0) >= full.counts[(where, k)] for k in kinds):
                found = attempt
                break
        what = _describe_draws(kinds)
        settle = found if found is not None else [where]
        if found is None or set(kinds) != {"mask"} or stateful & set(found):
            findings.report.append((where, settle, what, False))
            continue
        notes, deterministic, outside_torch = check_gates(model, found, run, cuda_devices)
        put_back_buffers()
        if deterministic or outside_torch:
            findings.report.append((where, settle, what + "; its train mode also changes more than randomness", False))
            continue
        for path in found:
            findings.sample[path] = (
                f"found at run time: train mode draws {what} here, which the scan of the code did not see"
            )
    return findings


def discover_on(
    model: nn.Module,
    inputs: Inputs,
    settings: CheckSettings,
    *,
    candidates: list[str],
    gates: list[str],
    sampled: set[str],
) -> Findings:
    """:func:`discover` on a few rows of ``inputs`` (as many as the gate check runs on).

    Args:
        model: The model, inside the policy's activation.
        inputs: The call's prepared inputs.
        settings: The call's settings the check passes follow.
        candidates: Unclassified user modules (see :func:`discover`).
        gates: The sampled gates the static scan found.
        sampled: Paths of every sampled site.

    Returns:
        The :class:`Findings`.
    """
    with check_rows(model, inputs, settings, measure_row=False) as (passes, rows):
        return discover(
            model,  # its paths are the policy's (a compiled model's run through its eager original)
            candidates=candidates,
            gates=gates,
            sampled=sampled,
            run=lambda: passes.forward(rows),
            cuda_devices=passes.cuda,
        )
