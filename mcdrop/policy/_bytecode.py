"""Reading a class's code for ``.training`` reads (the bytecode scan behind rule 10 of :mod:`mcdrop.policy.classify`).

What a forward pass can run is searched: ``forward`` (and ``__call__``) of the class and its
non-torch bases, and, transitively, every method, property or static/class method of theirs whose
name that code uses, and every module-level function (not torch's) that code calls by name,
including the originals behind decorators. Reads of the flag that only choose gradient
checkpointing, or set or pass the mode on, do not count. Results are cached per class.
"""

from __future__ import annotations

import ast
import builtins
import dis
import inspect
import textwrap
import types
from collections.abc import Iterator
from typing import Any

from torch import nn

_CLASS_CODE_CACHE: dict[type, tuple[bool, frozenset[str]]] = {}


_MODE_SETTERS = frozenset({"train", "eval"})


#: Where a forward pass enters a module's own code.
_FORWARD_ROOTS = ("forward", "__call__")


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


def class_code(cls: type) -> tuple[bool, frozenset[str]]:
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
    codes = _reachable_codes(cls)
    reads = any(_code_reads_training(code) for code, _, _ in codes)
    names = {used for code, _, own in codes if own for inner in _iter_codes(code) for used in inner.co_names}
    result = (reads, frozenset(names))
    _CLASS_CODE_CACHE[cls] = result
    return result


def _reachable_codes(cls: type) -> list[tuple[types.CodeType, dict[str, Any], bool]]:
    """The code a forward pass of ``cls`` can run (see :func:`class_code`), with its globals.

    Each is ``(code, globals, own)``, ``own`` false for module-level helper functions.
    """
    members: dict[str, list[tuple[types.CodeType, dict[str, Any]]]] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object or is_torch_class(klass):
            continue
        for attr_name, attr in vars(klass).items():
            if attr_name not in _MODE_SETTERS and attr_name != "__init__":
                members.setdefault(attr_name, []).extend(_function_codes(attr))
    pending: list[tuple[types.CodeType, dict[str, Any], bool]] = [
        (code, namespace, True) for name in _FORWARD_ROOTS for code, namespace in members.get(name, ())
    ]
    visited_members: set[str] = {name for name in _FORWARD_ROOTS if name in members}
    visited_helpers: set[int] = set()
    reached = []
    while pending:
        code, namespace, own = pending.pop()
        reached.append((code, namespace, own))
        for inner in _iter_codes(code):
            for used in inner.co_names:
                if used in members and used not in visited_members:
                    visited_members.add(used)
                    pending.extend((c, g, True) for c, g in members[used])
                    continue
                helper = _helper_function(used, namespace)
                if helper is not None and id(helper) not in visited_helpers and len(visited_helpers) < 256:
                    visited_helpers.add(id(helper))
                    pending.extend((c, g, False) for c, g in _function_codes(helper))
    return reached


def _dropout_functions() -> dict[Any, tuple[str, str, int, bool | None]]:
    """The dropout functions of torch: ``(shown name, mode argument, its position, its default)``."""
    import torch
    import torch.nn.functional as F

    found: dict[Any, tuple[str, str, int, bool | None]] = {}
    for name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"):
        func = getattr(F, name, None)
        if func is not None:
            found[func] = (f"F.{name}", "training", 2, "alpha" not in name)  # alpha ones default to off
    for name in ("dropout", "dropout_", "alpha_dropout", "feature_dropout", "feature_alpha_dropout"):
        func = getattr(torch, name, None)
        if func is not None:
            found[func] = (f"torch.{name}", "train", 2, None)  # no default
    return found


def _resolve(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """The object a name or dotted name (``F.dropout``, ``torch.nn.functional.dropout``) refers to."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id, getattr(builtins, node.id, None))
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, namespace)
        if isinstance(base, types.ModuleType):
            return getattr(base, node.attr, None)
    return None


def always_on_dropout_calls(cls: type) -> list[str]:
    """Calls of torch's dropout functions that a forward pass of ``cls`` makes always on.

    That is with the mode argument a constant true (``F.dropout(x, 0.3, True)``,
    ``training=True``) or left out where it defaults to true (``F.dropout(x, 0.3)``): such dropout
    draws new masks in eval mode too, whatever the module's ``training`` flag. The code read is
    what :func:`class_code` reads, from its source (code without source is not read); a mode
    given by any other expression (``training=self.training``) is not listed.

    Returns:
        One description per call, such as ``"F.dropout(..., training=True) in Net.forward"``.
    """
    functions = _dropout_functions()
    found: list[str] = []
    for code, namespace, _ in _reachable_codes(cls):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            try:
                known = functions.get(_resolve(node.func, namespace))
            except TypeError:  # an unhashable object under that name
                known = None
            if known is None:
                continue
            shown, mode, position, default = known
            given = [k.value for k in node.keywords if k.arg == mode]
            if len(node.args) > position:
                given.append(node.args[position])
            where = f"in {code.co_qualname if hasattr(code, 'co_qualname') else code.co_name}"
            if not given:
                if default:
                    found.append(f"{shown}(...) without {mode}= (its default is True) {where}")
            elif isinstance(given[0], ast.Constant) and given[0].value:
                found.append(f"{shown}(..., {mode}={given[0].value!r}) {where}")
    return found


def class_reads_training(cls: type) -> bool:
    """True if forward-reachable code of ``cls`` or its non-torch bases reads ``.training``."""
    return class_code(cls)[0]


def is_torch_class(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == "torch" or module.startswith("torch.")
