"""TRANSITIONAL alias of :mod:`mcdrop.engine.probe` (the module moved there), until the tests import from it."""

import mcdrop.engine.probe as _moved


def __getattr__(name: str) -> object:
    return getattr(_moved, name)
