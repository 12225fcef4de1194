"""Figures of the uncertainty report, drawn with seaborn on matplotlib ``Axes``.

Every function takes plain data (tensors, numpy arrays or lists; most also accept a
:class:`~mcdrop.Prediction` as their first argument), draws on ``ax`` when one is given (else on a
new figure made with ``matplotlib.pyplot``) and returns that ``Axes``. Every number shown in a
title or legend comes from :mod:`mcdrop.metrics`. Nothing here calls ``plt.show()`` or changes
matplotlib's global settings; seaborn's ``whitegrid`` style is applied to new figures only.

Classification:

* :func:`reliability_diagram`: accuracy against confidence per bin, the gap, and the bin mass.
* :func:`confidence_histogram`: the confidence of right and wrong predictions.
* :func:`uncertainty_histogram`: the distributions of predictive entropy and mutual information.
* :func:`risk_coverage_plot`: selective risk against coverage, with the oracle and the AURC.
* :func:`ood_histogram`: an uncertainty score on in- and out-of-distribution data, with the AUROC.

Regression:

* :func:`regression_calibration_plot`: observed against expected coverage of central intervals.
* :func:`ordered_intervals_plot`: predicted intervals ordered by their std, against the truth.
* :func:`residuals_vs_std_plot`: residuals against the predicted std, with the interval cone.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import seaborn as sns
import torch

from mcdrop import metrics
from mcdrop._checks import check_choice, check_int, check_real
from mcdrop.errors import InvalidInputError, InvalidTypeError
from mcdrop.metrics.inputs import parse_classification, parse_regression, vector
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = [
    "reliability_diagram",
    "confidence_histogram",
    "uncertainty_histogram",
    "risk_coverage_plot",
    "ood_histogram",
    "regression_calibration_plot",
    "ordered_intervals_plot",
    "residuals_vs_std_plot",
]

_STYLE = "whitegrid"
_RIGHT, _WRONG = "correct", "wrong"
_INSIDE, _OUTSIDE = "inside", "outside"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _axes(ax: Axes | None, figsize: tuple[float, float] = (6.0, 4.5)) -> Axes:
    """``ax`` itself, or the axes of a new pyplot figure in seaborn's whitegrid style."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    with sns.axes_style(_STYLE):
        _, new = plt.subplots(figsize=figsize)
    return new


def _numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def _vector(x: Any, name: str) -> np.ndarray:
    """A validated (1-D, non-empty, finite) float64 numpy vector."""
    return _numpy(vector(x, name))


def _classification_inputs(
    probs: Any, labels: Any
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Validated probabilities and labels, as given and as ``(n, K)`` / ``(n,)`` numpy arrays.

    The tensors as given go to the metrics (so that bin edges match the input's precision); the
    float64 arrays are for drawing. Accepts a ClassificationPrediction in place of ``probs``.
    """
    if isinstance(probs, Prediction):
        if not isinstance(probs, ClassificationPrediction):
            raise InvalidTypeError(
                f"this figure is for classification; got a {type(probs).__name__}. Use the regression "
                "figures (regression_calibration_plot, ordered_intervals_plot, residuals_vs_std_plot)."
            )
        if labels is None:
            labels = probs.targets
        if probs.probs.dim() != 2:
            raise InvalidInputError(
                f"the figure needs one prediction per input, probs of shape (n, K); got "
                f"{tuple(probs.probs.shape)}. For dense predictions move the class axis last and "
                "flatten: probs.movedim(1, -1).reshape(-1, K)."
            )
        probs = probs.probs
    if labels is None:
        raise InvalidInputError(
            "labels are needed: pass them as the second argument (or predict with "
            "MCDropout.predict_loader, which collects the targets)."
        )
    data = parse_classification(probs, labels)
    if data.probs is None:  # binary (n,) positive-class probabilities
        assert data.positive is not None
        given = data.positive
        p1 = _numpy(given)
        p = np.stack([1 - p1, p1], axis=1)
    else:
        given = data.probs
        p = _numpy(given)
    return given, data.labels, p, data.labels.cpu().numpy()


def _regression_inputs(mean: Any, std: Any, targets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated flat ``mean``, ``std`` (> 0) and ``targets``; accepts a RegressionPrediction."""
    if isinstance(mean, Prediction):
        if not isinstance(mean, RegressionPrediction):
            raise InvalidTypeError(
                f"this figure is for regression; got a {type(mean).__name__}. Use the classification "
                "figures (reliability_diagram, confidence_histogram, ...)."
            )
        pred = mean
        if pred.mean.dim() > 1 and pred.mean[0].numel() > 1:
            raise InvalidInputError(
                f"the figure shows one output per input; the prediction has {pred.mean[0].numel()} "
                "outputs per input. Pass one output's arrays, e.g. pred.mean[:, j], "
                "pred.total_std[:, j] and targets[:, j]."
            )
        if targets is None:
            targets = pred.targets
        std = pred.total_std if std is None else std
        mean = pred.mean.reshape(-1)
        if targets is not None:
            targets = torch.as_tensor(targets).reshape(-1)
        std = torch.as_tensor(std).reshape(-1)
    if std is None or targets is None:
        missing = "std" if std is None else "targets"
        raise InvalidInputError(
            f"{missing} is needed: pass mean, std and targets (or a RegressionPrediction)."
        )
    mu, sigma, y = parse_regression(mean, std, targets)
    assert sigma is not None
    return _numpy(mu), _numpy(sigma), _numpy(y)


def _z(level: float) -> float:
    return NormalDist().inv_cdf((1 + level) / 2)


def _legend(ax: Axes, extra: list[tuple[Any, str]] | None = None, **kwargs: Any) -> None:
    """Rebuild the legend from seaborn's hue legend (if any) plus ``extra`` (handle, label) pairs."""
    handles: list[Any] = []
    labels: list[str] = []
    old = ax.get_legend()
    if old is not None:
        handles.extend(old.legend_handles)
        labels.extend(t.get_text() for t in old.get_texts())
        if "title" not in kwargs and old.get_title().get_text():
            kwargs["title"] = old.get_title().get_text()
        old.remove()
    for handle, label in extra or []:
        handles.append(handle)
        labels.append(label)
    ax.legend(handles, labels, **kwargs)


def _pct(level: float) -> str:
    return f"{level * 100:g}%"


def _sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits (``0.00104``, not ``0.001``)."""
    text = f"{float(value):#.{digits}g}"
    return text.rstrip(".") if "e" not in text else text


def _shared_edges(values: list[np.ndarray], bins: int, low: float | None = None) -> np.ndarray:
    """``bins + 1`` equal-width bin edges spanning every array (from ``low`` when given)."""
    lo = min(float(v.min()) for v in values) if low is None else min(low, *(float(v.min()) for v in values))
    hi = max(float(v.max()) for v in values)
    if hi <= lo:
        hi = lo + 1e-9 if lo == 0 else lo + abs(lo) * 1e-6
    return np.linspace(lo, hi, bins + 1)


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------
def reliability_diagram(
    probs: Any,
    labels: Any = None,
    *,
    n_bins: int = 15,
    binning: str = "uniform",
    label: str = "model",
    overlay: Mapping[str, Any] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Reliability diagram: accuracy against confidence per bin, the gap, and the bin mass below.

    One bar per bin (empty bins have height 0) shows the accuracy of the inputs whose top-label
    confidence falls in the bin, as opaque as the bin's share of the inputs (a bin of one input is
    faint, the fullest bin solid); a hatched bar shows the gap to the bin's mean confidence. The
    dashed diagonal (perfect calibration) is drawn over the bars. A strip appended below the axes
    shows the fraction of inputs in each bin, labelled with each bin's count. Each ``overlay``
    prediction (e.g. the same model with dropout off) is a line through its bins' (mean confidence,
    accuracy) points, with markers whose area grows with the bin's count. The legend sits right of
    the axes, off the bars. The title gives the ECE of
    :func:`mcdrop.metrics.expected_calibration_error` with the same bins; the bars are
    :func:`mcdrop.metrics.reliability_table`.

    Args:
        probs: Predicted probabilities ``(n, K)`` (or binary ``(n,)``), or a
            :class:`~mcdrop.ClassificationPrediction` (its targets are used when ``labels`` is None).
        labels: Integer class labels ``(n,)``.
        n_bins: Number of bins (default 15).
        binning: ``"uniform"`` (default) or ``"quantile"`` (equal-mass bins).
        label: Name of the prediction drawn as bars, for the legend (default ``"model"``).
        overlay: ``{name: probabilities}`` of other predictions of the same inputs to draw as
            lines (same labels, same bins); each name's legend entry gives its ECE.
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The main Axes: ``ax.containers[0]`` holds the ``n_bins`` accuracy bars and
        ``ax.containers[1]`` the ``n_bins`` gap bars; the bin-mass strip is a second Axes of
        ``ax.figure``.

    Raises:
        InvalidInputError: Invalid probabilities, labels or options, or labels missing.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import reliability_diagram
        >>> ax = reliability_diagram([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], [0, 1, 1], n_bins=5,
        ...                          overlay={"dropout off": [[0.8, 0.2], [0.6, 0.4], [0.4, 0.6]]})
        >>> len(ax.containers[0]), ax.get_title()
        (5, 'Reliability diagram (ECE = 0.333)')
        >>> diagonal = next(line for line in ax.get_lines() if line.get_label() == "perfect calibration")
        >>> diagonal.get_zorder() > ax.containers[0][0].get_zorder()  # drawn over the bars
        True
        >>> plt.close(ax.figure)
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    n_bins = check_int(n_bins, "n_bins", minimum=1)
    given, y, _, _ = _classification_inputs(probs, labels)
    table = metrics.reliability_table(given, y, n_bins=n_bins, binning=binning)
    ece = metrics.expected_calibration_error(given, y, n_bins=n_bins, binning=binning)
    others = {}
    for name, other in (overlay or {}).items():
        raw = other.probs if isinstance(other, ClassificationPrediction) else other
        n_other = len(raw) if isinstance(raw, (torch.Tensor, np.ndarray, list, tuple)) else -1
        if n_other != given.shape[0]:
            raise InvalidInputError(
                f"overlay[{name!r}] has {n_other} inputs but probs has {given.shape[0]}; an overlay must be "
                "the probabilities of the same inputs."
            )
        o_given, _, _, _ = _classification_inputs(raw, y)
        others[str(name)] = (
            metrics.reliability_table(o_given, y, n_bins=n_bins, binning=binning),
            metrics.expected_calibration_error(o_given, y, n_bins=n_bins, binning=binning),
        )
    ax = _axes(ax, (6.6, 6.0))
    palette = sns.color_palette()
    width = table.upper - table.lower
    accuracy = np.nan_to_num(table.accuracy)
    confidence = np.where(table.count > 0, table.confidence, accuracy)
    share = np.sqrt(table.count / max(int(table.count.max()), 1))
    bars = ax.bar(
        table.lower,
        accuracy,
        width=width,
        align="edge",
        color=palette[0],
        edgecolor="white",
        linewidth=0.8,
        label=f"{label}: accuracy",
        zorder=2,
    )
    for bar, s, count in zip(bars, share, table.count, strict=True):
        bar.set_alpha(0.2 + 0.8 * float(s))
        if count == 0:
            bar.set_linewidth(0)
    gaps = ax.bar(
        table.lower,
        np.abs(confidence - accuracy),
        bottom=np.minimum(confidence, accuracy),
        width=width,
        align="edge",
        fill=False,
        edgecolor=palette[3],
        hatch="///",
        linewidth=1.0,
        label="gap to mean confidence",
        zorder=3,
    )
    for gap, count in zip(gaps, table.count, strict=True):
        if count == 0:  # an empty bin has no gap: no outline either
            gap.set_linewidth(0)
    (diagonal,) = ax.plot(
        [0, 1], [0, 1], linestyle="--", color="0.25", linewidth=1.4, label="perfect calibration", zorder=4
    )
    handles: list[Any] = [
        Patch(facecolor=palette[0], edgecolor="white", label=f"{label}: accuracy"),
        gaps,
        diagonal,
    ]
    markers = ["o", "s", "^", "D"]
    colours = [palette[1], palette[4], palette[2], palette[5]]
    for i, (name, (o_table, o_ece)) in enumerate(others.items()):
        keep = o_table.count > 0
        sizes = 12 + 140 * o_table.count[keep] / max(int(o_table.count.max()), 1)
        colour = colours[i % len(colours)]
        ax.plot(
            o_table.confidence[keep],
            o_table.accuracy[keep],
            color=colour,
            linewidth=1.4,
            label=f"{name} (ECE = {_sig(o_ece)})",
            zorder=5,
        )
        ax.scatter(
            o_table.confidence[keep],
            o_table.accuracy[keep],
            s=sizes,
            color=colour,
            marker=markers[i % len(markers)],
            edgecolors="white",
            linewidths=0.6,
            zorder=6,
        )
        handles.append(
            Line2D(
                [],
                [],
                color=colour,
                linewidth=1.4,
                marker=markers[i % len(markers)],
                markersize=6,
                label=f"{name} (ECE = {_sig(o_ece)})",
            )
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE = {_sig(ece)})")
    ax.tick_params(labelbottom=False)
    mass = make_axes_locatable(ax).append_axes("bottom", size="24%", pad=0.08, sharex=ax)
    mass.bar(
        table.lower, table.weight, width=width, align="edge", color="0.55", edgecolor="white", linewidth=0.8
    )
    top = max(float(table.weight.max()), 1e-9)
    for lower, w, count, weight in zip(table.lower, width, table.count, table.weight, strict=True):
        if count > 0:
            mass.text(
                lower + w / 2,
                weight + 0.04 * top,
                f"{int(count)}",
                ha="center",
                va="bottom",
                fontsize=6.5,
                rotation=90 if n_bins > 12 else 0,
                color="0.25",
            )
    mass.set_xlim(0, 1)
    mass.set_ylim(0, top * 1.6)
    mass.set_xlabel("confidence (max predicted probability)")
    mass.set_ylabel("bin mass\n(count)")
    mass.grid(axis="x", visible=False)
    # the legend goes below the axes, off the bars and the diagonal
    mass.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.55),
        ncol=2,
        fontsize="small",
        frameon=False,
    )
    return ax


def confidence_histogram(probs: Any, labels: Any = None, *, bins: int = 20, ax: Axes | None = None) -> Axes:
    """Histogram of the top-label confidence of right and wrong predictions, on a log count axis.

    The two groups are drawn side by side in each bin on a logarithmic count axis, so that a handful
    of wrong predictions among hundreds of right ones stays visible; the legend gives each group's
    size. Two vertical lines mark the accuracy (:func:`mcdrop.metrics.accuracy`) and the mean
    confidence: a mean confidence to the right of the accuracy is over-confidence on average.

    Args:
        probs: Predicted probabilities ``(n, K)`` (or binary ``(n,)``), or a
            :class:`~mcdrop.ClassificationPrediction` (its targets are used when ``labels`` is None).
        labels: Integer class labels ``(n,)``.
        bins: Number of equal-width bins on ``[0, 1]`` (default 20).
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The Axes, with one bar per bin and group and a legend.

    Raises:
        InvalidInputError: Invalid probabilities, labels or options, or labels missing.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import confidence_histogram
        >>> ax = confidence_histogram([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], [0, 1, 1], bins=10)
        >>> [t.get_text() for t in ax.get_legend().get_texts()][:2], ax.get_yscale()
        (['correct (n = 2)', 'wrong (n = 1)'], 'log')
        >>> plt.close(ax.figure)
    """
    bins = check_int(bins, "bins", minimum=1)
    given, labels_t, p, y = _classification_inputs(probs, labels)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    acc = metrics.accuracy(given, labels_t)
    right = f"{_RIGHT} (n = {int(correct.sum())})"
    wrong = f"{_WRONG} (n = {int((~correct).sum())})"
    frame = pd.DataFrame({"confidence": confidence, "prediction": np.where(correct, right, wrong)})
    ax = _axes(ax)
    palette = sns.color_palette()
    sns.histplot(
        frame,
        x="confidence",
        hue="prediction",
        hue_order=[right, wrong],
        palette={right: palette[2], wrong: palette[3]},
        bins=np.linspace(0, 1, bins + 1),
        multiple="dodge",
        shrink=0.9,
        alpha=0.85,
        ax=ax,
    )
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.7)
    line_acc = ax.axvline(acc, color="0.15", linestyle="--", linewidth=1.4)
    line_conf = ax.axvline(float(confidence.mean()), color="0.15", linestyle=":", linewidth=1.6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (max predicted probability)")
    ax.set_ylabel("inputs (log scale)")
    ax.set_title("Confidence of right and wrong predictions")
    _legend(
        ax,
        [(line_acc, f"accuracy = {_sig(acc)}"), (line_conf, f"mean confidence = {_sig(confidence.mean())}")],
        loc="upper left",
        fontsize="small",
    )
    return ax


def uncertainty_histogram(
    predictive_entropy: Any,
    mutual_information: Any = None,
    *,
    bins: int = 30,
    ax: Axes | None = None,
) -> Axes:
    """Distributions of the predictive entropy (total) and mutual information (epistemic), in nats.

    Both are drawn as filled step histograms normalised to densities on the same bin edges (so
    their densities compare on one axis); the legend gives each mean.

    Args:
        predictive_entropy: Per-input predictive entropy ``(n,)``, or a
            :class:`~mcdrop.ClassificationPrediction` (both scores are then taken from it).
        mutual_information: Per-input mutual information ``(n,)``; ``None`` draws the entropy alone.
        bins: Number of bins spanning both distributions (default 30).
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The Axes, with one filled step patch per distribution and a legend naming each.

    Raises:
        InvalidInputError: Inputs that are not 1-D, are empty or differ in length.
        NonFiniteError: NaN or infinity in the inputs.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import uncertainty_histogram
        >>> ax = uncertainty_histogram([0.1, 0.5, 0.9, 0.3], [0.01, 0.1, 0.3, 0.02], bins=4)
        >>> len(ax.get_legend().get_texts()), len(ax.patches)
        (2, 2)
        >>> plt.close(ax.figure)
    """
    bins = check_int(bins, "bins", minimum=1)
    if isinstance(predictive_entropy, ClassificationPrediction):
        pred = predictive_entropy
        if pred.predictive_entropy.dim() != 1:
            raise InvalidInputError(
                f"the figure needs one score per input; predictive_entropy has shape "
                f"{tuple(pred.predictive_entropy.shape)}. Reduce it first, e.g. .mean((1, 2))."
            )
        predictive_entropy, mutual_information = pred.predictive_entropy, pred.mutual_information
    scores = {"predictive entropy": _vector(predictive_entropy, "predictive_entropy")}
    if mutual_information is not None:
        scores["mutual information"] = _vector(mutual_information, "mutual_information")
        if scores["mutual information"].shape != scores["predictive entropy"].shape:
            raise InvalidInputError(
                "predictive_entropy and mutual_information must have one value per input each; got "
                f"{scores['predictive entropy'].shape[0]} and {scores['mutual information'].shape[0]}."
            )
    edges = _shared_edges(list(scores.values()), bins, low=0.0)
    ax = _axes(ax)
    palette = sns.color_palette()
    for i, (name, v) in enumerate(scores.items()):
        ax.hist(
            v,
            bins=edges,
            density=True,
            histtype="stepfilled",
            facecolor=(*palette[i][:3], 0.25),
            edgecolor=palette[i],
            linewidth=1.5,
            label=f"{name} (mean {_sig(v.mean())})",
        )
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("uncertainty (nats)")
    ax.set_ylabel("density")
    ax.set_title("Distribution of predictive uncertainty (shared bins)")
    ax.legend(loc="upper right", fontsize="small")
    return ax


def _errors_of(pred: ClassificationPrediction) -> np.ndarray:
    if pred.targets is None:
        raise InvalidInputError(
            "the prediction carries no targets, so its errors are unknown: pass errors explicitly, "
            "e.g. errors = pred.predicted != labels."
        )
    return (pred.predicted.cpu() != torch.as_tensor(pred.targets).cpu()).numpy()


def risk_coverage_plot(
    uncertainty: Any,
    errors: Any = None,
    *,
    oracle: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Risk–coverage curves of selective prediction, one per uncertainty score, with their AURC.

    Rejecting the most uncertain inputs first, each point shows the fraction kept (coverage) and the
    mean error over the kept inputs (selective risk), from :func:`mcdrop.metrics.risk_coverage_curve`;
    the legend gives each AURC (:func:`mcdrop.metrics.aurc`) to 3 significant digits. The dashed
    oracle ranks the inputs by their own errors, the best any score can do.

    The risk axis is symmetric-logarithmic: linear from 0 up to ``1/n`` (one error among all
    inputs, the smallest risk above 0 that can occur) and logarithmic above, and its lower limit
    lies below 0, so the stretches where a curve is at zero risk are drawn as visible lines above
    the axis instead of hiding in it, and small risks of an accurate model do not collapse onto
    it. Each curve has its own line style and markers at every tenth of its points, so curves that
    coincide stay distinguishable.

    Args:
        uncertainty: Per-input uncertainty ``(n,)`` (higher means less confident); a mapping
            ``{name: scores}`` for several curves; or a :class:`~mcdrop.ClassificationPrediction`
            with targets (curves for its predictive entropy and mutual information).
        errors: Per-input non-negative loss ``(n,)``, e.g. ``predicted != labels``; taken from the
            prediction when one is given.
        oracle: Also draw the oracle curve (default True).
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The Axes, with one line per curve (the oracle last) and a legend.

    Raises:
        InvalidInputError: Mismatched lengths, empty input, negative errors, or errors missing.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import risk_coverage_plot
        >>> ax = risk_coverage_plot({"entropy": [0.1, 0.9, 0.2, 0.4]}, [0, 1, 1, 0])
        >>> [line.get_label() for line in ax.get_lines()]
        ['entropy (AURC = 0.333)', 'oracle (AURC = 0.208)']
        >>> ax.get_yscale(), bool(ax.get_ylim()[0] < 0)  # zero risk sits above the bottom of the axes
        ('symlog', True)
        >>> plt.close(ax.figure)
    """
    if isinstance(uncertainty, ClassificationPrediction):
        pred = uncertainty
        if errors is None:
            errors = _errors_of(pred)
        uncertainty = {
            "predictive entropy": pred.predictive_entropy,
            "mutual information": pred.mutual_information,
        }
    if errors is None:
        raise InvalidInputError("errors are needed: pass the per-input loss, e.g. predicted != labels.")
    scores = dict(uncertainty) if isinstance(uncertainty, Mapping) else {"uncertainty": uncertainty}
    if not scores:
        raise InvalidInputError("uncertainty is an empty mapping; give at least one {name: scores} entry.")
    e = _vector(errors, "errors")
    ax = _axes(ax)
    palette = sns.color_palette()
    styles = ["-", "-.", ":", (0, (5, 1, 1, 1))]
    markers = ["o", "s", "^", "D", "v", "P"]
    curves: list[tuple[str, Any, dict[str, Any]]] = []
    for i, (name, u) in enumerate(scores.items()):
        curve = metrics.risk_coverage_curve(u, e)
        area = metrics.aurc(u, e)
        style = {"color": palette[i % len(palette)], "linestyle": styles[i % len(styles)], "linewidth": 1.8}
        style["marker"] = markers[i % len(markers)]
        curves.append((f"{name} (AURC = {_sig(area)})", curve, style))
    if oracle:
        curve = metrics.risk_coverage_curve(e, e)
        area = metrics.aurc(e, e)
        style = {"color": "0.3", "linestyle": "--", "linewidth": 1.4, "marker": "x"}
        curves.append((f"oracle (AURC = {_sig(area)})", curve, style))
    n = e.size
    top = max(float(np.max(c.risk)) for _, c, _ in curves)
    for label, curve, style in curves:
        ax.plot(
            curve.coverage,
            curve.risk,
            label=label,
            markevery=max(1, len(curve.coverage) // 10),
            markersize=4.5,
            markerfacecolor="white",
            **style,
        )
    linthresh = 1.0 / n
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.6)
    ax.set_ylim(-0.25 * linthresh, max(top * 1.6, 2 * linthresh))
    ax.set_xlim(0, 1.01)
    ax.set_xlabel("coverage (fraction of inputs kept)")
    ax.set_ylabel(f"selective risk (linear below 1/n = {_sig(linthresh)}, log above)")
    ax.set_title("Risk–coverage: rejecting the most uncertain first")
    ax.legend(loc="upper left", fontsize="small")
    return ax


def _ood_scores(pred: Prediction, score: str | None) -> torch.Tensor:
    if score is None:
        score = "predictive_entropy" if isinstance(pred, ClassificationPrediction) else "total_std"
    value = getattr(pred, score, None)
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(
            f"score={score!r} is not a per-input tensor of {type(pred).__name__}; use e.g. "
            "'predictive_entropy', 'mutual_information', 'variation_ratio' (classification) or "
            "'total_std', 'std' (regression)."
        )
    return value.reshape(len(pred), -1).mean(1) if value.dim() > 1 else value


def ood_histogram(
    scores_in: Any,
    scores_out: Any,
    *,
    score_name: str | None = None,
    score: str | None = None,
    bins: int = 30,
    ax: Axes | None = None,
) -> Axes:
    """An uncertainty score on in-distribution against out-of-distribution (OOD) inputs, with the AUROC.

    Every distribution is a filled step histogram normalised to a density, all on the same bin
    edges; each OOD set's legend entry gives its size and its OOD AUROC
    (:func:`mcdrop.metrics.ood_auroc`, higher score means more OOD-like), printed once. The title
    is the score's name.

    Args:
        scores_in: Scores of in-distribution inputs ``(n_in,)``, or a :class:`~mcdrop.Prediction`.
        scores_out: Scores of OOD inputs ``(n_out,)``, or a :class:`~mcdrop.Prediction`, or a
            mapping ``{name: scores or prediction}`` of several OOD sets.
        score_name: Name of the score for the axis label (default: ``score``, or "uncertainty").
        score: With predictions, the attribute to use (default ``"predictive_entropy"`` for
            classification, ``"total_std"`` for regression).
        bins: Number of bins spanning all the scores (default 30).
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The Axes, with one filled step patch per distribution (in-distribution first) and a legend.

    Raises:
        InvalidInputError: Inputs that are not 1-D or are empty, an empty mapping, or an unknown
            ``score``.
        NonFiniteError: NaN or infinity in the scores.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import ood_histogram
        >>> ax = ood_histogram([0.1, 0.2, 0.6], {"noise": [0.5, 0.9]}, score_name="entropy")
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['in-distribution (n = 3)', 'noise (n = 2, AUROC = 0.833)']
        >>> plt.close(ax.figure)
    """
    bins = check_int(bins, "bins", minimum=1)
    if isinstance(scores_in, Prediction):
        scores_in = _ood_scores(scores_in, score)
    outs = dict(scores_out) if isinstance(scores_out, Mapping) else {"out-of-distribution": scores_out}
    if not outs:
        raise InvalidInputError("scores_out is an empty mapping; give at least one {name: scores} entry.")
    s_in = _vector(scores_in, "scores_in")
    sets: dict[str, np.ndarray] = {}
    for name, s in outs.items():
        if isinstance(s, Prediction):
            s = _ood_scores(s, score)
        sets[str(name)] = _vector(
            s, f"scores_out[{name!r}]" if isinstance(scores_out, Mapping) else "scores_out"
        )
    name = score_name or (score.replace("_", " ") if score else "uncertainty")
    edges = _shared_edges([s_in, *sets.values()], bins)
    ax = _axes(ax)
    palette = sns.color_palette()
    series = [(f"in-distribution (n = {s_in.size})", s_in)]
    series += [
        (f"{set_name} (n = {s.size}, AUROC = {_sig(metrics.ood_auroc(s_in, s))})", s)
        for set_name, s in sets.items()
    ]
    for i, (label, s) in enumerate(series):
        colour = palette[i % len(palette)]
        ax.hist(
            s,
            bins=edges,
            density=True,
            histtype="stepfilled",
            facecolor=(*colour[:3], 0.22),
            edgecolor=colour,
            linewidth=1.5,
            label=label,
        )
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(name)
    ax.set_ylabel("density")
    ax.set_title(name)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize="small", frameon=False)
    return ax


# ----------------------------------------------------------------------------------------------
# regression
# ----------------------------------------------------------------------------------------------
def regression_calibration_plot(
    mean: Any,
    std: Any = None,
    targets: Any = None,
    *,
    kind: str = "interval",
    n_levels: int = 100,
    label: str = "model",
    overlay: Mapping[str, tuple[Any, Any]] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Calibration curve of Gaussian regression: observed against expected coverage.

    The curve is :func:`mcdrop.metrics.calibration_curve`; the shaded area between it and the
    diagonal is the miscalibration area of :func:`mcdrop.metrics.miscalibration_area`, given in the
    legend. Below the diagonal the intervals are too narrow (over-confident). Each ``overlay``
    (e.g. the same model with dropout off, or recalibrated) is a further curve with markers.

    Args:
        mean: Predictive means ``(n,)``, or a :class:`~mcdrop.RegressionPrediction` (its total std
            and targets are then used unless given).
        std: Predictive standard deviations ``(n,)``, strictly positive.
        targets: Targets ``(n,)``.
        kind: ``"interval"`` (default: coverage of central intervals) or ``"quantile"``.
        n_levels: Number of expected proportions on ``[0, 1]`` (default 100).
        label: Name of the main curve in the legend (default ``"model"``).
        overlay: ``{name: (mean, std)}`` of other predictions of the same targets to draw as well;
            each legend entry gives its miscalibration area.
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The Axes, with the curve and the diagonal as lines (then one line per overlay), the shaded
        area and a legend.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or invalid options.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import regression_calibration_plot
        >>> ax = regression_calibration_plot([0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.5, 0.2, 3.9])
        >>> len(ax.get_lines())
        2
        >>> plt.close(ax.figure)
    """
    check_choice(kind, ("interval", "quantile"), "kind")
    mu, sigma, y = _regression_inputs(mean, std, targets)
    curve = metrics.calibration_curve(mu, sigma, y, kind=kind, n_levels=n_levels)  # type: ignore[arg-type]
    area = metrics.miscalibration_area(mu, sigma, y, kind=kind, n_levels=n_levels)  # type: ignore[arg-type]
    ax = _axes(ax, (5.5, 5.0))
    palette = sns.color_palette()
    ax.plot(curve.expected, curve.observed, color=palette[0], linewidth=2.0, label=label, zorder=3)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1.2, label="perfect calibration", zorder=4)
    ax.fill_between(
        curve.expected,
        curve.expected,
        curve.observed,
        color=palette[0],
        alpha=0.2,
        label=f"miscalibration area = {_sig(area)}",
    )
    markers = ["o", "s", "^", "D"]
    for i, (name, (o_mean, o_std)) in enumerate((overlay or {}).items()):
        o_mu, o_sigma, _ = _regression_inputs(o_mean, o_std, y)
        o_curve = metrics.calibration_curve(o_mu, o_sigma, y, kind=kind, n_levels=n_levels)  # type: ignore[arg-type]
        o_area = metrics.miscalibration_area(o_mu, o_sigma, y, kind=kind, n_levels=n_levels)  # type: ignore[arg-type]
        ax.plot(
            o_curve.expected,
            o_curve.observed,
            color=palette[(i + 1) % len(palette)],
            linewidth=1.4,
            marker=markers[i % len(markers)],
            markevery=max(1, n_levels // 10),
            markersize=5,
            label=f"{name} (area = {_sig(o_area)})",
            zorder=5,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    if kind == "interval":
        ax.set_xlabel("expected coverage (nominal level of the central interval)")
        ax.set_ylabel("observed coverage (fraction of targets inside)")
    else:
        ax.set_xlabel("expected proportion (quantile level)")
        ax.set_ylabel("observed proportion of targets below the quantile")
    ax.set_title("Regression calibration curve")
    ax.legend(loc="upper left", fontsize="small")
    return ax


def ordered_intervals_plot(
    mean: Any,
    std: Any = None,
    targets: Any = None,
    *,
    level: float = 0.95,
    centered: bool = True,
    max_points: int = 400,
    ax: Axes | None = None,
) -> Axes:
    """Predicted central intervals ordered by their std, against the observed targets.

    The inputs are ordered by increasing predicted std (x axis: rank). The band is the interval
    ``mean ± z·std`` with ``z = Φ⁻¹((1 + level)/2)``; the dots are the targets, coloured by whether
    they fall inside. With ``centered=True`` (default) everything is drawn relative to the predicted
    mean (the band becomes ``±z·std`` and the dots the residuals ``y − mean``), which keeps the plot
    readable when the means vary a lot. The title gives the PICP (:func:`mcdrop.metrics.picp`).

    Args:
        mean: Predictive means ``(n,)``, or a :class:`~mcdrop.RegressionPrediction`.
        std: Predictive standard deviations ``(n,)``, strictly positive.
        targets: Targets ``(n,)``.
        level: Nominal coverage of the intervals in ``(0, 1)`` (default 0.95).
        centered: Draw relative to the predicted mean (default True).
        max_points: At most this many inputs are drawn, evenly spaced in the std order (default 400).
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The Axes, with the band, the mean as a line, the targets as points and a legend.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or invalid options.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import ordered_intervals_plot
        >>> ax = ordered_intervals_plot([0.0, 1.0, 2.0], [1.0, 0.5, 2.0], [0.5, 2.5, 3.9])
        >>> ax.get_title()
        '95% intervals ordered by std (PICP = 0.667)'
        >>> plt.close(ax.figure)
    """
    level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
    max_points = check_int(max_points, "max_points", minimum=2)
    mu, sigma, y = _regression_inputs(mean, std, targets)
    coverage = metrics.picp(mu, sigma, y, level=level)
    order = np.argsort(sigma, kind="stable")
    n = order.size
    rank = np.arange(n)
    if n > max_points:
        rank = np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(int))
    idx = order[rank]
    half = _z(level) * sigma[idx]
    center = np.zeros_like(half) if centered else mu[idx]
    truth = y[idx] - mu[idx] if centered else y[idx]
    inside = np.abs(y[idx] - mu[idx]) <= half
    ax = _axes(ax, (7.0, 4.5))
    palette = sns.color_palette()
    ax.fill_between(
        rank,
        center - half,
        center + half,
        color=palette[0],
        alpha=0.25,
        linewidth=0,
        label=f"{_pct(level)} interval",
    )
    ax.plot(rank, center, color=palette[0], linewidth=1.2, label="predicted mean")
    sns.scatterplot(
        x=rank,
        y=truth,
        hue=np.where(inside, _INSIDE, _OUTSIDE),
        hue_order=[_INSIDE, _OUTSIDE],
        palette={_INSIDE: palette[2], _OUTSIDE: palette[3]},
        s=14,
        linewidth=0,
        ax=ax,
    )
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(
        handles, [f"target {lab}" if lab in (_INSIDE, _OUTSIDE) else lab for lab in labels], loc="upper left"
    )
    ax.set_xlabel("inputs ordered by predicted std (rank)")
    ax.set_ylabel("target − predicted mean" if centered else "value")
    ax.set_title(f"{_pct(level)} intervals ordered by std (PICP = {coverage:.3f})")
    return ax


def residuals_vs_std_plot(
    mean: Any,
    std: Any = None,
    targets: Any = None,
    *,
    level: float = 0.95,
    ax: Axes | None = None,
) -> Axes:
    """Residuals ``y − mean`` against the predicted std, with the cone ``±z·std`` of the intervals.

    For calibrated uncertainty the residuals fan out with the std and a fraction ``level`` of the
    points lies inside the cone; points are coloured by whether they do.

    Args:
        mean: Predictive means ``(n,)``, or a :class:`~mcdrop.RegressionPrediction`.
        std: Predictive standard deviations ``(n,)``, strictly positive.
        targets: Targets ``(n,)``.
        level: Nominal coverage of the cone in ``(0, 1)`` (default 0.95).
        ax: Axes to draw on; a new figure when ``None``.

    Returns:
        The Axes, with the points, the two cone lines and the zero line, and a legend.

    Raises:
        InvalidInputError: Mismatched shapes, empty input, ``std <= 0`` or invalid options.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from mcdrop.report.figures import residuals_vs_std_plot
        >>> ax = residuals_vs_std_plot([0.0, 1.0, 2.0], [1.0, 0.5, 2.0], [0.5, 2.5, 3.9])
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['target inside', 'target outside', '±1.96·std (95%)']
        >>> plt.close(ax.figure)
    """
    level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
    mu, sigma, y = _regression_inputs(mean, std, targets)
    z = _z(level)
    residual = y - mu
    inside = np.abs(residual) <= z * sigma
    ax = _axes(ax)
    palette = sns.color_palette()
    sns.scatterplot(
        x=sigma,
        y=residual,
        hue=np.where(inside, _INSIDE, _OUTSIDE),
        hue_order=[_INSIDE, _OUTSIDE],
        palette={_INSIDE: palette[2], _OUTSIDE: palette[3]},
        s=16,
        linewidth=0,
        alpha=0.8,
        ax=ax,
    )
    grid = np.linspace(0, float(sigma.max()) * 1.05, 50)
    ax.plot(grid, z * grid, color="0.3", linestyle="--", linewidth=1.2, label=f"±{z:.2f}·std ({_pct(level)})")
    ax.plot(grid, -z * grid, color="0.3", linestyle="--", linewidth=1.2)
    ax.axhline(0, color="0.5", linewidth=0.8)
    handles, labels = ax.get_legend_handles_labels()
    keep = [
        (h, f"target {lab}" if lab in (_INSIDE, _OUTSIDE) else lab)
        for h, lab in zip(handles, labels, strict=True)
        if not lab.startswith("_")
    ]
    ax.legend([h for h, _ in keep], [lab for _, lab in keep], loc="upper left")
    ax.set_xlim(left=0)
    ax.set_xlabel("predicted std")
    ax.set_ylabel("residual (target − predicted mean)")
    ax.set_title("Residuals against predicted std")
    return ax
