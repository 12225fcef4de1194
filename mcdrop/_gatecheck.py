"""Transitional alias of :mod:`mcdrop.engine.checks` (the module moved there)."""

import sys

import mcdrop.engine.checks as _moved

sys.modules[__name__] = _moved
