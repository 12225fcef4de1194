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
5. Drop-path / stochastic depth (classes named ``DropPath`` or ``StochasticDepth``, as in timm and
   torchvision, or registered with kind ``"drop_path"``): found and listed, sampled only with
   ``drop_path=True``.
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
    module and the fix (``exclude=`` or :func:`register_deterministic`).

TorchScript modules are classified by their original class name and, for user classes, by whether
their compiled code reads ``self.training``.

Inside :func:`enable_dropout` every module that is not a sampled site is in eval mode, whatever
mode the model was in; on exit every module's ``training`` flag is restored exactly, also when the
body raises.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import types
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    ModelStateError,
    NoDropoutError,
    NoRandomnessWarning,
)

__all__ = [
    "StochasticSite",
    "StochasticPolicy",
    "enable_dropout",
    "find_stochastic_sites",
    "register_stochastic",
    "register_deterministic",
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
_READS_TRAINING_CACHE: dict[type, bool] = {}


def register_stochastic(cls: type[nn.Module], kind: str = "dropout", rate_attr: str | None = "p") -> None:
    """Register a module class as a source of randomness that MC dropout should sample.

    Use it for a home-made dropout or noise layer whose ``forward`` the automatic rules miss.

    Args:
        cls: The ``nn.Module`` subclass.
        kind: ``"dropout"`` (sampled by default) or ``"drop_path"`` (sampled with ``drop_path=True``).
        rate_attr: Name of the attribute holding the drop rate, or ``None`` if it has none.

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
    if kind not in ("dropout", "drop_path"):
        raise InvalidInputError(f"kind must be one of 'dropout', 'drop_path'; got {kind!r}.")
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
    """

    path: str
    kind: str
    module_type: str
    rate: float | None
    sampled: bool
    note: str = ""


def _code_reads_training(code: types.CodeType) -> bool:
    if "training" in code.co_names:
        return True
    return any(isinstance(c, types.CodeType) and _code_reads_training(c) for c in code.co_consts)


def _class_reads_training(cls: type) -> bool:
    """True if code defined by ``cls`` or its non-torch bases reads an attribute named ``training``."""
    cached = _READS_TRAINING_CACHE.get(cls)
    if cached is not None:
        return cached
    found = False
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object or _is_torch_class(klass):
            continue
        for attr in vars(klass).values():
            func = attr
            if isinstance(attr, (staticmethod, classmethod)):
                func = attr.__func__
            elif isinstance(attr, property):
                func = attr.fget
            code = getattr(func, "__code__", None)
            if isinstance(code, types.CodeType) and _code_reads_training(code):
                found = True
                break
        if found:
            break
    _READS_TRAINING_CACHE[cls] = found
    return found


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
    patterns = tuple(value)
    for p in patterns:
        if not (isinstance(p, (str, type)) or callable(p)):
            raise InvalidTypeError(
                f"{name} takes module-path patterns (str, e.g. 'encoder.*'), module classes, or "
                f"callables (path, module) -> bool; got {p!r}."
            )
    return patterns


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
    if _matches(path, module, exclude):
        if site is None:
            return None
        return StochasticSite(path, site[0], name, site[1], False, "excluded by the user")
    if _matches(path, module, include):
        kind = site[0] if site is not None else "custom"
        rate = site[1] if site is not None else None
        return StochasticSite(path, kind, name, rate, True, "included by the user")
    if site is None:
        return None
    kind, rate = site
    if kind == "drop_path":
        note = "sampled (drop_path=True)" if drop_path else "not sampled: pass drop_path=True to sample it"
        return StochasticSite(path, kind, name, rate, drop_path and rate != 0.0, note)
    if rate is not None and rate == 0.0:
        return StochasticSite(path, kind, name, rate, False, "rate is 0: nothing to sample")
    return StochasticSite(path, kind, name, rate, True, "")


def _classify_kind(module: nn.Module, name: str) -> tuple[str, float | None] | None:
    cls = type(module)
    for registered, (kind, attr) in _REGISTERED_STOCHASTIC.items():
        if isinstance(module, registered):
            return kind, _rate(module, attr)
    if any(isinstance(module, t) for t in _REGISTERED_DETERMINISTIC):
        return None
    if isinstance(module, torch.jit.ScriptModule):
        if name in _SCRIPTED_DETERMINISTIC_NAMES:
            return None
        if name in _SCRIPTED_DROPOUT_NAMES or name in ("Dropout", "Dropout2d"):
            return "dropout", _rate(module, "p")
        if name in _DROP_PATH_NAMES:
            return "drop_path", _rate(module, "p") if hasattr(module, "p") else _rate(module, "drop_prob")
        try:
            code = module.code
        except (RuntimeError, AttributeError):
            code = ""
        return ("functional", None) if "training" in code else None
    if isinstance(module, _TORCH_DETERMINISTIC_TYPES):
        return None
    if isinstance(module, _TORCH_DROPOUT_TYPES):
        return "dropout", float(module.p)
    if name in _DROP_PATH_NAMES:
        rate = _rate(module, "drop_prob") if hasattr(module, "drop_prob") else _rate(module, "p")
        return "drop_path", rate
    if _is_mcdrop_dropout(cls):
        return "dropout", _rate(module, "p")
    if isinstance(module, nn.MultiheadAttention):
        return "attention_dropout", float(module.dropout)
    if isinstance(module, nn.RNNBase):
        rate = float(module.dropout) if module.num_layers > 1 else 0.0
        return "rnn_dropout", rate
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return "fast_path_gate", None
    if _is_torch_class(cls):
        return None
    if _class_reads_training(cls):
        return "functional", None
    return None


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
        drop_path: Sample drop-path / stochastic-depth modules too.
        include: Extra modules to switch to train mode: module-path patterns (``fnmatch`` style,
            e.g. ``"encoder.*.noise"``), module classes, or callables ``(path, module) -> bool``.
        exclude: Modules to keep in eval mode, in the same forms.

    Returns:
        One :class:`StochasticSite` per site, in ``named_modules()`` order. A
        ``"fast_path_gate"`` site is listed only when something inside it is sampled.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.3))
        >>> [(s.path, s.kind, s.rate) for s in mcdrop.find_stochastic_sites(net)]
        [('2', 'dropout', 0.3)]
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    include_p = _check_patterns(include, "include")
    exclude_p = _check_patterns(exclude, "exclude")
    sites: list[StochasticSite] = []
    for path, module in model.named_modules():
        site = _classify(path, module, drop_path=drop_path, include=include_p, exclude=exclude_p)
        if site is not None:
            sites.append(site)
    # A fast-path gate matters only if a sampled site lives inside it.
    sampled_paths = [s.path for s in sites if s.sampled and s.kind != "fast_path_gate"]
    kept: list[StochasticSite] = []
    for site in sites:
        if site.kind == "fast_path_gate" and site.sampled and site.note != "included by the user":
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
    return kept


class StochasticPolicy:
    """Which modules of a model are switched to train mode for MC dropout, and how to undo it.

    Most users never build one: :func:`enable_dropout` and :class:`mcdrop.MCDropout` do. It is
    public so that tools can inspect the decision (``policy.sites``) before sampling.

    Args:
        model: Any ``nn.Module``.
        drop_path: Sample drop-path / stochastic-depth modules too.
        include: Extra modules to switch on (see :func:`find_stochastic_sites`).
        exclude: Modules to keep off (see :func:`find_stochastic_sites`).

    Raises:
        NoDropoutError: The model has no source of dropout randomness at all.

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
        self.sites = find_stochastic_sites(model, drop_path=drop_path, include=include, exclude=exclude)
        self.sampled_sites = [s for s in self.sites if s.sampled]
        if not self.sampled_sites:
            raise NoDropoutError(_no_dropout_message(model, self.sites))
        self._sampled_paths = {s.path for s in self.sampled_sites}
        self._gate_paths = {s.path for s in self.sampled_sites if s.kind in ("functional", "custom")}

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
        """
        modules = list(self.model.named_modules())
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
            changed = []
            for path, module, bname, before in snapshots:
                now = module._buffers.get(bname)
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
        """Return the sites as a list of plain dicts (one per site)."""
        return [
            {
                "path": s.path or "<model>",
                "kind": s.kind,
                "module_type": s.module_type,
                "rate": s.rate,
                "sampled": s.sampled,
                "note": s.note,
            }
            for s in self.sites
        ]


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
