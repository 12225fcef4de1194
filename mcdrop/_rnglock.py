"""Transitional alias of :mod:`mcdrop.engine.rng` (the module moved there)."""

import sys

import mcdrop.engine.rng as _moved

sys.modules[__name__] = _moved
