"""``mcdrop.report(...)``, the :class:`UncertaintyReport` it returns, and ``mcdrop.compare(...)``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import seaborn as sns

from mcdrop._checks import check_int, check_real
from mcdrop.errors import InvalidInputError, InvalidTypeError, ReportExistsError
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
        ood: The out-of-distribution prediction, prepared the same way, or ``None``.
        sites: The stochastic sites of the model (``MCDropout.describe()``), or ``None``.
        n_bins: Number of confidence bins the classification tables were computed with; the
            reliability diagram and the page use it too.
        level: Nominal coverage of the regression intervals the tables were computed with, in
            ``(0, 1)``; the interval and residual figures use it too.
        sort_by: How :attr:`per_input` is sorted, in words (e.g. ``"total_std (largest first)"``
            or ``"input order"``); shown in the HTML page and saved in ``summary.json``.
        intervals: How the summary's bootstrap intervals were computed (an internal ``Intervals``
            record: ``n_resamples``, ``seed``, ``level``); default: 1000 resamples, seed 0, 95%.

    Attributes:
        title: The report's title.
        task: ``"classification"`` or ``"regression"``.
        summary: One row per metric, columns ``metric, value, ci_low, ci_high, definition,
            higher_is_better, flag``: ``ci_low``/``ci_high`` the percentile bootstrap interval over
            inputs (NaN for counts, undefined values, or without intervals); ``higher_is_better`` is
            ``None`` for descriptive rows such as counts; ``flag`` says why a value is fragile (an
            MCE resting on a bin of fewer than 20 inputs), else ``""``.
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
        ood: The out-of-distribution prediction, or ``None``.
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
        >>> rep = mcdrop.report(mc.predict(x), y, ood=mc.predict(3 * torch.randn(20, 4)), model=mc)
        >>> rep
        UncertaintyReport(task='classification', n_inputs=40, n_samples=10, n_ood=20, metrics=22)
        >>> list(rep.summary.columns)
        ['metric', 'value', 'ci_low', 'ci_high', 'definition', 'higher_is_better', 'flag']
        >>> rep.figure_names
        ('reliability', 'confidence', 'uncertainty', 'risk_coverage', 'ood')
        >>> rep.sort_by, rep.n_bins, rep.level
        ('predictive_entropy (largest first)', 15, 0.95)
    """

    def __init__(
        self,
        *,
        title: str,
        prediction: Prediction,
        targets: Any,
        tables: _tables.Tables,
        ood: Prediction | None,
        sites: pd.DataFrame | None,
        n_bins: int,
        level: float,
        sort_by: str,
        intervals: _tables.Intervals | None = None,
    ) -> None:
        intervals = intervals or _tables.Intervals()
        self.title = title
        self.task = prediction.task
        self.prediction = prediction
        self.targets = targets
        self.ood = ood
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
        self.created = datetime.now().astimezone()
        self.version = _version()
        self._data = tables.data

    # ------------------------------------------------------------------ facts
    @property
    def n_inputs(self) -> int:
        """Number of evaluated inputs."""
        return len(self.prediction)

    @property
    def n_samples(self) -> int:
        """Number of MC dropout passes per input."""
        return int(self.prediction.n_samples)

    @property
    def n_ood(self) -> int | None:
        """Number of out-of-distribution inputs, or ``None`` without OOD data."""
        return None if self.ood is None else len(self.ood)

    @property
    def metrics(self) -> dict[str, float]:
        """The summary as a ``{metric: value}`` dict.

        Example:
            >>> import torch, mcdrop
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
            >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(10, 2))
            >>> rep = mcdrop.report(pred, torch.zeros(10, dtype=torch.long))
            >>> rep.metrics["n_inputs"]
            10.0
        """
        return dict(zip(self.summary["metric"], self.summary["value"].astype(float), strict=True))

    @property
    def figure_names(self) -> tuple[str, ...]:
        """Names of the report's figures, in display order (each is saved as ``<name>.png``)."""
        if self.task == "classification":
            names = ["reliability", "confidence", "uncertainty", "risk_coverage"]
        else:
            names = ["calibration", "intervals", "residuals"] if self._data["std_ok"] else []
        if self.ood is not None:
            names.append("ood")
        return tuple(names)

    @property
    def figure_captions(self) -> dict[str, str]:
        """One sentence per figure saying what it shows."""
        pct = f"{self.level * 100:g}%"
        captions = {
            "reliability": (
                f"Accuracy against top-label confidence in {self.n_bins} equal-width bins; hatched: the gap "
                "to the bin's mean confidence; dashed: perfect calibration; bottom strip: fraction of inputs "
                "per bin. Title: ECE."
            ),
            "confidence": (
                "Top-label confidence of right and wrong predictions (stacked), with the accuracy and the "
                "mean confidence: a mean confidence right of the accuracy is over-confidence."
            ),
            "uncertainty": (
                "Distributions of the predictive entropy (total uncertainty) and the mutual information "
                "(epistemic part), in nats."
            ),
            "risk_coverage": (
                "Selective risk (error rate of the kept inputs) when the most uncertain inputs are rejected "
                "first, ranked by predictive entropy and by mutual information; dashed: the oracle. "
                "Legend: AURC."
            ),
            "calibration": (
                "Observed against expected coverage of the central predictive intervals at 100 levels; "
                "shaded: the miscalibration area. Below the diagonal the intervals are too narrow."
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
        if self.task == "classification":
            captions["ood"] = (
                "Predictive entropy (left) and mutual information (right) on in-distribution and "
                "out-of-distribution inputs, with the OOD AUROC of each."
            )
        else:
            captions["ood"] = (
                "Predicted std on in-distribution and out-of-distribution inputs, with the OOD AUROC."
            )
        return {name: captions[name] for name in self.figure_names}

    def __repr__(self) -> str:
        ood = "" if self.ood is None else f", n_ood={self.n_ood}"
        return (
            f"UncertaintyReport(task={self.task!r}, n_inputs={self.n_inputs}, n_samples={self.n_samples}"
            f"{ood}, metrics={len(self.summary)})"
        )

    # ------------------------------------------------------------------ figures
    def _draw(self, name: str, fig: Figure) -> None:
        d = self._data
        if name == "ood":
            if self.task == "classification":
                left, right = fig.subplots(1, 2)
                figures.ood_histogram(
                    d["entropy"], d["ood_entropy"], score_name="predictive entropy (nats)", ax=left
                )
                figures.ood_histogram(d["mi"], d["ood_mi"], score_name="mutual information (nats)", ax=right)
            else:
                scores = d["ood_scores"]
                axes = fig.subplots(1, len(scores), squeeze=False)[0]
                for ax, (tag, (s_in, s_out)) in zip(axes, scores.items(), strict=True):
                    figures.ood_histogram(s_in, s_out, score_name=f"predicted {tag}", ax=ax)
            return
        ax = fig.add_subplot()
        if name == "reliability":
            figures.reliability_diagram(d["probs"], d["labels"], n_bins=self.n_bins, ax=ax)
        elif name == "confidence":
            figures.confidence_histogram(d["probs"], d["labels"], ax=ax)
        elif name == "uncertainty":
            figures.uncertainty_histogram(d["entropy"], d["mi"], ax=ax)
        elif name == "risk_coverage":
            scores = {"predictive entropy": d["entropy"], "mutual information": d["mi"]}
            figures.risk_coverage_plot(scores, d["errors"], ax=ax)
        elif name == "calibration":
            figures.regression_calibration_plot(d["mean"], d["std"], d["targets"], ax=ax)
        elif name == "intervals":
            figures.ordered_intervals_plot(d["mean"], d["std"], d["targets"], level=self.level, ax=ax)
        elif name == "residuals":
            figures.residuals_vs_std_plot(d["mean"], d["std"], d["targets"], level=self.level, ax=ax)
        else:  # pragma: no cover - guarded by figure()
            raise AssertionError(name)

    def _figsize(self, name: str) -> tuple[float, float]:
        if name == "ood":
            n_panels = 2 if self.task == "classification" or len(self._data["ood_scores"]) > 1 else 1
            return (6.0 * n_panels, 4.5)
        return {"reliability": (5.5, 6.2), "calibration": (5.5, 5.2), "intervals": (7.5, 4.5)}.get(
            name, (6.5, 4.5)
        )

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

        rows = [
            {
                "metric": str(r.metric),
                "value": clean(float(r.value)),
                "ci_low": clean(float(r.ci_low)),
                "ci_high": clean(float(r.ci_high)),
                "definition": str(r.definition),
                "higher_is_better": None if r.higher_is_better is None else bool(r.higher_is_better),
                "flag": str(r.flag),
            }
            for r in self.summary.itertuples(index=False)
        ]
        payload = {
            "generator": _GENERATOR,
            "mcdrop_version": self.version,
            "title": self.title,
            "created": self.created.isoformat(timespec="seconds"),
            "task": self.task,
            "n_inputs": self.n_inputs,
            "n_samples": self.n_samples,
            "n_ood": self.n_ood,
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
            "metrics": {row["metric"]: row["value"] for row in rows},
            "intervals": {row["metric"]: [row["ci_low"], row["ci_high"]] for row in rows},
            "summary": rows,
            "notes": self.notes,
            "figures": self.figure_captions,
            "files": files,
        }
        return json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

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

            write("summary.csv", lambda p: self.summary.to_csv(p, index=False))
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


def report(
    prediction: Prediction,
    targets: Any = None,
    *,
    ood: Prediction | None = None,
    title: str = "mcdrop uncertainty report",
    model: Any = None,
    n_bins: int = 15,
    level: float = 0.95,
    sort_by: str | None = None,
    output: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> UncertaintyReport:
    """Build the uncertainty report of a prediction: metrics, per-input table, calibration, figures.

    Classification (``probs`` of shape ``(n, K)``) summary rows: accuracy, NLL, Brier, ECE, MCE,
    adaptive ECE, classwise ECE (all with ``n_bins`` bins), AURC and E-AURC (inputs ranked by
    predictive entropy), misclassification AUROC by predictive entropy and by mutual information,
    the mean predictive entropy and mutual information, ``n_inputs`` and ``n_samples``; with
    ``ood``: OOD AUROC, AUPR-In and FPR@95TPR by predictive entropy and by mutual information, and
    ``n_ood``.

    Regression (``mean`` of shape ``(n,)`` or ``(n, 1)``; Gaussian with the total std ``σ``):
    RMSE, MAE, Gaussian NLL, CRPS, PICP and MPIW at ``level``, miscalibration area, MACE, RMSCE,
    sharpness, the mean epistemic std (and mean aleatoric std with an aleatoric head), counts;
    with ``ood``: OOD AUROC, AUPR-In and FPR@95TPR by the std (and by the epistemic std alone with
    an aleatoric head). A multi-output model is reported one output at a time (``output=j``).

    Every metric row but the counts has a percentile bootstrap interval over the inputs
    (``ci_low``, ``ci_high``): the inputs are resampled with replacement ``n_resamples`` times
    (OOD inputs apart from the others), the metric is recomputed on each resample with the same
    function as its value (:mod:`mcdrop.metrics.bootstrap`, all resamples at once), and the interval
    is the ``(1 - ci_level)/2`` and ``(1 + ci_level)/2`` quantiles. It is over inputs, not over MC
    samples. The MCE is flagged when its bin holds fewer than 20 inputs, and so are such bins of
    the reliability table (``few_inputs``).

    Every value comes from :mod:`mcdrop.metrics`; every row states its exact definition. A metric
    that is undefined for the data (e.g. misclassification AUROC when every prediction is right) is
    NaN and explained in :attr:`UncertaintyReport.notes`.

    Args:
        prediction: A :class:`~mcdrop.ClassificationPrediction` or :class:`~mcdrop.RegressionPrediction`.
        targets: Labels ``(n,)`` (classification) or targets ``(n,)``/``(n, 1)``/``(n, d)``
            (regression); defaults to ``prediction.targets``.
        ood: A prediction of the same model on out-of-distribution inputs (targets not needed).
        title: The report's title.
        model: The :class:`~mcdrop.MCDropout` that made the prediction; its stochastic sites
            (``describe()``) are shown in the report and saved as ``sites.csv``.
        n_bins: Number of confidence bins of the calibration errors and the reliability diagram.
        level: Nominal coverage of the regression intervals (PICP, MPIW, figures), in ``(0, 1)``.
        sort_by: Column of the per-input table to sort by, largest first (prefix ``"+"`` for
            smallest first; ``"input"`` keeps the input order). Default: most uncertain first,
            ``predictive_entropy`` (classification) or ``total_std`` (regression).
        output: For multi-output regression, the index of the output to report.
        n_resamples: Bootstrap resamples of the intervals (default 1000); 0 for no intervals.
        seed: Seed of the bootstrap resamples (default 0: the same report every time).
        ci_level: Nominal coverage of the intervals, in ``(0, 1)`` (default 0.95).

    Returns:
        An :class:`UncertaintyReport`.

    Raises:
        InvalidInputError: No targets, targets whose length differs from the prediction's, invalid
            values (e.g. labels out of range), an ``ood`` of another task, a multi-output regression
            without ``output``, or an unknown ``sort_by`` column.
        InvalidTypeError: ``prediction``, ``ood`` or ``model`` of the wrong type.

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
    if ood is not None and not isinstance(ood, type(prediction)):
        raise InvalidTypeError(
            f"ood must be a prediction of the same task as prediction ({type(prediction).__name__}, made by "
            f"the same model on out-of-distribution inputs); got {type(ood).__name__}."
        )
    sites = None
    if model is not None:
        if not isinstance(model, MCDropout):
            raise InvalidTypeError(
                f"model must be the mcdrop.MCDropout wrapper that made the prediction; got "
                f"{type(model).__name__}. Wrap it: mcdrop.MCDropout(model)."
            )
        sites = model.describe()

    pred = replace(prediction, samples=None).cpu()  # raw samples are not needed: don't copy them
    target = _tables.resolve_targets(pred, targets)
    ood_pred = None if ood is None else replace(ood, samples=None).cpu()
    if isinstance(pred, ClassificationPrediction):
        _tables.check_classification(pred, "prediction")
        if ood_pred is not None:
            assert isinstance(ood_pred, ClassificationPrediction)
            _tables.check_classification(ood_pred, "ood")
            if ood_pred.n_classes != pred.n_classes:
                raise InvalidInputError(
                    f"ood has {ood_pred.n_classes} classes but prediction has {pred.n_classes}; both must come "
                    "from the same model."
                )
        tables = _tables.classification_tables(pred, target, ood_pred, n_bins, intervals)
        default_sort = "predictive_entropy"
        # per_input labels as integers (metrics accepted integer-valued floats)
        target = target.long()
    else:
        pred, target = _tables.select_output(pred, target, output, "prediction")  # type: ignore[arg-type]
        if ood_pred is not None:
            ood_pred, _ = _tables.select_output(ood_pred, None, output, "ood")  # type: ignore[arg-type]
        assert target is not None
        tables = _tables.regression_tables(pred, target, ood_pred, level, intervals)  # type: ignore[arg-type]
        default_sort = "total_std"
    tables.per_input, sort_text = _sort_per_input(tables.per_input, sort_by, default_sort)
    return UncertaintyReport(
        title=title,
        prediction=pred,
        targets=target,
        tables=tables,
        ood=ood_pred,
        sites=sites,
        n_bins=n_bins,
        level=level,
        sort_by=sort_text,
        intervals=intervals,
    )


def compare(
    reports: Sequence[UncertaintyReport] | Mapping[str, UncertaintyReport] | Iterable[UncertaintyReport],
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The summaries of several reports side by side: one row per metric, one column per report.

    Use it for before/after recalibration, N = 10 against N = 100 samples, two models, ... Rows
    keep the order of the first report, then any metric only later reports have; a metric a report
    lacks (e.g. OOD rows) is NaN in its column. The last column, ``intervals_overlap``, says whether
    the reports' bootstrap intervals of the metric have a point in common (for two reports: whether
    they overlap); ``None`` where a report has no interval for it. Overlapping intervals do not
    show that two values are equal, and disjoint 95% intervals are a conservative sign of a
    difference (the reports' inputs are resampled independently).

    Args:
        reports: Reports of the same task, as a sequence, or a mapping ``{name: report}``.
        names: Column names, one per report (unique). Default: the mapping's keys, else the reports'
            titles when they are distinct, else ``"report 1"``, ``"report 2"``, ...

    Returns:
        A DataFrame indexed by ``metric`` with one float column per report and the object column
        ``intervals_overlap`` (``True``, ``False`` or ``None``).

    Raises:
        InvalidInputError: No reports, reports of different tasks, or names of the wrong number or
            not unique.
        InvalidTypeError: An element that is not an :class:`UncertaintyReport`.

    Example:
        >>> import torch, mcdrop
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)).eval()
        >>> x, y = torch.randn(30, 2), torch.randint(0, 2, (30,))
        >>> reps = [mcdrop.report(mcdrop.MCDropout(net, n_samples=n, seed=0).predict(x), y) for n in (5, 50)]
        >>> table = mcdrop.compare(reps, names=["N=5", "N=50"])
        >>> table.columns.tolist(), table.loc["n_samples", ["N=5", "N=50"]].tolist()
        (['N=5', 'N=50', 'intervals_overlap'], [5.0, 50.0])
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
    if "intervals_overlap" in names:
        raise InvalidInputError(
            "'intervals_overlap' is the column of the intervals; choose another report name."
        )
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidInputError(
            f"names must be unique (they become columns); repeated: {_render.names_list(dupes)}."
        )
    order: list[str] = []
    for rep in items:
        order.extend(m for m in rep.summary["metric"] if m not in order)
    columns = {
        name: rep.summary.set_index("metric")["value"].astype(float).reindex(order)
        for name, rep in zip(names, items, strict=True)
    }
    frame = pd.DataFrame(columns, index=pd.Index(order, name="metric"))
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
