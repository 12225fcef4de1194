"""Collection of the package's doctests: an integration whose framework is not installed is skipped.

``pytest`` collects the doctests of every module under ``mcdrop/`` (``--doctest-modules``); importing
``mcdrop.integrations.lightning`` or ``.transformers`` imports its framework, an optional extra. Where
that is missing, the module is left out of the collection instead of failing it (the tests of the
integrations skip themselves the same way).
"""

from __future__ import annotations

import importlib.util

collect_ignore = [
    path
    for framework, path in {
        "lightning": "mcdrop/integrations/lightning.py",
        "transformers": "mcdrop/integrations/transformers.py",
    }.items()
    if importlib.util.find_spec(framework) is None
]
