"""Reading a class's code for ``.training`` reads (the bytecode scan behind rule 10 of :mod:`mcdrop.policy.classify`).

What a forward pass can run is searched: ``forward`` (and ``__call__``) of the class and its
non-torch bases, and, transitively, every method, property or static/class method of theirs whose
name that code uses, and every module-level function (not torch's) that code calls by name,
including the originals behind decorators. Reads of the flag that only choose gradient
checkpointing, or set or pass the mode on, do not count. Results are cached per class.
"""

from __future__ import annotations

import dis
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
    members: dict[str, list[tuple[types.CodeType, dict[str, Any]]]] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object or is_torch_class(klass):
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


def class_reads_training(cls: type) -> bool:
    """True if forward-reachable code of ``cls`` or its non-torch bases reads ``.training``."""
    return class_code(cls)[0]


def is_torch_class(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == "torch" or module.startswith("torch.")
