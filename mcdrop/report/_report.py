"""``mcdrop.report(...)``, the :class:`UncertaintyReport` it returns, and ``mcdrop.compare(...)``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import seaborn as sns

from mcdrop._checks import check_int, check_real
from mcdrop.errors import InvalidInputError, InvalidTypeError, McdropWarning, ReportExistsError
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction
from mcdrop.report import _render, _tables, figures

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["UncertaintyReport", "report", "compare"]

#: the files ``save`` writes besides one PNG per figure
REPORT_FILES = ("summary.csv", "per_input.csv", "reliability.csv", "summary.json", "report.html", "sites.csv")
_GENERATOR = "mcdrop"
_DPI = 110


def _version() -> str:
    import mcdrop

    return str(getattr(mcdrop, "__version__", "unknown"))


def _fit_to_content(fig: Figure, pad: float = 0.08) -> None:
    """Resize ``fig`` to what it draws, legends outside the axes included, keeping every size in inches.

    The figures put legends and strips outside their axes; without this, a figure drawn on its own
    canvas at its nominal size (a tracker's image, ``fig.savefig`` without ``bbox_inches="tight"``)
    would cut them off.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    canvas.draw()
    box = fig.get_tightbbox(renderer)  # inches
    width, height = fig.get_size_inches()
    x0, y0 = box.x0 - pad, box.y0 - pad
    new_w, new_h = box.x1 + pad - x0, box.y1 + pad - y0
    for ax in fig.axes:
        pos = ax.get_position()
        ax.set_axes_locator(None)
        ax.set_position(
            [
                (pos.x0 * width - x0) / new_w,
                (pos.y0 * height - y0) / new_h,
                pos.width * width / new_w,
                pos.height * height / new_h,
            ]
        )
    fig.set_size_inches(new_w, new_h)


def _environment() -> dict[str, str]:
    """The versions that made a report: mcdrop, torch, numpy, pandas, matplotlib, Python."""
    import matplotlib
    import numpy
    import torch

    return {
        "mcdrop": _version(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "numpy": str(numpy.__version__),
        "pandas": str(pd.__version__),
        "matplotlib": str(matplotlib.__version__),
    }


def _variant_label(key: str, prediction: Prediction, recalibration: dict[str, Any] | None) -> str:
    """How the summary's column ``key`` is headed in the page and named in the figures."""
    if key == "deterministic":
        return "deterministic (dropout off)"
    if recalibration is None:  # pragma: no cover - the column exists only with a recalibration
        return "recalibrated"
    symbol = "T" if recalibration["parameter"] == "temperature" else "s"
    short = "temperature" if symbol == "T" else "std scaling"
    return f"MC + {short} ({symbol} = {recalibration['value']:.3g})"


class UncertaintyReport:
    """Tables, figures and files describing how uncertain a model is and how well calibrated.

    Built by :func:`mcdrop.report`; see there for what it contains. The tables are pandas
    DataFrames computed once; the figures are drawn on demand (:meth:`figure`, :meth:`to_html`,
    :meth:`save`), with matplotlib's Agg canvas, so no window opens and no global pyplot state is
    touched.

    The constructor only stores what :func:`mcdrop.report` has validated and computed (it checks
    nothing itself); build reports with :func:`mcdrop.report`, not directly. Its arguments are all
    keyword-only.

    Args:
        title: The report's title.
        prediction: The evaluated prediction, as :func:`mcdrop.report` prepared it (on the CPU,
            without raw samples; for multi-output regression the chosen output).
        targets: The targets it is evaluated against (a CPU tensor; integer labels for
            classification).
        tables: The summary, per-input and reliability tables, the notes and the data the figures
            are drawn from (an internal ``Tables`` record of :mod:`mcdrop.report`); its tables
            become :attr:`summary`, :attr:`per_input`, :attr:`reliability` and :attr:`notes`.
        ood: The out-of-distribution predictions by name, prepared the same way, or ``None``.
        sites: The stochastic sites of the model (``MCDropout.describe()``), or ``None``.
        n_bins: Number of confidence bins the classification tables were computed with; the
            reliability diagram and the page use it too.
        level: Nominal coverage of the regression intervals the tables were computed with, in
            ``(0, 1)``; the interval and residual figures use it too.
        sort_by: How :attr:`per_input` is sorted, in words (e.g. ``"total_std (largest first)"``
            or ``"input order"``); shown in the HTML page and saved in ``summary.json``.
        intervals: How the summary's bootstrap intervals were computed (an internal ``Intervals``
            record: ``n_resamples``, ``seed``, ``level``); default: 1000 resamples, seed 0, 95%.
        counts: The count rows, ``{name: (value, definition)}`` (already in ``tables.summary``).
        recalibration: What ``calibration=`` fitted (method, parameter, value, inputs), or ``None``.
        run: Facts of the run (``seed``, ``device``, ``n_samples`` and ``metadata``; with adaptive
            sampling also ``samples_per_input`` and the sampler's settings), for ``summary.json``
            and the page; default: none known.
        predictions: The evaluated predictions by column, ``{"mc": ..., "deterministic": ...,
            "recalibrated": ...}`` (those present), prepared as ``prediction``; default:
            ``{"mc": prediction}``.
        recalibrator: The recalibrator ``calibration=`` fitted, or ``None``.

    Attributes:
        title: The report's title.
        task: ``"classification"`` or ``"regression"``.
        summary: One row per metric, columns ``group, metric, value, ci_low, ci_high, definition,
            higher_is_better, flag``: ``group`` one of ``classification``/``regression``,
            ``calibration``, ``selective prediction``, ``uncertainty``, ``OOD: <name>`` (one per OOD
            set) and ``counts`` (numbers of inputs and samples, last); ``value`` the MC dropout
            prediction's; ``ci_low``/``ci_high`` the percentile bootstrap interval over inputs
            (NaN for counts, undefined values, or without intervals); ``higher_is_better`` is
            ``None`` for descriptive rows such as counts; ``flag`` says why a value is fragile (an
            MCE resting on a bin of fewer than 20 inputs), else ``""``. With a baseline, three more
            columns ``deterministic, deterministic_ci_low, deterministic_ci_high``; with
            ``calibration=``, ``recalibrated, recalibrated_ci_low, recalibrated_ci_high``.
        per_input: One row per input, most uncertain first by default (index: the input's position).
        reliability: Classification: the per-bin reliability table (``bin, lower, upper, count,
            confidence, accuracy, gap, weight, few_inputs``; ``few_inputs``: a non-empty bin of fewer
            than 20 inputs). Regression: the calibration curve
            (``expected, observed, gap``) of central intervals at 100 levels.
        sites: The stochastic sites of the model (``MCDropout.describe()``), or ``None``.
        notes: Warnings about the data, e.g. a metric that is undefined (reported as NaN).
        created: When the report was built (local time, timezone-aware).
        prediction: The evaluated prediction (on the CPU; for multi-output regression the chosen output).
        targets: The targets it was evaluated against (a CPU tensor).
        ood: The out-of-distribution predictions as ``{name: prediction}`` (a bare prediction is
            named ``"ood"``), or ``None``.
        variants: The summary's other columns and what they hold, ``{"deterministic": label,
            "recalibrated": label}`` for those present (empty without baseline or calibration).
        predictions: The predictions behind the summary's value columns, ``{"mc": prediction,
            "deterministic": baseline, "recalibrated": recalibrated}`` for those present (the keys
            of :attr:`variants` plus ``"mc"``), each as :attr:`prediction` is (on the CPU, without
            raw samples; for multi-output regression the chosen output). ``predictions["recalibrated"]``
            is the prediction the ``recalibrated`` column describes, e.g. to count the inputs whose
            class the temperature changed.
        recalibration: What ``calibration=`` fitted, ``{"method", "parameter", "value",
            "n_inputs"}``, or ``None``.
        recalibrator: The fitted :class:`~mcdrop.TemperatureScaling` (classification) or
            :class:`~mcdrop.VarianceScaling` (regression) of ``calibration=``, or ``None``; its
            ``transform`` recalibrates other predictions of the same model the same way (with the
            kept samples, unlike ``predictions["recalibrated"]``).
        run: ``{"seed", "device", "n_samples", "metadata"}`` of the run (``None`` where unknown).
            With adaptive sampling ``n_samples`` is ``"auto"``, ``samples_per_input`` is
            ``{"min", "mean", "max"}`` and ``max_samples`` the prediction's cap; with ``model=``
            also the sampler's ``tolerance``, ``min_samples`` and ``target``.
        n_bins: Number of confidence bins (as given to :func:`mcdrop.report`).
        level: Nominal coverage of the regression intervals (as given to :func:`mcdrop.report`).
        sort_by: How :attr:`per_input` is sorted, in words.
        n_resamples: Bootstrap resamples of the summary's intervals (0: no intervals).
        seed: Seed of the bootstrap resamples.
        ci_level: Nominal coverage of the summary's intervals.
        version: The mcdrop version that built the report.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
        ...                           torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).eval()
        >>> mc = mcdrop.MCDropout(net, n_samples=10, seed=0)
        >>> x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
        >>> rep = mcdrop.report(mc.predict(x), y, ood={"noise": mc.predict(3 * torch.randn(20, 4))}, model=mc)
        >>> rep
        UncertaintyReport(task='classification', n_inputs=40, n_samples=10, ood={'noise': 20}, metrics=19)
        >>> list(rep.summary.columns)
        ['group', 'metric', 'value', 'ci_low', 'ci_high', 'definition', 'higher_is_better', 'flag']
        >>> rep.counts
        {'n_inputs': 40, 'n_samples': 10, 'n_ood [noise]': 20}
        >>> rep.figure_names
        ('reliability', 'confidence', 'uncertainty', 'risk_coverage', 'ood')
        >>> rep.sort_by, rep.n_bins, rep.level
        ('predictive_entropy (largest first)', 15, 0.95)
        >>> list(rep.predictions), rep.recalibrator  # no baseline, no calibration=
        (['mc'], None)
    """

    def __init__(
        self,
        *,
        title: str,
        prediction: Prediction,
        targets: Any,
        tables: _tables.Tables,
        ood: dict[str, Prediction] | None,
        sites: pd.DataFrame | None,
        n_bins: int,
        level: float,
        sort_by: str,
        intervals: _tables.Intervals | None = None,
        counts: dict[str, tuple[int | float, str]] | None = None,
        recalibration: dict[str, Any] | None = None,
        run: dict[str, Any] | None = None,
        predictions: dict[str, Prediction] | None = None,
        recalibrator: Any = None,
    ) -> None:
        intervals = intervals or _tables.Intervals()
        self.title = title
        self.task = prediction.task
        self.prediction = prediction
        self.targets = targets
        self.ood = ood or None
        self.summary = tables.summary
        self.per_input = tables.per_input
        self.reliability = tables.reliability
        self.sites = sites
        self.notes = list(tables.notes)
        self.n_bins = n_bins
        self.level = level
        self.sort_by = sort_by
        self.n_resamples = intervals.n_resamples
        self.seed = intervals.seed
        self.ci_level = intervals.level
        self.recalibration = recalibration
        self.recalibrator = recalibrator
        self.predictions = dict(predictions) if predictions else {"mc": prediction}
        facts = {"seed": None, "device": None, "n_samples": None, "metadata": {}, **(run or {})}
        self.run = {**{k: v for k, v in facts.items() if k != "metadata"}, "metadata": facts["metadata"]}
        self.created = datetime.now().astimezone()
        self.version = _version()
        self._counts = dict(counts or {})
        self._data = tables.data
        self.variants = {
            key: _variant_label(key, prediction, recalibration)
            for key in _tables.VARIANTS
            if key in self.summary.columns
        }

    # ------------------------------------------------------------------ facts
    @property
    def n_inputs(self) -> int:
        """Number of evaluated inputs."""
        return len(self.prediction)

    @property
    def n_samples(self) -> int:
        """Number of MC dropout passes per input (the most any input got, with adaptive sampling)."""
        return int(self.prediction.n_samples)

    @property
    def n_ood(self) -> int | None:
        """Number of out-of-distribution inputs over all OOD sets, or ``None`` without OOD data."""
        return None if self.ood is None else sum(len(o) for o in self.ood.values())

    @property
    def counts(self) -> dict[str, int | float]:
        """The counts as ``{name: value}``: integers, but the mean samples per input.

        ``n_inputs``, ``n_samples``, one ``n_ood`` per OOD set (``n_ood [name]`` for a named set),
        and, with adaptive sampling, ``samples per input (min/mean/max)`` and ``inputs that reached
        max_samples``. They are the rows of the ``counts`` group of :attr:`summary`.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(10, 2))
            >>> mcdrop.report(pred, torch.zeros(10, dtype=torch.long)).counts
            {'n_inputs': 10, 'n_samples': 5}
        """
        return {name: value for name, (value, _) in self._counts.items()}

    @property
    def metrics(self) -> dict[str, float]:
        """The summary as a ``{metric: value}`` dict (the MC dropout column), counts included as floats.

        The integer counts are :attr:`counts`; the deterministic and recalibrated columns are in
        :attr:`summary`.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(10, 2))
            >>> rep = mcdrop.report(pred, torch.zeros(10, dtype=torch.long))
            >>> rep.metrics["n_inputs"], rep.counts["n_inputs"], "ECE" in rep.metrics
            (10.0, 10, True)
        """
        return dict(zip(self.summary["metric"], self.summary["value"].astype(float), strict=True))

    @property
    def figure_names(self) -> tuple[str, ...]:
        """Names of the report's figures, in display order (each is saved as ``<name>.png``)."""
        if self.task == "classification":
            names = ["reliability", "confidence", "uncertainty", "risk_coverage"]
        else:
            names = ["calibration", "intervals", "residuals"] if self._data["std_ok"] else []
        if self.ood is not None and (self.task == "classification" or self._data["ood_scores"]):
            names.append("ood")
        return tuple(names)

    @property
    def figure_captions(self) -> dict[str, str]:
        """One sentence per figure saying what it shows."""
        pct = f"{self.level * 100:g}%"
        others = " and ".join(self.variants.values())
        overlay = f" Lines with markers: {others} (marker area ∝ inputs in the bin)." if others else ""
        captions = {
            "reliability": (
                f"Accuracy against top-label confidence in {self.n_bins} equal-width bins of the MC dropout "
                "prediction, each bar as opaque as its share of the inputs and labelled with its count; "
                "hatched: the gap to the bin's mean confidence; dashed: perfect calibration; bottom strip: "
                f"fraction of inputs per bin. Title: ECE.{overlay}"
            ),
            "confidence": (
                "Top-label confidence of right and wrong predictions side by side on a logarithmic count "
                "axis (so a handful of wrong predictions stays visible), with the accuracy and the mean "
                "confidence: a mean confidence right of the accuracy is over-confidence."
            ),
            "uncertainty": (
                "Distributions of the predictive entropy (total uncertainty) and the mutual information "
                "(epistemic part), in nats, on the same bins."
            ),
            "risk_coverage": (
                "Selective risk (error rate of the kept inputs) when the most uncertain inputs are rejected "
                "first, ranked by predictive entropy and by mutual information; dashed: the oracle. The risk "
                "axis is linear up to one error among all inputs and logarithmic above it, so stretches of "
                "zero risk stay visible above the axis. Legend: AURC (3 significant digits)."
            ),
            "calibration": (
                "Observed against expected coverage of the central predictive intervals at 100 levels; "
                f"shaded: the miscalibration area. Below the diagonal the intervals are too narrow.{overlay}"
            ),
            "intervals": (
                f"The {pct} central intervals ordered by predicted std, relative to the predicted mean; dots: "
                "the targets, coloured by whether they fall inside. Title: PICP."
            ),
            "residuals": (
                f"Residuals against predicted std, with the cone ±z·std of the {pct} interval: calibrated "
                "uncertainty fans out with the residuals."
            ),
        }
        sets = ", ".join(f"{name!r} ({len(o)} inputs)" for name, o in (self.ood or {}).items())
        if self.task == "classification":
            captions["ood"] = (
                "Predictive entropy (left) and mutual information (right) on the in-distribution inputs and "
                f"on each out-of-distribution set ({sets}), on shared bins; the legend gives each set's OOD "
                "AUROC."
            )
        else:
            captions["ood"] = (
                f"Predicted std on the in-distribution inputs and on each out-of-distribution set ({sets}); "
                "the legend gives each set's OOD AUROC."
            )
        return {name: captions[name] for name in self.figure_names}

    def __repr__(self) -> str:
        ood = "" if self.ood is None else f", ood={ {name: len(o) for name, o in self.ood.items()} }"
        n_metrics = int((self.summary["group"] != _tables.COUNTS).sum())
        return (
            f"UncertaintyReport(task={self.task!r}, n_inputs={self.n_inputs}, n_samples={self.n_samples}"
            f"{ood}, metrics={n_metrics})"
        )

    # ------------------------------------------------------------------ figures
    def _draw(self, name: str, fig: Figure) -> None:
        d = self._data
        if name == "ood":
            if self.task == "classification":
                left, right = fig.subplots(1, 2)
                for ax, key, label in (
                    (left, "entropy", "predictive entropy (nats)"),
                    (right, "MI", "mutual information (nats)"),
                ):
                    scores = {n: s[key] for n, s in d["ood"].items()}
                    figures.ood_histogram(
                        d["entropy"] if key == "entropy" else d["mi"], scores, score_name=label, ax=ax
                    )
            else:
                tags = list(next(iter(d["ood_scores"].values())))
                axes = fig.subplots(1, len(tags), squeeze=False)[0]
                for ax, tag in zip(axes, tags, strict=True):
                    s_in = next(iter(d["ood_scores"].values()))[tag][0]
                    outs = {n: s[tag][1] for n, s in d["ood_scores"].items()}
                    figures.ood_histogram(s_in, outs, score_name=f"predicted {tag}", ax=ax)
            return
        ax = fig.add_subplot()
        overlay = {self.variants[k]: v for k, v in d["variants"].items()}
        if name == "reliability":
            figures.reliability_diagram(
                d["probs"], d["labels"], n_bins=self.n_bins, ax=ax, label=self._main_label(), overlay=overlay
            )
        elif name == "confidence":
            figures.confidence_histogram(d["probs"], d["labels"], ax=ax)
        elif name == "uncertainty":
            figures.uncertainty_histogram(d["entropy"], d["mi"], ax=ax)
        elif name == "risk_coverage":
            scores = {"predictive entropy": d["entropy"], "mutual information": d["mi"]}
            figures.risk_coverage_plot(scores, d["errors"], ax=ax)
        elif name == "calibration":
            figures.regression_calibration_plot(
                d["mean"], d["std"], d["targets"], ax=ax, label=self._main_label(), overlay=overlay
            )
        elif name == "intervals":
            figures.ordered_intervals_plot(d["mean"], d["std"], d["targets"], level=self.level, ax=ax)
        elif name == "residuals":
            figures.residuals_vs_std_plot(d["mean"], d["std"], d["targets"], level=self.level, ax=ax)
        else:  # pragma: no cover - guarded by figure()
            raise AssertionError(name)

    def _main_label(self) -> str:
        return f"MC dropout ({_render.samples_label(self)})"

    def _figsize(self, name: str) -> tuple[float, float]:
        if name == "ood":
            if self.task == "classification":
                n_panels = 2
            else:
                n_panels = len(next(iter(self._data["ood_scores"].values())))
            return (6.0 * n_panels, 5.6)
        return {
            "reliability": (5.8, 7.0),
            "calibration": (6.4, 5.4),
            "intervals": (7.5, 4.5),
            "risk_coverage": (6.5, 4.8),
        }.get(name, (6.5, 4.5))

    def figure(self, name: str) -> Figure:
        """Draw one of the report's figures on a new matplotlib Figure (Agg canvas; no window opens).

        Args:
            name: One of :attr:`figure_names`.

        Returns:
            The ``matplotlib.figure.Figure``; save it with ``fig.savefig(path)``. It is not registered
            with pyplot, so it needs no ``plt.close``.

        Raises:
            InvalidInputError: An unknown figure name.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(30, 2))
            >>> fig = mcdrop.report(pred, torch.randint(0, 2, (30,))).figure("reliability")
            >>> len(fig.axes[0].containers[0])  # one bar per bin
            15
        """
        if name not in self.figure_names:
            raise InvalidInputError(
                f"unknown figure {name!r}; this report has {_render.names_list(self.figure_names) or 'no figures'}."
            )
        from matplotlib.figure import Figure

        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
            fig = Figure(figsize=self._figsize(name))
            self._draw(name, fig)
            _fit_to_content(fig)
        return fig

    def _png(self, name: str) -> bytes:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
            fig = self.figure(name)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", facecolor="white")
        return buf.getvalue()

    def _images(self) -> dict[str, bytes]:
        return {name: self._png(name) for name in self.figure_names}

    # ------------------------------------------------------------------ text outputs
    def to_markdown(self) -> str:
        """The report as Markdown: title, facts, notes, summary with definitions, tables, figure list.

        Figures are not embedded (they are the PNG files :meth:`save` writes); the per-input table
        shows the most uncertain rows. No ``tabulate`` is needed.

        Returns:
            The Markdown text.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(30, 2))
            >>> text = mcdrop.report(pred, torch.randint(0, 2, (30,)), title="demo").to_markdown()
            >>> text.splitlines()[0]
            '# demo'
            >>> "| ECE |" in text
            True
        """
        return _render.to_markdown(self)

    def to_html(self, path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> str:
        """The report as ONE self-contained HTML document (figures embedded as base64 PNG).

        It loads nothing from the network and opens offline: inline CSS, the summary with the
        definition of every metric, the figures, the reliability (or calibration-curve) table, the
        stochastic sites when the report has a model, the most uncertain inputs, and the notation.

        Args:
            path: Where to write it (atomically, via a temporary file and a rename); ``None`` only
                returns the text.
            overwrite: Replace an existing file at ``path``.

        Returns:
            The HTML text.

        Raises:
            ReportExistsError: ``path`` exists and ``overwrite`` is False, or it is a folder or a
                symbolic link.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(30, 2))
            >>> page = mcdrop.report(pred, torch.randint(0, 2, (30,))).to_html()
            >>> page.startswith("<!DOCTYPE html>"), page.count("data:image/png;base64,")
            (True, 4)
        """
        target = None
        if path is not None:
            target = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
            if target.is_symlink() or target.is_dir():
                kind = "a symbolic link" if target.is_symlink() else "a folder"
                raise ReportExistsError(f"{target} is {kind}; choose a file path for the HTML report.")
            if target.exists() and not overwrite:
                raise ReportExistsError(
                    f"{target} exists; pass overwrite=True to replace it, or choose another path."
                )
        page = _render.document_html(self, self._images())
        if target is not None:
            _write_atomic(target, page.encode("utf-8"))
        return page

    def _repr_html_(self) -> str:
        return _render.body_html(self, self._images())

    def _summary_json(self, files: list[str]) -> str:
        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        counts = self.counts
        variant_columns = [
            (key, key + "_ci_low", key + "_ci_high")
            for key in _tables.VARIANTS
            if key in self.summary.columns
        ]
        rows = []
        for r in self.summary.to_dict("records"):
            metric = str(r["metric"])
            row: dict[str, Any] = {
                "group": str(r["group"]),
                "metric": metric,
                "value": counts[metric] if r["group"] == _tables.COUNTS else clean(float(r["value"])),
                "ci_low": clean(float(r["ci_low"])),
                "ci_high": clean(float(r["ci_high"])),
            }
            for columns in variant_columns:
                row.update({c: clean(float(r[c])) for c in columns})
            row.update(
                {
                    "definition": str(r["definition"]),
                    "higher_is_better": None
                    if r["higher_is_better"] is None
                    else bool(r["higher_is_better"]),
                    "flag": str(r["flag"]),
                }
            )
            rows.append(row)
        metric_rows = [row for row in rows if row["group"] != _tables.COUNTS]
        payload = {
            "generator": _GENERATOR,
            "mcdrop_version": self.version,
            "versions": _environment(),
            "title": self.title,
            "created": self.created.isoformat(timespec="seconds"),
            "task": self.task,
            "n_inputs": self.n_inputs,
            "n_samples": self.n_samples,
            "n_ood": self.n_ood,
            "ood_sets": None if self.ood is None else {name: len(o) for name, o in self.ood.items()},
            "counts": counts,
            "run": {key: value for key, value in self.run.items() if key != "metadata"},
            "metadata": self.run["metadata"],
            "n_bins": self.n_bins,
            "level": self.level,
            "sort_by": self.sort_by,
            "bootstrap": {
                "n_resamples": self.n_resamples,
                "seed": self.seed,
                "level": self.ci_level,
                "over": "inputs (the MC samples of each input held fixed)",
                "min_bin_inputs": _tables.MIN_BIN_INPUTS,
            },
            "columns": {"value": self._main_label(), **self.variants},
            "recalibration": self.recalibration,
            "metrics": {row["metric"]: row["value"] for row in metric_rows},
            "intervals": {row["metric"]: [row["ci_low"], row["ci_high"]] for row in metric_rows},
            "summary": rows,
            "notes": self.notes,
            "figures": self.figure_captions,
            "files": files,
        }
        return json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def _summary_csv(self) -> pd.DataFrame:
        """The summary as written to ``summary.csv``: counts as integers, metrics as floats."""
        frame = self.summary.copy()
        counts = self.counts
        frame["value"] = pd.Series(
            [
                counts[m] if g == _tables.COUNTS else v
                for g, m, v in zip(frame["group"], frame["metric"], frame["value"], strict=True)
            ],
            index=frame.index,
            dtype=object,
        )
        return frame

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the report into a folder, atomically.

        The folder gets ``summary.csv``, ``per_input.csv``, ``reliability.csv``, ``summary.json``,
        ``report.html``, one ``<name>.png`` per figure, and ``sites.csv`` when the report has a
        model. Everything is first written into a temporary sibling folder, which is then renamed
        into place, so ``directory`` either keeps its previous state or holds the complete new
        report, never a half-written one, also when an error interrupts.

        Args:
            directory: The report folder; missing parents are created.
            overwrite: Replace an existing, non-empty report folder. For safety only a folder that
                holds an mcdrop report (its ``summary.json``) and nothing but report files is
                replaced; the old report is removed only after the new one is in place.

        Returns:
            The folder's path.

        Raises:
            ReportExistsError: ``directory`` is non-empty and ``overwrite`` is False; or it holds
                files that are not part of an mcdrop report; or it is a file. (A subclass of
                ``FileExistsError``.)

        Example:
            >>> import tempfile, pathlib, torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(30, 2))
            >>> rep = mcdrop.report(pred, torch.randint(0, 2, (30,)))
            >>> out = rep.save(pathlib.Path(tempfile.mkdtemp()) / "report")
            >>> sorted(p.name for p in out.iterdir())  # doctest: +NORMALIZE_WHITESPACE
            ['confidence.png', 'per_input.csv', 'reliability.csv', 'reliability.png', 'report.html',
             'risk_coverage.png', 'summary.csv', 'summary.json', 'uncertainty.png']
        """
        target = Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))
        check_report_folder(target, bool(overwrite), self.figure_names)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            images = self._images()
            files: list[str] = []

            def write(name: str, writer: Callable[[Path], None]) -> None:
                writer(tmp / name)
                files.append(name)

            write("summary.csv", lambda p: self._summary_csv().to_csv(p, index=False))
            write("per_input.csv", lambda p: self.per_input.to_csv(p, index=True, index_label="input"))
            write("reliability.csv", lambda p: self.reliability.to_csv(p, index=False))
            if self.sites is not None:
                sites = self.sites
                write("sites.csv", lambda p: sites.to_csv(p, index=False))
            for name, png in images.items():
                write(f"{name}.png", lambda p, png=png: p.write_bytes(png))  # type: ignore[misc]
            write(
                "report.html", lambda p: p.write_text(_render.document_html(self, images), encoding="utf-8")
            )
            (tmp / "summary.json").write_text(
                self._summary_json(sorted([*files, "summary.json"])), encoding="utf-8"
            )
            os.chmod(tmp, 0o777 & ~_umask())
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    # ------------------------------------------------------------------ experiment trackers
    def log_to(
        self, logger: Any, step: int | None = None, prefix: str = "mc/", *, run_id: str | None = None
    ) -> dict[str, float]:
        """Log the metrics (scalars), figures (images) and summary (a table) to an experiment tracker.

        A TensorBoard ``SummaryWriter``, an MLflow run (the ``mlflow`` module with an active run, an
        ``mlflow.ActiveRun``, or an ``MlflowClient`` with ``run_id``), a Lightning logger, or a list of
        them; see :func:`mcdrop.report.trackers.log_report` for what each gets. NaN metrics
        (undefined for the data) are not logged as scalars; the table keeps them.

        Args:
            logger: The tracker.
            step: The step to log at (``None``: the tracker's default).
            prefix: Put before every key (default ``"mc/"``: ``mc/ECE``).
            run_id: The run, with an ``MlflowClient`` only.

        Returns:
            The scalars logged, ``{key: value}``.

        Raises:
            InvalidTypeError: ``logger`` of a kind not supported (the message lists what is).
            InvalidInputError: the ``mlflow`` module without an active run, an ``MlflowClient``
                without ``run_id``, a negative ``step``.

        Example:
            >>> import tempfile, torch, mcdrop
            >>> from torch.utils.tensorboard import SummaryWriter
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(30, 2))
            >>> rep = mcdrop.report(pred, torch.randint(0, 2, (30,)), n_resamples=0)
            >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
            ...     sorted(rep.log_to(writer, step=0))[:3]
            ['mc/AURC', 'mc/Brier', 'mc/E-AURC']
        """
        from mcdrop.report.trackers import log_report

        return log_report(self, logger, step, prefix, run_id=run_id)


# ----------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, data: bytes) -> None:
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _is_report_file(name: str) -> bool:
    return name in REPORT_FILES or (name.endswith(".png") and "/" not in name)


def check_report_folder(target: Path, overwrite: bool, figure_names: Sequence[str] = ()) -> None:
    """Refuse a folder that :meth:`UncertaintyReport.save` must not write into.

    Refused: a symbolic link or a file; a folder that is not empty, unless ``overwrite``; and, even
    with ``overwrite``, a folder that is not an mcdrop report: one with entries other than the
    report's files (``summary.csv``, ``per_input.csv``, ``reliability.csv``, ``summary.json``,
    ``report.html``, ``sites.csv`` and any ``*.png`` file; a subfolder is never one), or without a
    ``summary.json`` whose ``"generator"`` is ``"mcdrop"``: replacing it would delete someone
    else's files. A path that does not exist, or an empty folder, is fine. Nothing is written.

    Args:
        target: The report folder, a :class:`pathlib.Path` (:meth:`UncertaintyReport.save` passes
            it absolute, with ``~`` expanded).
        overwrite: Whether an existing mcdrop report there may be replaced.
        figure_names: The figures the report will write. Not used by the check at present: every
            ``*.png`` file counts as a report file, whatever its name.

    Raises:
        ReportExistsError: The folder must not be written into; the message says why.

    Example:
        >>> import tempfile, pathlib
        >>> from mcdrop.report import check_report_folder
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> check_report_folder(folder / "new", overwrite=False)  # does not exist: fine
        >>> _ = (folder / "notes.txt").write_text("mine")
        >>> check_report_folder(folder, overwrite=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        mcdrop.errors.ReportExistsError: refusing to overwrite ...: it holds entries that are not part of an mcdrop report: notes.txt. ...
    """
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise ReportExistsError(f"{target} is {kind}, not a report folder; choose another path.")
    if not target.exists():
        return
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ReportExistsError(
            f"the report folder {target} exists and is not empty ({len(entries)} entries); pass "
            "overwrite=True to replace it, or choose a new folder."
        )
    foreign = [name for name in entries if not _is_report_file(name) or (target / name).is_dir()]
    is_report = False
    try:
        is_report = (
            json.loads((target / "summary.json").read_text(encoding="utf-8")).get("generator") == _GENERATOR
        )
    except (OSError, ValueError, AttributeError):
        is_report = False
    if foreign or not is_report:
        why = (
            f"it holds entries that are not part of an mcdrop report: {', '.join(foreign[:8])}"
            + (" ..." if len(foreign) > 8 else "")
            if foreign
            else "it has no mcdrop summary.json, so it is not an mcdrop report folder"
        )
        raise ReportExistsError(
            f"refusing to overwrite {target}: {why}. overwrite=True only replaces a previous mcdrop "
            "report; choose an empty or new folder."
        )


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def _sort_per_input(frame: pd.DataFrame, sort_by: str | None, default: str) -> tuple[pd.DataFrame, str]:
    frame.index.name = "input"
    if sort_by is None:
        sort_by = default
    if not isinstance(sort_by, str):
        raise InvalidTypeError(f"sort_by must be a column name (str) or None; got {type(sort_by).__name__}.")
    if sort_by == "input":
        return frame, "input order"
    ascending = sort_by.startswith("+")
    column = sort_by[1:] if sort_by[:1] in "+-" else sort_by
    if column not in frame.columns:
        raise InvalidInputError(
            f"sort_by={sort_by!r} is not a column of the per-input table; choose one of "
            f"{_render.names_list(['input', *map(str, frame.columns)])} (largest first; prefix '+' for "
            "smallest first)."
        )
    ordered = frame.sort_values(column, ascending=ascending, kind="mergesort", na_position="last")
    return ordered, f"{column} ({'smallest' if ascending else 'largest'} first)"


def _ood_sets(ood: Any, prediction: Prediction) -> dict[str, Prediction]:
    """``ood`` as ``{name: prediction}`` (a bare prediction is named ``"ood"``), each validated."""
    if ood is None:
        return {}
    if isinstance(ood, Prediction):
        items = {_tables.DEFAULT_OOD: ood}
    elif isinstance(ood, Mapping):
        items = dict(ood)
        if not items:
            raise InvalidInputError("ood is an empty mapping; give {name: prediction} entries, or ood=None.")
    else:
        raise InvalidTypeError(
            f"ood must be a prediction of the same task as prediction ({type(prediction).__name__}, made by "
            "the same model on out-of-distribution inputs) or a mapping {name: prediction} of several "
            f"such sets; got {type(ood).__name__}."
        )
    out: dict[str, Prediction] = {}
    for name, o in items.items():
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError(f"the names of ood sets must be non-empty strings; got {name!r}.")
        if not isinstance(o, type(prediction)):
            raise InvalidTypeError(
                f"ood[{name!r}] must be a prediction of the same task as prediction "
                f"({type(prediction).__name__}, made by the same model on out-of-distribution inputs); got "
                f"{type(o).__name__}."
            )
        out[name.strip()] = o
    return out


def _check_same_model(other: Prediction, pred: Prediction, name: str) -> None:
    """Raise unless ``other`` (already on the CPU) can be compared with ``pred`` class for class."""
    if isinstance(pred, ClassificationPrediction):
        assert isinstance(other, ClassificationPrediction)
        _tables.check_classification(other, name)
        if other.n_classes != pred.n_classes:
            raise InvalidInputError(
                f"{name} has {other.n_classes} classes but prediction has {pred.n_classes}; both must come "
                "from the same model."
            )


def _strip(pred: Prediction) -> Prediction:
    """A CPU copy without raw samples or nested deterministic prediction (nothing the tables need)."""
    return (
        replace(pred, samples=None, deterministic=None).cpu()
        if hasattr(pred, "deterministic")
        else (replace(pred, samples=None).cpu())
    )


def _device_of(pred: Prediction) -> str:
    first = pred.probs if isinstance(pred, ClassificationPrediction) else pred.mean  # type: ignore[attr-defined]
    return str(first.device)


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as JSON can hold it: paths become strings; anything else that JSON lacks is refused."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return _jsonable(item(), where)
    raise InvalidTypeError(
        f"{where} is a {type(value).__name__}, which summary.json cannot hold; give strings, numbers, "
        "booleans, paths, lists or mappings of them."
    )


def _adaptive_run(
    run: dict[str, Any], pred: Prediction, counts: dict[str, tuple[int | float, str]], model: Any
) -> list[str]:
    """Record adaptive sampling in ``run`` (in place) and return notes; nothing for a fixed N.

    An adaptive prediction's ``n_samples`` is only its largest N: ``run["n_samples"]`` becomes
    ``"auto"``, with the samples per input (min, mean, max) and the prediction's ``max_samples``
    beside it, and, when ``model`` samples adaptively with that ``max_samples``, the sampler's
    ``tolerance``, ``min_samples`` and ``target``.
    """
    if "samples per input (min)" not in counts:
        return []
    from mcdrop.options import DEFAULT_TARGETS

    run["n_samples"] = "auto"
    run["samples_per_input"] = {
        "min": counts["samples per input (min)"][0],
        "mean": counts["samples per input (mean)"][0],
        "max": counts["samples per input (max)"][0],
    }
    cap = getattr(pred, "max_samples", None)
    run["max_samples"] = None if cap is None else int(cap)
    if model is None:
        return []
    options = model.options
    if not options.adaptive or (cap is not None and options.max_samples != int(cap)):
        made = f"n_samples={options.n_samples!r}" + (
            f", max_samples={options.max_samples}" if options.adaptive else ""
        )
        return [
            f"the prediction was sampled adaptively (max_samples={cap}), but model= samples with {made}: "
            "its adaptive settings are not recorded; pass the MCDropout that made the prediction."
        ]
    run["max_samples"] = int(options.max_samples)
    run["min_samples"] = int(options.min_samples)
    run["tolerance"] = float(options.tolerance)
    run["target"] = options.target or DEFAULT_TARGETS[pred.task]
    return []


def _recalibrate(
    pred: Prediction,
    ood: dict[str, Prediction],
    calibration: Any,
    output: int | None,
) -> tuple[Prediction, dict[str, Prediction | None], dict[str, Any], list[str], Any]:
    """Fit the recalibrator on ``calibration = (prediction, targets)`` and apply it to ``pred`` and ``ood``.

    Returns the recalibrated prediction, the recalibrated OOD predictions (``None`` where the
    recalibrator could not be applied), what was fitted, notes, and the fitted recalibrator.
    """
    if not isinstance(calibration, (tuple, list)) or len(calibration) != 2:
        raise InvalidInputError(
            "calibration must be a pair (prediction, targets) of held-out data: the same model's prediction "
            "on a validation set and its targets, e.g. calibration=(mc.predict_loader(val_loader), None) "
            f"with the targets in the prediction; got {type(calibration).__name__}."
        )
    val_pred, val_targets = calibration
    if not isinstance(val_pred, type(pred)):
        raise InvalidTypeError(
            f"calibration[0] must be a prediction of the same task as prediction ({type(pred).__name__}) on "
            f"held-out data; got {type(val_pred).__name__}."
        )
    val_y = _tables.resolve_targets(val_pred, val_targets)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recal, out_ood, info, scaler = _fit_and_apply(pred, ood, val_pred, val_y, output, notes)
    for w in caught:  # the recalibrator's warnings go into the report's notes, and on to the caller
        if issubclass(w.category, McdropWarning):
            notes.append(f"recalibrated: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes.append(
        f"recalibrated: {info['method']} fitted on {info['n_inputs']} held-out inputs "
        f"({info['parameter']} = {info['value']:.4g}) and applied to these predictions."
    )
    return recal, out_ood, info, notes, scaler


def _fit_and_apply(
    pred: Prediction,
    ood: dict[str, Prediction],
    val_pred: Prediction,
    val_y: Any,
    output: int | None,
    notes: list[str],
) -> tuple[Prediction, dict[str, Prediction | None], dict[str, Any], Any]:
    from mcdrop.errors import McdropError
    from mcdrop.recalibration import TemperatureScaling, VarianceScaling

    out_ood: dict[str, Prediction | None] = {}
    if isinstance(pred, ClassificationPrediction):
        scaler: Any = TemperatureScaling().fit(val_pred, val_y)
        info = {
            "method": "temperature scaling",
            "parameter": "temperature",
            "value": float(scaler.temperature_),
            "n_inputs": len(val_pred),
        }
        recal = scaler.transform(pred)
        for name, o in ood.items():
            try:
                out_ood[name] = scaler.transform(o)
            except McdropError as err:
                out_ood[name] = None
                notes.append(
                    f"recalibrated: the OOD set {name!r} could not be recalibrated ({err}); its rows are NaN."
                )
    else:
        val_one, val_y1 = _tables.select_output(val_pred, val_y, output, "calibration[0]")  # type: ignore[arg-type]
        scaler = VarianceScaling().fit(val_one, val_y1)
        info = {
            "method": "variance scaling",
            "parameter": "std factor",
            "value": float(scaler.factor_),
            "n_inputs": len(val_pred),
        }
        recal = scaler.transform(pred)
        out_ood = {name: scaler.transform(o) for name, o in ood.items()}
    return recal, out_ood, info, scaler


def report(
    prediction: Prediction,
    targets: Any = None,
    *,
    ood: Prediction | Mapping[str, Prediction] | None = None,
    title: str = "mcdrop uncertainty report",
    model: Any = None,
    n_bins: int = 15,
    level: float = 0.95,
    sort_by: str | None = None,
    output: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
    baseline: Prediction | None = None,
    calibration: tuple[Prediction, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> UncertaintyReport:
    """Build the uncertainty report of a prediction: metrics, per-input table, calibration, figures.

    Classification (``probs`` of shape ``(n, K)``) summary rows, by group: *classification*
    accuracy, NLL, Brier; *calibration* ECE, MCE, adaptive ECE, classwise ECE (all with ``n_bins``
    bins); *selective prediction* AURC and E-AURC (inputs ranked by predictive entropy),
    misclassification AUROC by predictive entropy and by mutual information; *uncertainty* the mean
    predictive entropy and mutual information; per OOD set (*OOD: name*) OOD AUROC, AUPR-In and
    FPR@95TPR by predictive entropy and by mutual information; *counts* ``n_inputs``,
    ``n_samples``, ``n_ood`` per set (and, with adaptive sampling, the samples per input).

    Regression (``mean`` of shape ``(n,)`` or ``(n, 1)``; Gaussian with the total std ``σ``):
    *regression* RMSE, MAE, Gaussian NLL, CRPS; *calibration* PICP and MPIW at ``level``,
    miscalibration area, MACE, RMSCE, sharpness; *uncertainty* the mean epistemic std (and mean
    aleatoric std with an aleatoric head); per OOD set OOD AUROC, AUPR-In and FPR@95TPR by the std
    (and by the epistemic std alone with an aleatoric head); counts. A multi-output model is
    reported one output at a time (``output=j``).

    Every metric row has a percentile bootstrap interval over the inputs (``ci_low``,
    ``ci_high``): the inputs are resampled with replacement ``n_resamples`` times (OOD inputs apart
    from the others), the metric is recomputed on each resample with the same function as its value
    (:mod:`mcdrop.metrics.bootstrap`, all resamples at once), and the interval is the
    ``(1 - ci_level)/2`` and ``(1 + ci_level)/2`` quantiles. It is over inputs, not over MC
    samples. The MCE is flagged when its bin holds fewer than 20 inputs, and so are such bins of the
    reliability table (``few_inputs``).

    With ``baseline`` (or a prediction whose ``deterministic`` field holds the dropout-off
    prediction) the summary gets a ``deterministic`` column (with its interval) beside the MC one,
    and the reliability diagram overlays it: whether MC dropout helps is then in the report. With
    ``calibration`` the recalibrator is fitted on the held-out pair and the summary gets a
    ``recalibrated`` column; its fitted temperature (or std factor) is in
    :attr:`UncertaintyReport.recalibration`, the page and ``summary.json``.

    Every value comes from :mod:`mcdrop.metrics`; every row states its exact definition. A metric
    that is undefined for the data (e.g. misclassification AUROC when every prediction is right) is
    NaN and explained in :attr:`UncertaintyReport.notes`.

    Args:
        prediction: A :class:`~mcdrop.ClassificationPrediction` or :class:`~mcdrop.RegressionPrediction`.
        targets: Labels ``(n,)`` (classification) or targets ``(n,)``/``(n, 1)``/``(n, d)``
            (regression); defaults to ``prediction.targets``.
        ood: A prediction of the same model on out-of-distribution inputs (targets not needed; it is
            named ``"ood"``), or a mapping ``{name: prediction}`` of several OOD sets, each reported
            under its name.
        title: The report's title.
        model: The :class:`~mcdrop.MCDropout` that made the prediction; its stochastic sites
            (``describe()``) are shown in the report and saved as ``sites.csv``, and its seed and
            device go into ``summary.json``.
        n_bins: Number of confidence bins of the calibration errors and the reliability diagram.
        level: Nominal coverage of the regression intervals (PICP, MPIW, figures), in ``(0, 1)``.
        sort_by: Column of the per-input table to sort by, largest first (prefix ``"+"`` for
            smallest first; ``"input"`` keeps the input order). Default: most uncertain first,
            ``predictive_entropy`` (classification) or ``total_std`` (regression).
        output: For multi-output regression, the index of the output to report.
        n_resamples: Bootstrap resamples of the intervals (default 1000); 0 for no intervals.
        seed: Seed of the bootstrap resamples (default 0: the same report every time).
        ci_level: Nominal coverage of the intervals, in ``(0, 1)`` (default 0.95).
        baseline: The same model's prediction of the same inputs with dropout off
            (``MCDropout.predict_deterministic``). Default: ``prediction.deterministic`` when set.
            Its OOD rows use each OOD prediction's ``deterministic`` field (NaN, with a note, without).
        calibration: A pair ``(prediction, targets)`` of held-out data (``targets`` may be ``None``
            when the prediction carries them): temperature scaling (classification; needs
            ``keep_samples=True`` on both predictions) or variance scaling (regression) is fitted on
            it and applied to ``prediction`` and the OOD sets.
        metadata: Facts to record in ``summary.json`` and the page, e.g. the input paths
            (``{"data": "test.npz"}``); strings, numbers, booleans, paths, lists and mappings.

    Returns:
        An :class:`UncertaintyReport`.

    Raises:
        InvalidInputError: No targets, targets whose length differs from the prediction's, invalid
            values (e.g. labels out of range), a multi-output regression without ``output``, an
            unknown ``sort_by`` column, a baseline of other inputs, or a malformed ``calibration``.
        InvalidTypeError: ``prediction``, ``ood``, ``baseline``, ``calibration``, ``model`` or
            ``metadata`` of the wrong type.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(),
        ...                           torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)).eval()
        >>> mc = mcdrop.MCDropout(net, n_samples=20, task="regression", seed=0)
        >>> x = torch.randn(50, 4)
        >>> rep = mcdrop.report(mc.predict(x), x.sum(1), title="toy regression")
        >>> rep.summary["metric"].tolist()[:4]
        ['RMSE', 'MAE', 'Gaussian NLL', 'CRPS']
        >>> rep.per_input.columns[:3].tolist()
        ['mean', 'std', 'total_std']
        >>> bool(rep.per_input["total_std"].is_monotonic_decreasing)  # most uncertain first
        True
        >>> row = rep.summary.set_index("metric").loc["RMSE"]
        >>> bool(row.ci_low <= row.value <= row.ci_high)  # 95% bootstrap interval over the inputs
        True
    """
    from mcdrop.wrapper import MCDropout

    if not isinstance(prediction, (ClassificationPrediction, RegressionPrediction)):
        raise InvalidTypeError(
            f"prediction must be a ClassificationPrediction or RegressionPrediction (from "
            f"MCDropout.predict or predict_loader); got {type(prediction).__name__}."
        )
    if not isinstance(title, str):
        raise InvalidTypeError(f"title must be a str; got {type(title).__name__}.")
    n_bins = check_int(n_bins, "n_bins", minimum=1)
    level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
    intervals = _tables.Intervals(
        n_resamples=check_int(n_resamples, "n_resamples", minimum=0),
        seed=check_int(seed, "seed", minimum=0),
        level=check_real(ci_level, "ci_level", low=0.0, high=1.0, low_open=True, high_open=True),
    )
    if output is not None:
        output = check_int(output, "output", minimum=0)
    ood_given = _ood_sets(ood, prediction)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidTypeError(f"metadata must be a mapping {{name: value}}; got {type(metadata).__name__}.")
    meta = _jsonable(dict(metadata or {}), "metadata")
    if baseline is None:
        baseline = getattr(prediction, "deterministic", None)
    if baseline is not None and not isinstance(baseline, type(prediction)):
        raise InvalidTypeError(
            f"baseline must be the same model's {type(prediction).__name__} of the same inputs with dropout "
            f"off (MCDropout.predict_deterministic); got {type(baseline).__name__}."
        )
    if baseline is not None and len(baseline) != len(prediction):
        raise InvalidInputError(
            f"baseline has {len(baseline)} inputs but prediction has {len(prediction)}; the baseline must be "
            "the dropout-off prediction of exactly the same inputs, in order."
        )
    sites = None
    run: dict[str, Any] = {"device": _device_of(prediction), "n_samples": int(prediction.n_samples)}
    if model is not None:
        if not isinstance(model, MCDropout):
            raise InvalidTypeError(
                f"model must be the mcdrop.MCDropout wrapper that made the prediction; got "
                f"{type(model).__name__}. Wrap it: mcdrop.MCDropout(model)."
            )
        sites = model.describe()
        run["seed"] = model.seed
        param = next(iter(model.model.parameters()), None)
        if param is not None:
            run["device"] = str(param.device)
    run["metadata"] = meta

    # recalibrate first: temperature scaling needs the kept samples that the tables drop
    variants_raw: dict[str, tuple[Prediction, dict[str, Prediction | None]]] = {}
    recal_info = None
    recal_notes: list[str] = []
    recalibrator = None
    if calibration is not None:
        recal, recal_ood, recal_info, recal_notes, recalibrator = _recalibrate(
            prediction, ood_given, calibration, output
        )
        variants_raw["recalibrated"] = (recal, recal_ood)
    if baseline is not None:
        base_ood = {name: getattr(o, "deterministic", None) for name, o in ood_given.items()}
        variants_raw = {"deterministic": (baseline, base_ood), **variants_raw}

    pred = _strip(prediction)  # raw samples are not needed: don't copy them
    target = _tables.resolve_targets(pred, targets)
    ood_preds = {name: _strip(o) for name, o in ood_given.items()}
    variants = {
        key: (_strip(p), {n: None if o is None else _strip(o) for n, o in outs.items()})
        for key, (p, outs) in variants_raw.items()
    }
    if isinstance(pred, ClassificationPrediction):
        _tables.check_classification(pred, "prediction")
        for name, o in ood_preds.items():
            _check_same_model(o, pred, f"ood[{name!r}]")
        for key, (p, outs) in variants.items():
            _check_same_model(p, pred, key)
            for name, o in outs.items():
                if o is not None:
                    _check_same_model(o, pred, f"the {key} prediction of ood[{name!r}]")
        tables = _tables.classification_tables(
            pred,
            target,
            ood_preds,
            n_bins,
            intervals,
            variants,  # type: ignore[arg-type]
        )
        default_sort = "predictive_entropy"
        # per_input labels as integers (metrics accepted integer-valued floats)
        target = target.long()
    else:
        pred, target = _tables.select_output(pred, target, output, "prediction")  # type: ignore[arg-type]
        ood_preds = {
            name: _tables.select_output(o, None, output, f"ood[{name!r}]")[0]  # type: ignore[arg-type]
            for name, o in ood_preds.items()
        }
        variants = {
            key: (
                _tables.select_output(p, None, output, key)[0],  # type: ignore[arg-type]
                {
                    n: None if o is None else _tables.select_output(o, None, output, key)[0]  # type: ignore[arg-type]
                    for n, o in outs.items()
                },
            )
            for key, (p, outs) in variants.items()
        }
        assert target is not None
        tables = _tables.regression_tables(
            pred,
            target,
            ood_preds,
            level,
            intervals,
            variants,  # type: ignore[arg-type]
        )
        default_sort = "total_std"
    counts = _tables.counts_of(pred, ood_preds)
    tables.summary = _tables.with_counts(tables.summary, counts)
    tables.notes += recal_notes
    tables.notes += _adaptive_run(run, pred, counts, model)
    tables.per_input, sort_text = _sort_per_input(tables.per_input, sort_by, default_sort)
    return UncertaintyReport(
        title=title,
        prediction=pred,
        targets=target,
        tables=tables,
        ood=ood_preds or None,
        sites=sites,
        n_bins=n_bins,
        level=level,
        sort_by=sort_text,
        intervals=intervals,
        counts=counts,
        recalibration=recal_info,
        run=run,
        predictions={"mc": pred, **{key: p for key, (p, _) in variants.items()}},
        recalibrator=recalibrator,
    )


def compare(
    reports: Sequence[UncertaintyReport] | Mapping[str, UncertaintyReport] | Iterable[UncertaintyReport],
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The summaries of several reports side by side: one row per metric, one column per report.

    Use it for before/after recalibration, N = 10 against N = 100 samples, two models, ... Rows
    keep the order of the first report, then any metric only later reports have, with the counts
    last; a metric a report lacks (e.g. OOD rows) is NaN in its column. The first column, ``group``,
    is the metric's group in the summaries. A report with a deterministic baseline adds the column
    ``"<name> (deterministic)"`` before its own, one with ``calibration=`` the column
    ``"<name> (recalibrated)"`` after it. The last column, ``intervals_overlap``, says whether
    the reports' bootstrap intervals of the metric (of their MC columns) have a point in common (for
    two reports: whether they overlap); ``None`` where a report has no interval for it. Overlapping
    intervals do not show that two values are equal, and disjoint 95% intervals are a conservative
    sign of a difference (the reports' inputs are resampled independently).

    Args:
        reports: Reports of the same task, as a sequence, or a mapping ``{name: report}``.
        names: Column names, one per report (unique). Default: the mapping's keys, else the reports'
            titles when they are distinct, else ``"report 1"``, ``"report 2"``, ...

    Returns:
        A DataFrame indexed by ``metric``: the object column ``group``, float columns per report
        (counts as floats too), and the object column ``intervals_overlap`` (``True``, ``False`` or
        ``None``).

    Raises:
        InvalidInputError: No reports, reports of different tasks, or names of the wrong number, not
            unique, or ``"group"``/``"intervals_overlap"``.
        InvalidTypeError: An element that is not an :class:`UncertaintyReport`.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)).eval()
        >>> x, y = torch.randn(30, 2), torch.randint(0, 2, (30,))
        >>> reps = [mcdrop.report(mcdrop.MCDropout(net, n_samples=n, seed=0).predict(x), y) for n in (5, 50)]
        >>> table = mcdrop.compare(reps, names=["N=5", "N=50"])
        >>> table.columns.tolist(), table.loc["n_samples", ["N=5", "N=50"]].tolist()
        (['group', 'N=5', 'N=50', 'intervals_overlap'], [5.0, 50.0])
        >>> table.loc["accuracy", "intervals_overlap"], table.loc["n_samples", "intervals_overlap"]
        (True, None)
    """
    if isinstance(reports, Mapping):
        if names is not None:
            raise InvalidInputError("give names either as the mapping's keys or as names=, not both.")
        names = [str(k) for k in reports.keys()]
        items = list(reports.values())
    else:
        items = list(reports)
    if not items:
        raise InvalidInputError("compare needs at least one report.")
    for i, rep in enumerate(items):
        if not isinstance(rep, UncertaintyReport):
            raise InvalidTypeError(
                f"reports[{i}] is a {type(rep).__name__}, not an UncertaintyReport; build it with mcdrop.report(...)."
            )
    tasks = sorted({rep.task for rep in items})
    if len(tasks) > 1:
        raise InvalidInputError(
            f"compare needs reports of one task; got {' and '.join(tasks)} reports, whose metrics differ."
        )
    if names is None:
        titles = [rep.title for rep in items]
        names = titles if len(set(titles)) == len(titles) else [f"report {i + 1}" for i in range(len(items))]
    names = [str(n) for n in names]
    if len(names) != len(items):
        raise InvalidInputError(
            f"names has {len(names)} entries for {len(items)} reports; give one name per report."
        )
    for reserved in ("intervals_overlap", "group"):
        if reserved in names:
            raise InvalidInputError(f"{reserved!r} is a column of the table; choose another report name.")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidInputError(
            f"names must be unique (they become columns); repeated: {_render.names_list(dupes)}."
        )
    order: list[str] = []
    groups: dict[str, str] = {}
    for rep in items:
        for group, metric in zip(rep.summary["group"], rep.summary["metric"], strict=True):
            if metric not in groups:
                order.append(metric)
                groups[metric] = str(group)
    order = [m for m in order if groups[m] != _tables.COUNTS] + [
        m for m in order if groups[m] == _tables.COUNTS
    ]
    frame = pd.DataFrame(
        {"group": pd.Series([groups[m] for m in order], index=order, dtype=object)},
        index=pd.Index(order, name="metric"),
    )
    for name, rep in zip(names, items, strict=True):
        indexed = rep.summary.set_index("metric")
        for key in _tables.VARIANTS[:1]:  # the deterministic column goes before the MC one
            if key in indexed.columns:
                frame[f"{name} ({key})"] = indexed[key].astype(float).reindex(order)
        frame[name] = indexed["value"].astype(float).reindex(order)
        for key in _tables.VARIANTS[1:]:
            if key in indexed.columns:
                frame[f"{name} ({key})"] = indexed[key].astype(float).reindex(order)
    frame.columns.name = None
    lows = pd.DataFrame(
        {
            n: rep.summary.set_index("metric")["ci_low"].astype(float).reindex(order)
            for n, rep in zip(names, items, strict=True)
        }
    )
    highs = pd.DataFrame(
        {
            n: rep.summary.set_index("metric")["ci_high"].astype(float).reindex(order)
            for n, rep in zip(names, items, strict=True)
        }
    )
    known = lows.notna().all(axis=1) & highs.notna().all(axis=1)
    overlap = lows.max(axis=1) <= highs.min(axis=1)
    frame["intervals_overlap"] = pd.Series(
        [bool(o) if k else None for o, k in zip(overlap, known, strict=True)], index=frame.index, dtype=object
    )
    return frame
