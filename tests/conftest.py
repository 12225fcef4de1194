"""Shared test configuration: the hypothesis profiles of the fuzz and robustness tests, and shared fixtures.

``mcdrop-ci`` (the default) keeps every fuzz test bounded and deterministic, so CI runs the same
examples every time in well under a minute. ``MCDROP_FUZZ=long`` selects ``mcdrop-long``: random
(not derandomized) examples, ``MCDROP_FUZZ_EXAMPLES`` of them per test (default 2000), for a run by
hand; see docs/reliability.md for the command and the counts of the last run. The profiles are only
applied where a test asks for them (``tests/test_fuzz.py``, ``tests/test_numerics.py``); tests with
their own ``@settings`` are unaffected.

Fixtures shared by several test files live here (``one_thread``); the models and small helpers they
share live in ``tests/zoo.py`` and ``tests/support_models.py`` (helper modules, not test modules:
nothing in them is collected). pytest's default ``prepend`` import mode puts ``tests/`` on
``sys.path`` before it imports this file and the test files, so ``from zoo import mlp`` works from
``pytest`` in the repository root as well as from ``pytest tests/test_x.py``.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, settings

_QUIET_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "mcdrop-ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_QUIET_CHECKS,
)
settings.register_profile(
    "mcdrop-long",
    max_examples=int(os.environ.get("MCDROP_FUZZ_EXAMPLES", "2000")),
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=_QUIET_CHECKS,
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The tensors of most tests are tiny: thread-pool hand-offs cost more than they save, and on a busy
    shared runner OpenMP's spin-waits make a two-thread run several times slower than one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def T() -> ModuleType:
    """``transformers``, quiet (the tests that need it are skipped where it cannot be imported)."""
    from support_models import optional_import

    transformers = optional_import("transformers")
    transformers.logging.set_verbosity_error()
    return transformers
