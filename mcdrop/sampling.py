"""Transitional: the names this module held now live in :mod:`mcdrop.engine` (to be removed)."""

from mcdrop.engine.inputs import prepare_inputs
from mcdrop.engine.outputs import flag_bad_rows as _flag_bad_rows
from mcdrop.engine.outputs import raise_if_bad_rows as _raise_if_bad_rows
from mcdrop.engine.plan import plan_work
from mcdrop.engine.sample import sample_chunks
from mcdrop.engine.strategies import STRATEGIES

__all__ = ["STRATEGIES", "_flag_bad_rows", "_raise_if_bad_rows", "plan_work", "prepare_inputs", "sample_chunks"]
