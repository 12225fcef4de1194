"""Transitional alias of :mod:`mcdrop.policy.classify` (the module moved there)."""

import sys

import mcdrop.policy.classify as _moved

sys.modules[__name__] = _moved
