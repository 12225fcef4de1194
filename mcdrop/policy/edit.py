"""Editing a model's dropout: adding dropout where it has none, changing rates, and undoing it.

:func:`add_dropout` puts ``mcdrop.nn.Dropout`` before chosen layers (as a child module, so the
model stays scriptable and picklable); :func:`set_dropout_rate` changes the rates of the sites
:mod:`mcdrop.policy.classify` finds and returns a :class:`RateChange` that restores them.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_real
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropWarning,
    UnsupportedModelError,
)
from mcdrop.policy.classify import (
    StochasticSite,
    check_patterns,
    find_stochastic_sites,
    is_traced,
    matches,
    never_called,
    registered_rate_problem,
)

__all__ = ["ADDED_DROPOUT_NAME", "RateChange", "add_dropout", "set_dropout_rate"]

# ----------------------------------------------------------------------------- adding dropout
#: Name of the dropout child that :func:`add_dropout` gives a module.
ADDED_DROPOUT_NAME = "mcdrop_dropout"


def added_dropout_hook(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """Forward pre-hook of :func:`add_dropout`: dropout on the module's first positional input.

    TorchScript compiles it with the module (its annotations are what ``torch.jit.script`` needs for
    a layer whose ``forward`` takes one tensor); keyword arguments pass by untouched.
    """
    if not torch.jit.is_scripting():
        if not args or not isinstance(args[0], torch.Tensor):
            _refuse_hook_input(module, args)
    return (module.mcdrop_dropout(args[0]),) + args[1:]


def dropout_before_hook(module: nn.Module, args: tuple[Any, ...], *kwargs: dict[str, Any]) -> Any:
    """The pre-hook that earlier versions of :func:`add_dropout` registered, by this name.

    Kept so that models saved with it (``torch.save``, pickle) still load and run: called with the
    keyword arguments (``with_kwargs=True``, the first versions) it returns ``(args, kwargs)``, as
    such a hook must; without them, the new args. TorchScript cannot compile it (the later
    versions registered a two-argument hook by this name): calling :func:`add_dropout` on such a
    model replaces it with :func:`added_dropout_hook`, which it can.
    """
    new_args = added_dropout_hook(module, args)
    return (new_args, kwargs[0]) if kwargs else new_args


#: The pre-hooks by which a layer is known to have dropout from :func:`add_dropout` before it.
_ADDED_DROPOUT_HOOKS = (added_dropout_hook, dropout_before_hook)


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
    traced = [path or "<model>" for path, m in model.named_modules() if is_traced(m)]
    if traced:
        raise UnsupportedModelError(
            f"add_dropout cannot change modules made by torch.jit.trace ({', '.join(traced[:5])}). Add "
            "dropout to the eager model, then trace or script the result."
        )
    modules = dict(model.named_modules())
    candidates = [
        (path, m)
        for path, m in modules.items()
        if isinstance(m, classes) and not _is_added_dropout_path(path) and not never_called(path, modules)
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
        patterns = check_patterns(where, "where")
        chosen = [(path, m) for path, m in candidates if matches(path, m, patterns)]
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
            module.register_forward_pre_hook(added_dropout_hook)
    return target


def _drop_earlier_hooks(module: nn.Module) -> bool:
    """Remove the pre-hook of an earlier version of :func:`add_dropout`; whether there was one.

    Whether or not it took the keyword arguments, ``torch.jit.script`` compiles neither.
    """
    earlier = [key for key, hook in module._forward_pre_hooks.items() if hook is dropout_before_hook]
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

        Later changes of the same rates that are still in force are undone with it (their own
        :meth:`restore` then leaves those rates alone). A rate set by hand in between, not through
        :func:`set_dropout_rate`, is overwritten too.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
            >>> change = mcdrop.set_dropout_rate(net, 0.3)
            >>> net[1].p
            0.3
            >>> change.restore()
            >>> net[1].p, change
            (0.1, RateChange(1 rates, restored))
            >>> change.restore()  # a second call does nothing
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
    patterns = check_patterns(where, "where")
    if where is not None and not patterns:
        raise InvalidInputError(
            f"where={where!r} names no site: an empty selection would change nothing (and "
            "where=None means every site). Pass module-path patterns, classes or callables, e.g. "
            "where='classifier*', or leave where= out to change every site."
        )
    modules = dict(model.named_modules())
    sites = find_stochastic_sites(model, drop_path=True)
    selected = [s for s in sites if not patterns or matches(s.path, modules[s.path], patterns)]
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
                problem = registered_rate_problem(module)
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
