"""Every docstring example of the metrics and recalibration modules runs and is right."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mcdrop.metrics",
    "mcdrop.metrics.calibration",
    "mcdrop.metrics.classification",
    "mcdrop.metrics.selective",
    "mcdrop.metrics.ood",
    "mcdrop.metrics.regression",
    "mcdrop.recalibration",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
