"""Transitional alias of :mod:`mcdrop.engine.fastdropout` (the module moved there)."""

import sys

import mcdrop.engine.fastdropout as _moved

sys.modules[__name__] = _moved
