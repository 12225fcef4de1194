"""The options of a wrapper: one frozen, validated value; its checkpoint fingerprint.

:class:`SamplingOptions` holds every setting of :class:`mcdrop.MCDropout` but the model. It is
validated once, on construction (each message names the option, what it got and what it expects),
and never changes afterwards, so it is at once:

* what the engine's remembered decisions are valid for (a wrapper's decisions are remembered per
  input signature; its options cannot change under them);
* the checkpoint fingerprint of ``predict_loader(checkpoint=...)`` (:meth:`SamplingOptions.fingerprint`):
  a run resumes only with the same settings;
* the per-rank copy of :mod:`mcdrop.distributed` (:meth:`SamplingOptions.replace` with another seed).

Callables among the options (``output=``) cannot be compared across processes by identity, so the
fingerprint describes them by what they compute (:func:`describe_option`): qualified name, and a
digest of their code, constants, names, closure values and defaults. A qualified name alone would
not do: every lambda is ``<lambda>``, so resuming with ``output=lambda o: o[1]`` a checkpoint
written with ``output=lambda o: o[0]`` would silently mix two outputs in one result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_bool, check_choice, check_int
from mcdrop.engine.checks import CheckSettings
from mcdrop.engine.outputs import OutputSelector
from mcdrop.engine.plan import DEFAULT_MEMORY_BUDGET
from mcdrop.engine.strategies import STRATEGIES
from mcdrop.errors import InvalidInputError, InvalidTypeError

__all__ = ["SamplingOptions", "describe_option"]

TASKS = ("auto", "classification", "regression")
OUTPUT_TYPES = ("logits", "probs", "log_probs")
ALEATORIC = ("variance", "log_variance")
#: The statistics adaptive sampling (``n_samples="auto"``) can drive to its tolerance, per task.
ADAPTIVE_TARGETS = {
    "classification": (
        "confidence",
        "probs",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "std",
    ),
    "regression": ("mean", "variance", "std", "aleatoric_variance"),
}
#: What adaptive sampling watches when ``target`` is not given.
DEFAULT_TARGETS = {"classification": "confidence", "regression": "mean"}
#: The defaults of adaptive sampling's options (``n_samples="auto"``).
ADAPTIVE_DEFAULTS = {"tolerance": 0.01, "min_samples": 20, "max_samples": 1000}


@dataclass(frozen=True)
class SamplingOptions:
    """Every setting of an :class:`mcdrop.MCDropout` but the model, validated; see its arguments.

    ``memory_budget=None`` means the automatic budget (:attr:`budget` is then ``None`` and
    :attr:`memory_budget_bytes` the default); ``output_batch_dim=None`` is resolved to
    ``batch_dim`` when that is an int, or to the one batch dimension a ``batch_dim`` mapping gives
    (its ``"*"`` default 0 included); a mapping that gives several stays ``None``, and each call
    infers it (the dimension every batched input has, else the output's only dimension of the
    batch's size) or refuses. ``output_type=None`` and ``class_dim=None`` mean
    "not given" and stay ``None``: logits (:attr:`read_output_type`), and the class dimension read
    from each call's output (docs/outputs.md); a wrapper refuses outputs that contradict a default
    it was not told.

    Raises:
        InvalidTypeError: An option of the wrong type.
        InvalidInputError: An option out of range, or options that contradict each other.

    Example:
        >>> from mcdrop.options import SamplingOptions
        >>> options = SamplingOptions(n_samples=20, seed=0)
        >>> options.output_batch_dim, options.replace(seed=1).seed
        (0, 1)
    """

    n_samples: int = 50
    task: str = "auto"
    output_type: str | None = None
    aleatoric: str | None = None
    class_dim: int | None = None
    batch_dim: int | Mapping[Any, int | None] = 0
    output_batch_dim: int | None = None
    output: OutputSelector = None
    max_batch_size: int | None = None
    memory_budget: int | None = None
    seed: int | None = None
    keep_samples: bool = False
    drop_path: bool = False
    include: Any = None
    exclude: Any = None
    strategy: str = "auto"
    dtype: torch.dtype | None = None
    tolerance: float | None = None
    min_samples: int | None = None
    max_samples: int | None = None
    target: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.n_samples == "auto":
            self._check_adaptive(put)
        else:
            if isinstance(self.n_samples, str):
                raise InvalidInputError(
                    f"n_samples must be a whole number of passes (>= 1) or 'auto'; got {self.n_samples!r}."
                )
            put("n_samples", check_int(self.n_samples, "n_samples", minimum=1))
            given = [
                n
                for n in ("tolerance", "min_samples", "max_samples", "target")
                if getattr(self, n) is not None
            ]
            if given:
                raise InvalidInputError(
                    f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to adaptive sampling only: "
                    f"pass n_samples='auto' with {'it' if len(given) == 1 else 'them'}, or leave "
                    f"{'it' if len(given) == 1 else 'them'} out to draw a fixed n_samples={self.n_samples}."
                )
        check_choice(self.task, TASKS, "task")
        if self.output_type is not None:
            check_choice(self.output_type, OUTPUT_TYPES, "output_type")
        if self.aleatoric is not None:
            check_choice(self.aleatoric, ALEATORIC, "aleatoric")
            if self.task == "classification":
                raise InvalidInputError(
                    "aleatoric= applies to regression; it cannot be used with task='classification'."
                )
        if self.class_dim is not None:
            put("class_dim", check_int(self.class_dim, "class_dim"))
        if not isinstance(self.batch_dim, Mapping):
            check_int(self.batch_dim, "batch_dim")
        output_batch_dim = self.output_batch_dim
        if output_batch_dim is None:
            output_batch_dim = _implied_output_batch_dim(self.batch_dim)
        if output_batch_dim is not None:
            put("output_batch_dim", check_int(output_batch_dim, "output_batch_dim"))
        output = self.output
        if not (output is None or callable(output) or isinstance(output, (str, int))):
            raise InvalidTypeError(
                f"output must be None, a key/attribute name, a tuple index or a callable; got {output!r}."
            )
        if self.max_batch_size is not None:
            put("max_batch_size", check_int(self.max_batch_size, "max_batch_size", minimum=1))
        if self.memory_budget is not None:
            put("memory_budget", check_int(self.memory_budget, "memory_budget", minimum=1))
        if self.seed is not None:
            put("seed", check_int(self.seed, "seed", minimum=0, maximum=2**64 - 1))
        put("keep_samples", check_bool(self.keep_samples, "keep_samples"))
        put("drop_path", check_bool(self.drop_path, "drop_path"))
        check_choice(self.strategy, STRATEGIES, "strategy")
        if self.dtype is not None and self.dtype not in (torch.float16, torch.bfloat16):
            raise InvalidInputError(
                f"dtype must be None, torch.bfloat16 or torch.float16 (the autocast precision); got {self.dtype!r}."
            )

    def _check_adaptive(self, put: Any) -> None:
        """Validate and fill in the options of adaptive sampling (``n_samples="auto"``)."""
        tolerance = ADAPTIVE_DEFAULTS["tolerance"] if self.tolerance is None else self.tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
            raise InvalidTypeError(f"tolerance must be a number; got {tolerance!r}.")
        if not math.isfinite(tolerance) or tolerance <= 0:
            raise InvalidInputError(
                f"tolerance must be a finite number > 0 (the standard error each input's statistic must "
                f"reach); got {tolerance!r}."
            )
        put("tolerance", float(tolerance))
        low = self.min_samples
        if low is None:  # the default, or max_samples where that is given smaller
            low = ADAPTIVE_DEFAULTS["min_samples"]
            if isinstance(self.max_samples, int) and not isinstance(self.max_samples, bool):
                low = max(2, min(low, self.max_samples))
        put("min_samples", check_int(low, "min_samples", minimum=2))
        high = (
            max(ADAPTIVE_DEFAULTS["max_samples"], self.min_samples or 0)
            if self.max_samples is None
            else self.max_samples
        )
        put("max_samples", check_int(high, "max_samples", minimum=2))
        if self.max_samples < self.min_samples:  # type: ignore[operator]
            raise InvalidInputError(
                f"max_samples ({self.max_samples}) must be at least min_samples ({self.min_samples})."
            )
        if self.target is not None:
            every = sorted({t for targets in ADAPTIVE_TARGETS.values() for t in targets})
            check_choice(self.target, every, "target")
            if self.task != "auto" and self.target not in ADAPTIVE_TARGETS[self.task]:
                raise InvalidInputError(
                    f"target={self.target!r} is not a statistic of task={self.task!r}; choose one of "
                    f"{', '.join(repr(t) for t in ADAPTIVE_TARGETS[self.task])}."
                )
        if self.keep_samples:
            raise InvalidInputError(
                "keep_samples=True needs a fixed number of samples (every input then holds the same N "
                "samples in prediction.samples); with n_samples='auto' each input stops at its own N. "
                "Pass an integer n_samples to keep the samples."
            )

    @property
    def adaptive(self) -> bool:
        """Whether the number of samples is chosen per input (``n_samples="auto"``)."""
        return self.n_samples == "auto"

    @property
    def first_round(self) -> int:
        """Samples per input in the first (or only) round: ``n_samples``, or ``min_samples`` when adaptive."""
        return int(self.min_samples) if self.adaptive else int(self.n_samples)  # type: ignore[arg-type]

    @property
    def pair(self) -> bool:
        """Whether the model outputs a ``(mean, variance)`` pair (``aleatoric`` is set)."""
        return self.aleatoric is not None

    @property
    def read_output_type(self) -> str:
        """What the model's classification output is read as: ``output_type``, else ``"logits"``."""
        return "logits" if self.output_type is None else self.output_type

    @property
    def budget(self) -> int | None:
        """The memory budget the engine is given: ``None`` for the automatic one."""
        return self.memory_budget

    @property
    def memory_budget_bytes(self) -> int:
        """Bytes one forward pass may hold: the budget, or the default one (256 MiB)."""
        return DEFAULT_MEMORY_BUDGET if self.memory_budget is None else self.memory_budget

    @property
    def check_settings(self) -> CheckSettings:
        """What the check passes of a call follow (the gate check, run-time discovery)."""
        return CheckSettings(
            output=self.output,
            pair=self.pair,
            autocast_dtype=self.dtype,
            max_batch_size=self.max_batch_size,
            memory_budget=self.budget,
            n_samples=self.first_round,
        )

    def replace(self, **changes: Any) -> SamplingOptions:
        """A copy with ``changes`` (validated the same way), e.g. another seed for another rank.

        Args:
            **changes: Options to change, by name.

        Returns:
            The new options; these are unchanged.

        Example:
            >>> from mcdrop.options import SamplingOptions
            >>> SamplingOptions(seed=0).replace(seed=7).seed
            7
        """
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :class:`mcdrop.MCDropout` (shallow: callables as they are).

        Returns:
            One entry per option.

        Example:
            >>> from mcdrop.options import SamplingOptions
            >>> SamplingOptions(n_samples=5).as_kwargs()["n_samples"]
            5
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resumption, as plain text and numbers.

        How the passes are drawn and read: another setting would mix two sets of draws in one result.
        Callables are described by their code (:func:`describe_option`); ``batch_dim`` ``0``, ``{}``
        and ``{"*": 0}`` read the same. The keys and formats are those of every earlier version, so
        their checkpoints resume: ``output_type`` and ``class_dim`` not given are written as the old
        defaults ``"logits"`` and 1. (So a checkpoint written with ``class_dim=1`` given resumes
        without it, where a model config's ``num_labels`` may name another class dimension: only
        an output that ``class_dim=1`` read wrongly.)

        Returns:
            A dict of options by name.

        Example:
            >>> from mcdrop.options import SamplingOptions
            >>> SamplingOptions(n_samples=5).fingerprint()["n_samples"]
            5
        """
        adaptive = (
            {
                "tolerance": self.tolerance,
                "min_samples": self.min_samples,
                "max_samples": self.max_samples,
                "target": self.target,
            }
            if self.adaptive
            else {}  # absent for a fixed N: the keys of earlier versions, whose checkpoints resume
        )
        return {
            **adaptive,
            "n_samples": self.n_samples,
            "task": self.task,
            "output_type": self.read_output_type,
            "aleatoric": self.aleatoric,
            "class_dim": 1 if self.class_dim is None else self.class_dim,
            "seed": self.seed,
            "max_batch_size": self.max_batch_size,
            "memory_budget": self.memory_budget_bytes,
            "strategy": self.strategy,
            "dtype": str(self.dtype),
            "output": describe_option(self.output),
            "output_batch_dim": self.output_batch_dim,
            "batch_dim": _batch_dim_option(self.batch_dim),
        }


def describe_option(value: Any) -> str:
    """A text for an option in a checkpoint fingerprint, the same in another process.

    A callable is described by what it computes: its qualified name, and for Python functions
    (lambdas included) a digest of their code, constants, names and closure values; a
    ``functools.partial`` by its function and bound arguments. Two lambdas that select other
    outputs therefore differ, and the same lambda in a new process matches. Anything that cannot
    be described so (a closure that refers to itself is described once, an object whose ``repr``
    fails) falls back to its type's qualified name.
    """
    return _describe(value, set())


def _describe(value: Any, seen: set[int]) -> str:
    """:func:`describe_option`, with the ids of the containers and functions being described.

    A part that cannot be described falls back to its type's name alone, the rest still counts.
    """
    try:
        return _describe_part(value, seen)
    except Exception:  # noqa: BLE001 - e.g. a repr that raises: by its type, never a failed checkpoint
        return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _describe_part(value: Any, seen: set[int]) -> str:
    if id(value) in seen:  # a closure or container that refers to itself
        return f"<recursive {type(value).__qualname__}>"
    if isinstance(value, functools.partial):
        inner = seen | {id(value)}
        return (
            f"partial({_describe(value.func, inner)}, {_describe(value.args, inner)}, "
            f"{_describe(value.keywords, inner)})"
        )
    if callable(value) and not isinstance(value, type):
        name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        code = getattr(value, "__code__", None)
        if code is None:  # a builtin, or an object with __call__: its repr where that is stable
            text = repr(value)
            return name if " at 0x" in text or isinstance(value, nn.Module) else f"{name}:{text}"
        inner = seen | {id(value)}
        cells = []
        for cell in getattr(value, "__closure__", None) or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell: a name assigned after the function was made
                cells.append("<empty>")
                continue
            cells.append(_describe(contents, inner))
        defaults = getattr(value, "__defaults__", None)
        body = repr(
            (
                code.co_code,
                _code_constants(code),
                code.co_names,
                tuple(cells),
                # As written (as earlier versions did, so their checkpoints resume), unless
                # the text would hold an address.
                defaults if _plain_defaults(defaults) else _describe(defaults, inner),
            )
        )
        return f"{name}#{hashlib.sha256(body.encode()).hexdigest()[:16]}"
    if isinstance(value, Mapping):
        inner = seen | {id(value)}
        return repr(sorted((_describe(k, inner), _describe(v, inner)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        inner = seen | {id(value)}
        return repr([_describe(v, inner) for v in value])
    if isinstance(value, (set, frozenset)):  # unordered, and ordered by hash: sorted descriptions
        inner = seen | {id(value)}
        return f"{type(value).__name__}({sorted(_describe(v, inner) for v in value)})"
    if isinstance(value, torch.Tensor):
        return _describe_tensor(value)
    text = repr(value)
    if " at 0x" in text or isinstance(value, nn.Module):  # an address or a whole model: by its type
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return text


def _plain_defaults(defaults: Any) -> bool:
    """Whether default values read the same in full in their ``repr`` (numbers, strings, ...)."""
    if isinstance(defaults, tuple):
        return all(_plain_defaults(d) for d in defaults)
    return defaults is None or isinstance(defaults, (bool, int, float, complex, str, bytes))


_COMPRESSED_LAYOUTS = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _describe_tensor(value: torch.Tensor) -> str:
    """Shape, dtype and a digest of the values (dense tensors of at most 2**20 elements)."""
    digest = ""
    if value.numel() <= 2**20 and value.device.type != "meta" and value.layout == torch.strided:
        flat = value.detach().cpu().reshape(-1).clone()  # 0-d and non-contiguous tensors too
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    elif value.layout in _COMPRESSED_LAYOUTS and value.numel() <= 2**20 and value.device.type != "meta":
        return _describe_tensor(value.detach().cpu().to_dense())
    elif value.is_sparse and value.device.type != "meta":
        dense = value.detach().cpu().coalesce()
        digest = _describe_tensor(dense.indices()) + _describe_tensor(dense.values())
        digest = hashlib.sha256(digest.encode()).hexdigest()
    return f"tensor{tuple(value.shape)}:{value.dtype}:{digest[:16]}"


def _code_constants(code: Any) -> tuple[Any, ...]:
    """The constants of a code object, nested code objects (inner lambdas) by their own contents.

    Frozensets (``x in {1, 2}`` compiles to one) by their sorted items: their order follows string
    hashes, which change from one process to the next.
    """
    return tuple(
        (c.co_code, _code_constants(c), c.co_names)
        if hasattr(c, "co_code")
        else repr(sorted(map(repr, c)))
        if isinstance(c, frozenset)
        else repr(c)
        for c in code.co_consts
    )


def _implied_output_batch_dim(batch_dim: int | Mapping[Any, int | None]) -> int | None:
    """The output batch dimension ``batch_dim`` implies: the one it gives (``None``: several)."""
    if not isinstance(batch_dim, Mapping):
        return batch_dim
    dims = {d for d in batch_dim.values() if d is not None}
    if "*" not in batch_dim:
        dims.add(0)  # the default of the inputs it does not name
    return dims.pop() if len(dims) == 1 else None


def _batch_dim_option(batch_dim: int | Mapping[Any, int | None]) -> str:
    """``batch_dim`` for a fingerprint: ``0``, ``{}`` and ``{"*": 0}`` say the same, and read the same."""
    dims = dict(batch_dim) if isinstance(batch_dim, Mapping) else {"*": batch_dim}
    dims.setdefault("*", 0)
    return describe_option(dims)
