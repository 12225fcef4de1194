"""The stochastic policy: which modules are random at inference, switching them on, restoring state.

MC dropout needs dropout *on* and everything else *off* at inference. PyTorch has a single switch
per module, ``module.training``, and that switch controls more than dropout: BatchNorm uses batch
statistics and updates its running buffers in train mode, ``nn.TransformerEncoderLayer`` takes a
fused fast path (which never calls its dropout modules) in eval mode, and user code often gates
functional dropout on ``self.training``. ``model.train()`` therefore breaks BatchNorm, and
"set every ``nn.Dropout`` to train" misses attention dropout, LSTM inter-layer dropout and
functional dropout.

How the policy decides, module by module (the first rule that matches wins):

1. Modules matched by ``exclude=`` are left in eval mode.
2. Modules matched by ``include=`` are switched to train mode (kind ``"custom"``).
3. Classes registered with :func:`register_deterministic`, normalisation layers with running
   statistics (every ``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*``) and ``nn.RReLU`` (random,
   but not dropout) stay in eval mode.
4. Dropout layers: ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``,
   ``mcdrop.nn.Dropout``/``Dropout2d`` and classes registered with :func:`register_stochastic`
   (kind ``"dropout"``). Sampled when their rate is above zero.
5. Drop-path / stochastic depth (classes whose name ends in ``DropPath`` or ``StochasticDepth``:
   timm's ``DropPath``, torchvision's ``StochasticDepth``, Hugging Face's ``ConvNextDropPath``,
   ``SwinDropPath``, ...; or classes registered with kind ``"drop_path"``): found and listed, with
   the rate from ``drop_prob`` or ``p``, sampled only with ``drop_path=True``.
6. ``nn.MultiheadAttention`` with ``dropout > 0`` (kind ``"attention_dropout"``): its internal
   dropout on the attention weights only runs in train mode.
7. ``nn.RNN``/``LSTM``/``GRU`` with ``dropout > 0`` and more than one layer (kind
   ``"rnn_dropout"``): inter-layer dropout is an argument of the fused kernel, active only in train
   mode.
8. ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` containing a sampled site
   (kind ``"fast_path_gate"``): in eval mode the encoder layer may run a fused kernel that skips
   its dropout modules altogether, so it is put in train mode too (which changes nothing else).
9. Any other ``torch.nn`` module is left as it is set by the model's own ``eval()`` mode: its
   forward does not read ``training``.
10. User-defined classes (anything not from ``torch``) whose own code reads ``.training`` — such as
    ``F.dropout(x, self.p, training=self.training)`` or Hugging Face style
    ``dropout_p = p if self.training else 0.0`` — are *gates* (kind ``"functional"``): they are put
    in train mode, their rate is unknown (``None``). Their own buffers are snapshotted: if a pass in
    train mode changed one (i.e. the flag gates something stateful, like a hand-written BatchNorm),
    the buffers are put back and :class:`~mcdrop.errors.ModelStateError` is raised naming the
    module and the fix (``exclude=`` or :func:`register_deterministic`). Reading the flag does not
    prove that it gates only dropout, so :class:`mcdrop.MCDropout` also runs each gate on the first
    rows of every new input signature, with every dropout operation made the identity (see
    :mod:`mcdrop._gatecheck`): a gate whose train mode still changes the output deterministically
    raises :class:`~mcdrop.errors.ModelStateError`, one drawing from numpy's or Python's RNG warns
    (:class:`~mcdrop.errors.GateRandomnessWarning`).

    The code searched is what a forward pass can run: ``forward`` (and ``__call__``) of the class
    and its non-torch bases, and, transitively, every method, property or static/class method of
    theirs whose name that code uses (``self._attn(...)``, ``super().forward(...)``), and every
    module-level function (not torch's) that code calls by name (``helper(self, x)`` reading
    ``module.training``), including the originals behind decorators (``functools.wraps``'
    ``__wrapped__``). Reads are ``obj.training`` and ``getattr(obj, "training")``. Methods no
    forward pass reaches (a Hugging Face ``set_use_kernels`` that reads the flag to pick kernels)
    gate nothing. Not counted as reads: methods named ``train``/``eval`` (they set the flag, they do
    not gate randomness), reads that pass the mode on (``self.head.train(self.training)``), and
    reads that form one condition with a ``gradient_checkpointing`` read
    (``self.gradient_checkpointing and self.training``, as in every Hugging Face
    ``PreTrainedModel`` and ``GradientCheckpointingLayer``).

    A gate whose class name contains ``Attention``/``Attn`` and whose code reads one of the
    attributes ``attention_dropout``, ``attn_dropout``, ``attn_drop``, ``attn_pdrop``,
    ``dropout_prob``, ``dropout_p`` or ``dropout`` (a number, or an ``nn.Dropout`` whose ``p`` is
    read) is attention dropout (kind ``"attention_dropout"``) with that rate: this is how Hugging Face
    and timm attention passes ``dropout_p`` to ``scaled_dot_product_attention`` or to the eager
    attention function only in train mode. With a known rate of 0 it is not sampled. Where the rate
    is an ``nn.Dropout``'s ``p`` (BERT's ``self.dropout``, GPT-2's ``attn_dropout``), that child is
    listed as the same attention dropout ("holds the rate of ..."): both are sampled together, and
    excluding either keeps both in eval mode. A gate whose code also reads other numeric
    ``*drop*`` attributes (Starcoder2's ``residual_dropout``) applies several rates: it is a
    ``"functional"`` gate, sampled unless every rate is 0, with the rates in its note.

TorchScript modules are classified by their original class name and, for user classes, by whether
their compiled code reads ``self.training``. Traced modules (``torch.jit.trace``) froze the mode
they were traced in into their graph, so flags cannot switch their dropout:
:class:`StochasticPolicy` raises :class:`~mcdrop.errors.UnsupportedModelError` for a traced model,
and for traced parts of an eager model that hold a dropout layer or a random operation in their
graph; a traced part with neither runs as recorded, with a warning.
``torch.compile``'d models (``OptimizedModule``, whose sites sit under ``_orig_mod``) are supported:
TorchDynamo guards on the ``training`` flags, so switching them recompiles once per mode.

Inside :func:`enable_dropout` every module that is not a sampled site is in eval mode, whatever
mode the model was in; on exit every module's ``training`` flag is restored exactly, also when the
body raises. Activations nest (an inner one restores the outer one's flags), but the flags are
shared by all threads: while one thread samples a model, another thread that tries to switch any of
its modules gets :class:`~mcdrop.errors.ModelStateError` (give each thread its own copy of the model,
or serialise the calls), instead of switching the first thread's dropout off mid-sampling and
leaving dropout on afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import dis
import fnmatch
import inspect
import keyword
import re
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_bool, check_real
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropWarning,
    ModelStateError,
    NoDropoutError,
    NoRandomnessWarning,
    UnsupportedModelError,
)

__all__ = [
    "StochasticSite",
    "StochasticPolicy",
    "enable_dropout",
    "find_stochastic_sites",
    "register_stochastic",
    "register_deterministic",
    "describe",
    "add_dropout",
    "set_dropout_rate",
    "RateChange",
    "SITE_KINDS",
]

#: The kinds of stochastic site the policy recognises.
SITE_KINDS = (
    "dropout",
    "attention_dropout",
    "rnn_dropout",
    "fast_path_gate",
    "functional",
    "drop_path",
    "custom",
)

_TORCH_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_TORCH_DETERMINISTIC_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, their lazy versions
    nn.RReLU,
)
_DROP_PATH_NAMES = frozenset({"DropPath", "StochasticDepth"})
_SCRIPTED_DROPOUT_NAMES = frozenset(t.__name__ for t in _TORCH_DROPOUT_TYPES)
_SCRIPTED_DETERMINISTIC_NAMES = frozenset(
    {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "RReLU",
    }
)

# User registries: class -> (kind, rate attribute name)
_REGISTERED_STOCHASTIC: dict[type, tuple[str, str | None]] = {}
_REGISTERED_DETERMINISTIC: set[type] = set()
_CLASS_CODE_CACHE: dict[type, tuple[bool, frozenset[str]]] = {}
_MODE_SETTERS = frozenset({"train", "eval"})
#: Where a forward pass enters a module's own code.
_FORWARD_ROOTS = ("forward", "__call__")
# Attributes through which Hugging Face and timm attention modules hold their attention-dropout rate.
_ATTENTION_RATE_ATTRS = (
    "attention_dropout",
    "attn_dropout",
    "attn_drop",
    "attn_pdrop",
    "dropout_prob",
    "dropout_p",
    "dropout",
)


def register_stochastic(cls: type[nn.Module], kind: str = "dropout", rate_attr: str | None = "p") -> None:
    """Register a module class as a source of randomness that MC dropout should sample.

    Use it for a home-made dropout or noise layer whose ``forward`` the automatic rules miss.

    Args:
        cls: The ``nn.Module`` subclass.
        kind: ``"dropout"`` (sampled by default) or ``"drop_path"`` (sampled with ``drop_path=True``).
        rate_attr: Name of the attribute holding the drop rate (a plain attribute name such as
            ``"p"``, settable for :func:`set_dropout_rate`), or ``None`` if it has none.

    Raises:
        InvalidTypeError: ``cls`` is not an ``nn.Module`` subclass, or ``rate_attr`` is neither a
            string nor ``None``.
        InvalidInputError: ``kind`` is not one of the two above, or ``rate_attr`` is not a valid
            attribute name.

    Example:
        >>> import torch, mcdrop
        >>> class Noisy(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.p = 0.1
        ...     def forward(self, x):
        ...         return x + 0.1 * torch.randn_like(x) if self.training else x
        >>> mcdrop.register_stochastic(Noisy, kind="dropout", rate_attr="p")
        >>> [s.kind for s in mcdrop.find_stochastic_sites(torch.nn.Sequential(Noisy()))]
        ['dropout']
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InvalidTypeError(f"register_stochastic expects an nn.Module subclass; got {cls!r}.")
    if not isinstance(kind, str) or kind not in ("dropout", "drop_path"):
        raise InvalidInputError(
            f"kind must be 'dropout' (sampled by default) or 'drop_path' (sampled with drop_path=True); "
            f"got {kind!r}. For a layer whose train mode is not randomness, use "
            "mcdrop.register_deterministic instead."
        )
    if rate_attr is not None and not isinstance(rate_attr, str):
        raise InvalidTypeError(
            f"rate_attr must be the name (a str) of the attribute that holds the drop rate of "
            f"{cls.__name__}, e.g. rate_attr='p', or None if it has none; got {rate_attr!r} of type "
            f"{type(rate_attr).__name__}."
        )
    if rate_attr is not None and (not rate_attr.isidentifier() or keyword.iskeyword(rate_attr)):
        raise InvalidInputError(
            f"rate_attr must be a plain attribute name of {cls.__name__} (such as 'p' or 'drop_rate'); "
            f"got {rate_attr!r}, which is not a valid Python identifier. Pass the name of the attribute "
            "the layer reads its rate from, or None."
        )
    _REGISTERED_DETERMINISTIC.discard(cls)
    _REGISTERED_STOCHASTIC[cls] = (kind, rate_attr)


def register_deterministic(cls: type[nn.Module]) -> None:
    """Register a module class whose train mode must never be switched on by MC dropout.

    Use it for a custom layer whose ``forward`` reads ``self.training`` for something other than
    dropout (a hand-written normalisation layer, a layer that updates statistics, ...).

    Args:
        cls: The ``nn.Module`` subclass.

    Example:
        >>> import torch, mcdrop
        >>> class MyNorm(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x - x.mean(0) if self.training else x
        >>> mcdrop.register_deterministic(MyNorm)
        >>> mcdrop.find_stochastic_sites(torch.nn.Sequential(MyNorm()))
        []
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InvalidTypeError(f"register_deterministic expects an nn.Module subclass; got {cls!r}.")
    _REGISTERED_STOCHASTIC.pop(cls, None)
    _REGISTERED_DETERMINISTIC.add(cls)


@dataclass(frozen=True)
class StochasticSite:
    """One place in a model where randomness can be switched on at inference.

    Attributes:
        path: The module's dotted name in ``model.named_modules()`` (``""`` for the model itself).
        kind: One of :data:`SITE_KINDS`.
        module_type: The module's class name.
        rate: The drop rate where it is known, else ``None``.
        sampled: Whether MC dropout switches it on under the current options.
        note: Why it is or is not sampled.
        rate_attr: The (dotted) attribute of the module that holds ``rate`` (``"p"``,
            ``"dropout"``, ``"attn_dropout.p"``, ...), which :func:`set_dropout_rate` changes;
            ``None`` where the rate is unknown.

    Example:
        >>> import torch, mcdrop
        >>> site = mcdrop.find_stochastic_sites(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))[0]
        >>> site.path, site.kind, site.rate, site.sampled
        ('1', 'dropout', 0.1, True)
    """

    path: str
    kind: str
    module_type: str
    rate: float | None
    sampled: bool
    note: str = ""
    rate_attr: str | None = None


def _iter_codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _iter_codes(const)


def _code_reads_training(code: types.CodeType) -> bool:
    """True if ``code`` (or code nested in it) reads an attribute ``training``.

    Reads are ``obj.training`` and ``getattr(obj, "training"[, default])``. Not counted: a read in
    one boolean condition with a read of ``gradient_checkpointing`` (``self.gradient_checkpointing
    and self.training``): it chooses whether to checkpoint, not whether to drop; and a read passed
    to a ``train`` method (``self.head.train(self.training)``).
    """
    for inner in _iter_codes(code):
        if "training" not in inner.co_names and "training" not in inner.co_consts:
            continue
        instructions = [i for i in dis.get_instructions(inner) if i.opname not in ("CACHE", "EXTENDED_ARG")]
        for index, ins in enumerate(instructions):
            if ins.argval != "training" or not ins.opname.startswith("LOAD_"):
                continue
            if ins.opname == "LOAD_CONST" and not any(
                w.argval == "getattr" for w in instructions[max(0, index - 3) : index]
            ):
                continue  # the string "training", not getattr(obj, "training")
            if _in_checkpointing_condition(instructions, index):
                continue
            if any(w.argval == "train" for w in instructions[max(0, index - 3) : index]):
                continue  # ``child.train(self.training)`` passes the mode on, it gates nothing
            return True
    return False


def _in_checkpointing_condition(instructions: list[dis.Instruction], index: int) -> bool:
    """True if the read at ``index`` and a ``gradient_checkpointing`` read form one condition.

    They do when they are at most 8 instructions apart with a conditional jump (``and``/``or``)
    and no store between them.
    """
    for other in range(max(0, index - 8), min(len(instructions), index + 9)):
        if instructions[other].argval != "gradient_checkpointing":
            continue
        low, high = sorted((index, other))
        between = instructions[low + 1 : high]
        if any("JUMP" in w.opname for w in between) and not any(
            w.opname.startswith("STORE_") for w in between
        ):
            return True
    return False


def _function_codes(attr: Any) -> Iterator[tuple[types.CodeType, dict[str, Any]]]:
    """Yield the code objects behind a class attribute, each with the globals it runs with.

    That is functions, static/class methods, properties, and the originals behind decorators
    (``__wrapped__``).
    """
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    if isinstance(attr, property):
        candidates = [attr.fget, attr.fset]
    else:
        candidates = [attr]
    for func in candidates:
        for _ in range(16):  # a decorator chain; bounded against cycles
            if func is None:
                break
            code = getattr(func, "__code__", None)
            if isinstance(code, types.CodeType):
                yield code, getattr(func, "__globals__", None) or {}
            func = getattr(func, "__wrapped__", None)


def _helper_function(name: str, namespace: dict[str, Any]) -> Any:
    """The plain function a global ``name`` refers to, if it is one of the user's (not torch's)."""
    value = namespace.get(name)
    if not isinstance(value, types.FunctionType):
        return None
    module = getattr(value, "__module__", "") or ""
    return None if module == "torch" or module.startswith("torch.") else value


def _class_code(cls: type) -> tuple[bool, frozenset[str]]:
    """Return whether a forward pass of ``cls`` reads ``.training``, and the names its code uses.

    The code is that of ``cls`` and its non-torch bases which a forward pass can reach: ``forward``
    and ``__call__``, then every class attribute whose name reachable code uses, and every
    module-level (non-torch) function it calls by name (``helper(self, x)`` reading
    ``module.training``), transitively (see :func:`_code_reads_training`; methods named
    ``train``/``eval`` set the flag and are skipped). The names are the attribute/global names
    used by the reachable code of the class itself.
    """
    cached = _CLASS_CODE_CACHE.get(cls)
    if cached is not None:
        return cached
    members: dict[str, list[tuple[types.CodeType, dict[str, Any]]]] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object or _is_torch_class(klass):
            continue
        for attr_name, attr in vars(klass).items():
            if attr_name not in _MODE_SETTERS and attr_name != "__init__":
                members.setdefault(attr_name, []).extend(_function_codes(attr))
    reads = False
    names: set[str] = set()
    pending: list[tuple[types.CodeType, dict[str, Any], bool]] = [
        (code, namespace, True) for name in _FORWARD_ROOTS for code, namespace in members.get(name, ())
    ]
    visited_members: set[str] = {name for name in _FORWARD_ROOTS if name in members}
    visited_helpers: set[int] = set()
    while pending:
        code, namespace, own = pending.pop()
        if not reads and _code_reads_training(code):
            reads = True
        for inner in _iter_codes(code):
            for used in inner.co_names:
                if own:
                    names.add(used)
                if used in members and used not in visited_members:
                    visited_members.add(used)
                    pending.extend((c, g, True) for c, g in members[used])
                    continue
                helper = _helper_function(used, namespace)
                if helper is not None and id(helper) not in visited_helpers and len(visited_helpers) < 256:
                    visited_helpers.add(id(helper))
                    pending.extend((c, g, False) for c, g in _function_codes(helper))
    result = (reads, frozenset(names))
    _CLASS_CODE_CACHE[cls] = result
    return result


def _class_reads_training(cls: type) -> bool:
    """True if forward-reachable code of ``cls`` or its non-torch bases reads ``.training``."""
    return _class_code(cls)[0]


def _attention_rate(module: nn.Module, cls: type) -> tuple[float, str] | None:
    """Return the attention-dropout rate of a Hugging Face / timm style attention gate.

    Returns ``(rate, dotted attribute it comes from)``, or ``None`` when the module is not such a
    gate.
    """
    lowered = cls.__name__.lower()
    if "attention" not in lowered and "attn" not in lowered:
        return None
    names = _class_code(cls)[1]
    for attr in _ATTENTION_RATE_ATTRS:
        if attr not in names:
            continue
        value = module._modules[attr] if attr in module._modules else getattr(module, attr, None)
        if isinstance(value, nn.Module):
            if "p" in names and (isinstance(value, _TORCH_DROPOUT_TYPES) or _is_mcdrop_dropout(type(value))):
                rate = _rate(value, "p")
                if rate is not None:
                    return rate, f"{attr}.p"
            continue
        rate = _rate(module, attr)
        if rate is not None:
            return rate, attr
    return None


def _other_dropout_rates(module: nn.Module, cls: type, rate_attr: str | None) -> dict[str, float]:
    """Dropout rates other than ``rate_attr`` that a gate's code reads: numeric attributes named ``*drop*``.

    Starcoder2's attention, for one, applies ``F.dropout(attn_output, p=self.residual_dropout,
    training=self.training)`` besides its attention dropout; such a module is not one rate.
    """
    own = (rate_attr or "").split(".", 1)[0]
    rates = {}
    for name in sorted(_class_code(cls)[1]):
        if "drop" not in name.lower() or name == own or name in module._modules:
            continue
        rate = _rate(module, name)
        if rate is not None:
            rates[name] = rate
    return rates


def _never_called(path: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the module at ``path`` is one its parent uses only through its weights, never calls.

    ``nn.MultiheadAttention.out_proj`` is such a layer (the attention function reads
    ``out_proj.weight``): a hook on it would never run, so dropout cannot go in front of it.
    """
    parent = path.rpartition(".")[0] if "." in path else ("" if path else None)
    return parent is not None and isinstance(modules.get(parent), nn.MultiheadAttention)


def _is_torch_class(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == "torch" or module.startswith("torch.")


def _rate(module: nn.Module, attr: str | None) -> float | None:
    if attr is None:
        return None
    value = getattr(module, attr, None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _matches(path: str, module: nn.Module, patterns: tuple[Any, ...]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(path, pattern):
                return True
        elif isinstance(pattern, type):
            if isinstance(module, pattern):
                return True
        elif callable(pattern):
            if pattern(path, module):
                return True
    return False


def _check_patterns(value: Any, name: str) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, type)) or (callable(value) and not isinstance(value, Iterable)):
        value = (value,)
    if not isinstance(value, Iterable):
        value = (value,)  # reported below as not a pattern
    patterns = tuple(value)
    for p in patterns:
        if not (isinstance(p, (str, type)) or callable(p)):
            raise InvalidTypeError(
                f"{name} takes module-path patterns (str, e.g. 'encoder.*'), module classes, or "
                f"callables (path, module) -> bool; got {p!r}."
            )
        if not isinstance(p, (str, type)):
            _check_pattern_signature(p, name)
    return patterns


def _check_pattern_signature(func: Callable[..., Any], name: str) -> None:
    """Refuse a callable pattern that cannot be called as ``func(path, module)``."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        signature.bind("", None)
    except TypeError as err:
        raise InvalidTypeError(
            f"A callable in {name}= is called as fn(path, module) -> bool, with the module's dotted "
            "path in the model (a str, '' for the model itself) and the module, for every module; "
            f"{getattr(func, '__qualname__', repr(func))} has the signature {signature}, which cannot take "
            f"these two positional arguments ({err}). Pass e.g. "
            f"{name}=lambda path, module: isinstance(module, nn.Linear)."
        ) from None


def _registered_rate_problem(module: nn.Module) -> str | None:
    """Why the rate of an instance of a class registered with a ``rate_attr`` cannot be read, or None."""
    for registered, (_, attr) in _REGISTERED_STOCHASTIC.items():
        if not isinstance(module, registered):
            continue
        if attr is None:
            return None
        missing = object()
        value = getattr(module, attr, missing)
        if value is missing:
            return (
                f"registered with rate_attr={attr!r}, but this {type(module).__name__} has no attribute "
                f"{attr!r}: its rate is unknown"
            )
        if _rate(module, attr) is None:
            return (
                f"registered with rate_attr={attr!r}, but its {attr!r} holds {value!r} "
                f"({type(value).__name__}), not a number: its rate is unknown"
            )
        return None
    return None


def _classify(
    path: str,
    module: nn.Module,
    *,
    drop_path: bool,
    include: tuple[Any, ...],
    exclude: tuple[Any, ...],
) -> StochasticSite | None:
    """Return the site this module is, or None if it is not a source (or gate) of randomness."""
    name = type(module).__name__
    if isinstance(module, torch.jit.ScriptModule):
        name = getattr(module, "original_name", name)
    site = _classify_kind(module, name)
    if site is not None and _is_traced(module):
        return StochasticSite(path, site[0], name, site[1], False, _TRACED_NOTE, site[2])
    if _matches(path, module, exclude):
        if site is None:
            return None
        return StochasticSite(path, site[0], name, site[1], False, "excluded by the user", site[2])
    if _matches(path, module, include):
        kind = site[0] if site is not None else "custom"
        rate = site[1] if site is not None else None
        rate_attr = site[2] if site is not None else None
        return StochasticSite(path, kind, name, rate, True, INCLUDED_NOTE, rate_attr)
    if site is None:
        return None
    kind, rate, rate_attr = site
    if kind == "drop_path":
        note = "sampled (drop_path=True)" if drop_path else "not sampled: pass drop_path=True to sample it"
        return StochasticSite(path, kind, name, rate, drop_path and rate != 0.0, note, rate_attr)
    if rate is not None and rate == 0.0:
        return StochasticSite(path, kind, name, rate, False, "rate is 0: nothing to sample", rate_attr)
    note = (
        _gate_note(module) if kind == "functional" and not isinstance(module, torch.jit.ScriptModule) else ""
    )
    if (
        kind == "attention_dropout"
        and rate_attr is not None
        and not isinstance(module, nn.MultiheadAttention)
    ):
        note = f"dropout on the attention weights, applied by the module's code in train mode (rate: {rate_attr})"
    return StochasticSite(path, kind, name, rate, True, note, rate_attr)


#: Operations that draw randomness (or may: attention with a traced dropout_p), in a traced graph.
_RANDOM_GRAPH_OP = re.compile(
    r"aten::(?:\w*dropout|bernoulli|rand|randn|randint|randperm|multinomial|normal|uniform|exponential"
    r"|geometric|cauchy|log_normal|poisson|rrelu\w*|scaled_dot_product_attention|_?fused_dropout)"
    r"(?:_like)?_?\("
)


def _outermost_traced(model: nn.Module) -> list[str]:
    """Paths of the traced modules that no other traced module contains."""
    paths = [path for path, m in model.named_modules() if _is_traced(m)]
    return [p for p in paths if not any(p != q and (q == "" or p.startswith(q + ".")) for q in paths)]


def _traced_is_deterministic(module: nn.Module) -> bool:
    """True if a traced module has no stochastic site inside and no random op in its graph."""
    if any(_classify_kind(m, getattr(m, "original_name", type(m).__name__)) for m in module.modules()):
        return False
    try:
        graph = str(module.inlined_graph)
    except (RuntimeError, AttributeError):
        return False
    return _RANDOM_GRAPH_OP.search(graph) is None


def _refused_traced_modules(model: nn.Module, outer: list[str]) -> list[str]:
    """Of the outermost traced modules ``outer``, those MC dropout cannot handle.

    That is the model itself, or ones holding dropout or randomness.
    """
    if "" in outer:
        return ["<model>"]
    modules = dict(model.named_modules())
    return [p for p in outer if not _traced_is_deterministic(modules[p])]


#: The note of a site the user named in ``include=``.
INCLUDED_NOTE = "included by the user"

_TRACED_NOTE = (
    "traced with torch.jit.trace: the train/eval mode is frozen into the graph, so it cannot be "
    "switched; use the eager model or torch.jit.script"
)


def _is_traced(module: nn.Module) -> bool:
    try:
        from torch.jit._trace import TracedModule
    except ImportError:  # pragma: no cover - present in every supported torch
        return False
    return isinstance(module, TracedModule)


def _scripted_torch_class(module: torch.jit.ScriptModule) -> bool:
    """True if a scripted module was compiled from a ``torch`` class (e.g. ``torch.nn.Linear``)."""
    try:
        qualified = module._c._type().qualified_name()
    except (RuntimeError, AttributeError):
        return False
    return qualified.startswith("__torch__.torch.")


#: A read of a ``training`` attribute in TorchScript code (``self.training``, ``fc.training``; the
#: compiler turns ``getattr(self, "training")`` into ``self.training``), not ``self.training_scale``.
_SCRIPTED_TRAINING_READ = re.compile(r"\.training\b")


def _scripted_code(module: torch.jit.ScriptModule) -> str:
    """The TorchScript source of the module's own methods (``forward`` and any others).

    ``module.code`` is ``forward`` alone; a helper method it calls (``self.drop(x)`` reading
    ``self.training``) is compiled as a method of its own, so every compiled method is read.
    """
    parts = []
    try:
        method_names = module._c._method_names()
    except (RuntimeError, AttributeError):
        method_names = []
    if not method_names:
        try:
            return str(module.code)
        except (RuntimeError, AttributeError):
            return ""
    for method in method_names:
        try:
            parts.append(str(getattr(module, method).code))
        except (RuntimeError, AttributeError):
            continue
    return "\n".join(parts)


def _classify_kind(module: nn.Module, name: str) -> tuple[str, float | None, str | None] | None:
    """``(kind, rate, rate attribute)`` of a module that is a site, else ``None``."""
    cls = type(module)
    for registered, (kind, attr) in _REGISTERED_STOCHASTIC.items():
        if isinstance(module, registered):
            rate = _rate(module, attr)
            return kind, rate, attr if rate is not None else None
    if any(isinstance(module, t) for t in _REGISTERED_DETERMINISTIC):
        return None
    if isinstance(module, torch.jit.ScriptModule):
        if name in _SCRIPTED_DETERMINISTIC_NAMES:
            return None
        if name in _SCRIPTED_DROPOUT_NAMES or name in ("Dropout", "Dropout2d"):
            return "dropout", _rate(module, "p"), "p"
        if _is_drop_path_name(name):
            attr = "p" if hasattr(module, "p") else "drop_prob"
            return "drop_path", _rate(module, attr), attr
        if name == "MultiheadAttention" and hasattr(module, "dropout"):
            return "attention_dropout", _rate(module, "dropout"), "dropout"
        if name in ("LSTM", "GRU", "RNN") and hasattr(module, "dropout"):
            layers = getattr(module, "num_layers", 1)
            return "rnn_dropout", (_rate(module, "dropout") if layers > 1 else 0.0), "dropout"
        if _scripted_torch_class(module):  # the same rules as for eager torch.nn modules
            if name in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
                return "fast_path_gate", None, None
            return None
        return ("functional", None, None) if _SCRIPTED_TRAINING_READ.search(_scripted_code(module)) else None
    if isinstance(module, _TORCH_DETERMINISTIC_TYPES):
        return None
    if isinstance(module, _TORCH_DROPOUT_TYPES):
        return "dropout", float(module.p), "p"
    if _is_drop_path_name(name):
        attr = "drop_prob" if hasattr(module, "drop_prob") else "p"
        rate = _rate(module, attr)
        return "drop_path", rate, attr if rate is not None else None
    if _is_mcdrop_dropout(cls):
        rate = _rate(module, "p")
        return "dropout", rate, "p" if rate is not None else None
    if isinstance(module, nn.MultiheadAttention):
        return "attention_dropout", float(module.dropout), "dropout"
    if isinstance(module, nn.RNNBase):
        rate = float(module.dropout) if module.num_layers > 1 else 0.0
        return "rnn_dropout", rate, "dropout"
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return "fast_path_gate", None, None
    if _is_torch_class(cls):
        return None
    if _class_reads_training(cls):
        found = _attention_rate(module, cls)
        if found is not None:
            others = _other_dropout_rates(module, cls, found[1])
            if not others or (found[0] == 0.0 and not any(others.values())):
                return "attention_dropout", found[0], found[1]
        return "functional", None, None  # several rates (see _gate_note), or none known
    return None


def _gate_note(module: nn.Module) -> str:
    """The describe() note of a functional gate whose code reads several dropout rates, else ``""``."""
    cls = type(module)
    found = _attention_rate(module, cls)
    rates = dict([(found[1], found[0])] if found is not None else []) | _other_dropout_rates(
        module, cls, found[1] if found is not None else None
    )
    if not rates:
        return ""
    listed = ", ".join(f"{name}={rate:g}" for name, rate in rates.items())
    return f"its own code applies dropout in train mode ({listed}): sampled as a gate; set_dropout_rate cannot change these rates"


def _is_drop_path_name(name: str) -> bool:
    return name in _DROP_PATH_NAMES or name.endswith(tuple(_DROP_PATH_NAMES))


def _is_mcdrop_dropout(cls: type) -> bool:
    try:
        from mcdrop import nn as mcdrop_nn
    except ImportError:  # pragma: no cover - mcdrop.nn is part of the package
        return False
    types_ = tuple(getattr(mcdrop_nn, n) for n in ("Dropout", "Dropout2d") if hasattr(mcdrop_nn, n))
    return bool(types_) and issubclass(cls, types_)


def find_stochastic_sites(
    model: nn.Module,
    *,
    drop_path: bool = False,
    include: Any = None,
    exclude: Any = None,
) -> list[StochasticSite]:
    """List every place in ``model`` where randomness can be switched on at inference.

    The rules are described in the module documentation of :mod:`mcdrop.stochastic`.

    Args:
        model: Any ``nn.Module``.
        drop_path: Sample drop-path / stochastic-depth modules too (``True`` or ``False``).
        include: Extra modules to switch to train mode: module-path patterns (``fnmatch`` style,
            e.g. ``"encoder.*.noise"``), module classes, or callables ``(path, module) -> bool``
            (called with the module's dotted path, ``""`` for the model itself, and the module).
        exclude: Modules to keep in eval mode, in the same forms.

    Returns:
        One :class:`StochasticSite` per site, in ``named_modules()`` order. A
        ``"fast_path_gate"`` site is listed only when something inside it is sampled.

    Raises:
        InvalidTypeError: ``drop_path`` is not a bool, a pattern is of none of these forms, or a
            callable cannot be called with ``(path, module)``.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.3))
        >>> [(s.path, s.kind, s.rate) for s in mcdrop.find_stochastic_sites(net)]
        [('2', 'dropout', 0.3)]
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    check_bool(drop_path, "drop_path")
    include_p = _check_patterns(include, "include")
    exclude_p = _check_patterns(exclude, "exclude")
    sites: list[StochasticSite] = []
    for path, module in model.named_modules():
        site = _classify(path, module, drop_path=drop_path, include=include_p, exclude=exclude_p)
        if site is not None and site.rate is None:
            problem = _registered_rate_problem(module)
            if problem is not None:
                site = dataclasses.replace(site, note=_join_notes(site.note, problem))
        if site is not None:
            sites.append(site)
    # A fast-path gate matters only if a sampled site lives inside it.
    sampled_paths = [s.path for s in sites if s.sampled and s.kind != "fast_path_gate"]
    kept: list[StochasticSite] = []
    for site in sites:
        if site.kind == "fast_path_gate" and site.sampled and site.note != INCLUDED_NOTE:
            prefix = f"{site.path}." if site.path else ""
            if not any(p.startswith(prefix) and p != site.path for p in sampled_paths):
                site = StochasticSite(
                    site.path, site.kind, site.module_type, None, False, "no sampled dropout inside"
                )
            else:
                site = StochasticSite(
                    site.path,
                    site.kind,
                    site.module_type,
                    None,
                    True,
                    "train mode keeps the fused eval fast path (which skips dropout) off",
                )
        kept.append(site)
    return _merge_rate_holders(kept)


#: The note of an ``nn.Dropout`` whose ``p`` an attention gate reads (see :func:`_merge_rate_holders`).
RATE_HOLDER_NOTE = "holds the rate of {parent}'s attention dropout (the attention module applies it)"


def is_rate_holder(site: StochasticSite) -> bool:
    """Whether ``site`` is the ``nn.Dropout`` an attention gate reads its rate from (not a gate itself)."""
    return site.note.startswith(RATE_HOLDER_NOTE.split("{", 1)[0])


def _merge_rate_holders(sites: list[StochasticSite]) -> list[StochasticSite]:
    """Tie each attention gate to the ``nn.Dropout`` child whose ``p`` it reads as its rate.

    Hugging Face attention (``BertSelfAttention``'s ``self.dropout``) passes ``self.dropout.p`` as
    ``dropout_p`` in train mode and may never call the child; timm's ``Attention`` calls it on one
    path and passes its ``p`` on the fused one. Either way the two are one site of attention
    dropout: the child is listed as kind ``"attention_dropout"``, and both are sampled only when
    neither is excluded by the user (excluding either keeps both in eval mode, so the attention is
    deterministic on every path).
    """
    by_path = {s.path: i for i, s in enumerate(sites)}
    merged = list(sites)
    for parent in sites:
        if parent.kind != "attention_dropout" or not (parent.rate_attr or "").endswith(".p"):
            continue
        child_path = f"{parent.path}.{parent.rate_attr[:-2]}" if parent.path else parent.rate_attr[:-2]
        i = by_path.get(child_path)
        if i is None:
            continue
        child = merged[i]
        name = parent.path or "<model>"
        note = RATE_HOLDER_NOTE.format(parent=name)
        excluded = [s for s in (parent, child) if s.note == "excluded by the user"]
        sampled = parent.sampled and not excluded
        if excluded and not sampled:
            note += f"; not sampled: {excluded[0].path or '<model>'} is excluded by the user"
        elif not sampled and child.rate == 0.0:
            note += "; rate is 0: nothing to sample"
        merged[i] = dataclasses.replace(child, kind="attention_dropout", sampled=sampled, note=note)
        if parent.sampled and not sampled:
            j = by_path[parent.path]
            merged[j] = dataclasses.replace(
                parent,
                sampled=False,
                note=f"not sampled: its rate holder {child_path} is excluded by the user",
            )
    return merged


class StochasticPolicy:
    """Which modules of a model are switched to train mode for MC dropout, and how to undo it.

    Most users never build one: :func:`enable_dropout` and :class:`mcdrop.MCDropout` do. It is
    public so that tools can inspect the decision (``policy.sites``) before sampling.

    Args:
        model: Any ``nn.Module``.
        drop_path: Sample drop-path / stochastic-depth modules too.
        include: Extra modules to switch on (see :func:`find_stochastic_sites`).
        exclude: Modules to keep off (see :func:`find_stochastic_sites`).

    The sites are found again on every :meth:`activate`, so rates changed after construction (with
    :func:`set_dropout_rate` or by hand) are honoured: a site raised from rate 0 is sampled.

    Raises:
        NoDropoutError: The model has no source of dropout randomness at all.
        UnsupportedModelError: The model is ``torch.jit.trace``'d, or contains traced modules with
            dropout layers or random operations in their graphs (traced modules without any run as
            recorded, with a warning).

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
        >>> policy = mcdrop.StochasticPolicy(net)
        >>> [s.path for s in policy.sampled_sites]
        ['1']
    """

    def __init__(
        self, model: nn.Module, *, drop_path: bool = False, include: Any = None, exclude: Any = None
    ):
        self.model = model
        check_bool(drop_path, "drop_path")
        self._options = {"drop_path": drop_path, "include": include, "exclude": exclude}
        #: Notes on sites learnt from running the model (see :mod:`mcdrop._gatecheck`), by path.
        self.gate_notes: dict[str, str] = {}
        if not isinstance(model, nn.Module):
            raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        harmless = _outermost_traced(model)
        traced = _refused_traced_modules(model, harmless)
        if traced:
            raise UnsupportedModelError(
                f"{type(model).__name__} contains modules made by torch.jit.trace ({', '.join(traced[:5])}"
                f"{', ...' if len(traced) > 5 else ''}). Tracing records the ops of one forward pass in "
                "the mode it ran in, so dropout is either absent from the graph (traced in eval mode) or "
                "always on (traced in train mode), whatever the training flags say: MC dropout cannot "
                "switch it. Pass the eager model, or a torch.jit.script'ed one (scripted code honours "
                "the flags)."
            )
        if harmless:  # none was refused
            warnings.warn(
                f"{type(model).__name__} contains modules made by torch.jit.trace "
                f"({', '.join(p or '<model>' for p in harmless[:5])}{', ...' if len(harmless) > 5 else ''}) "
                "with no dropout layer inside and no random operation in their graphs: they run as "
                "recorded, deterministically. Dropout their own code applied (F.dropout gated on "
                "self.training) was left out of the graph when they were traced in eval mode and cannot "
                "be sampled; the rest of the model is sampled as usual.",
                McdropWarning,
                stacklevel=3,
            )
        self._find_sites()

    def current_sites(self) -> list[StochasticSite]:
        """The sites of the model as it is now (current rates), with the notes learnt from running it."""
        sites = find_stochastic_sites(self.model, **self._options)
        return [
            dataclasses.replace(s, note=_join_notes(s.note, self.gate_notes[s.path]))
            if s.sampled and s.path in self.gate_notes
            else s
            for s in sites
        ]

    def _find_sites(self) -> None:
        self.sites = self.current_sites()
        self.sampled_sites = [s for s in self.sites if s.sampled]
        if not self.sampled_sites:
            raise NoDropoutError(_no_dropout_message(self.model, self.sites))
        self._sampled_paths = {s.path for s in self.sampled_sites}
        self._gate_paths = {
            s.path for s in self.sampled_sites if s.kind in ("functional", "custom", "attention_dropout")
        }

    @property
    def has_randomness(self) -> bool:
        """False when every sampled site has a known rate of 0 (then all samples are identical)."""
        return any(s.rate is None or s.rate > 0 for s in self.sampled_sites if s.kind != "fast_path_gate")

    @contextlib.contextmanager
    def activate(self, *, check_buffers: bool = True) -> Iterator[StochasticPolicy]:
        """Switch the sampled sites to train mode and everything else to eval, then restore.

        Args:
            check_buffers: Snapshot the buffers of ``"functional"``/``"custom"`` gates and raise
                :class:`~mcdrop.errors.ModelStateError` (after putting them back) if sampling
                changed any.

        Yields:
            The policy itself.

        Raises:
            ModelStateError: Another thread is sampling (a module of) this model right now.
        """
        self._find_sites()
        modules = list(self.model.named_modules())
        _claim(modules, self.model)
        saved = [(module, module.training) for _, module in modules]
        snapshots: list[tuple[str, nn.Module, str, torch.Tensor]] = []
        try:
            for path, module in modules:
                module.training = path in self._sampled_paths
            if check_buffers:
                for path, module in modules:
                    if path in self._gate_paths:
                        for bname, buf in module._buffers.items():
                            if buf is not None:
                                snapshots.append((path, module, bname, buf.detach().clone()))
            yield self
        finally:
            for module, flag in saved:
                module.training = flag
            _release(modules)
            changed = []
            for path, module, bname, before in snapshots:
                now = dict(module._buffers.items()).get(bname)  # scripted modules wrap _buffers
                if now is None or now.shape != before.shape or not torch.equal(now, before):
                    changed.append(f"{path or '<model>'}.{bname}")
                    if now is not None and now.shape == before.shape:
                        with torch.no_grad():
                            now.copy_(before)
                    else:
                        module._buffers[bname] = before
            if changed:
                gates = sorted({c.rsplit(".", 1)[0] for c in changed})
                message = (
                    f"Sampling in train mode changed buffers {changed}: the module(s) {gates} read "
                    "`self.training` for something stateful, not only dropout. The buffers have been "
                    "restored and the samples discarded. Keep them in eval mode with "
                    f"exclude={gates!r} or mcdrop.register_deterministic(<their class>)."
                )
                # Do not mask an exception already propagating from the body.
                if sys.exc_info()[0] is None:
                    raise ModelStateError(message)

    def describe(self) -> list[dict[str, Any]]:
        """The sites of the model as it is now (see :meth:`current_sites`), as plain dicts, one per site.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2))
            >>> policy = mcdrop.StochasticPolicy(net)
            >>> _ = mcdrop.set_dropout_rate(net, 0.4)
            >>> [(row["path"], row["rate"]) for row in policy.describe()]
            [('1', 0.4)]
        """
        return _site_rows(self.current_sites())


# Modules whose training flags an activation has switched, with the thread that switched them and
# how many (nested) activations of that thread hold them. The flags are shared by every thread, so a
# second thread entering would save the first one's switched flags as "the original" and restore
# them on exit, leaving dropout on in the user's model, while the first thread's passes run partly
# with dropout off.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[int]] = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


def _claim(modules: list[tuple[str, nn.Module]], model: nn.Module) -> None:
    """Mark ``modules`` as switched by this thread, or raise if another thread is sampling them."""
    me = threading.get_ident()
    with _ACTIVE_LOCK:
        busy = [path or "<model>" for path, m in modules if _ACTIVE.get(m, (me,))[0] != me]
        if busy:
            raise ModelStateError(
                f"{type(model).__name__} is being sampled with MC dropout in another thread (modules "
                f"{', '.join(busy[:5])}{', ...' if len(busy) > 5 else ''}). Dropout is switched on through "
                "the modules' `training` flags, which all threads share, so two threads sampling one "
                "model would switch each other's dropout off mid-sampling and leave it on afterwards. "
                "Give each thread its own copy of the model (copy.deepcopy(model)) and wrapper, or "
                "serialise the calls with a threading.Lock. Nothing was changed."
            )
        for _, m in modules:
            entry = _ACTIVE.get(m)
            if entry is None:
                _ACTIVE[m] = [me, 1]
            else:
                entry[1] += 1


def _release(modules: list[tuple[str, nn.Module]]) -> None:
    with _ACTIVE_LOCK:
        for _, m in modules:
            entry = _ACTIVE.get(m)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _ACTIVE[m]


def _no_dropout_message(model: nn.Module, sites: list[StochasticSite]) -> str:
    found = ", ".join(f"{s.path or '<model>'} ({s.kind}: {s.note})" for s in sites)
    found_text = f" Found but not sampled: {found}." if sites else ""
    return (
        f"{type(model).__name__} has no source of dropout randomness for MC dropout to sample: no "
        "dropout layer, no attention or RNN dropout, and no custom module whose forward reads "
        f"`self.training`.{found_text} To fix it, insert dropout before the layers you want to be "
        "uncertain about, e.g. nn.Dropout(p=0.1) before the last nn.Linear (the 'last-layer MC "
        "dropout' recipe), then fine-tune or use as is; or register your own stochastic layer with "
        "mcdrop.register_stochastic(MyLayer)."
    )


@contextlib.contextmanager
def enable_dropout(
    model: nn.Module,
    *,
    drop_path: bool = False,
    include: Any = None,
    exclude: Any = None,
    check_buffers: bool = True,
    warn_if_inactive: bool = True,
) -> Iterator[StochasticPolicy]:
    """Keep dropout on and everything else in eval mode inside a ``with`` block.

    On entry every stochastic site found by :func:`find_stochastic_sites` is put in train mode and
    every other module in eval mode; on exit every module's ``training`` flag is restored exactly as
    it was, also when the body raises. Parameters and buffers are never modified.

    Args:
        model: Any ``nn.Module``.
        drop_path: Sample drop-path / stochastic-depth modules too.
        include: Extra modules to switch on (see :func:`find_stochastic_sites`).
        exclude: Modules to keep off (see :func:`find_stochastic_sites`).
        check_buffers: Verify that gated custom modules did not change their buffers (see
            :meth:`StochasticPolicy.activate`).
        warn_if_inactive: Emit :class:`~mcdrop.errors.NoRandomnessWarning` when every sampled site
            has rate 0.

    Yields:
        The :class:`StochasticPolicy` in force (``policy.sites`` lists what was switched on).

    Raises:
        NoDropoutError: The model has no source of dropout randomness.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                           torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)).eval()
        >>> x = torch.randn(16, 4)
        >>> with mcdrop.enable_dropout(net):
        ...     a, b = net(x), net(x)
        >>> bool((a != b).any()), net[2].training, net[1].training
        (True, False, False)
    """
    policy = StochasticPolicy(model, drop_path=drop_path, include=include, exclude=exclude)
    if warn_if_inactive and not policy.has_randomness:
        warnings.warn(
            "Every dropout site found in the model has rate 0, so all MC samples will be identical: "
            + ", ".join(s.path or "<model>" for s in policy.sampled_sites),
            NoRandomnessWarning,
            stacklevel=3,
        )
    with policy.activate(check_buffers=check_buffers):
        yield policy


# ----------------------------------------------------------------------------- inspection
_DESCRIBE_COLUMNS = ("path", "kind", "module_type", "rate", "sampled", "note")


def _site_rows(sites: list[StochasticSite]) -> list[dict[str, Any]]:
    """One plain dict per site, with the columns of :func:`describe`."""
    return [
        {
            "path": s.path or "<model>",
            "kind": s.kind,
            "module_type": s.module_type,
            "rate": s.rate,
            "sampled": s.sampled,
            "note": s.note,
        }
        for s in sites
    ]


def describe(
    model: Any,
    *,
    drop_path: bool = False,
    include: Any = None,
    exclude: Any = None,
) -> Any:
    """Every stochastic site of a model as a table: where it is, what kind, its rate, sampled or not.

    The table shows what MC dropout will (and will not) switch on, so it is the first thing to look
    at with a new architecture: attention dropout inside Hugging Face attention modules, drop-path
    that is off by default, dropout layers with rate 0, modules excluded by the user. pandas is
    imported only when this is called.

    Args:
        model: An ``nn.Module``; or a :class:`StochasticPolicy` or :class:`mcdrop.MCDropout`, whose
            own options are then used (and the keyword arguments must be left out).
        drop_path: Sample drop-path / stochastic-depth modules too (``True`` or ``False``).
        include: Extra modules to switch on (see :func:`find_stochastic_sites`).
        exclude: Modules to keep off (see :func:`find_stochastic_sites`).

    Returns:
        A ``pandas.DataFrame`` with one row per site, in ``named_modules()`` order, and the columns
        ``path`` (``"<model>"`` for the model itself), ``kind`` (one of :data:`SITE_KINDS`),
        ``module_type``, ``rate`` (a float column, NaN where unknown, e.g. for ``"functional"``
        gates), ``sampled`` and ``note``. A model without any site gives an empty table with these
        columns.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2),
        ...                           torch.nn.MultiheadAttention(8, 2, dropout=0.0))
        >>> table = mcdrop.describe(net)
        >>> table[["path", "kind", "rate", "sampled"]].values.tolist()
        [['1', 'dropout', 0.2, True], ['2', 'attention_dropout', 0.0, False]]
    """
    import pandas as pd

    check_bool(drop_path, "drop_path")
    policy = model if isinstance(model, StochasticPolicy) else getattr(model, "policy", None)
    if isinstance(policy, StochasticPolicy) and not isinstance(model, nn.Module):
        if drop_path or include is not None or exclude is not None:
            raise InvalidInputError(
                "describe() of an MCDropout or a StochasticPolicy uses the options they were built "
                "with; leave drop_path=, include= and exclude= out, or pass the model itself."
            )
        sites = policy.current_sites()
    else:
        sites = find_stochastic_sites(model, drop_path=drop_path, include=include, exclude=exclude)
    table = pd.DataFrame(_site_rows(sites), columns=list(_DESCRIBE_COLUMNS))
    # float64 always, NaN where unknown (an all-None or empty column would otherwise be object).
    return table.astype({"rate": "float64", "sampled": "bool"})


def _join_notes(note: str | None, extra: str) -> str:
    return extra if not note else f"{note}; {extra}"


# ----------------------------------------------------------------------------- adding dropout
#: Name of the dropout child that :func:`add_dropout` gives a module.
ADDED_DROPOUT_NAME = "mcdrop_dropout"


def _added_dropout_hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """Forward pre-hook of :func:`add_dropout`: dropout on the module's first positional input.

    TorchScript compiles it with the module (its annotations are what ``torch.jit.script`` needs for
    a layer whose ``forward`` takes one tensor); keyword arguments pass by untouched.
    """
    if not torch.jit.is_scripting():
        if not args or not isinstance(args[0], torch.Tensor):
            _refuse_hook_input(module, args)
    return (module.mcdrop_dropout(args[0]),) + args[1:]


def _dropout_before_hook(module: nn.Module, args: tuple[Any, ...], *kwargs: dict[str, Any]) -> Any:
    """The pre-hook that earlier versions of :func:`add_dropout` registered, by this name.

    Kept so that models saved with it (``torch.save``, pickle) still load and run: called with the
    keyword arguments (``with_kwargs=True``, the first versions) it returns ``(args, kwargs)``, as
    such a hook must; without them, the new args. TorchScript cannot compile it (the later
    versions registered a two-argument hook by this name): calling :func:`add_dropout` on such a
    model replaces it with :func:`_added_dropout_hook`, which it can.
    """
    new_args = _added_dropout_hook(module, args)
    return (new_args, kwargs[0]) if kwargs else new_args


#: The pre-hooks by which a layer is known to have dropout from :func:`add_dropout` before it.
_ADDED_DROPOUT_HOOKS = (_added_dropout_hook, _dropout_before_hook)


def _refuse_hook_input(module: nn.Module, args: tuple[Any, ...]) -> None:
    raise InvalidInputError(
        f"add_dropout put dropout before this {type(module).__name__}, which applies it to the first "
        "positional input, but it was called with "
        f"{'no positional input' if not args else f'a {type(args[0]).__name__} first'}. Call the "
        "module with its input tensor as the first positional argument, or add dropout elsewhere "
        "(before=, where=)."
    )


def _check_unsupported_for_edit(model: nn.Module, what: str) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{what} cannot change a TorchScript module ({type(model).__name__}): its code is compiled. "
            f"Call {what} on the eager model, then torch.jit.script the result."
        )
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise UnsupportedModelError(
            f"{what} cannot change a torch.compile'd model (OptimizedModule): its graphs were captured "
            f"without the new layers. Call {what} on the original model (compiled._orig_mod, or the "
            "model you compiled), then torch.compile the result."
        )


def _check_classes(value: Any, name: str) -> tuple[type[nn.Module], ...]:
    classes = (value,) if isinstance(value, type) else tuple(value) if isinstance(value, Iterable) else None
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise InvalidTypeError(
            f"{name} must be an nn.Module subclass or a tuple of them (e.g. (nn.Linear, nn.Conv2d)); "
            f"got {value!r}."
        )
    return classes


def add_dropout(
    model: nn.Module,
    p: float,
    *,
    before: type[nn.Module] | tuple[type[nn.Module], ...] = (nn.Linear,),
    where: Any = "last",
    inplace: bool = False,
    layer: Callable[[float], nn.Module] = nn.Dropout,
) -> nn.Module:
    """Put dropout in front of chosen layers of a model that has none (or too little).

    The "last-layer MC dropout" recipe for a pretrained network trained without dropout: dropout
    before its classification head, then MC dropout as usual (optionally fine-tuning first). The
    dropout is a child module named ``mcdrop_dropout`` of each chosen layer, applied to the layer's
    first positional input by a forward pre-hook. The model's parameters, buffers and
    ``state_dict`` keys do not change, so checkpoints of the original model still load into it; the
    hook travels with ``copy.deepcopy`` and ``pickle``, but ``save_pretrained``/``from_pretrained``
    of Hugging Face store weights only, so call ``add_dropout`` again after loading. Calling it
    again on a layer that already has one changes that dropout's rate. ``torch.jit.script``
    compiles the hook with the layer when the layer's ``forward`` takes one tensor (``nn.Linear``,
    ``nn.Conv*``), so the result can be scripted and sampled; before a layer with more inputs
    TorchScript refuses the hook, and the model is sampled eager.

    Args:
        model: An eager ``nn.Module`` (not scripted, traced or compiled: add dropout first, then
            script or compile the result).
        p: The dropout rate, in ``[0, 1)``.
        before: The layer classes in front of which dropout goes.
        where: Which of those layers: ``"last"`` (default; the last one in ``named_modules()``
            order, which is the output head of nearly every model — check with :func:`describe`),
            ``"all"`` (or ``None``), or module-path patterns (``fnmatch`` style, e.g. ``"classifier"`` or
            ``"encoder.layer.?.output.dense"``; ``*`` also matches dots), module classes, or callables
            ``(path, module) -> bool``, alone or in a list. Layers that their parent never calls
            (``nn.MultiheadAttention.out_proj``, whose weights the attention function reads
            directly) are never chosen: dropout in front of them would never run.
        inplace: Change ``model`` itself instead of a deep copy of it.
        layer: Makes the dropout module from ``p``: ``nn.Dropout`` (default), or e.g.
            ``nn.Dropout2d`` before a convolution, ``mcdrop.nn.Dropout``.

    Returns:
        The model with dropout added: a copy, or ``model`` itself when ``inplace=True``.

    Raises:
        InvalidInputError: ``p`` is outside ``[0, 1)``, or no layer matches ``before``/``where``.
        UnsupportedModelError: The model is a TorchScript, traced or compiled module.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
        >>> mc_net = mcdrop.add_dropout(net, 0.2)
        >>> [(s.path, s.rate) for s in mcdrop.find_stochastic_sites(mc_net)]
        [('2.mcdrop_dropout', 0.2)]
        >>> mcdrop.find_stochastic_sites(net)  # the original is unchanged
        []
        >>> mcdrop.MCDropout(mc_net, n_samples=8, seed=0).predict(torch.randn(5, 4)).probs.shape
        torch.Size([5, 3])
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    rate = check_real(p, "p", low=0.0, high=1.0, high_open=True)
    classes = _check_classes(before, "before")
    if not callable(layer):
        raise InvalidTypeError(f"layer must be a callable p -> nn.Module, such as nn.Dropout; got {layer!r}.")
    if not isinstance(inplace, bool):
        raise InvalidTypeError(f"inplace must be True or False; got {inplace!r}.")
    _check_unsupported_for_edit(model, "add_dropout")
    traced = [path or "<model>" for path, m in model.named_modules() if _is_traced(m)]
    if traced:
        raise UnsupportedModelError(
            f"add_dropout cannot change modules made by torch.jit.trace ({', '.join(traced[:5])}). Add "
            "dropout to the eager model, then trace or script the result."
        )
    modules = dict(model.named_modules())
    candidates = [
        (path, m)
        for path, m in modules.items()
        if isinstance(m, classes) and not _is_added_dropout_path(path) and not _never_called(path, modules)
    ]
    class_names = "/".join(c.__name__ for c in classes)
    if not candidates:
        raise InvalidInputError(
            f"{type(model).__name__} has no {class_names} layer to put dropout in front of. Pass the "
            "classes of the layers you want it before, e.g. before=(nn.Linear, nn.Conv2d)."
        )
    if where is None or (isinstance(where, str) and where in ("last", "all")):
        chosen = candidates[-1:] if where == "last" else candidates
    else:
        patterns = _check_patterns(where, "where")
        chosen = [(path, m) for path, m in candidates if _matches(path, m, patterns)]
        if not chosen:
            listing = ", ".join(path or "<model>" for path, _ in candidates[:12])
            more = f" and {len(candidates) - 12} more" if len(candidates) > 12 else ""
            raise InvalidInputError(
                f"where={where!r} matches none of the {class_names} layers of {type(model).__name__}: "
                f"{listing}{more}. Pass one of these paths (fnmatch patterns work), 'last' or 'all'."
            )
    if not inplace:
        try:
            target = copy.deepcopy(model)
        except Exception as err:  # noqa: BLE001 - any failure to copy has the same fix
            raise UnsupportedModelError(
                f"add_dropout could not copy {type(model).__name__} ({type(err).__name__}: {err}). "
                "Pass inplace=True to add the dropout to the model itself."
            ) from err
        chosen_paths = [path for path, _ in chosen]
        modules = dict(target.named_modules())
        chosen = [(path, modules[path]) for path in chosen_paths]
    else:
        target = model
    # Check everything first, so that a failure leaves the model (in place) untouched.
    planned = []
    for path, module in chosen:
        dropout = layer(rate)
        if not isinstance(dropout, nn.Module):
            raise InvalidTypeError(
                f"layer({rate}) returned a {type(dropout).__name__}, not an nn.Module; pass a dropout "
                "class such as nn.Dropout."
            )
        hooked = any(h in _ADDED_DROPOUT_HOOKS for h in module._forward_pre_hooks.values())
        if module._modules.get(ADDED_DROPOUT_NAME) is not None and not hooked:
            raise InvalidInputError(
                f"{path or '<model>'} ({type(module).__name__}) already has a child named "
                f"{ADDED_DROPOUT_NAME!r} that add_dropout did not put there; rename it or choose "
                "another layer with where=."
            )
        planned.append((module, dropout, hooked))
    for module, dropout, hooked in planned:
        _move_like(dropout, module)
        dropout.train(module.training)
        module.add_module(ADDED_DROPOUT_NAME, dropout)
        hooked = hooked and not _drop_earlier_hooks(module)
        if not hooked:
            module.register_forward_pre_hook(_added_dropout_hook)
    return target


def _drop_earlier_hooks(module: nn.Module) -> bool:
    """Remove the pre-hook of an earlier version of :func:`add_dropout`; whether there was one.

    Whether or not it took the keyword arguments, ``torch.jit.script`` compiles neither.
    """
    earlier = [key for key, hook in module._forward_pre_hooks.items() if hook is _dropout_before_hook]
    for key in earlier:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
    return bool(earlier)


def _is_added_dropout_path(path: str) -> bool:
    return path == ADDED_DROPOUT_NAME or path.endswith(f".{ADDED_DROPOUT_NAME}")


def _move_like(new: nn.Module, reference: nn.Module) -> None:
    """Put ``new`` on the device of ``reference``'s first parameter or buffer (if any)."""
    for tensor in (*reference.parameters(recurse=False), *reference.buffers(recurse=False)):
        new.to(tensor.device)
        return


# ----------------------------------------------------------------------------- changing rates
_RATE_KINDS = ("dropout", "attention_dropout", "rnn_dropout", "drop_path")
_DEFAULT_RATE_KINDS = ("dropout", "attention_dropout", "rnn_dropout")


class _RateEntry:
    """One attribute set by a :class:`RateChange`: its name, the value before, and whether it still counts."""

    __slots__ = ("name", "old", "live", "__weakref__")

    def __init__(self, name: str, old: Any) -> None:
        self.name = name
        self.old = old
        self.live = True


# The entries of unrestored RateChanges, oldest first, by owner and attribute name: restoring one
# change undoes the later changes of the same attributes too (their old values are rates it set).
# Weak all round: neither the model nor a RateChange the user dropped is kept alive by it.
_RATE_ENTRIES: weakref.WeakKeyDictionary[Any, dict[str, list[weakref.ref[_RateEntry]]]] = (
    weakref.WeakKeyDictionary()
)
_RATE_LOCK = threading.Lock()


def _rate_stack(owner: Any, name: str) -> list[weakref.ref[_RateEntry]]:
    """The live stack of entries of ``owner.name`` (a throwaway list for an owner without weak references)."""
    try:
        return _RATE_ENTRIES.setdefault(owner, {}).setdefault(name, [])
    except TypeError:
        return []


class RateChange:
    """The dropout rates changed by :func:`set_dropout_rate`, and how to put them back.

    Used as a context manager, it restores the old rates on exit (also when the body raises);
    otherwise the change stays until :meth:`restore` is called.

    Changes stack: restoring one puts back, for every rate it changed, the value from before it,
    and so also undoes the later changes of those rates (restoring those later does not bring
    its rate back). Restoring in any order therefore ends with the rates from before the first
    change.

    Attributes:
        changes: One ``(path, attribute, old value, new value)`` per changed rate, where
            ``attribute`` is the (dotted) attribute of the module at ``path`` that was set.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> change = mcdrop.set_dropout_rate(net, 0.3)
        >>> change.changes
        [('1', 'p', 0.1, 0.3)]
        >>> later = mcdrop.set_dropout_rate(net, 0.5)
        >>> change.restore()  # before the later change: both are undone
        >>> later.restore()
        >>> net[1].p
        0.1
    """

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, Any, float]] = []
        self._entries: list[tuple[Any, _RateEntry]] = []
        self._restored = False

    def _set(self, path: str, attribute: str, owner: Any, name: str, value: float) -> None:
        old = getattr(owner, name)
        setattr(owner, name, value)
        entry = _RateEntry(name, old)
        self._entries.append((owner, entry))
        self.changes.append((path, attribute, old, value))
        with _RATE_LOCK:
            stack = _rate_stack(owner, name)
            stack[:] = [ref for ref in stack if ref() is not None]
            stack.append(weakref.ref(entry))

    def restore(self) -> None:
        """Put every changed rate back to its old value (a second call does nothing).

        Later changes of the same rates that are still in force are undone with it.
        """
        if self._restored:
            return
        self._restored = True
        for owner, entry in reversed(self._entries):
            with _RATE_LOCK:
                if not entry.live:
                    continue  # an earlier change was restored first and undid this one
                stack = _rate_stack(owner, entry.name)
                index = next((i for i, ref in enumerate(stack) if ref() is entry), len(stack))
                for ref in stack[index:]:
                    later = ref()
                    if later is not None:
                        later.live = False
                del stack[index:]
                entry.live = False
            setattr(owner, entry.name, entry.old)

    def __enter__(self) -> RateChange:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "restored" if self._restored else "active"
        return f"RateChange({len(self.changes)} rates, {state})"


def _set_site_rate(
    change: RateChange,
    site: StochasticSite,
    rate_attr: str,
    module: nn.Module,
    rate: float,
    seen: set[tuple[int, str]],
) -> None:
    """Set the rate of one site through ``change``, or raise an mcdrop error saying why it cannot be."""
    label = f"{site.path or '<model>'} ({site.module_type})"
    try:
        owner, name = _resolve_attr(module, rate_attr)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"The rate {rate_attr!r} of {label} cannot be reached: {err}. Nothing was changed; "
            "set that rate by hand, or leave the site out with where=."
        ) from err
    key = (id(owner), name)
    if key in seen:
        return
    seen.add(key)
    try:
        change._set(site.path or "<model>", rate_attr, owner, name, rate)
    except Exception as err:  # noqa: BLE001 - every failure to set the attribute gets the same report
        if isinstance(owner, torch.jit.ScriptModule):  # a TorchScript constant, e.g. nn.Dropout's p
            fix = (
                "In a TorchScript module it is a constant compiled into the code; set the rate on the "
                "eager model, then script it again."
            )
        else:
            fix = (
                f"The attribute must be writable (not a read-only property) and accept a number. Make "
                f"{rate_attr!r} settable on {type(owner).__name__}, register the class with the "
                "attribute that is (mcdrop.register_stochastic(cls, rate_attr=...)), or leave the site "
                "out with where=."
            )
        raise UnsupportedModelError(
            f"The rate {rate_attr!r} of {label} cannot be changed: setting it to {rate} raised "
            f"{type(err).__name__}: {err}. {fix} Nothing was changed."
        ) from err


def _resolve_attr(module: Any, dotted: str) -> tuple[Any, str]:
    owner = module
    *parents, name = dotted.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


def set_dropout_rate(
    model: nn.Module,
    p: float,
    *,
    where: Any = None,
    kinds: Iterable[str] | None = None,
) -> RateChange:
    """Change the dropout rate of a model's stochastic sites, e.g. to study MC dropout at other rates.

    Every site of the chosen kinds whose rate lives in an attribute is set to ``p``: ``nn.Dropout*``
    and ``mcdrop.nn`` layers (``p``), ``nn.MultiheadAttention`` and multi-layer RNNs (``dropout``),
    Hugging Face / timm attention (``attention_dropout``, ``attn_dropout.p``, ``dropout.p``, ...),
    drop-path (``drop_prob``/``p``) and registered classes (their ``rate_attr``). Use it as a
    context manager to have the old rates restored on exit, or call
    :meth:`RateChange.restore`. Rates raised from 0 are sampled: MC dropout finds the sites again
    on every call.

    Args:
        model: Any ``nn.Module``.
        p: The new rate, in ``[0, 1]``.
        where: Which sites: module-path patterns (``fnmatch`` style), module classes, or callables
            ``(path, module) -> bool``, alone or in a list; ``None`` for all.
        kinds: Which kinds of site: any of ``"dropout"``, ``"attention_dropout"``,
            ``"rnn_dropout"``, ``"drop_path"``. Default: all but ``"drop_path"``.

    Returns:
        A :class:`RateChange` listing what changed; a context manager that restores it.

    Raises:
        InvalidInputError: ``p`` is outside ``[0, 1]``, an unknown kind is asked for, ``where`` is
            empty (``[]``), or no site with a settable rate matches.
        InvalidTypeError: A callable in ``where`` cannot be called as ``fn(path, module)``.
        UnsupportedModelError: A matching rate cannot be set (a TorchScript constant, such as the
            ``p`` of a scripted ``nn.Dropout``, or a registered ``rate_attr`` that is a read-only
            property); then nothing is changed. Whatever exception interrupts the change, the rates
            already set are put back before it propagates.

    Warns:
        McdropWarning: Matching sites whose rate mcdrop cannot see (custom code that reads
            ``self.training``, kind ``"functional"``; an instance of a class registered with a
            ``rate_attr`` it does not have) keep their rate; the warning names them and why.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1),
        ...                           torch.nn.MultiheadAttention(8, 2, dropout=0.1))
        >>> with mcdrop.set_dropout_rate(net, 0.5, kinds=["dropout"]):
        ...     print(net[1].p, net[2].dropout)
        0.5 0.1
        >>> net[1].p
        0.1
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    rate = check_real(p, "p", low=0.0, high=1.0)
    if kinds is None:
        chosen_kinds: tuple[str, ...] = _DEFAULT_RATE_KINDS
    else:
        if isinstance(kinds, str):
            kinds = (kinds,)
        chosen_kinds = tuple(kinds)
        unknown = [k for k in chosen_kinds if k not in _RATE_KINDS]
        if unknown or not chosen_kinds:
            raise InvalidInputError(
                f"kinds must be a non-empty list of {', '.join(map(repr, _RATE_KINDS))}; got {list(chosen_kinds)!r}."
            )
    patterns = _check_patterns(where, "where")
    if where is not None and not patterns:
        raise InvalidInputError(
            f"where={where!r} names no site: an empty selection would change nothing (and "
            "where=None means every site). Pass module-path patterns, classes or callables, e.g. "
            "where='classifier*', or leave where= out to change every site."
        )
    modules = dict(model.named_modules())
    sites = find_stochastic_sites(model, drop_path=True)
    selected = [s for s in sites if not patterns or _matches(s.path, modules[s.path], patterns)]
    change = RateChange()
    seen: set[tuple[int, str]] = set()
    unknown_rate = []
    misregistered = []
    try:
        for site in selected:
            if site.kind not in chosen_kinds:
                if site.kind == "functional":
                    unknown_rate.append(site.path or "<model>")
                continue
            module = modules[site.path]
            if site.rate_attr is None:
                problem = _registered_rate_problem(module)
                if problem is not None:
                    misregistered.append(f"{site.path or '<model>'} ({site.module_type}): {problem}")
                else:
                    unknown_rate.append(site.path or "<model>")
                continue
            if site.kind == "rnn_dropout" and getattr(module, "num_layers", 2) < 2:
                continue  # a one-layer RNN has no inter-layer dropout to set
            _set_site_rate(change, site, site.rate_attr, module, rate, seen)
    except BaseException:
        change.restore()  # nothing is changed, whatever interrupted (KeyboardInterrupt too)
        raise
    if misregistered:
        warnings.warn(
            f"set_dropout_rate cannot change the rate of {'; '.join(misregistered)}. Give the "
            "instances that attribute, holding the rate as a number, or register the class again "
            "with the attribute it keeps its rate in: mcdrop.register_stochastic(cls, rate_attr=...).",
            McdropWarning,
            stacklevel=2,
        )
    if unknown_rate:
        warnings.warn(
            f"set_dropout_rate cannot change the rate of {', '.join(unknown_rate)}: their own code "
            "applies dropout in train mode at a rate mcdrop cannot see. Change it in their attributes, "
            "or register their class with mcdrop.register_stochastic(cls, rate_attr=...).",
            McdropWarning,
            stacklevel=2,
        )
    if not change.changes:
        listing = ", ".join(f"{s.path or '<model>'} ({s.kind})" for s in sites) or "none"
        raise InvalidInputError(
            f"No site of kind {'/'.join(chosen_kinds)} with a settable rate matches where={where!r} in "
            f"{type(model).__name__}. Sites found: {listing}. Widen where= or kinds=, or add dropout "
            "with mcdrop.add_dropout."
        )
    return change
