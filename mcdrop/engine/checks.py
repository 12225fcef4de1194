"""The check passes: on a few real rows, that gates switch only randomness and whether rows mix.

Both checks run the model on a few rows of the call's inputs through one harness
(:class:`CheckPasses`): the eager original of a compiled model, every generator (torch's, numpy's,
Python's, and the generators given as inputs) run from a fixed seed and put back afterwards, the
call's autocast, passes sized to the call's limits (:func:`~mcdrop.engine.plan.check_row_count`).
The passes are not samples: nothing in them advances a random stream.

**The gate check** (:func:`check_gates_on`). A *gate* (see :mod:`mcdrop.policy.classify`) is a
user-defined module whose own code reads ``self.training``. The static rule cannot tell
``F.dropout(x, p, training=self.training)`` from ``x if self.training else x / T``: both read the
flag. Putting the second one in train mode changes every sample in a deterministic way that is not
dropout, a wrong number that nothing else would flag. So before a wrapper samples inputs of a new
signature, it runs the gates once more:

1. every sampled site is put in eval mode and the gates' forward passes run with every dropout
   operation torch offers made the identity (``F.dropout`` and its variants, ``torch.dropout``,
   ``dropout_p`` of ``scaled_dot_product_attention`` and ``multi_head_attention_forward``, the
   inter-layer rate of the recurrent ops): the reference output;
2. the same with the gates in train mode, twice, from two torch seeds.

A gate that gates only dropout gives the reference output both times. A gate whose train mode
changes the output the same way from both seeds does something deterministic in train mode:
:class:`~mcdrop.errors.ModelStateError`, naming it. A gate whose train mode draws from numpy's or
Python's global RNG (not torch's) adds randomness mcdrop's ``seed=`` does not control, such as
data augmentation: :class:`~mcdrop.errors.GateRandomnessWarning`. Randomness drawn from torch by
other ops (a hand-made ``torch.rand`` mask) is sampled and noted in ``describe()``. The check runs
on at most :data:`~mcdrop.engine.plan.CHECK_ROWS` rows, once per input signature and wrapper.

**The row check** (:func:`rows_mix`): whether the output of a row depends on the other rows of its
forward pass, which decides whether a batch may be replicated or split (see its docstring).
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mcdrop._checks import user_stacklevel
from mcdrop.engine.choose import log
from mcdrop.engine.inputs import (
    Inputs,
    all_rows_alike,
    concat_rows,
    input_generators_untouched,
    model_device_dtype,
    other_row,
    replicate,
    slice_batch,
    split_errors_named,
)
from mcdrop.engine.outputs import OutputSelector, row_gap, rows_first, select_output
from mcdrop.engine.plan import CHECK_MARGIN, check_row_count, gate_check_measures_a_row
from mcdrop.engine.probe import PeakBytesMode
from mcdrop.engine.rng import cuda_devices, rng_untouched
from mcdrop.engine.state import parameters_untouched
from mcdrop.engine.strategies import Runner, autocast_context
from mcdrop.errors import GateRandomnessWarning, ModelStateError

_IDENTITY_DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
}
_DROPOUT_P_FUNCTIONS = {F.scaled_dot_product_attention: 4, F.multi_head_attention_forward: 10}
#: The recurrent ops of nn.LSTM/GRU/RNN, whose inter-layer dropout rate is an argument.
_RNN_OPS = {torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu}


def _rnn_dropout_index(func: Any, args: tuple[Any, ...]) -> int:
    """Position of the dropout rate among the arguments of a recurrent op (packed input or not)."""
    if func is torch.lstm:
        packed = isinstance(args[1], torch.Tensor)  # (data, batch_sizes, hx, ...) vs (input, hx, ...)
    else:
        packed = isinstance(args[2], torch.Tensor)  # (data, batch_sizes, hx, ...) vs (input, hx, params, ...)
    return 6 if packed else 5


#: The notes ``describe()`` shows for gates the check found drawing randomness outside dropout ops.
TORCH_RANDOMNESS_NOTE = "train mode adds torch randomness other than dropout ops (e.g. a hand-made mask)"
#: The same for a TorchScript gate, whose compiled dropout the check cannot make the identity.
SCRIPTED_GATE_NOTE = (
    "TorchScript: its compiled dropout cannot be made the identity for the gate check, so a train-only "
    "change other than randomness in it would not be found"
)


_STATE = threading.local()



def eager_module(model: nn.Module) -> nn.Module:
    """The eager original of a ``torch.compile``'d model (the same modules and flags), else the model.

    Check passes run through it, so they do not compile once more for their own shapes.
    """
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        return model._orig_mod  # type: ignore[return-value]
    return model


def checking() -> bool:
    """Whether this thread is running one of mcdrop's check passes rather than a sample.

    Before it samples inputs of a new signature, :class:`~mcdrop.MCDropout` runs the model a few
    more times to check it (``docs/reliability.md``): whether modules it puts in train mode switch
    only randomness, and whether a row's output depends on the other rows of its pass. These
    passes are not samples. In most of them every dropout operation is the identity and torch's
    random draws are constants; they run on a few rows, in modes of their own, and for a batch of
    one row (or of identical rows) also on a changed copy of that row, which the user never
    passed. Every parameter and buffer they write is put back afterwards, but anything else a
    model or a forward hook does in them happens: code that counts passes, stores activations or
    logs can skip them with ``if mcdrop.checking(): ...``.

    Returns:
        ``True`` inside one of mcdrop's check passes on this thread, else ``False``.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
        >>> sampled = []  # the outputs of the sampling passes only
        >>> hook = net.register_forward_hook(
        ...     lambda module, args, out: None if mcdrop.checking() else sampled.append(out)
        ... )
        >>> pred = mcdrop.MCDropout(net.eval(), n_samples=6, seed=0).predict(torch.randn(3, 4))
        >>> sum(out.shape[0] for out in sampled)  # 6 samples of 3 rows, however they were batched
        18
        >>> mcdrop.checking()
        False
    """
    return getattr(_STATE, "depth", 0) > 0


class NoDropout(TorchFunctionMode):
    """Every torch dropout operation becomes the identity (rate 0)."""

    def __enter__(self) -> NoDropout:
        _STATE.depth = getattr(_STATE, "depth", 0) + 1
        try:
            return super().__enter__()
        except BaseException:
            _STATE.depth -= 1
            raise

    def __exit__(self, *exc: Any) -> Any:
        _STATE.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _IDENTITY_DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func in _RNN_OPS and len(args) > 6:
            index = _rnn_dropout_index(func, args)
            return func(*args[:index], 0.0, *args[index + 1 :], **kwargs)
        index = _DROPOUT_P_FUNCTIONS.get(func)
        if index is not None:
            if len(args) > index:
                args = (*args[:index], 0.0, *args[index + 1 :])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


def _named_args(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of an aten call by their schema names, defaults filled in."""
    named: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            named[a.name] = args[i]
        elif a.name in kwargs:
            named[a.name] = kwargs[a.name]
        elif a.has_default_value():
            named[a.name] = a.default_value
    return named


#: For each aten random op, the value its draws take in :class:`NoRandomness`, from the one uniform
#: quantile ``u`` every draw of a check pass is made from, its standard normal quantile ``z`` and
#: the op's arguments by name.
_CONSTANT_DRAWS: dict[Any, Callable[[float, float, dict[str, Any]], Any]] = {
    torch.ops.aten.rand: lambda u, z, a: u,
    torch.ops.aten.rand_like: lambda u, z, a: u,
    torch.ops.aten.randn: lambda u, z, a: z,
    torch.ops.aten.randn_like: lambda u, z, a: z,
    torch.ops.aten.uniform_: lambda u, z, a: a["from"] + (a["to"] - a["from"]) * u,
    torch.ops.aten.normal_: lambda u, z, a: a["mean"] + a["std"] * z,
    torch.ops.aten.normal: lambda u, z, a: a["mean"] + a["std"] * z,
    torch.ops.aten.log_normal_: lambda u, z, a: math.exp(a["mean"] + a["std"] * z),
    torch.ops.aten.cauchy_: lambda u, z, a: a["median"] + a["sigma"] * math.tan(math.pi * (u - 0.5)),
    torch.ops.aten.exponential_: lambda u, z, a: -math.log1p(-u) / a["lambd"],
    torch.ops.aten.geometric_: lambda u, z, a: (
        max(1.0, math.ceil(math.log1p(-u) / math.log1p(-a["p"]))) if 0.0 < a["p"] < 1.0 else 1.0
    ),
    # Bernoulli(p) from the uniform draw u: 1 where p > u. Without p, the input holds the p's.
    torch.ops.aten.bernoulli_: lambda u, z, a: a["p"] > u,
    torch.ops.aten.bernoulli: lambda u, z, a: a.get("p", a["self"]) > u,
}

#: The uniform quantiles of the passes of a row check (:class:`NoRandomness`): a low one, under
#: which every mask ``rand < keep`` or ``bernoulli(keep)`` keeps all (keep > 0.02), and a high
#: one, under which every mask ``rand > rate`` keeps all (rate < 0.98). A model's rows cannot
#: hide behind a mask that drops everything in both.
CHECK_QUANTILES = (0.02, 0.98)


_DROPOUT_P_INDEX: dict[Any, int | None] = {}


def _dropout_p_index(func: Any) -> int | None:
    """Position of an aten op's dropout rate (``None`` for none), cached per op.

    ``dropout_p`` of fused attention kernels, ``dropout`` of fused recurrent ones (``_cudnn_rnn``,
    ``miopen_rnn``).
    """
    try:
        return _DROPOUT_P_INDEX[func]
    except KeyError:
        names = [a.name for a in func._schema.arguments]
        index = names.index("dropout_p") if "dropout_p" in names else None
        if index is None and "rnn" in func.name() and "dropout" in names:
            index = names.index("dropout")
        _DROPOUT_P_INDEX[func] = index
        return index


class _ConstantDraws(TorchDispatchMode):
    """The aten half of :class:`NoRandomness`: sees every op, in eager, scripted and library code."""

    def __init__(self, owner: NoRandomness) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        packet = func.overloadpacket
        if args and isinstance(args[0], nn.Parameter) and func._schema.name.endswith("_"):
            # A parameter drawn in place: initialisation (a lazy module's first pass), not noise.
            return func(*args, **kwargs)
        if packet is torch.ops.aten.native_dropout:  # dropout inside compiled or C++ code: identity
            named = _named_args(func, args, kwargs)
            if named.get("train") is not False:
                self.owner.draws += 1
                x = named["input"]
                return x.clone(), torch.ones_like(x, dtype=torch.bool)
        constant = _CONSTANT_DRAWS.get(packet)
        if constant is None:
            i = _dropout_p_index(func)
            if i is not None:  # fused attention and recurrent kernels: no dropout
                if i < len(args):
                    args = (*args[:i], 0.0, *args[i + 1 :])
                else:
                    kwargs[func._schema.arguments[i].name] = 0.0
            return func(*args, **kwargs)
        value = constant(self.owner.u, self.owner.z, _named_args(func, args, kwargs))
        self.owner.draws += 1
        out = func(*args, **kwargs)
        fill = torch.as_tensor(value, device=out.device).to(out.dtype)
        return out.copy_(fill.expand_as(out))


class NoRandomness(NoDropout):
    """Every torch dropout operation the identity, and torch's random draws one constant quantile.

    For checks that compare passes over different rows (whether a model mixes its batch rows):
    a per-row draw, such as a drop-path mask (``x.new_empty(...).bernoulli_(keep)`` in timm and
    torchvision) or Gaussian noise (``torch.randn_like``), lands on other rows in a pass over other
    rows, so the passes would differ for a model that does not mix rows. Here every draw is the
    same quantile ``u`` of its distribution: uniform draws ``low + (high - low) * u``, normal ones
    ``mean + std * z`` (``z`` the standard normal quantile of ``u``; log-normal ones its exp),
    exponential ones ``-log(1 - u) / lambd``, Cauchy and geometric ones their ``u`` quantile,
    Bernoulli(p) ones ``p > u``. The same for every row, so a model that does not mix rows still
    does not. This is done on torch's aten ops (a dispatch mode), so it also reaches draws inside
    TorchScript code, inside ``torch.nn.functional`` helpers (``F.gumbel_softmax``) and inside
    fused kernels (their ``dropout_p`` is set to 0; ``native_dropout`` is the identity). Random
    ops not listed (``randint``, ``randperm``, ``multinomial``, ...) still draw: a check has to
    compare two seeds to see them. Not for the gate check, where it would turn a random gate into
    a deterministic one.

    Args:
        u: The quantile, in ``(0, 1)``; ``0.5`` gives centres and medians.
    """

    def __init__(self, u: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < u < 1.0:
            raise ValueError(f"u must lie in (0, 1), got {u!r}")
        self.u = u
        self.z = statistics.NormalDist().inv_cdf(u)
        #: How many draws were made constant (none: another ``u`` would give the same passes).
        self.draws = 0
        self._aten = _ConstantDraws(self)

    def __enter__(self) -> NoRandomness:
        super().__enter__()
        try:
            self._aten.__enter__()
        except BaseException:
            super().__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._aten.__exit__(*exc)
        finally:
            super().__exit__(*exc)



def _random_note(module: nn.Module) -> str:
    """The note of a gate whose train mode changes the output differently from two seeds."""
    return SCRIPTED_GATE_NOTE if isinstance(module, torch.jit.ScriptModule) else TORCH_RANDOMNESS_NOTE


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return False
    both_nan = a.isnan() & b.isnan()
    a, b = torch.where(both_nan, 0.0, a), torch.where(both_nan, 0.0, b)
    scale = max(1.0, float(a.abs().nan_to_num(posinf=0.0, neginf=0.0).max())) if a.numel() else 1.0
    return bool(((a - b).abs() <= 1e-5 * scale).all())


def _max_gap(a: Any, b: Any) -> float:
    if isinstance(a, tuple):
        return max(_max_gap(x, y) for x, y in zip(a, b, strict=True))
    return float((a.detach().float() - b.detach().float()).abs().nan_to_num(nan=float("inf")).max())


def _numpy_or_python_drawn(np_before: Any, py_before: Any) -> bool:
    np_now = np.random.get_state()
    return (
        np_now[1].tobytes() != np_before[1].tobytes() or np_now[2:] != np_before[2:]
    ) or random.getstate() != py_before


def check_gates(
    model: nn.Module,
    gate_paths: list[str],
    run: Callable[[], Any],
    cuda_devices: list[int],
) -> tuple[dict[str, str], list[tuple[list[str], float]], list[str]]:
    """Run the check of the module docstring.

    Args:
        model: The model, inside an activation of its policy (flags are changed and put back here).
        gate_paths: Paths of the gates to check.
        run: One forward pass on the check rows, returning the analysed output.
        cuda_devices: CUDA devices whose generators the passes may draw from.

    Returns:
        ``(notes, deterministic, outside_torch)``: describe() notes by path; ``(paths, largest
        change)`` for each gate (or group of gates, when only together they do) whose train mode
        changes the output deterministically; the gates drawing from numpy's or Python's RNG.
    """
    modules = dict(model.named_modules())
    saved = {path: m.training for path, m in modules.items()}

    def forward(train: set[str], seed: int) -> tuple[Any, bool]:
        for path, m in modules.items():
            m.training = path in train
        with rng_untouched(seed, cuda_devices), NoDropout():
            np_before, py_before = np.random.get_state(), random.getstate()
            out = run()
            return out, _numpy_or_python_drawn(np_before, py_before)

    try:
        reference, _ = forward(set(), 0)
        gates = set(gate_paths)
        first, outside = forward(gates, 0)
        if _same(first, reference) and not outside:
            return {}, [], []
        second, _ = forward(gates, 1)
        notes: dict[str, str] = {}
        deterministic: list[tuple[list[str], float]] = []
        outside_torch: list[str] = []
        # One gate at a time, to name the culprits.
        for path in gate_paths:
            one, one_outside = forward({path}, 0)
            if one_outside:
                outside_torch.append(path)
                continue
            if _same(one, reference):
                continue
            other, _ = forward({path}, 1)
            if _same(one, other):
                deterministic.append(([path], _max_gap(one, reference)))
            else:
                notes[path] = _random_note(modules[path])
        if not (deterministic or outside_torch or notes):
            # Only the gates together differ (e.g. one gate's flag steers another's code).
            if outside:
                outside_torch.extend(gate_paths)
            elif _same(first, second):
                deterministic.append((list(gate_paths), _max_gap(first, reference)))
            else:
                notes.update({p: _random_note(modules[p]) for p in gate_paths})
        return notes, deterministic, outside_torch
    finally:
        for path, m in modules.items():
            m.training = saved[path]


@dataclass(frozen=True)
class CheckSettings:
    """The settings of a call that its check passes follow (the gate check, run-time discovery).

    Built once per wrapper from its options (:attr:`mcdrop.options.SamplingOptions.check_settings`).
    """

    #: Which part of the model output is analysed.
    output: OutputSelector
    #: The analysed output is a ``(mean, variance)`` pair.
    pair: bool
    #: The call's autocast dtype, or ``None``.
    autocast_dtype: torch.dtype | None
    #: Most rows per pass, or ``None``.
    max_batch_size: int | None
    #: Bytes one pass may use (``None``: the default).
    memory_budget: int | None
    #: Samples per row of the call.
    n_samples: int


class CheckPasses:
    """The one harness of the check passes: eager model, the call's output and autocast, RNGs put back.

    Args:
        model: The model (its eager original is run: see :func:`eager_module`).
        output: Which part of the model output to keep.
        output_batch_dim: Batch dimension of the selected output.
        pair: The selected output is a ``(mean, variance)`` pair.
        autocast_dtype: The call's autocast dtype, or ``None``.
        device: The model's device.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        output: OutputSelector,
        output_batch_dim: int,
        pair: bool,
        autocast_dtype: torch.dtype | None,
        device: torch.device | None,
    ) -> None:
        self.model = eager_module(model)
        self.output = output
        self.output_batch_dim = output_batch_dim
        self.pair = pair
        self.autocast_dtype = autocast_dtype
        self.device = device
        self.cuda = cuda_devices(device)

    def forward(self, rows: Inputs) -> Any:
        """One forward pass on ``rows`` (fresh copies of them), returning the selected output."""
        args, kwargs = replicate(rows, 1)
        with autocast_context(self.device, self.autocast_dtype):
            return select_output(self.model(*args, **kwargs), self.output, self.pair)

    def run(self, rows: Inputs, mode: Any, *, seed: int = 0, meter: PeakBytesMode | None = None) -> Any:
        """:meth:`forward` under ``mode`` (a :class:`NoDropout`), every generator drawing from ``seed``.

        Torch's, numpy's and Python's generators and those given as inputs are put back afterwards;
        with ``meter``, the pass's peak of tensor storage is measured.
        """
        with (
            input_generators_untouched(rows, seed),
            rng_untouched(seed, self.cuda),
            mode,
            meter if meter is not None else contextlib.nullcontext(),
        ):
            return self.forward(rows)

    def row_bytes(self, inputs: Inputs) -> float | None:
        """What one row held at the peak of a pass with dropout the identity, with a margin.

        ``None`` where the model fails on one row (e.g. batch statistics need two).
        """
        meter = PeakBytesMode()
        try:
            self.run(slice_batch(inputs, 0, 1), NoDropout(), meter=meter)
        except Exception:  # noqa: BLE001 - the check itself runs (and reports) on more rows
            return None
        return float(meter.meter.peak) * CHECK_MARGIN


def rows_mix(
    runner: Runner, max_batch_size: int | None, memory_budget: int | None
) -> tuple[bool | None, float | None]:
    """Whether the output of a row depends on the other rows of its forward pass.

    Such a model (a mean or a normalisation over the batch, attention across rows) cannot have
    replicas of the batch in one pass, which would mix MC samples, nor a batch split into
    chunks, which would change every row's neighbours. The check runs once per decision with
    the modules in the modes they sample in, every dropout operation the identity, the common
    random ops drawing one constant quantile of their distribution (see :class:`NoRandomness`)
    and every RNG left as it was: the output of a few rows together must equal, row by row, the
    outputs of their two halves run apart. Where the model drew such constants, the check is made
    at a low and at a high quantile (:data:`CHECK_QUANTILES`), so that a hand-made mask that drops
    everything at one of them cannot hide the rows from each other. A batch of one row (or of
    identical rows) is checked against a changed copy of that row (float inputs scaled and
    shifted; integer ones rolled along their last dimension, or, where that changes nothing,
    such as ids of shape ``(batch,)``, moved to a neighbouring value).

    Its passes stay within the limits of the call: a first pass of one row measures what a row
    holds at the peak, then at most :data:`~mcdrop.engine.plan.CHECK_ROWS` rows, no more than
    ``max_batch_size`` and than fit ``memory_budget`` (at least two; see
    :func:`~mcdrop.engine.plan.check_row_count`). With ``max_batch_size=1`` there is no check
    (every pass holds one row of one sample anyway).

    Args:
        runner: The call's runner (model, inputs, output, autocast, fast masks).
        max_batch_size: Most rows per pass, or ``None``.
        memory_budget: Bytes one pass may use (``None``: the default).

    Returns:
        ``(verdict, row_bytes)``. ``verdict`` is ``True`` when the rows mix, ``False`` when they
        do not, and ``None`` when the check gives no verdict: the model fails on the check's rows,
        or its output still varies from one seed to another (randomness the check cannot make
        constant, e.g. ``torch.randperm``); the engine treats ``None`` as ``True`` unless the call
        asks for replicas or a split batch (:func:`~mcdrop.engine.choose.apply_verdict`).
        ``row_bytes`` is the most a row held in either pass, with a margin (``None`` when not
        measured), which sizes the first sampling pass.
    """
    inputs = runner.inputs
    measured: float | None = None
    if inputs.batch_size == 0 or (max_batch_size is not None and max_batch_size < 2):
        return False, measured
    passes = CheckPasses(
        runner.model,
        output=runner.output,
        output_batch_dim=runner.output_batch_dim,
        pair=runner.pair,
        autocast_dtype=runner.autocast_dtype,
        device=runner.device,
    )
    _, dtype = model_device_dtype(passes.model)
    eps = [torch.finfo(d).eps for d in (dtype, runner.autocast_dtype) if d is not None and d.is_floating_point]
    tolerance = max([1e-4] + [4 * e for e in eps])  # bfloat16: 3%, float16: 0.4%
    ctx = runner.ctx
    enabled = ctx.enabled if ctx is not None else None
    draws = 0

    def run(part: Inputs, u: float, meter: PeakBytesMode | None = None, seed: int = 0) -> Any:
        nonlocal draws
        constants = NoRandomness(u)
        out = passes.run(part, constants, seed=seed, meter=meter)
        draws += constants.draws
        return rows_first(out, runner.output_dim(out, part.batch_size))

    def no_verdict(why: str) -> None:
        log.debug("mcdrop: row-independence check gives no verdict: %s.", why)

    untouched = contextlib.ExitStack()  # parameters and buffers the passes write are put back
    try:
        untouched.enter_context(parameters_untouched(passes.model))
        if ctx is not None:
            ctx.enabled = False  # the engine's faster dropout would ignore eval mode
        low = CHECK_QUANTILES[0]
        first = slice_batch(inputs, 0, 1)
        meter = PeakBytesMode()
        try:
            first_out = run(first, low, meter)
            measured = float(meter.meter.peak) * CHECK_MARGIN
        except Exception:  # noqa: BLE001 - e.g. batch statistics need two rows: check on more rows
            first_out = None
        cap = check_row_count(inputs, max_batch_size, memory_budget, runner.n, measured)
        rows = slice_batch(inputs, 0, cap)
        if rows.batch_size < 2 or all_rows_alike(rows):
            other = other_row(first)
            if other is None:
                return False, measured  # no other row at hand: every row is the same
            rows = concat_rows(first, other)
        split = rows.batch_size // 2
        for u in CHECK_QUANTILES:
            if u != low and not draws:
                break  # no draw was made constant: another quantile gives the same passes
            meter = PeakBytesMode()
            whole = run(rows, u, meter if u == low else None)
            if u == low:
                # The most a row held in either pass (a row's activations may depend on its data).
                measured = max(measured or 0.0, float(meter.meter.peak) * CHECK_MARGIN / rows.batch_size)
            if u == low and split == 1 and first_out is not None:
                head = first_out
            else:
                head = run(slice_batch(rows, 0, split), u)
            # Compared where both are finite (see row_gap).
            if not (
                row_gap(whole, head, 0, tolerance)
                or row_gap(whole, run(slice_batch(rows, split, rows.batch_size), u), split, tolerance)
            ):
                continue
            if row_gap(whole, run(rows, u, seed=1), 0, tolerance):
                no_verdict(
                    "the check passes still draw randomness that torch's dropout and draw ops do not "
                    "explain (e.g. randint, randperm, multinomial, numpy or Python's random)"
                )
                return None, measured
            log.debug("mcdrop: a row's output depends on the other rows of its pass.")
            return True, measured
        return False, measured
    except Exception as err:  # noqa: BLE001 - the model fails on the check rows: no verdict
        no_verdict(f"the model fails on the check rows ({type(err).__name__}: {err})")
        return None, measured
    finally:
        untouched.close()
        if ctx is not None and enabled is not None:
            ctx.enabled = enabled


def check_gates_on(model: nn.Module, gates: list[str], inputs: Inputs, settings: CheckSettings) -> dict[str, str]:
    """Check on a few rows of ``inputs`` that the gates ``gates`` switch only randomness.

    Runs inside the policy's activation (flags are changed and put back here). See the module
    docstring for the check; the rows are no more than a sampling pass may hold
    (``max_batch_size``) and than fit ``memory_budget``, measured on one row.

    Args:
        model: The model.
        gates: Paths of the gates to check.
        inputs: The call's prepared inputs.
        settings: The call's settings the check passes follow.

    Returns:
        Notes for ``describe()`` by gate path: gates that draw torch randomness other than dropout
        ops, or numpy's or Python's.

    Raises:
        ModelStateError: A gate's train mode changes the output deterministically.
    """
    with check_rows(model, inputs, settings) as (passes, rows):
        notes, deterministic, outside_torch = check_gates(model, gates, lambda: passes.forward(rows), passes.cuda)

    def exclude_hint(paths: list[str]) -> str:
        names = [p for p in paths if p in gates]
        if "" in names or not names:  # the model itself: name its class
            return f"exclude=[{type(model).__name__}]"
        return f"exclude={names!r}"

    if deterministic:
        raise ModelStateError(
            f"{type(model).__name__}: in train mode, with every dropout operation made the identity, "
            "these modules still change the output, the same way from any seed: "
            + "; ".join(
                f"{', '.join(p or '<model>' for p in paths)}{' (together)' if len(paths) > 1 else ''} "
                f"by up to {gap:.3g}"
                for paths, gap in deterministic
            )
            + ". "
            "Their code reads `self.training` for something that is not dropout (a different formula, "
            "batch statistics, a temperature, ...), so sampling them in train mode would put that change "
            "into every MC sample. Keep them in eval mode with "
            f"{exclude_hint([p for paths, _ in deterministic for p in paths])} (dropout that only they "
            "apply is then not sampled), or, if the train-mode behaviour is what you want to sample, "
            "name them in include= the same way. Nothing was sampled; the model is unchanged."
        )
    if outside_torch:
        warnings.warn(
            f"{type(model).__name__}: in train mode, the module(s) "
            f"{', '.join(p or '<model>' for p in outside_torch)} draw from numpy's or Python's global "
            "random generator, not torch's: that randomness is not a dropout operation mcdrop knows (it is "
            "often data augmentation, e.g. SpecAugment masking) and seed= cannot reproduce it. It is "
            f"sampled as it is; keep these modules in eval mode with {exclude_hint(outside_torch)} if it "
            "should not be.",
            GateRandomnessWarning,
            stacklevel=user_stacklevel(),
        )
        notes.update({p: "draws from numpy's or Python's RNG in train mode" for p in outside_torch if p in gates})
    return notes


@contextlib.contextmanager
def check_pass() -> Iterator[None]:
    """Mark the passes run inside as check passes (:func:`checking` is true), dropout left as it is.

    For checks that need the model's own randomness (run-time discovery, :mod:`mcdrop.engine.discover`).
    """
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


@contextlib.contextmanager
def check_rows(
    model: nn.Module, inputs: Inputs, settings: CheckSettings, *, measure_row: bool = True
) -> Iterator[tuple[CheckPasses, Inputs]]:
    """The harness and the rows of a check on a call's inputs (the gate check, run-time discovery).

    At most :data:`~mcdrop.engine.plan.CHECK_ROWS` rows, no more than a sampling pass may hold
    (``max_batch_size``) and than fit ``memory_budget`` (as measured on one row, with
    ``measure_row``); the whole batch when the inputs hold an object such as a KV cache (see
    :func:`~mcdrop.engine.plan.check_row_count`). Inside the block, parameters and buffers the
    passes write are put back afterwards (:func:`~mcdrop.engine.state.parameters_untouched`), so
    are the generators given as inputs, which advance from pass to pass meanwhile (as across
    seeds: the check's passes are not samples), and a failure on a split batch names the input
    object it no longer matches.

    Args:
        model: The model.
        inputs: The call's prepared inputs.
        settings: The call's settings the check passes follow.
        measure_row: Measure what one row holds before choosing the rows.

    Yields:
        ``(passes, rows)``: the :class:`CheckPasses` and the check rows.
    """
    device, _ = model_device_dtype(model)
    s = settings
    passes = CheckPasses(
        model, output=s.output, output_batch_dim=0, pair=s.pair, autocast_dtype=s.autocast_dtype, device=device
    )
    with parameters_untouched(passes.model):
        measured = measure_row and gate_check_measures_a_row(inputs, s.max_batch_size)
        row_bytes = passes.row_bytes(inputs) if measured else None
        count = check_row_count(inputs, s.max_batch_size, s.memory_budget, s.n_samples, row_bytes)
        with split_errors_named(inputs, s.max_batch_size), input_generators_untouched(inputs):
            yield passes, slice_batch(inputs, 0, count)
