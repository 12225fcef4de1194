"""Switching a model's stochastic sites on and everything else off, and restoring every flag.

:class:`StochasticPolicy` holds the decision of :mod:`mcdrop.policy.classify` for one model and
applies it (:meth:`StochasticPolicy.activate`): inside, every module that is not a sampled site is
in eval mode, whatever mode the model was in; on exit every module's ``training`` flag is restored
exactly, also when the body raises, and the buffers of gates are checked unchanged. Activations
nest within a thread; a second thread that tries to switch a module another thread is sampling
gets :class:`~mcdrop.errors.ModelStateError`. :func:`enable_dropout` is the context-manager face
and :func:`describe` the table of sites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mcdrop._checks import check_bool
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropWarning,
    ModelStateError,
    NoDropoutError,
    NoRandomnessWarning,
    UnsupportedModelError,
)
from mcdrop.policy._bytecode import always_on_dropout_calls, is_torch_class
from mcdrop.policy.classify import (
    INCLUDED_NOTE,
    StochasticSite,
    find_stochastic_sites,
    frozen_modules,
    is_rate_holder,
    join_notes,
    outermost_traced,
    refused_traced_modules,
    unclassified_user_modules,
)

__all__ = ["StochasticPolicy", "describe", "enable_dropout"]


class StochasticPolicy:
    """Which modules of a model are switched to train mode for MC dropout, and how to undo it.

    Most users never build one: :func:`enable_dropout` and :class:`mcdrop.MCDropout` do. It is
    public so that tools can inspect the decision (``policy.sites``) before sampling.

    The sites are found again on every :meth:`activate`, so rates changed after construction (with
    :func:`set_dropout_rate` or by hand) are honoured: a site raised from rate 0 is sampled, and
    one set to 0 is not. ``sites`` and ``sampled_sites`` hold the result of the latest search
    (construction or :meth:`activate`); :meth:`current_sites` and :meth:`describe` search again
    without changing them.

    Args:
        model: Any ``nn.Module``.
        drop_path: Sample drop-path / stochastic-depth modules too (``True`` or ``False``).
        include: Extra modules to switch on (see :func:`find_stochastic_sites`).
        exclude: Modules to keep off (see :func:`find_stochastic_sites`).

    Raises:
        InvalidTypeError: ``model`` is not an ``nn.Module``, or ``drop_path`` is not a bool.
        NoDropoutError: The model has no source of dropout randomness at all (no site is sampled).
        UnsupportedModelError: The model is ``torch.jit.trace``'d, or contains traced modules with
            dropout layers or random operations in their graphs (traced modules without any run as
            recorded, with a warning); or the model or a part of it is frozen
            (``torch.jit.freeze``, ``torch.jit.optimize_for_inference``).

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
        #: Notes on sites learnt from running the model (see :mod:`mcdrop.engine.checks`), by path.
        self.gate_notes: dict[str, str] = {}
        #: Modules found at run time to draw dropout in train mode, which no rule saw (see
        #: :meth:`record_discovered`), with their notes, by path.
        self.discovered: dict[str, str] = {}
        self._active = 0  # activations entered and not yet left
        if not isinstance(model, nn.Module):
            raise InvalidTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        frozen = frozen_modules(model)
        if frozen:
            where = (
                "is a module"
                if frozen == [""]
                else f"contains modules ({', '.join(p or '<model>' for p in frozen[:5])}"
                f"{', ...' if len(frozen) > 5 else ''})"
            )
            raise UnsupportedModelError(
                f"{type(model).__name__} {where} made by torch.jit.freeze or "
                "torch.jit.optimize_for_inference. Freezing inlines a module into one graph in eval "
                "mode, so its dropout was removed and no training flag can switch it back on: MC "
                "dropout would silently sample without it. Pass the unfrozen torch.jit.script'ed "
                "model (or the eager one) instead."
            )
        harmless = outermost_traced(model)
        traced = refused_traced_modules(model, harmless)
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
        """The sites of the model as it is now (current rates), with the notes learnt from running it.

        Searches the model again with the policy's ``drop_path``, ``include`` and ``exclude`` (see
        :func:`find_stochastic_sites`), and appends the note recorded for a sampled site by
        :meth:`record_notes` to that site's ``note``. It does not change ``sites`` or
        ``sampled_sites`` and raises nothing when no site is sampled any more.

        Returns:
            One :class:`StochasticSite` per site, sampled or not, in ``named_modules()`` order
            (``path`` is ``""`` for the model itself).

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
            >>> policy = mcdrop.StochasticPolicy(net)
            >>> net[1].p = 0.0
            >>> [(s.path, s.rate, s.sampled, s.note) for s in policy.current_sites()]
            [('1', 0.0, False, 'rate is 0: nothing to sample')]
            >>> [s.rate for s in policy.sampled_sites]  # the search at construction
            [0.5]
        """
        sites = find_stochastic_sites(self.model, **self._options)
        if self.discovered:
            listed = {s.path for s in sites}
            modules = dict(self.model.named_modules())
            found = [
                StochasticSite(path, "functional", type(modules[path]).__name__, None, True, note)
                for path, note in self.discovered.items()
                if path in modules and path not in listed
            ]
            order = {path: i for i, path in enumerate(modules)}
            sites = sorted([*sites, *found], key=lambda s: order.get(s.path, len(order)))
        return [
            dataclasses.replace(s, note=join_notes(s.note, self.gate_notes[s.path]))
            if s.sampled and s.path in self.gate_notes
            else s
            for s in sites
        ]

    def _find_sites(self) -> None:
        # All or nothing: a search that finds nothing sampled raises and leaves the last decision whole.
        sites = self.current_sites()
        sampled = [s for s in sites if s.sampled]
        if not sampled:
            raise NoDropoutError(_no_dropout_message(self.model, sites))
        self.sites, self.sampled_sites = sites, sampled
        self._sampled_paths = {s.path for s in sampled}
        self._gate_paths = {s.path for s in sampled if s.kind in ("functional", "custom", "attention_dropout")}

    @property
    def has_randomness(self) -> bool:
        """False when every sampled site has a known rate of 0 (then all samples are identical)."""
        return any(s.rate is None or s.rate > 0 for s in self.sampled_sites if s.kind != "fast_path_gate")

    @contextlib.contextmanager
    def activate(self, *, check_buffers: bool = True) -> Iterator[StochasticPolicy]:
        """Switch the sampled sites to train mode and everything else to eval, then restore.

        The sites are searched again on entry (see :meth:`current_sites`), which updates
        ``sites`` and ``sampled_sites``. Inside, exactly the sampled sites are in train mode; on
        exit every module's ``training`` flag is restored as it was, also when the body raises.
        Activations nest within a thread.

        Args:
            check_buffers: Snapshot the buffers of the sampled ``"functional"``, ``"custom"`` and
                ``"attention_dropout"`` sites on entry and raise
                :class:`~mcdrop.errors.ModelStateError` on exit (after putting them back) if the
                body changed any.

        Yields:
            The policy itself.

        Raises:
            NoDropoutError: No site is sampled any more (e.g. every rate was set to 0 since the
                policy was built); nothing was switched.
            ModelStateError: Another thread is sampling (a module of) this model right now; or,
                with ``check_buffers``, the body changed a gate's buffers (raised on exit, unless
                the body is already raising).

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
            ...                           torch.nn.Dropout(0.5)).train()
            >>> policy = mcdrop.StochasticPolicy(net)
            >>> with policy.activate() as active:
            ...     inside = (net[1].training, net[2].training)
            >>> active is policy, inside, net[1].training  # BatchNorm in eval inside, restored after
            (True, (False, True), True)
        """
        self._find_sites()
        modules = list(self.model.named_modules())
        _claim(modules, self.model)
        saved = [(module, module.training) for _, module in modules]
        snapshots: list[tuple[str, nn.Module, str, torch.Tensor]] = []
        self._active += 1
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
            self._active -= 1
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

    def gates_to_check(self) -> list[str]:
        """Paths of the sampled gates whose train mode the gate check runs on real inputs.

        User-defined modules that read ``self.training`` (``"functional"``, and attention dropout
        other than ``nn.MultiheadAttention``'s), except those the user included and the
        ``nn.Dropout`` children that only hold an attention module's rate. See
        :func:`mcdrop.engine.checks.check_gates_on`.

        Returns:
            The paths, in the order of :attr:`sampled_sites`.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
            >>> mcdrop.StochasticPolicy(net).gates_to_check()
            []
        """
        return [
            s.path
            for s in self.sampled_sites
            if (
                s.kind == "functional"
                or (s.kind == "attention_dropout" and s.module_type != "MultiheadAttention")
            )
            and s.note != INCLUDED_NOTE
            and not is_rate_holder(s)
        ]

    def unclassified_modules(self) -> list[str]:
        """Paths of the user-defined modules no rule made a site, and not found at run time either.

        See :func:`mcdrop.policy.classify.unclassified_user_modules`; run-time discovery
        (:mod:`mcdrop.engine.discover`) looks in them for train-gated randomness.

        Returns:
            The paths, in ``named_modules()`` order.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
            >>> mcdrop.StochasticPolicy(net).unclassified_modules()
            []
        """
        # Inside an activation the sites it found are current: no second search of the model.
        found = unclassified_user_modules(self.model, **self._options, sites=self.sites if self._active else None)
        return [p for p in found if p not in self.discovered]

    def record_discovered(self, notes: dict[str, str]) -> None:
        """Sample, from now on, modules found at run time to draw dropout in train mode.

        They are listed as sites of kind ``"functional"`` (rate unknown) with their note, sampled
        like the gates the rules find (and gate-checked the same way).

        Args:
            notes: A note per module path.

        Example:
            >>> import torch, mcdrop
            >>> class Block(torch.nn.Module):
            ...     def forward(self, x):
            ...         return x
            >>> policy = mcdrop.StochasticPolicy(torch.nn.Sequential(Block(), torch.nn.Dropout(0.5)))
            >>> policy.record_discovered({"0": "found at run time"})
            >>> [(s.path, s.kind, s.sampled) for s in policy.current_sites()]
            [('0', 'functional', True), ('1', 'dropout', True)]
        """
        self.discovered.update(notes)
        if self._active:  # inside an activation: switched on at once (its exit restores every flag)
            modules = dict(self.model.named_modules())
            for path in notes:
                if path in modules:
                    modules[path].training = True
            self._find_sites()

    def record_notes(self, notes: dict[str, str]) -> None:
        """Keep notes on sites learnt from running the model (e.g. by the gate check), by path.

        They are added to the ``note`` of those sites wherever the sites are listed
        (:meth:`current_sites`, :meth:`describe`).

        Args:
            notes: A note per site path.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
            >>> policy = mcdrop.StochasticPolicy(net)
            >>> policy.record_notes({"1": "seen at work"})
            >>> policy.describe()[0]["note"]
            'seen at work'
        """
        self.gate_notes.update(notes)

    def describe(self) -> list[dict[str, Any]]:
        """The sites of the model as it is now (see :meth:`current_sites`), as plain dicts, one per site.

        The table of :func:`describe` without pandas.

        Returns:
            One dict per site, in ``named_modules()`` order, with the keys ``path`` (``"<model>"``
            for the model itself), ``kind``, ``module_type``, ``rate`` (``None`` where unknown),
            ``sampled`` and ``note``.

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
    always_on = [
        f"{path or '<model>'}: {call}"
        for path, module in model.named_modules()
        if not is_torch_class(type(module))
        for call in always_on_dropout_calls(type(module))
    ]
    if always_on:
        return (
            f"{type(model).__name__} has dropout that is always on, whatever the training flags say: "
            f"{'; '.join(always_on[:5])}{'; ...' if len(always_on) > 5 else ''}. It draws new masks in "
            "eval mode too, so every forward pass is already random; but mcdrop switches dropout on and "
            "off through the modules' training flags, which this dropout ignores, so it cannot sample it "
            "as a site, change its rate or switch it off (the model's eval outputs are random as well)."
            f"{found_text} To fix it, make it follow the module's mode, F.dropout(x, p, "
            "training=self.training) (or use an nn.Dropout): then MC dropout samples it, and eval mode "
            "is deterministic again."
        )
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
