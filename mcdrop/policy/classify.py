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
    :mod:`mcdrop.engine.checks`): a gate whose train mode still changes the output deterministically
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
graph; a traced part with neither runs as recorded, with a warning. Frozen modules
(``torch.jit.freeze``, ``torch.jit.optimize_for_inference``) were inlined in eval mode, which
removed their dropout: a frozen model or part is refused the same way.
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

import dataclasses
import fnmatch
import inspect
import keyword
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_bool
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
)
from mcdrop.policy._bytecode import class_code, class_reads_training, is_torch_class

__all__ = [
    "SITE_KINDS",
    "StochasticSite",
    "find_stochastic_sites",
    "register_deterministic",
    "register_stochastic",
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


def _attention_rate(module: nn.Module, cls: type) -> tuple[float, str] | None:
    """Return the attention-dropout rate of a Hugging Face / timm style attention gate.

    Returns ``(rate, dotted attribute it comes from)``, or ``None`` when the module is not such a
    gate.
    """
    lowered = cls.__name__.lower()
    if "attention" not in lowered and "attn" not in lowered:
        return None
    names = class_code(cls)[1]
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
    for name in sorted(class_code(cls)[1]):
        if "drop" not in name.lower() or name == own or name in module._modules:
            continue
        rate = _rate(module, name)
        if rate is not None:
            rates[name] = rate
    return rates


def never_called(path: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the module at ``path`` is one its parent uses only through its weights, never calls.

    ``nn.MultiheadAttention.out_proj`` is such a layer (the attention function reads
    ``out_proj.weight``): a hook on it would never run, so dropout cannot go in front of it.
    """
    parent = path.rpartition(".")[0] if "." in path else ("" if path else None)
    return parent is not None and isinstance(modules.get(parent), nn.MultiheadAttention)


def _rate(module: nn.Module, attr: str | None) -> float | None:
    if attr is None:
        return None
    value = getattr(module, attr, None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def matches(path: str, module: nn.Module, patterns: tuple[Any, ...]) -> bool:
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


def check_patterns(value: Any, name: str) -> tuple[Any, ...]:
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


def registered_rate_problem(module: nn.Module) -> str | None:
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
    if site is not None and is_traced(module):
        return StochasticSite(path, site[0], name, site[1], False, _TRACED_NOTE, site[2])
    if matches(path, module, exclude):
        if site is None:
            return None
        return StochasticSite(path, site[0], name, site[1], False, "excluded by the user", site[2])
    if matches(path, module, include):
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


def outermost_traced(model: nn.Module) -> list[str]:
    """Paths of the traced modules that no other traced module contains."""
    paths = [path for path, m in model.named_modules() if is_traced(m)]
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


def refused_traced_modules(model: nn.Module, outer: list[str]) -> list[str]:
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


def is_traced(module: nn.Module) -> bool:
    try:
        from torch.jit._trace import TracedModule
    except ImportError:  # pragma: no cover - present in every supported torch
        return False
    return isinstance(module, TracedModule)


def is_frozen(module: nn.Module) -> bool:
    """True for a module made by ``torch.jit.freeze`` or ``torch.jit.optimize_for_inference``.

    Freezing inlines the module, its children and its parameters into one graph run in eval mode,
    and drops the ``training`` attribute (which is also how ``optimize_for_inference`` tells a
    frozen module from one to freeze). A module frozen with ``preserved_attrs=["training"]`` keeps
    the attribute but is still inlined: it has no children and no parameters left, and its code
    reads its tensors as constants (``CONSTANTS.c0``), which scripted code cannot write.
    """
    if not isinstance(module, torch.jit.ScriptModule) or is_traced(module):
        return False
    try:
        if not module._c.hasattr("training"):
            return True
    except (RuntimeError, AttributeError):  # pragma: no cover - every ScriptModule has _c
        return False
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None:
        return False
    return "CONSTANTS.c" in _scripted_code(module)


def frozen_modules(model: nn.Module) -> list[str]:
    """Paths of the modules made by ``torch.jit.freeze``/``optimize_for_inference`` (``""``: the model)."""
    return [path for path, m in model.named_modules() if is_frozen(m)]


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
    if is_torch_class(cls):
        return None
    if class_reads_training(cls):
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

    The rules are described in the module documentation of :mod:`mcdrop.policy.classify`.

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
    include_p = check_patterns(include, "include")
    exclude_p = check_patterns(exclude, "exclude")
    sites: list[StochasticSite] = []
    for path, module in model.named_modules():
        site = _classify(path, module, drop_path=drop_path, include=include_p, exclude=exclude_p)
        if site is not None and site.rate is None:
            problem = registered_rate_problem(module)
            if problem is not None:
                site = dataclasses.replace(site, note=join_notes(site.note, problem))
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


def unclassified_user_modules(
    model: nn.Module,
    *,
    drop_path: bool = False,
    include: Any = None,
    exclude: Any = None,
    sites: list[StochasticSite] | None = None,
) -> list[str]:
    """Paths of the user-defined modules that no rule made a site.

    Their code reads no ``.training`` that the static scan could see. These are where train-gated randomness the scan misses can hide (a helper called through its
    module, a helper object holding the module, a child's method other than ``forward``,
    ``getattr`` dispatch); run-time discovery (:mod:`mcdrop.engine.discover`) switches them on to
    look. Not listed: ``torch`` classes (their rules are exact), TorchScript and traced modules,
    registered deterministic classes, and modules matched by ``exclude``.

    Args:
        model: Any ``nn.Module``.
        drop_path: As for :func:`find_stochastic_sites`.
        include: As for :func:`find_stochastic_sites`.
        exclude: As for :func:`find_stochastic_sites`.
        sites: The sites :func:`find_stochastic_sites` gives with these options, when at hand
            (``None``: searched here).

    Returns:
        The paths, in ``named_modules()`` order (``""`` for the model itself).

    Example:
        >>> import torch
        >>> from mcdrop.policy.classify import unclassified_user_modules
        >>> class Block(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x
        >>> unclassified_user_modules(torch.nn.Sequential(Block(), torch.nn.Dropout(0.1)))
        ['0']
    """
    if sites is None:
        sites = find_stochastic_sites(model, drop_path=drop_path, include=include, exclude=exclude)
    listed = {s.path for s in sites}
    exclude_p = check_patterns(exclude, "exclude")
    found = []
    for path, module in model.named_modules():
        cls = type(module)
        if (
            path in listed
            or is_torch_class(cls)
            or isinstance(module, torch.jit.ScriptModule)
            or is_traced(module)
            or any(isinstance(module, t) for t in _REGISTERED_DETERMINISTIC)
            or matches(path, module, exclude_p)
        ):
            continue
        found.append(path)
    return found


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


def join_notes(note: str | None, extra: str) -> str:
    return extra if not note else f"{note}; {extra}"
