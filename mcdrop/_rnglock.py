"""TRANSITIONAL alias of :mod:`mcdrop.engine.rng` (the module moved there), until the tests import from it."""

import mcdrop.engine.rng as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
