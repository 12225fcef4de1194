"""Transitional alias of :mod:`mcdrop.engine.probe` (the module moved there)."""

import sys

import mcdrop.engine.probe as _moved

sys.modules[__name__] = _moved
