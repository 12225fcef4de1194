"""Observing one forward pass to choose how to sample (what :mod:`mcdrop.engine.choose` decides from).

:class:`ProbeMode` is a ``TorchDispatchMode`` that watches every ATen operation of a forward pass
and records what the sampling engine needs to decide, once per input signature, how to draw the
remaining passes:

* which operations draw random numbers (the CPU/CUDA generator state changed while they ran) and
  how many numbers they drew, which checks that a batched run (``torch.func.vmap`` or replicated
  rows) really draws fresh numbers for every sample;
* which operations depend on a random draw (their inputs descend from one): the rest is the
  deterministic *trunk* that need not be repeated per sample;
* the FLOPs of the trunk and of the stochastic part (matrix products, convolutions, attention, as
  counted by :mod:`torch.utils.flop_counter`) and the largest single activation of each, per row,
  for choosing chunk sizes;
* the peak of the tensor storage the pass allocated and held at once (:class:`LiveBytes`), per
  row, for keeping passes within a memory budget.

The mode only observes: it never changes a result or the random stream.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

try:  # the FLOP formulas of torch's own FLOP counter
    from torch.utils.flop_counter import flop_registry as _FLOP_REGISTRY
except ImportError:  # pragma: no cover - present in every supported torch
    _FLOP_REGISTRY = {}

__all__ = [
    "LiveBytes",
    "PeakBytesMode",
    "ProbeMode",
    "ProbeReport",
    "unmetered",
]


@dataclass(frozen=True)
class ProbeReport:
    """What one observed forward pass of ``rows`` rows did, normalised per row.

    Attributes:
        rows: Rows of the observed pass (replicas times inputs).
        foreign_draws: Random numbers drawn by torch operations (not by mcdrop's own masks).
        own_draws: Seed draws of mcdrop's own dropout masks.
        trunk_flops: FLOPs of operations that depend on no random draw, per row.
        stochastic_flops: FLOPs of operations downstream of a random draw, per row.
        max_bytes: Largest single operation output, per row.
        max_stochastic_bytes: Largest output of an operation downstream of a random draw, per row.
        random_ops: Names of the torch operations that drew random numbers.
        peak_bytes: Most bytes of tensor storage allocated by the pass and alive at once, per row.
        peak_stochastic_bytes: The same for the storage of operations downstream of a random draw
            (what grows with the samples of a vmap pass), per row.
    """

    rows: int
    foreign_draws: int
    own_draws: int
    trunk_flops: float
    stochastic_flops: float
    max_bytes: float
    max_stochastic_bytes: float
    random_ops: tuple[str, ...] = ()
    peak_bytes: float = 0.0
    peak_stochastic_bytes: float = 0.0

    @property
    def trunk_fraction(self) -> float:
        """Share of the FLOPs that a hoisted run computes once instead of once per sample."""
        total = self.trunk_flops + self.stochastic_flops
        return self.trunk_flops / total if total > 0 else 0.0


class LiveBytes:
    """Bytes of the tensor storage that a pass's operations returned and that is still alive, and its peak.

    Each storage counts once while any tensor using it lives (views share their base's storage);
    storage freed by the time the next operation returns no longer counts. This is what a pass
    holds at its fullest, measured without an allocator (the CPU has no memory statistics) and
    without counting parameters or inputs allocated before it.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        #: The same for storage first returned by an operation downstream of a random draw.
        self.live_stochastic = 0
        self.peak_stochastic = 0
        self._users: dict[int, list[int]] = {}  # storage -> [users, bytes, stochastic]

    def _release(self, key: int) -> None:
        entry = self._users.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            self.live_stochastic -= entry[1] * entry[2]
            del self._users[key]

    @staticmethod
    def _storage_key(t: Tensor) -> tuple[int, int] | None:
        if t.device.type == "meta" or t.is_nested:
            return None
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            return None
        key = storage.data_ptr()
        return None if key == 0 else (key, storage.nbytes())

    def observe(self, outputs: list[Tensor], inputs: Sequence[Tensor] = (), stochastic: bool = False) -> None:
        """Count the storages of an operation's outputs (once each) and update the peaks.

        An output that shares the storage of an input allocated before the pass (a view of a
        parameter, an in-place op on an input) allocated nothing and is not counted.
        ``stochastic``: the operation depends on a random draw.
        """
        before: set[int] | None = None
        for t in outputs:
            found = self._storage_key(t)
            if found is None:
                continue
            key, nbytes = found
            if key not in self._users:
                if before is None:
                    before = {k[0] for k in map(self._storage_key, inputs) if k is not None}
                if key in before:
                    continue
            entry = self._users.setdefault(key, [0, nbytes, int(stochastic)])
            if entry[0] == 0:
                self.live += entry[1]
                self.live_stochastic += entry[1] * entry[2]
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        self.peak_stochastic = max(self.peak_stochastic, self.live_stochastic)


_UNMETERED = threading.local()


@contextlib.contextmanager
def unmetered() -> Iterator[None]:
    """Operations inside are not measured by :class:`PeakBytesMode` nor :class:`ProbeMode`.

    For the copies of a pass's inputs that do not grow with its rows (a tensor given whole to
    every pass, a deep-copied cache): counted, they would read as memory per row. Their storage
    then counts as an input's, allocated before the pass.
    """
    _UNMETERED.depth = getattr(_UNMETERED, "depth", 0) + 1
    try:
        yield
    finally:
        _UNMETERED.depth -= 1


def _metered() -> bool:
    return not getattr(_UNMETERED, "depth", 0)


class PeakBytesMode(TorchDispatchMode):
    """A dispatch mode that only measures :class:`LiveBytes` (``mode.meter.peak`` afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.meter = LiveBytes()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not _metered():
            return out
        self.meter.observe(
            [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)],
            [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)],
        )
        return out


def _generator_states() -> list[Tensor]:
    states = [torch.default_generator.get_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += [g.get_state() for g in torch.cuda.default_generators]
    return states


class ProbeMode(TorchDispatchMode):
    """Dispatch mode recording randomness, the trunk/stochastic split, FLOPs and activation sizes.

    Args:
        rows: Rows of the observed pass, to normalise per row.
    """

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = max(int(rows), 1)
        self._tainted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._own = False
        self.foreign_draws = 0
        self.own_draws = 0
        self.random_ops: set[str] = set()
        self.trunk_flops = 0.0
        self.stochastic_flops = 0.0
        self.max_bytes = 0
        self.max_stochastic_bytes = 0
        self.live = LiveBytes()

    def own_draw(self, active: bool) -> None:
        """Mark the draws made while ``active`` as mcdrop's own (hooked into the fast masks)."""
        self._own = active

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not _metered():
            return func(*args, **kwargs)
        before = _generator_states()
        out = func(*args, **kwargs)
        after = _generator_states()
        drew = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        written = self._written_args(func, args)
        stochastic = drew or any(t in self._tainted for t in inputs)
        if drew:
            if self._own:
                self.own_draws += 1
            else:
                self.foreign_draws += sum(t.numel() for t in (outputs or written))
                self.random_ops.add(str(func))
        if stochastic:
            for t in (*outputs, *written):
                self._tainted[t] = True
        flops = self._flops(func, args, kwargs, out)
        self.live.observe(outputs, inputs, stochastic)
        size = max((_nbytes(t) for t in outputs), default=0)
        self.max_bytes = max(self.max_bytes, size)
        if stochastic:
            self.stochastic_flops += flops
            self.max_stochastic_bytes = max(self.max_stochastic_bytes, size)
        else:
            self.trunk_flops += flops
        return out

    @staticmethod
    def _written_args(func: Any, args: Any) -> list[Tensor]:
        written = []
        schema = getattr(func, "_schema", None)
        if schema is None:
            return written
        for arg, value in zip(schema.arguments, args, strict=False):
            info = arg.alias_info
            if info is not None and info.is_write and isinstance(value, Tensor):
                written.append(value)
        return written

    @staticmethod
    def _flops(func: Any, args: Any, kwargs: Any, out: Any) -> float:
        formula = _FLOP_REGISTRY.get(getattr(func, "overloadpacket", None))
        try:
            if formula is not None:
                return float(formula(*args, **kwargs, out_val=out))
            return _composite_flops(func, args, out)
        except Exception:  # noqa: BLE001 - a formula that does not fit just counts nothing
            return 0.0

    def report(self) -> ProbeReport:
        """The observations, per row of the observed pass."""
        rows = self.rows
        return ProbeReport(
            rows=rows,
            foreign_draws=self.foreign_draws,
            own_draws=self.own_draws,
            trunk_flops=self.trunk_flops / rows,
            stochastic_flops=self.stochastic_flops / rows,
            max_bytes=self.max_bytes / rows,
            max_stochastic_bytes=self.max_stochastic_bytes / rows,
            random_ops=tuple(sorted(self.random_ops)),
            peak_bytes=self.live.peak / rows,
            peak_stochastic_bytes=self.live.peak_stochastic / rows,
        )


_CONVOLUTIONS = frozenset(
    {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
)


def _composite_flops(func: Any, args: Any, out: Any) -> float:
    """FLOPs of the composite ops that ``torch.inference_mode`` dispatches undecomposed.

    (Under ``no_grad`` they reach the mode as ``addmm``/``convolution``/..., which torch's
    counter knows.)
    """
    name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
    if not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
        return 0.0
    if name == "linear" and isinstance(args[1], Tensor):
        return 2.0 * out.numel() * args[1].shape[-1]
    if name == "matmul" and isinstance(args[1], Tensor):
        return 2.0 * out.numel() * args[0].shape[-1]
    if name in _CONVOLUTIONS and isinstance(args[1], Tensor):
        weight = args[1]
        per_output = weight[0].numel() if not name.startswith("conv_transpose") else weight.shape[1]
        return 2.0 * out.numel() * per_output
    if name == "scaled_dot_product_attention" and isinstance(args[1], Tensor):
        q, k = args[0], args[1]
        return 4.0 * q.numel() / q.shape[-1] * k.shape[-2] * q.shape[-1]
    return 0.0


def _nbytes(t: Tensor) -> int:
    logical = t.numel() * t.element_size()
    try:
        return min(logical, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return logical
