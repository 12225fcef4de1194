"""Checking, on real inputs, that functional gates switch only randomness.

A *gate* (see rule 10 of :mod:`mcdrop.stochastic`) is a user-defined module whose own code reads
``self.training``. The static rule cannot tell ``F.dropout(x, p, training=self.training)`` from
``x if self.training else x / T``: both read the flag. Putting the second one in train mode changes
every sample in a deterministic way that is not dropout, a wrong number that nothing else would
flag. So before a wrapper samples inputs of a new signature, it runs the gates once more:

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
on at most :data:`CHECK_ROWS` rows, leaves every RNG (torch's, numpy's, Python's) as it was, and
runs once per input signature and wrapper.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: Most input rows the check runs on.
CHECK_ROWS = 8

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


def cuda_devices(device: torch.device | None) -> list[int]:
    """The CUDA device indices whose generators a check pass on ``device`` may draw from."""
    if device is None or device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def eager_module(model: nn.Module) -> nn.Module:
    """The eager original of a ``torch.compile``'d model (the same modules and flags), else the model.

    Check passes run through it, so they do not compile once more for their own shapes.
    """
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        return model._orig_mod  # type: ignore[return-value]
    return model


def checking() -> bool:
    """Whether this thread is running one of mcdrop's check passes (every dropout op the identity).

    For models and tests that count their forward passes and want to tell the checks apart.
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


@contextlib.contextmanager
def rng_untouched(seed: int, cuda_devices: list[int]) -> Iterator[None]:
    """Run from seed ``seed`` (torch's, numpy's and Python's generators); put them back afterwards."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


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
