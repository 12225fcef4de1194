"""Transitional alias of :mod:`mcdrop.engine.sample` (the module moved there)."""

import sys

import mcdrop.engine.sample as _moved

sys.modules[__name__] = _moved
