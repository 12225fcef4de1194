"""Logging an :class:`~mcdrop.UncertaintyReport` to an experiment tracker: TensorBoard, MLflow, Lightning.

:func:`log_report` (also :meth:`UncertaintyReport.log_to <mcdrop.UncertaintyReport.log_to>`) sends a
report's metrics as scalars, its figures as images and its summary as a table to one of:

* a TensorBoard ``torch.utils.tensorboard.SummaryWriter``: scalars (``add_scalar``), figures as RGB
  images (``add_image``, rendered with matplotlib's Agg canvas; no pyplot state is touched) and the
  summary as a Markdown table (``add_text``, shown by TensorBoard's text plugin);
* an MLflow run: the module ``mlflow`` itself (the active run, as ``mlflow.log_metric`` would log
  to; with no active run a clear error, never a run started on the sly), an ``mlflow.ActiveRun``
  (what ``mlflow.start_run()`` returns), or an ``mlflow.MlflowClient`` with ``run_id=``. Scalars go
  in one ``log_batch``, figures as PNG artifacts (``log_figure``) and the summary as an MLflow table
  (``log_table``, a JSON artifact the UI shows as a table);
* a Lightning logger (``TensorBoardLogger``, ``MLFlowLogger``, ``CSVLogger``, or any other logger
  of ``lightning.pytorch``/``pytorch_lightning``): scalars through its ``log_metrics``; figures and
  the table too where its ``experiment`` is a ``SummaryWriter`` (TensorBoardLogger) or an
  ``MlflowClient`` (MLFlowLogger), as above. A ``CSVLogger`` gets the scalars only;
* a list or tuple of the above (e.g. ``trainer.loggers``): each one in turn.

Names: metric ``m`` becomes the key ``prefix + metric_key(m)``: spaces and characters that trackers
refuse (MLflow accepts only letters, digits and ``_ - . /``) become ``_``, ``%`` becomes ``pct``
and ``@`` ``at`` (``"misclassification AUROC (entropy)"`` is ``mc/misclassification_AUROC_entropy``,
``"PICP (95%)"`` is ``mc/PICP_95pct``). Figures are logged as ``prefix + name`` (TensorBoard) or
as the artifact ``<prefix>/<name>.png`` (MLflow; ``<prefix>/step_<step>/<name>.png`` with a step).

Variants: a report made with a dropout-off baseline (``mcdrop.report(..., baseline=...)``, or a
prediction from ``predict_loader(..., deterministic=True)``) or a calibration set has the summary
columns ``deterministic`` and ``recalibrated`` beside the MC ``value``. Their metrics are logged as
scalars too, under ``prefix + variant + "/" + metric_key(m)``: ``mc/ECE`` (MC dropout),
``mc/deterministic/ECE`` (dropout off), ``mc/recalibrated/ECE`` (MC after temperature scaling), so
a dashboard can plot the three side by side. Counts (``n_inputs``...) are logged for MC only.

The summary table holds every row of ``report.summary`` with its ``group`` (classification,
calibration, ...), the MC value and its bootstrap interval, the variants' values and intervals when
the report has them (dropout off before MC, recalibrated after, as in the report's HTML) and the
flag. TensorBoard gets it as Markdown; MLflow as the summary DataFrame itself (every column).

NaN: a metric that is undefined for the data (NaN, explained in ``report.notes``) is **not** logged
as a scalar. TensorBoard would plot it as a gap, but MLflow's stores, Lightning's checkpoint
monitors and most dashboards treat a NaN point as a value; leaving it out means "not defined at
this step". The summary table (TensorBoard text, MLflow table) keeps every row, NaN included.

Nothing here imports TensorBoard, MLflow or Lightning: an object of theirs can only be passed in once
they are imported, and that is when it is recognised.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mcdrop._checks import check_int
from mcdrop.errors import InvalidInputError, InvalidTypeError
from mcdrop.report._tables import COUNTS, VARIANTS

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from mcdrop.report._report import UncertaintyReport

__all__ = ["SUPPORTED", "log_report", "metric_key", "report_values"]

#: What :func:`log_report` accepts, in words (the error for anything else lists it).
SUPPORTED = (
    "torch.utils.tensorboard.SummaryWriter",
    "the mlflow module (with an active run)",
    "mlflow.ActiveRun",
    "mlflow.MlflowClient (with run_id=)",
    "a Lightning logger (lightning.pytorch.loggers: TensorBoardLogger, MLFlowLogger, CSVLogger, ...)",
    "a list or tuple of these",
)

_REFUSED = re.compile(r"[^A-Za-z0-9_./-]+")


def metric_key(name: str, prefix: str = "mc/") -> str:
    """The key a report metric is logged under: ``prefix`` plus the name with only safe characters.

    Args:
        name: A metric of the report's summary (``"ECE"``, ``"PICP (95%)"``...).
        prefix: Put before it (default ``"mc/"``).

    Returns:
        ``prefix`` + the name with ``%`` as ``pct``, ``@`` as ``at`` and every run of characters
        other than letters, digits, ``_ . / -`` as one ``_`` (none at the ends).

    Example:
        >>> from mcdrop.report.trackers import metric_key
        >>> metric_key("misclassification AUROC (entropy)")
        'mc/misclassification_AUROC_entropy'
        >>> metric_key("PICP (95%)"), metric_key("OOD FPR@95TPR (MI)", prefix="val/")
        ('mc/PICP_95pct', 'val/OOD_FPR_at_95TPR_MI')
    """
    text = str(name).replace("%", "pct").replace("@", "_at_")
    return prefix + _REFUSED.sub("_", text).strip("_")


def report_values(report: UncertaintyReport, variant: str | None = None) -> dict[str, float]:
    """Every value of a report's summary by name: its metrics, then its counts (``n_inputs``...).

    Args:
        report: The :class:`~mcdrop.UncertaintyReport`.
        variant: ``None``: the MC dropout values (the summary's ``value`` column). ``"deterministic"``
            or ``"recalibrated"``: that column of a report made with a baseline or a calibration
            set, its metrics only (its counts are the MC one's, or one pass per input).

    Returns:
        ``{name: value}`` (NaN where a metric is undefined), the names as in ``report.summary``.

    Raises:
        InvalidInputError: ``variant`` is not a column of this report (the message lists those it has).

    Example:
        >>> import torch, mcdrop
        >>> from mcdrop.report.trackers import report_values
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
        >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(10, 2))
        >>> values = report_values(mcdrop.report(pred, torch.zeros(10, dtype=torch.long), n_resamples=0))
        >>> values["n_inputs"], values["n_samples"], "ECE" in values
        (10.0, 5.0, True)
    """
    if variant is not None:
        present = _variants(report)
        if variant not in present:
            raise InvalidInputError(
                f"the report has no {variant!r} column; it has {present or 'none'} (a deterministic "
                "baseline comes from mcdrop.report(..., baseline=...), a recalibrated one from "
                "calibration=...)."
            )
        rows = report.summary[report.summary["group"] != COUNTS]
        return {str(m): float(v) for m, v in zip(rows["metric"], rows[variant], strict=True)}
    values = {name: float(value) for name, value in report.metrics.items()}
    for name, count in (getattr(report, "counts", None) or {}).items():
        values.setdefault(name, float(count))
    return values


def _variants(report: UncertaintyReport) -> list[str]:
    """The variant columns (:data:`VARIANTS`) the report's summary holds, in display order."""
    return [key for key in VARIANTS if key in report.summary.columns]


def _finite_scalars(report: UncertaintyReport, prefix: str) -> dict[str, float]:
    """MC values as ``prefix + metric``, each variant's as ``prefix + variant + "/" + metric``."""
    out = {metric_key(k, prefix): v for k, v in report_values(report).items() if math.isfinite(v)}
    for variant in _variants(report):
        values = report_values(report, variant)
        out.update({metric_key(k, f"{prefix}{variant}/"): v for k, v in values.items() if math.isfinite(v)})
    return out


def _summary_markdown(report: UncertaintyReport) -> str:
    level = f"{report.ci_level * 100:g}%"
    variants = _variants(report)
    labels = getattr(report, "variants", None) or {}
    # value columns in display order: dropout off, MC, recalibrated (each with its interval)
    columns = (
        [v for v in variants if v == VARIANTS[0]] + ["value"] + [v for v in variants if v != VARIANTS[0]]
    )
    header = ["group", "metric"]
    for column in columns:
        name = "MC" if column == "value" and variants else column
        header += [name, f"{name} {level} interval" if variants else f"{level} interval"]
    header.append("flag")
    lines = [
        f"**{report.title}**: {report.task}, {report.n_inputs} inputs, {report.n_samples} MC samples",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def fmt(value: float) -> str:
        return "NaN" if not math.isfinite(value) else f"{value:.6g}"

    def interval(low: float, high: float) -> str:
        return "" if not (math.isfinite(low) and math.isfinite(high)) else f"[{fmt(low)}, {fmt(high)}]"

    for row in report.summary.to_dict("records"):
        cells = [str(row["group"]), str(row["metric"])]
        for column in columns:
            stem = "" if column == "value" else column + "_"
            cells += [
                fmt(float(row[column])),
                interval(float(row[stem + "ci_low"]), float(row[stem + "ci_high"])),
            ]
        cells.append(str(row["flag"]))
        lines.append("| " + " | ".join(cells) + " |")
    for variant in variants:
        if variant in labels:
            lines.append("")
            lines.append(f"Column {variant}: {labels[variant]}.")
    for note in report.notes:
        lines.append("")
        lines.append(f"Note: {note}")
    return "\n".join(lines)


def _rgb(fig: Figure) -> Any:
    """The figure as an ``(H, W, 3)`` uint8 array, drawn on its own Agg canvas."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _class_in(obj: Any, modules: Sequence[str], name: str) -> bool:
    """Whether ``obj`` is an instance of ``module.name`` for one of the (already imported) modules."""
    for module in modules:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(obj, cls):
            return True
    return False


def _is_summary_writer(obj: Any) -> bool:
    return _class_in(obj, ("torch.utils.tensorboard.writer", "tensorboardX.writer"), "SummaryWriter")


def _is_mlflow_client(obj: Any) -> bool:
    return _class_in(obj, ("mlflow.tracking.client", "mlflow.client"), "MlflowClient")


def _is_lightning_logger(obj: Any) -> bool:
    modules = ("lightning.fabric.loggers.logger", "lightning_fabric.loggers.logger")
    return _class_in(obj, modules, "Logger") or _class_in(
        obj, ("lightning.pytorch.loggers.logger", "pytorch_lightning.loggers.logger"), "Logger"
    )


def _to_tensorboard(
    report: UncertaintyReport, writer: Any, step: int | None, prefix: str, scalars: bool
) -> None:
    if scalars:
        for key, value in _finite_scalars(report, prefix).items():
            writer.add_scalar(key, value, global_step=step)
    for name in report.figure_names:
        writer.add_image(prefix + name, _rgb(report.figure(name)), global_step=step, dataformats="HWC")
    writer.add_text(prefix + "summary", _summary_markdown(report), global_step=step)
    writer.flush()


def _mlflow_run(logger: Any, run_id: str | None) -> tuple[Any, str]:
    """``(MlflowClient, run id)`` for the mlflow module, an ActiveRun or a client."""
    mlflow = sys.modules.get("mlflow")
    if logger is mlflow:
        run = mlflow.active_run()
        if run is None:
            raise InvalidInputError(
                "log_to(mlflow) logs to the active MLflow run, and none is active; start one with "
                "`with mlflow.start_run(): report.log_to(mlflow)`, or pass an MlflowClient with run_id=."
            )
        return mlflow.MlflowClient(), run.info.run_id
    if _is_mlflow_client(logger):
        if not isinstance(run_id, str) or not run_id:
            raise InvalidInputError(
                "an MlflowClient needs the run to log to: pass run_id= (e.g. run.info.run_id); or pass the "
                "mlflow module (its active run) or the ActiveRun itself."
            )
        return logger, run_id
    return mlflow.MlflowClient(), logger.info.run_id  # an ActiveRun


def _to_mlflow(
    report: UncertaintyReport, client: Any, run_id: str, step: int | None, prefix: str, scalars: bool
) -> None:
    import time

    from mlflow.entities import Metric

    if scalars:
        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key=k, value=v, timestamp=stamp, step=step or 0)
            for k, v in _finite_scalars(report, prefix).items()
        ]
        client.log_batch(run_id, metrics=metrics)
    folder = prefix.strip("/") or "mcdrop"
    if step is not None:
        folder = f"{folder}/step_{step}"
    for name in report.figure_names:
        client.log_figure(run_id, report.figure(name), f"{folder}/{name}.png")
    table = report.summary.copy()
    table["higher_is_better"] = table["higher_is_better"].map(lambda v: "" if v is None else str(bool(v)))
    with warnings.catch_warnings():  # MLflow's own use of select_dtypes, deprecated by pandas 3
        warnings.filterwarnings("ignore", message=".*select_dtypes.*")
        client.log_table(run_id, data=table, artifact_file=f"{folder}/summary.json")


def _kind(logger: Any) -> str:
    """``"tensorboard"``, ``"mlflow"`` or ``"lightning"``; anything else is refused, listing what is supported."""
    mlflow = sys.modules.get("mlflow")
    if _is_summary_writer(logger):
        return "tensorboard"
    if mlflow is not None and (
        logger is mlflow
        or _is_mlflow_client(logger)
        or _class_in(logger, ("mlflow.tracking.fluent",), "ActiveRun")
    ):
        return "mlflow"
    if _is_lightning_logger(logger):
        return "lightning"
    raise InvalidTypeError(
        f"cannot log an uncertainty report to a {type(logger).__module__}.{type(logger).__qualname__}; "
        f"supported: {'; '.join(SUPPORTED)}."
    )


def _log_one(
    report: UncertaintyReport, logger: Any, step: int | None, prefix: str, run_id: str | None
) -> None:
    kind = _kind(logger)
    if kind == "tensorboard":
        _to_tensorboard(report, logger, step, prefix, scalars=True)
    elif kind == "mlflow":
        client, rid = _mlflow_run(logger, run_id)
        _to_mlflow(report, client, rid, step, prefix, scalars=True)
    else:
        logger.log_metrics(_finite_scalars(report, prefix), step=step)
        experiment = logger.experiment  # a stand-in on ranks other than 0: figures are then skipped
        if _is_summary_writer(experiment):
            _to_tensorboard(report, experiment, step, prefix, scalars=False)
        elif _is_mlflow_client(experiment) and getattr(logger, "run_id", None):
            _to_mlflow(report, experiment, logger.run_id, step, prefix, scalars=False)


def log_report(
    report: UncertaintyReport,
    logger: Any,
    step: int | None = None,
    prefix: str = "mc/",
    *,
    run_id: str | None = None,
) -> dict[str, float]:
    """Log a report's metrics, figures and summary table to an experiment tracker.

    See the module docstring for what each tracker gets, how metrics are named and why NaN metrics
    are left out of the scalars.

    Args:
        report: The :class:`~mcdrop.UncertaintyReport`.
        logger: A ``SummaryWriter``, the ``mlflow`` module (active run), an ``mlflow.ActiveRun``, an
            ``mlflow.MlflowClient`` (with ``run_id``), a Lightning logger, or a list/tuple of them.
        step: The step (epoch, global step) to log at; ``None``: the tracker's default (0 for
            TensorBoard and MLflow scalars) and, for MLflow, artifacts at ``<prefix>/`` rather than
            ``<prefix>/step_<step>/``.
        prefix: Put before every scalar and figure name (default ``"mc/"``).
        run_id: The run, with an ``MlflowClient`` only.

    Returns:
        The scalars logged, ``{key: value}`` (finite metrics only).

    Raises:
        InvalidTypeError: ``logger`` of a kind not supported (the message lists what is), or
            ``report`` not an ``UncertaintyReport``.
        InvalidInputError: the ``mlflow`` module without an active run, an ``MlflowClient`` without
            ``run_id``, a negative ``step``.

    Example:
        >>> import tempfile, torch, mcdrop
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
        >>> pred = mcdrop.MCDropout(net.eval(), n_samples=5, seed=0).predict(torch.randn(30, 2))
        >>> rep = mcdrop.report(pred, torch.randint(0, 2, (30,)), n_resamples=0)
        >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
        ...     logged = rep.log_to(writer, step=3)
        >>> logged["mc/n_inputs"], "mc/ECE" in logged
        (30.0, True)
    """
    for attribute in ("summary", "metrics", "figure_names", "figure"):
        if not hasattr(report, attribute):
            raise InvalidTypeError(
                f"report must be an mcdrop.UncertaintyReport (from mcdrop.report(...)); got {type(report).__name__}."
            )
    if step is not None:
        step = check_int(step, "step", minimum=0)
    if not isinstance(prefix, str):
        raise InvalidTypeError(f"prefix must be a str (e.g. 'mc/'); got {type(prefix).__name__}.")
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
    if not loggers:
        raise InvalidInputError(
            f"logger is an empty {type(logger).__name__}; give at least one of: {'; '.join(SUPPORTED)}."
        )
    for one in loggers:  # every one recognised before anything is logged
        _kind(one)
    for one in loggers:
        _log_one(report, one, step, prefix, run_id)
    return _finite_scalars(report, prefix)
