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
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

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


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    """Argument ``name`` of a call, given at position ``index`` or by keyword, else ``default``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _kept(p: Any) -> Any:
    """The draw of a Bernoulli(p) "keep" mask made certain: 1 where ``p > 0``, else 0."""
    return torch.as_tensor(p) > 0 if isinstance(p, torch.Tensor) else float(p > 0)


#: For each torch random op, the constant (or tensor) its draws become in :class:`NoRandomness`:
#: a mask keeps everything it could keep, noise is its mean or centre.
_CONSTANT_DRAWS: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], Any]] = {
    torch.rand: lambda a, k: 0.5,
    torch.rand_like: lambda a, k: 0.5,
    torch.randn: lambda a, k: 0.0,
    torch.randn_like: lambda a, k: 0.0,
    torch.Tensor.uniform_: lambda a, k: (_arg(a, k, 1, "from", 0.0) + _arg(a, k, 2, "to", 1.0)) / 2,
    torch.Tensor.normal_: lambda a, k: _arg(a, k, 1, "mean", 0.0),
    torch.normal: lambda a, k: _arg(a, k, 0, "mean", 0.0),
    torch.Tensor.exponential_: lambda a, k: 1.0 / _arg(a, k, 1, "lambd", 1.0),
    torch.Tensor.bernoulli_: lambda a, k: _kept(_arg(a, k, 1, "p", 0.5)),
    torch.bernoulli: lambda a, k: _kept(_arg(a, k, 1, "p", a[0] if a else k["input"])),
    torch.Tensor.bernoulli: lambda a, k: _kept(_arg(a, k, 1, "p", a[0])),
}


class NoRandomness(NoDropout):
    """Every torch dropout operation the identity, and the common random ops drawing a constant.

    For checks that compare passes over different rows (whether a model mixes its batch rows):
    a per-row draw, such as a drop-path mask (``x.new_empty(...).bernoulli_(keep)`` in timm and
    torchvision) or Gaussian noise (``torch.randn_like``), lands on other rows in a pass over other
    rows, so the passes would differ for a model that does not mix rows. Here masks keep all they
    may keep (``bernoulli`` gives 1 where its probability is positive), uniform draws are their
    centre, normal and exponential draws their mean. Random ops not listed (``randint``,
    ``randperm``, ``multinomial``, ...) still draw: a check has to compare two seeds to see them.
    Not for the gate check, where it would turn a random gate into a deterministic one.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        constant = _CONSTANT_DRAWS.get(func)
        if constant is None:
            return super().__torch_function__(func, types, args, kwargs)
        kwargs = dict(kwargs or {})
        value = constant(args, kwargs)
        out = func(*args, **kwargs)
        fill = torch.as_tensor(value, device=out.device).to(out.dtype)
        with torch.no_grad():
            return out.copy_(fill.expand_as(out))


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
