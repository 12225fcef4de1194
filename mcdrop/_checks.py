"""Argument validation shared by every layer of mcdrop (layer 0: knows nothing of ours but errors)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

from mcdrop.errors import InvalidInputError, InvalidTypeError, MissingDependencyError


def check_choice(value: Any, choices: Iterable[str], name: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming the choices."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise InvalidInputError(f"{name} must be one of {listed}; got {value!r}.")
    return value


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an int if it is a whole number within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidTypeError(f"{name} must be an integer; got {value!r} of type {type(value).__name__}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{name} must be at least {minimum}; got {value}.")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be at most {maximum}; got {value}.")
    return value


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidTypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be finite; got {value}.")
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if low is not None and (value < low or (low_open and value == low)):
        raise InvalidInputError(f"{name} must be in {interval}; got {value}.")
    if high is not None and (value > high or (high_open and value == high)):
        raise InvalidInputError(f"{name} must be in {interval}; got {value}.")
    return value


def check_rate(p: Any, name: str = "p") -> float:
    """Validate a dropout rate: a real number in [0, 1]."""
    return check_real(p, name, low=0.0, high=1.0)


def _type_name(value: Any) -> str:
    """``int``, or ``numpy.bool`` for a type from outside the builtins (whose name may mislead)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False``, else raise (``"yes"``, ``1``, ``None`` are refused)."""
    if not isinstance(value, bool):
        raise InvalidTypeError(
            f"{name} must be True or False; got {value!r} of type {_type_name(value)}. Pass a bool, "
            f"e.g. {name}=True."
        )
    return value


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside mcdrop.

    Call it from the function that calls :func:`warnings.warn`; whatever path led there inside
    mcdrop (``predict``, ``predict_loader``, ``sample``, ...), the warning names the user's line.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "mcdrop":
        frame = frame.f_back
        level += 1
    return level


def import_optional(module: str, *, extra: str, feature: str) -> Any:
    """Import an optional dependency, or raise :class:`MissingDependencyError` naming the extra.

    ``feature`` is what the user called (``"mcdrop.integrations.lightning"``); ``extra`` the
    ``pyproject.toml`` extra that installs the dependency (``"lightning"``).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{feature} needs the optional dependency {module!r}, which could not be imported ({err}). "
            f'Install it with: pip install "mcdrop[{extra}]"'
        ) from err
