"""The report layer: metrics tables (pandas), figures (seaborn) and a self-contained HTML page.

``mcdrop.report(prediction, ...)`` builds an :class:`UncertaintyReport`; ``mcdrop.compare(...)`` puts
the summaries of several reports side by side; :mod:`mcdrop.report.figures` has every figure as a
function that draws on a matplotlib ``Axes``. This package imports pandas, matplotlib and seaborn,
so ``import mcdrop`` does not load it: the first use of ``mcdrop.report`` does.

The package itself is callable, so ``mcdrop.report(pred)`` and ``mcdrop.report.figures`` both work:
calling it is calling :func:`mcdrop.report.report`.

Example:
    >>> import torch, mcdrop
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                           torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).eval()
    >>> mc = mcdrop.MCDropout(net, n_samples=10, seed=0)
    >>> rep = mcdrop.report(mc.predict(torch.randn(30, 4)), torch.randint(0, 3, (30,)))
    >>> rep.summary.set_index("metric").loc["ECE", "higher_is_better"]
    False
    >>> import mcdrop.report.figures as figures  # the package is callable and has submodules
    >>> callable(mcdrop.report), figures.reliability_diagram.__name__
    (True, 'reliability_diagram')
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from mcdrop.report import figures
from mcdrop.report._report import UncertaintyReport, check_report_folder, compare, report

__all__ = ["report", "compare", "UncertaintyReport", "check_report_folder", "figures"]


class _CallableModule(types.ModuleType):
    """The ``mcdrop.report`` package, callable as the :func:`report` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> UncertaintyReport:
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(report)
