"""The model's own state across mcdrop's passes: what check passes write, what vmap passes leave.

Two guards keep the model as the user's own passes would leave it:

* :func:`parameters_untouched`, around the check passes (:mod:`mcdrop.engine.checks`). They run
  the model on rows the user may never have passed (a changed copy of a lone row), and in modes
  and on row counts of their own. A model can write to its parameters and buffers in a forward
  pass: ``nn.Embedding(max_norm=...)`` renormalises the rows it looks up in place, an eval-time
  observer (a running max of ``|x|``, ``torch.ao.quantization`` observers and ``FakeQuantize``)
  records what it sees. A dispatch mode watches the ops of the check passes; before an op first
  writes to the storage of a parameter or buffer, that tensor alone is copied, and every copy is
  written back afterwards (so memory grows only with what the checks write, not with the model).
  Parameters and buffers re-assigned during the checks (``self.max = torch.maximum(...)``, a
  ``.data`` swap) are put back too.
* :class:`HeldTensors`, around each ``torch.func.vmap`` pass (:mod:`mcdrop.engine.strategies`).
  A tensor computed inside vmap after a random draw is a functorch wrapper, dead once the vmap
  returns: a model that keeps one (``self.last_embedding = h``) or a forward hook that captures
  one would hand the user a tensor whose every use raises. The state a model and its hooks can
  reach is snapshotted before the pass and searched afterwards; where a functorch tensor is
  found, what held it is put back as it was and :class:`EscapedTensorsError` names the place,
  so the engine samples that model without vmap.

What :class:`HeldTensors` searches: every module's attributes (buffers included), the global
variables that the ``forward`` of each user-defined module class names, and the hooks' state
(forward and forward-pre hooks of every module, and the global ones: closure variables, defaults,
the ``functools.partial`` arguments, the object of a bound method or a callable object, and the
global variables their code names), through lists, tuples, dicts, sets and deques, at most
:data:`HELD_DEPTH` levels down and :data:`HELD_ITEMS` items in all. A tensor held elsewhere
(inside another object's attributes, in a global that only a helper of ``forward`` names) is not
found: see ``docs/support.md``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["EscapedTensorsError", "HeldTensors", "parameters_untouched"]


# --------------------------------------------------------------------------- check passes


#: For each aten op, the positions and names of the arguments it writes to (``Tensor(a!)``).
_WRITTEN: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    try:
        return _WRITTEN[func]
    except KeyError:
        schema = getattr(func, "_schema", None)
        spec = (
            ()
            if schema is None
            else tuple(
                (i, a.name)
                for i, a in enumerate(schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write
            )
        )
        _WRITTEN[func] = spec
        return spec


def _storage_key(t: Tensor) -> int:
    """The address of ``t``'s storage (0 where it has none: meta, functorch wrappers, ...)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return 0


class _WriteWatch(TorchDispatchMode):
    """Copies each watched tensor before an op first writes to its storage."""

    def __init__(self, watched: dict[int, list[Tensor]]) -> None:
        super().__init__()
        self.watched = watched
        self.saved: dict[int, tuple[Tensor, Tensor]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for i, name in _written_arguments(func):
            value = args[i] if i < len(args) else kwargs.get(name)
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if not isinstance(t, Tensor):
                    continue
                for owned in self.watched.get(_storage_key(t), ()):
                    if id(owned) not in self.saved:
                        self.saved[id(owned)] = (owned, owned.detach().clone())
        return func(*args, **kwargs)


def _uninitialized(t: Tensor) -> bool:
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


@contextlib.contextmanager
def parameters_untouched(model: nn.Module) -> Iterator[None]:
    """Every parameter and buffer of ``model`` as it was on entry, after the passes run inside.

    Only what the passes write in place is copied (before its first write), so memory grows with
    what they write, not with the model. Parameters and buffers re-assigned inside, or given other
    data (``.data = ...``), are put back. Lazy parameters that a first pass initialises are left
    initialised, as the user's own first pass would leave them.

    Args:
        model: The model whose passes run inside.

    Yields:
        Nothing; the block's passes run under a dispatch mode that watches their writes.
    """
    slots: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
    tensors: dict[int, Tensor] = {}
    for m in model.modules():
        if isinstance(m._parameters, dict) and isinstance(m._buffers, dict):  # not TorchScript's views
            slots.append((m, dict(m._parameters), dict(m._buffers)))
        for t in (*m._parameters.values(), *m._buffers.values()):
            if isinstance(t, Tensor) and not _uninitialized(t):
                tensors[id(t)] = t
    watched: dict[int, list[Tensor]] = {}
    data: list[tuple[Tensor, int, Tensor]] = []
    for t in tensors.values():
        key = _storage_key(t)
        if key:
            watched.setdefault(key, []).append(t)
            data.append((t, key, t.detach()))  # an alias: no copy, keeps the storage reachable
    watch = _WriteWatch(watched)
    try:
        with watch:
            yield
    finally:
        with torch.no_grad():
            for m, params, buffers in slots:
                for now, before in ((m._parameters, params), (m._buffers, buffers)):
                    if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                        now.clear()
                        now.update(before)
            for t, key, alias in data:
                if _storage_key(t) != key:
                    t.data = alias
            for t, copy in watch.saved.values():
                if t.shape != copy.shape:
                    t.data = copy
                else:
                    t.copy_(copy)


# --------------------------------------------------------------------------- vmap passes


#: How deep :class:`HeldTensors` looks into containers below a module attribute or a hook's state.
HELD_DEPTH = 4
#: How many items :class:`HeldTensors` looks at in all, per search (bounds its cost on huge state).
HELD_ITEMS = 200_000

#: nn.Module's own bookkeeping attributes (hook tables, submodules, parameters): not searched as
#: attributes (buffers are; hooks are searched through their state).
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"_buffers", "training"}
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks")
_MUTABLE = (list, dict, set, collections.deque, types.CellType)
_CONTAINERS = (*_MUTABLE, tuple, frozenset)
_EMPTY = object()


class EscapedTensorsError(RuntimeError):
    """A vmap pass left functorch tensors in the model's or its hooks' state (put back as it was)."""


def _is_wrapped(t: Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _items(obj: Any) -> list[tuple[Any, Any]]:
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, (list, tuple, collections.deque)):
        return list(enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return [(None, v) for v in obj]
    if isinstance(obj, types.CellType):
        try:
            return [(None, obj.cell_contents)]
        except ValueError:  # an empty cell
            return []
    return []


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, types.CellType):
        items = _items(obj)
        return items[0][1] if items else _EMPTY
    return list(obj)


def _put_back(obj: Any, saved: Any, key: Any) -> None:
    """Put ``obj`` back as ``saved`` (a dict: only the entry ``key``)."""
    if isinstance(obj, dict):
        if key in saved:
            obj[key] = saved[key]
        else:
            obj.pop(key, None)
    elif isinstance(obj, list):
        obj[:] = saved
    elif isinstance(obj, set):
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, collections.deque):
        obj.clear()
        obj.extend(saved)
    elif isinstance(obj, types.CellType):
        if saved is _EMPTY:
            with contextlib.suppress(ValueError):
                del obj.cell_contents
        else:
            obj.cell_contents = saved


#: Which entries of a root dict are searched: ``None`` (all), or ``(True, names)`` (those names) or
#: ``(False, names)`` (all but those names).
_Keys = tuple[bool, frozenset[str]] | None


def _entries(obj: Any, keys: _Keys) -> list[tuple[Any, Any]]:
    if keys is None:
        return _items(obj)
    include, names = keys
    chosen = obj.keys() & names if include else obj.keys() - names
    return [(k, obj[k]) for k in sorted(chosen)]


def _callable_state(fn: Any, label: str, depth: int = 0) -> list[tuple[str, Any, _Keys]]:
    """The state a hook's code can store a tensor into: ``(label, container, which keys)``."""
    if depth > 2:
        return []
    if isinstance(fn, functools.partial):
        return [
            (label, fn.args, None),
            (label, fn.keywords, None),
            *_callable_state(fn.func, label, depth + 1),
        ]
    if isinstance(fn, types.MethodType):
        state = _callable_state(fn.__func__, label, depth + 1)
        if not isinstance(fn.__self__, nn.Module):  # a module's attributes are searched anyway
            state += _callable_state(fn.__self__, label, depth + 1)
        return state
    if isinstance(fn, types.FunctionType):
        code = fn.__code__
        cells = zip(code.co_freevars, fn.__closure__ or (), strict=False)
        state: list[tuple[str, Any, _Keys]] = [(f"{label}: {name}", cell, None) for name, cell in cells]
        if fn.__defaults__:
            state.append((label, fn.__defaults__, None))
        if fn.__kwdefaults__:
            state.append((label, fn.__kwdefaults__, None))
        names = frozenset(n for n in code.co_names if n in fn.__globals__)
        if names:
            state.append((label, fn.__globals__, (True, names)))
        return state
    if not isinstance(fn, nn.Module) and hasattr(fn, "__dict__"):
        return [(label, vars(fn), None)]
    return []


class HeldTensors:
    """A snapshot of what a model and its forward hooks hold, to find functorch tensors a pass left.

    See the module docstring for what is searched. Taking the snapshot copies the containers
    (shallow: references, no tensor data).

    Args:
        model: The model about to run a vmap pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self._roots: list[tuple[str, Any, _Keys]] = []
        hooks: list[tuple[str, Any]] = []
        classes: set[type] = set()
        for name, m in model.named_modules():
            path = name or "<model>"
            self._roots.append((path, m.__dict__, (False, _MODULE_INTERNALS)))
            if type(m) not in classes:  # the global variables its forward names (a module-level cache)
                classes.add(type(m))
                forward = getattr(type(m), "forward", None)
                if isinstance(forward, types.FunctionType) and not forward.__module__.startswith("torch."):
                    names = frozenset(n for n in forward.__code__.co_names if n in forward.__globals__)
                    if names:
                        self._roots.append(
                            (
                                f"the globals of {type(m).__qualname__}.forward",
                                forward.__globals__,
                                (True, names),
                            )
                        )
            for table in _HOOK_TABLES:
                hooks += [(f"a forward hook of {path}", h) for h in getattr(m, table, {}).values()]
        for table in ("_global_forward_hooks", "_global_forward_pre_hooks"):
            hooks += [("a global forward hook", h) for h in getattr(_torch_module, table, {}).values()]
        for label, hook in hooks:
            self._roots += _callable_state(
                hook, f"{label} ({getattr(hook, '__qualname__', type(hook).__name__)})"
            )
        self._saved: dict[int, tuple[Any, Any]] = {}
        self._budget = 0
        for _, root, keys in self._roots:
            self._snapshot(root, keys, 0)

    def _snapshot(self, obj: Any, keys: _Keys, depth: int) -> None:
        if id(obj) in self._saved or depth > HELD_DEPTH or self._budget > HELD_ITEMS:
            return
        if isinstance(obj, _MUTABLE):
            self._saved[id(obj)] = (obj, _copy(obj))
        for _, value in _entries(obj, keys):
            self._budget += 1
            if isinstance(value, _CONTAINERS):
                self._snapshot(value, None, depth + 1)

    def escaped(self) -> list[str]:
        """Where functorch tensors are held now; what held them is put back as it was."""
        found: list[str] = []
        owners: dict[tuple[int, Any], tuple[Any, Any, Any]] = {}
        seen: set[int] = set()
        budget = [0]

        def search(obj: Any, path: str, keys: _Keys, depth: int, owner: Any) -> None:
            if isinstance(obj, Tensor):
                if _is_wrapped(obj):
                    found.append(path)
                    if owner is not None:
                        container, saved, key = owner
                        owners[(id(container), key)] = owner
                return
            if id(obj) in seen or depth > HELD_DEPTH or budget[0] > HELD_ITEMS:
                return
            seen.add(id(obj))
            snapshot = self._saved.get(id(obj))
            for key, value in _entries(obj, keys):
                budget[0] += 1
                if not isinstance(value, (Tensor, *_CONTAINERS)):
                    continue
                here = owner
                if snapshot is not None:
                    here = (obj, snapshot[1], key if isinstance(obj, dict) else None)
                step = (
                    f".{key}" if depth == 0 and isinstance(key, str) else "" if key is None else f"[{key!r}]"
                )
                search(value, path + step, None, depth + 1, here)

        for path, root, keys in self._roots:
            search(root, path, keys, 0, None)
        for container, saved, key in owners.values():
            _put_back(container, saved, key)
        return found

    def check(self) -> None:
        """Raise :class:`EscapedTensorsError` where a pass left functorch tensors (put back first).

        Raises:
            EscapedTensorsError: Naming where they were held.
        """
        found = self.escaped()
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise EscapedTensorsError(
                f"the model or a hook kept a tensor computed inside vmap ({shown}), which would be a dead "
                "functorch tensor afterwards"
            )
