"""Shared test configuration: the hypothesis profiles of the fuzz and robustness tests.

``mcdrop-ci`` (the default) keeps every fuzz test bounded and deterministic, so CI runs the same
examples every time in well under a minute. ``MCDROP_FUZZ=long`` selects ``mcdrop-long``: random
(not derandomized) examples, ``MCDROP_FUZZ_EXAMPLES`` of them per test (default 2000), for a run by
hand; see docs/reliability.md for the command and the counts of the last run. The profiles are only
applied where a test asks for them (``tests/test_fuzz.py``, ``tests/test_numerics.py``); tests with
their own ``@settings`` are unaffected.
"""

from __future__ import annotations

import os

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
