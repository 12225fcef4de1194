"""Tests for mcdrop/report/: tables against mcdrop.metrics, figures, files, HTML, Markdown, compare.

Every number of a report is checked against the mcdrop.metrics function called directly on the same
inputs; the figures are checked for the artists they promise; save() for its files, its atomicity
and its refusal to overwrite. Predictions come from small random MLPs (fast, with both right and
wrong predictions); figures are closed after every test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from zoo import mlp  # noqa: E402

import mcdrop  # noqa: E402
from mcdrop import metrics  # noqa: E402
from mcdrop.errors import (  # noqa: E402
    InvalidInputError,
    InvalidTypeError,
    McdropError,
    ReportExistsError,
)
from mcdrop.report import UncertaintyReport, compare, figures  # noqa: E402
from mcdrop.report._render import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_COLUMNS = ["group", "metric", "value", "ci_low", "ci_high", "definition", "higher_is_better", "flag"]
OVERLAP = "intervals_overlap"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture()
def fast_png(monkeypatch):
    """Replace the figures' PNG rendering by a tiny fixed PNG (for tests about files, not figures)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    monkeypatch.setattr(UncertaintyReport, "_png", lambda self, name: png)
    return png


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cls():
    """A 4-class prediction with labels that agree with it ~70% of the time, plus OOD data."""
    mc = mcdrop.MCDropout(mlp(6, 4), n_samples=8, seed=0)
    x = torch.randn(120, 6, generator=_gen(1)) * 2
    pred = mc.predict(x)
    labels = pred.predicted.clone()
    flip = torch.rand(120, generator=_gen(2)) < 0.3
    labels[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=_gen(3))
    ood = mc.predict(torch.randn(60, 6, generator=_gen(4)) * 6)
    return {"mc": mc, "pred": pred, "labels": labels, "ood": ood}


@pytest.fixture(scope="module")
def cls_report(cls):
    return mcdrop.report(cls["pred"], cls["labels"], ood=cls["ood"], model=cls["mc"], title="cls <&> test")


class _Hetero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def reg():
    """A heteroscedastic regression prediction (mean and log-variance head) with OOD data."""
    mc = mcdrop.MCDropout(_Hetero().eval(), n_samples=10, task="regression", aleatoric="log_variance", seed=0)
    x = torch.randn(80, 3, generator=_gen(5))
    y = x.sum(1) * 0.3 + 0.5 * torch.randn(80, generator=_gen(6))
    return {
        "mc": mc,
        "pred": mc.predict(x),
        "y": y,
        "ood": mc.predict(torch.randn(30, 3, generator=_gen(7)) * 5),
    }


@pytest.fixture(scope="module")
def reg_report(reg):
    return mcdrop.report(reg["pred"], reg["y"], ood=reg["ood"], model=reg["mc"], level=0.9)


def _values(rep: UncertaintyReport) -> dict[str, float]:
    """Every summary row, the counts included (as floats), in order."""
    return dict(zip(rep.summary["metric"], rep.summary["value"], strict=True))


def _assert_values(rep: UncertaintyReport, expected: dict[str, float]) -> None:
    got = _values(rep)
    assert list(got) == list(expected)
    for name, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name


# ----------------------------------------------------------------------------------------------
# package face
# ----------------------------------------------------------------------------------------------
def test_import_mcdrop_does_not_load_pandas_matplotlib_or_seaborn():
    code = (
        "import mcdrop, sys; "
        "assert 'pandas' not in sys.modules and 'matplotlib' not in sys.modules "
        "and 'seaborn' not in sys.modules, sorted(m for m in ('pandas', 'matplotlib', 'seaborn') if m in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_report_is_exported_lazily_and_callable():
    import mcdrop.report as package

    assert mcdrop.report is package and callable(mcdrop.report)
    assert mcdrop.compare is compare
    assert mcdrop.UncertaintyReport is UncertaintyReport
    assert mcdrop.report.figures is figures
    assert {"report", "compare", "UncertaintyReport", "ReportExistsError"} <= set(mcdrop.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mcdrop.nope  # noqa: B018


# ----------------------------------------------------------------------------------------------
# classification tables
# ----------------------------------------------------------------------------------------------
def test_classification_summary_equals_metrics(cls, cls_report):
    pred, y, ood = cls["pred"], cls["labels"], cls["ood"]
    p, h, mi = pred.probs, pred.predictive_entropy, pred.mutual_information
    err = pred.predicted != y
    h_out, mi_out = ood.predictive_entropy, ood.mutual_information
    expected = {
        "accuracy": metrics.accuracy(p, y),
        "NLL": metrics.negative_log_likelihood(p, y),
        "Brier": metrics.brier_score(p, y),
        "ECE": metrics.expected_calibration_error(p, y, n_bins=15),
        "MCE": metrics.expected_calibration_error(p, y, n_bins=15, norm="max"),
        "adaptive ECE": metrics.expected_calibration_error(p, y, n_bins=15, binning="quantile"),
        "classwise ECE": metrics.classwise_calibration_error(p, y, n_bins=15),
        "AURC": metrics.aurc(h, err),
        "E-AURC": metrics.e_aurc(h, err),
        "misclassification AUROC (entropy)": metrics.misclassification_auroc(h, err),
        "misclassification AUROC (MI)": metrics.misclassification_auroc(mi, err),
        "mean predictive entropy": float(h.double().mean()),
        "mean mutual information": float(mi.double().mean()),
        "OOD AUROC (entropy)": metrics.ood_auroc(h, h_out),
        "OOD AUPR-In (entropy)": metrics.ood_aupr(h, h_out),
        "OOD FPR@95TPR (entropy)": metrics.fpr_at_tpr(h, h_out, tpr=0.95),
        "OOD AUROC (MI)": metrics.ood_auroc(mi, mi_out),
        "OOD AUPR-In (MI)": metrics.ood_aupr(mi, mi_out),
        "OOD FPR@95TPR (MI)": metrics.fpr_at_tpr(mi, mi_out, tpr=0.95),
        "n_inputs": 120,
        "n_samples": 8,
        "n_ood": 60,
    }
    _assert_values(cls_report, expected)
    groups = dict(zip(cls_report.summary["metric"], cls_report.summary["group"], strict=True))
    assert [groups[m] for m in ("accuracy", "ECE", "AURC", "mean mutual information", "OOD AUROC (MI)")] == [
        "classification",
        "calibration",
        "selective prediction",
        "uncertainty",
        "OOD: ood",
    ]
    assert [m for m, g in groups.items() if g == "counts"] == ["n_inputs", "n_samples", "n_ood"]
    assert cls_report.counts == {"n_inputs": 120, "n_samples": 8, "n_ood": 60}
    assert all(type(v) is int for v in cls_report.counts.values())
    assert cls_report.metrics["n_inputs"] == 120.0 and len(cls_report.metrics) == 22
    summary = cls_report.summary
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["value"].dtype == np.float64
    assert all(isinstance(d, str) and len(d) > 10 for d in summary["definition"])
    better = dict(zip(summary["metric"], summary["higher_is_better"], strict=True))
    assert better["accuracy"] is True and better["ECE"] is False and better["n_inputs"] is None
    assert better["OOD AUROC (MI)"] is True and better["OOD FPR@95TPR (MI)"] is False
    assert cls_report.metrics["ECE"] == expected["ECE"]
    assert [n for n in cls_report.notes if "reliability bins hold fewer" not in n] == []
    assert (
        repr(cls_report)
        == "UncertaintyReport(task='classification', n_inputs=120, n_samples=8, ood={'ood': 60}, metrics=19)"
    )


def test_n_bins_changes_every_binned_metric_and_the_reliability_table(cls):
    pred, y = cls["pred"], cls["labels"]
    rep = mcdrop.report(pred, y, n_bins=7)
    values = _values(rep)
    assert values["ECE"] == pytest.approx(
        metrics.expected_calibration_error(pred.probs, y, n_bins=7), rel=1e-12
    )
    assert values["classwise ECE"] == pytest.approx(
        metrics.classwise_calibration_error(pred.probs, y, n_bins=7)
    )
    assert len(rep.reliability) == 7
    assert "OOD AUROC (entropy)" not in values and rep.ood is None and rep.n_ood is None


def test_reliability_table_is_the_metrics_table(cls, cls_report):
    table = metrics.reliability_table(cls["pred"].probs, cls["labels"], n_bins=15)
    expected = table.to_frame()
    rel = cls_report.reliability
    assert list(rel.columns) == ["bin", *expected.columns, "weight", "few_inputs"]
    pd.testing.assert_frame_equal(rel[expected.columns], expected)
    np.testing.assert_array_equal(rel["bin"], np.arange(15))
    np.testing.assert_allclose(rel["weight"], table.weight)
    assert float((rel["weight"] * rel["gap"].abs()).sum()) == pytest.approx(
        _values(cls_report)["ECE"], abs=1e-12
    )


def test_per_input_classification(cls, cls_report):
    pred, y = cls["pred"], cls["labels"]
    table = cls_report.per_input
    base = replace(pred, targets=y).to_frame()
    assert list(table.columns[:8]) == [
        "predicted",
        "confidence",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "variation_ratio",
        "target",
        "correct",
    ]
    assert "error" in table.columns and "prob_3" in table.columns
    assert table.index.name == "input" and len(table) == 120
    # most uncertain first, and the rows are the inputs' own rows
    assert table["predictive_entropy"].is_monotonic_decreasing
    back = table.sort_index()
    pd.testing.assert_frame_equal(back[base.columns], base, check_names=False, check_index_type=False)
    np.testing.assert_array_equal(back["error"].to_numpy(), (pred.predicted != y).long().numpy())
    np.testing.assert_array_equal(back["target"].to_numpy(), y.numpy())


def test_sort_by(cls):
    pred, y = cls["pred"], cls["labels"]
    assert mcdrop.report(pred, y, sort_by="confidence").per_input["confidence"].is_monotonic_decreasing
    rep = mcdrop.report(pred, y, sort_by="+confidence")
    assert rep.per_input["confidence"].is_monotonic_increasing and "smallest first" in rep.sort_by
    assert list(mcdrop.report(pred, y, sort_by="input").per_input.index) == list(range(120))
    with pytest.raises(InvalidInputError, match="not a column of the per-input table.*'mutual_information'"):
        mcdrop.report(pred, y, sort_by="entropy")


def test_targets_default_to_the_predictions_and_explicit_targets_win(cls):
    pred, y = cls["pred"], cls["labels"]
    with_targets = replace(pred, targets=y)
    a = mcdrop.report(with_targets)
    b = mcdrop.report(pred, y)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    other = torch.zeros_like(y)
    c = mcdrop.report(with_targets, other)
    assert _values(c)["accuracy"] == metrics.accuracy(pred.probs, other)
    # numpy arrays and lists work too
    d = mcdrop.report(pred, y.numpy().tolist())
    pd.testing.assert_frame_equal(d.summary, b.summary)


def test_undefined_metric_is_nan_with_a_note(cls):
    pred = cls["pred"]
    rep = mcdrop.report(pred, pred.predicted)  # every prediction right
    values = _values(rep)
    assert values["accuracy"] == 1.0
    assert math.isnan(values["misclassification AUROC (entropy)"]) and math.isnan(
        values["misclassification AUROC (MI)"]
    )
    notes = [n for n in rep.notes if "reliability bins hold fewer" not in n]
    assert len(notes) == 2 and "misclassification AUROC (entropy) is undefined" in notes[0]
    assert "n/a" in rep.to_markdown() and "undefined" in rep.to_markdown()


def test_classification_errors(cls, reg):
    pred, y = cls["pred"], cls["labels"]
    with pytest.raises(InvalidInputError, match="needs targets"):
        mcdrop.report(pred)
    with pytest.raises(InvalidInputError, match="120 inputs but the targets have 119 rows"):
        mcdrop.report(pred, y[:-1])
    with pytest.raises(InvalidInputError, match="class indices in \\[0, 3\\]"):
        mcdrop.report(pred, y + 4)
    with pytest.raises(InvalidInputError, match="One-hot rows"):
        mcdrop.report(pred, torch.nn.functional.one_hot(y, 4))
    with pytest.raises(InvalidTypeError, match="ClassificationPrediction or RegressionPrediction"):
        mcdrop.report(pred.probs, y)
    with pytest.raises(InvalidTypeError, match="same task"):
        mcdrop.report(pred, y, ood=reg["ood"])
    with pytest.raises(InvalidTypeError, match="MCDropout wrapper"):
        mcdrop.report(pred, y, model=cls["mc"].model)
    with pytest.raises(InvalidInputError, match="level must be in"):
        mcdrop.report(pred, y, level=1.5)
    with pytest.raises(InvalidInputError, match="n_bins must be at least 1"):
        mcdrop.report(pred, y, n_bins=0)
    dense = replace(pred, probs=pred.probs[:, :, None].expand(-1, -1, 2))
    with pytest.raises(InvalidInputError, match="one class distribution per input"):
        mcdrop.report(dense, y)
    assert issubclass(InvalidInputError, McdropError)


# ----------------------------------------------------------------------------------------------
# regression tables
# ----------------------------------------------------------------------------------------------
def test_regression_summary_equals_metrics(reg, reg_report):
    pred, y, ood = reg["pred"], reg["y"], reg["ood"]
    mu, sd, epi = pred.mean[:, 0], pred.total_std[:, 0], pred.std[:, 0]
    ale = pred.aleatoric_variance[:, 0].sqrt()
    sd_out, epi_out = ood.total_std[:, 0], ood.std[:, 0]
    expected = {
        "RMSE": metrics.rmse(mu, y),
        "MAE": metrics.mae(mu, y),
        "Gaussian NLL": metrics.gaussian_nll(mu, sd, y),
        "CRPS": metrics.crps_gaussian(mu, sd, y),
        "PICP (90%)": metrics.picp(mu, sd, y, level=0.9),
        "MPIW (90%)": metrics.mpiw(sd, level=0.9),
        "miscalibration area": metrics.miscalibration_area(mu, sd, y),
        "MACE": metrics.mean_absolute_calibration_error(mu, sd, y),
        "RMSCE": metrics.root_mean_squared_calibration_error(mu, sd, y),
        "sharpness": metrics.sharpness(sd),
        "mean epistemic std": float(epi.double().mean()),
        "mean aleatoric std": float(ale.double().mean()),
        "OOD AUROC (total std)": metrics.ood_auroc(sd, sd_out),
        "OOD AUPR-In (total std)": metrics.ood_aupr(sd, sd_out),
        "OOD FPR@95TPR (total std)": metrics.fpr_at_tpr(sd, sd_out),
        "OOD AUROC (epistemic std)": metrics.ood_auroc(epi, epi_out),
        "OOD AUPR-In (epistemic std)": metrics.ood_aupr(epi, epi_out),
        "OOD FPR@95TPR (epistemic std)": metrics.fpr_at_tpr(epi, epi_out),
        "n_inputs": 80,
        "n_samples": 10,
        "n_ood": 30,
    }
    # the report works in float64; the metrics agree to float32 rounding of their inputs
    got = _values(reg_report)
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert "1.645" in reg_report.summary.set_index("metric").loc["PICP (90%)", "definition"]


def test_regression_tables(reg, reg_report):
    pred, y = reg["pred"], reg["y"]
    mu, sd = pred.mean[:, 0].double(), pred.total_std[:, 0].double()
    table = reg_report.per_input
    assert table["total_std"].is_monotonic_decreasing and table.index.name == "input"
    for column in (
        "mean",
        "std",
        "aleatoric_std",
        "total_std",
        "lower_0.9",
        "upper_0.9",
        "target",
        "error",
        "abs_error",
        "z_score",
        "inside_0.9",
    ):
        assert column in table.columns, column
    back = table.sort_index()
    np.testing.assert_allclose(back["error"], (y.double() - mu).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back["z_score"], ((y.double() - mu) / sd).numpy(), rtol=1e-5, atol=1e-6)
    z = NormalDist().inv_cdf(0.95)
    np.testing.assert_array_equal(back["inside_0.9"], back["abs_error"] <= z * back["total_std"])
    assert back["inside_0.9"].mean() == pytest.approx(_values(reg_report)["PICP (90%)"], rel=1e-12)
    curve = metrics.calibration_curve(pred.mean[:, 0], pred.total_std[:, 0], y)
    assert list(reg_report.reliability.columns) == ["expected", "observed", "gap"]
    np.testing.assert_allclose(reg_report.reliability["expected"], curve.expected)
    np.testing.assert_allclose(reg_report.reliability["observed"], curve.observed, rtol=1e-12)
    assert reg_report.figure_names == ("calibration", "intervals", "residuals", "ood")
    assert list(reg_report.sites["path"]) == ["body.2"]


def test_regression_without_aleatoric_head_and_1d_mean():
    mc = mcdrop.MCDropout(mlp(3, 1, p=0.3), n_samples=12, task="regression", seed=0)
    x = torch.randn(50, 3, generator=_gen(8))
    pred = mc.predict(x)
    flat = replace(pred, mean=pred.mean[:, 0], variance=pred.variance[:, 0])
    y = torch.randn(50, 1, generator=_gen(9))
    ood = mc.predict(torch.randn(20, 3, generator=_gen(10)) * 4)
    rep = mcdrop.report(flat, y, ood=ood)
    values = _values(rep)
    assert "mean aleatoric std" not in values and "OOD AUROC (epistemic std)" not in values
    assert values["OOD AUROC (std)"] == pytest.approx(metrics.ood_auroc(pred.std[:, 0], ood.std[:, 0]))
    assert values["RMSE"] == pytest.approx(metrics.rmse(pred.mean[:, 0], y[:, 0]))
    assert "aleatoric_std" not in rep.per_input.columns


def test_multi_output_regression_needs_output():
    mc = mcdrop.MCDropout(mlp(3, 2, p=0.3), n_samples=6, task="regression", seed=0)
    pred = mc.predict(torch.randn(40, 3, generator=_gen(11)))
    y = torch.randn(40, 2, generator=_gen(12))
    with pytest.raises(InvalidInputError, match="2 outputs per input.*output=j"):
        mcdrop.report(pred, y)
    rep = mcdrop.report(pred, y, output=1)
    assert _values(rep)["RMSE"] == pytest.approx(metrics.rmse(pred.mean[:, 1], y[:, 1]))
    assert _values(rep)["CRPS"] == pytest.approx(
        metrics.crps_gaussian(pred.mean[:, 1], pred.std[:, 1], y[:, 1])
    )
    with pytest.raises(InvalidInputError, match="output must be in \\[0, 1\\]"):
        mcdrop.report(pred, y, output=2)
    with pytest.raises(InvalidInputError, match="targets have 3 values per input"):
        mcdrop.report(pred, torch.randn(40, 3), output=0)


def test_zero_std_gives_nan_gaussian_metrics_and_no_interval_figures(tmp_path):
    mc = mcdrop.MCDropout(mlp(3, 1, p=0.3), n_samples=1, task="regression", seed=0)
    pred = mc.predict(torch.randn(20, 3, generator=_gen(13)))
    rep = mcdrop.report(pred, torch.zeros(20))
    values = _values(rep)
    assert values["RMSE"] == pytest.approx(metrics.rmse(pred.mean, torch.zeros(20, 1)))
    assert math.isnan(values["CRPS"]) and math.isnan(values["PICP (95%)"])
    assert rep.figure_names == () and "predicted std of 0" in rep.notes[0]
    out = rep.save(tmp_path / "zero")
    assert json.loads((out / "summary.json").read_text())["metrics"]["CRPS"] is None


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def test_reliability_diagram(cls):
    probs, y = cls["pred"].probs, cls["labels"]
    fig, ax = plt.subplots()
    out = figures.reliability_diagram(probs, y, n_bins=10, ax=ax)
    assert out is ax
    table = metrics.reliability_table(probs, y, n_bins=10)
    bars, gaps = ax.containers[0], ax.containers[1]
    assert len(bars) == 10 and len(gaps) == 10
    np.testing.assert_allclose([b.get_height() for b in bars], np.nan_to_num(table.accuracy))
    np.testing.assert_allclose([b.get_width() for b in bars], table.upper - table.lower)
    ece = metrics.expected_calibration_error(probs, y, n_bins=10)
    assert f"ECE = {ece:#.3g}" in ax.get_title()
    # the diagonal is drawn over the bars and the gaps, not hidden behind them
    (diagonal,) = ax.get_lines()
    assert diagonal.get_label() == "perfect calibration"
    assert diagonal.get_zorder() > max(p.get_zorder() for p in [*bars, *gaps])
    # a bin's bar is as opaque as its share of the inputs: the fullest is solid, a small one faint
    alphas = np.array([b.get_alpha() for b in bars])
    full = int(np.argmax(table.count))
    assert alphas[full] == pytest.approx(1.0)
    small = [i for i in range(10) if 0 < table.count[i] < table.count[full] / 4]
    assert small and all(alphas[i] < 0.7 for i in small)
    mass = [a for a in fig.axes if a is not ax]
    assert len(mass) == 1
    np.testing.assert_allclose([b.get_height() for b in mass[0].patches], table.weight)
    # every non-empty bin is labelled with its count under the diagram
    labels = sorted(int(t.get_text()) for t in mass[0].texts)
    assert labels == sorted(int(c) for c in table.count if c > 0)
    # the legend lies outside the diagram (below it), so it covers no bar
    fig.canvas.draw()
    legend_box = mass[0].get_legend().get_window_extent()
    assert legend_box.y1 < ax.get_window_extent().y0 and ax.get_legend() is None
    # a prediction with targets works alone
    ax2 = figures.reliability_diagram(replace(cls["pred"], targets=y))
    assert len(ax2.containers[0]) == 15 and ax2.figure is not fig


def test_reliability_diagram_overlay(cls):
    probs, y = cls["pred"].probs, cls["labels"]
    sharp = torch.softmax(4 * torch.log(probs), dim=1)  # the same ranking, sharper
    ax = figures.reliability_diagram(probs, y, n_bins=8, label="MC", overlay={"sharp": sharp})
    table = metrics.reliability_table(sharp, y, n_bins=8)
    keep = table.count > 0
    line = next(line for line in ax.get_lines() if line.get_label().startswith("sharp"))
    np.testing.assert_allclose(line.get_xdata(), table.confidence[keep])
    np.testing.assert_allclose(line.get_ydata(), table.accuracy[keep])
    ece = metrics.expected_calibration_error(sharp, y, n_bins=8)
    assert line.get_label() == f"sharp (ECE = {ece:#.3g})"
    points = ax.collections[-1]
    sizes = points.get_sizes()
    assert np.argmax(sizes) == np.argmax(table.count[keep])  # marker area grows with the count
    assert line.get_zorder() > ax.containers[0][0].get_zorder()
    legend = [t.get_text() for t in ax.figure.axes[1].get_legend().get_texts()]
    assert legend[0] == "MC: accuracy" and legend[-1] == line.get_label()
    with pytest.raises(InvalidInputError, match="same inputs"):
        figures.reliability_diagram(probs, y, overlay={"short": sharp[:-1]})


def test_confidence_histogram(cls):
    probs, y = cls["pred"].probs, cls["labels"]
    ax = figures.confidence_histogram(probs, y, bins=12)
    assert len(ax.patches) == 2 * 12
    wrong = int((probs.argmax(1) != y).sum())
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[:2] == [f"correct (n = {120 - wrong})", f"wrong (n = {wrong})"]
    assert f"accuracy = {metrics.accuracy(probs, y):#.3g}" in texts
    assert sum(p.get_height() for p in ax.patches) == 120
    # a log count axis, whose bottom lies below one input, so a bin of one wrong prediction shows
    assert ax.get_yscale() == "log" and 0 < ax.get_ylim()[0] < 1
    # side by side, not stacked: every bar starts at the axis
    assert all(p.get_y() == 0 for p in ax.patches)


def test_uncertainty_histogram(cls):
    ax = figures.uncertainty_histogram(cls["pred"], bins=25)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == 2 and texts[0].startswith("predictive entropy (mean")
    assert len(ax.patches) == 2  # one filled step histogram per score
    # both on the same bin edges: the step outlines turn at the same x positions
    xs = [np.unique(np.round(p.get_xy()[:, 0], 12)) for p in ax.patches]
    np.testing.assert_array_equal(xs[0], xs[1])
    assert len(xs[0]) == 26
    h = cls["pred"].predictive_entropy.double().numpy()
    mi = cls["pred"].mutual_information.double().numpy()
    assert xs[0][0] == 0 and xs[0][-1] == pytest.approx(max(h.max(), mi.max()))
    ax = figures.uncertainty_histogram([0.1, 0.4, 0.2])
    assert len(ax.get_legend().get_texts()) == 1
    with pytest.raises(InvalidInputError, match="one value per input"):
        figures.uncertainty_histogram([0.1, 0.4, 0.2], [0.1])


def test_risk_coverage_plot(cls):
    pred, y = cls["pred"], cls["labels"]
    err = pred.predicted != y
    scores = {"entropy": pred.predictive_entropy, "MI": pred.mutual_information}
    ax = figures.risk_coverage_plot(scores, err)
    lines = ax.get_lines()
    assert len(lines) == 3 and ax.get_legend() is not None
    curve = metrics.risk_coverage_curve(pred.predictive_entropy, err)
    np.testing.assert_allclose(lines[0].get_xdata(), curve.coverage)
    np.testing.assert_allclose(lines[0].get_ydata(), curve.risk)
    assert lines[0].get_label() == f"entropy (AURC = {metrics.aurc(pred.predictive_entropy, err):#.3g})"
    assert lines[2].get_label().startswith("oracle")
    assert len(figures.risk_coverage_plot(replace(pred, targets=y), oracle=False).get_lines()) == 2
    with pytest.raises(InvalidInputError, match="errors are needed"):
        figures.risk_coverage_plot(pred.predictive_entropy)


def test_risk_coverage_keeps_zero_risk_and_small_risks_visible():
    """An accurate model: risk 0 over most of the coverage, then a few errors among 500 inputs."""
    g = _gen(21)
    n = 500
    errors = torch.zeros(n)
    errors[torch.randperm(n, generator=g)[:6]] = 1.0
    uncertainty = torch.rand(n, generator=g) + 2.0 * errors * torch.rand(n, generator=g)
    fig, ax = plt.subplots()
    figures.risk_coverage_plot({"u": uncertainty}, errors, ax=ax)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "symlog" and low < 0 < high  # zero risk lies inside the axes
    to_pixels = ax.transData.transform
    bottom = ax.get_window_extent().y0
    for line in ax.get_lines():
        x, risk = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert (risk == 0).any()
        # points of zero risk are drawn at least 5 pixels above the bottom spine ...
        zero_y = to_pixels(np.column_stack([x[risk == 0], risk[risk == 0]]))[:, 1]
        assert (zero_y > bottom + 5).all()
        # ... and the smallest non-zero risk (1/n) at least 10 pixels above zero risk
        small = to_pixels([[1.0, 1.0 / n]])[0, 1]
        assert small > zero_y.max() + 10
        # markers every tenth of the points, across the whole coverage range
        assert line.get_marker() not in ("None", "", None) and line.get_markevery() >= 1
    # the AURC values of the legend have 3 significant digits, so that 0.00104 and 0.00099 differ
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    area = metrics.aurc(uncertainty, errors)
    assert area < 0.01 and f"AURC = {area:#.3g}" in texts[0]


def test_ood_histogram(cls):
    pred, ood = cls["pred"], cls["ood"]
    auroc = metrics.ood_auroc(pred.predictive_entropy, ood.predictive_entropy)
    ax = figures.ood_histogram(pred, ood)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["in-distribution (n = 120)", f"out-of-distribution (n = 60, AUROC = {auroc:#.3g})"]
    # the AUROC is printed once: not in the title, nor as the legend's title
    assert "AUROC" not in ax.get_title() and ax.get_legend().get_title().get_text() == ""
    # several named sets, on shared bin edges
    far = cls["mc"].predict(torch.randn(25, 6, generator=_gen(30)) * 20)
    ax = figures.ood_histogram(pred, {"wide": ood, "far": far}, bins=20)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    auroc_far = metrics.ood_auroc(pred.predictive_entropy, far.predictive_entropy)
    assert texts[1].startswith("wide (n = 60") and texts[2] == f"far (n = 25, AUROC = {auroc_far:#.3g})"
    xs = [np.unique(np.round(p.get_xy()[:, 0], 12)) for p in ax.patches]
    assert len(xs) == 3 and all(np.array_equal(x, xs[0]) for x in xs) and len(xs[0]) == 21
    ax = figures.ood_histogram(pred, ood, score="mutual_information")
    assert ax.get_xlabel() == "mutual information"
    with pytest.raises(InvalidInputError, match="not a per-input tensor"):
        figures.ood_histogram(pred, ood, score="nope")
    with pytest.raises(InvalidInputError, match="empty mapping"):
        figures.ood_histogram(pred, {})


def test_regression_figures(reg):
    pred, y = reg["pred"], reg["y"]
    mu, sd = pred.mean[:, 0], pred.total_std[:, 0]
    ax = figures.regression_calibration_plot(mu, sd, y)
    curve = metrics.calibration_curve(mu, sd, y)
    assert len(ax.get_lines()) == 2 and len(ax.collections) == 1
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), curve.observed)
    area = metrics.miscalibration_area(mu, sd, y)
    assert f"miscalibration area = {area:#.3g}" in [t.get_text() for t in ax.get_legend().get_texts()]

    ax = figures.ordered_intervals_plot(replace(pred, targets=y), level=0.9)
    assert ax.get_title() == f"90% intervals ordered by std (PICP = {metrics.picp(mu, sd, y, level=0.9):.3f})"
    band, points = ax.collections[0], ax.collections[1]
    assert len(points.get_offsets()) == 80 and band is not None
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "90% interval",
        "predicted mean",
        "target inside",
        "target outside",
    ]
    ax = figures.ordered_intervals_plot(mu, sd, y, max_points=20, centered=False)
    assert len(ax.collections[1].get_offsets()) == 20

    ax = figures.residuals_vs_std_plot(mu, sd, y)
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(offsets)[:, 1], (y - mu).numpy(), rtol=1e-5, atol=1e-6)
    assert any("±1.96·std" in t.get_text() for t in ax.get_legend().get_texts())


def test_figure_input_errors(cls, reg):
    with pytest.raises(InvalidTypeError, match="for classification"):
        figures.reliability_diagram(reg["pred"])
    with pytest.raises(InvalidTypeError, match="for regression"):
        figures.regression_calibration_plot(cls["pred"])
    with pytest.raises(InvalidInputError, match="labels are needed"):
        figures.confidence_histogram(cls["pred"])
    with pytest.raises(InvalidInputError, match="std must be strictly positive"):
        figures.residuals_vs_std_plot([0.0, 1.0], [1.0, 0.0], [0.0, 0.0])
    with pytest.raises(InvalidInputError, match="std is needed"):
        figures.ordered_intervals_plot([0.0, 1.0])


def test_report_figure(cls_report):
    fig = cls_report.figure("ood")
    assert len(fig.axes) == 2
    for ax in fig.axes:  # the AUROC once per panel, in the OOD set's legend entry
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert sum("AUROC" in t for t in texts) == 1 and "AUROC" not in ax.get_title()
        assert texts[1].startswith("ood (n = 60")
    with pytest.raises(InvalidInputError, match="unknown figure 'nope'.*'reliability'"):
        cls_report.figure("nope")


# ----------------------------------------------------------------------------------------------
# text outputs
# ----------------------------------------------------------------------------------------------
def test_to_html_writes_the_page_and_repr_html_is_a_fragment(cls_report, tmp_path, fast_png):
    page = cls_report.to_html(tmp_path / "sub" / "page.html")
    assert (tmp_path / "sub" / "page.html").read_text(encoding="utf-8") == page
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["page.html"]
    assert page.count('src="data:image/png;base64,') == 5
    fragment = cls_report._repr_html_()
    assert (
        fragment.startswith("<style>")
        and '<div class="mcdrop-report">' in fragment
        and "<html" not in fragment
    )
    assert fragment.count('src="data:image/png;base64,') == 5


def test_html_is_self_contained_and_complete(cls_report, saved):
    page = (saved / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert (
        page.count("<img ") == page.count('src="data:image/png;base64,') == len(cls_report.figure_names) == 5
    )
    for external in ('src="http', 'href="http', "<link", "<script", "@import", "url("):
        assert external not in page
    import html

    for definition in cls_report.summary["definition"]:
        assert html.escape(definition) in page
    assert "<title>cls &lt;&amp;&gt; test</title>" in page and "<h1>cls &lt;&amp;&gt; test</h1>" in page
    assert "Stochastic sites" in page and ">2<" in page  # the sites table: path '2' of the Sequential
    assert "n_samples" in page and cls_report.created.strftime("%Y-%m-%d") in page
    assert page.count('<figure id="fig-') == 5 and 'class="wide"' in page  # the two-panel OOD figure


def test_to_markdown_needs_no_tabulate(cls_report, monkeypatch):
    monkeypatch.setitem(sys.modules, "tabulate", None)  # importing it would fail
    text = cls_report.to_markdown()
    lines = text.splitlines()
    assert lines[0] == "# cls <&> test"
    header = "| metric | MC dropout (N = 8) | better | definition |"
    assert "## Summary" in lines and header in lines
    for group in (
        "classification",
        "calibration",
        "selective prediction",
        "uncertainty",
        "OOD: ood",
        "counts",
    ):
        assert f"### {group}" in lines
    for metric in cls_report.summary["metric"]:
        assert f"| {metric} |" in text
    ece = cls_report.summary.set_index("metric").loc["ECE"]
    interval = f"[{ece.ci_low:#.3g}, {ece.ci_high:#.3g}]"
    assert f"| ECE | {ece.value:#.4g} {interval} | ↓ |" in text
    assert "| n_inputs | 120 |  |" in text and "| n_ood | 60 |  |" in text  # counts as integers
    assert "## Stochastic sites" in text and "`reliability.png`" in text
    header = next(line for line in lines if line.startswith("| input | predicted"))
    assert header.count("|") - 1 == 1 + len(cls_report.per_input.columns)


def test_markdown_table_escapes_and_aligns():
    frame = pd.DataFrame({"name": ["a|b", "line\nbreak"], "x": [0.5, float("nan")], "ok": [True, False]})
    assert markdown_table(frame).splitlines() == [
        "| name | x | ok |",
        "|:---|---:|:---|",
        "| a\\|b | 0.5 | True |",
        "| line break |  | False |",
    ]


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------
CLS_FILES = {
    "summary.csv",
    "per_input.csv",
    "reliability.csv",
    "summary.json",
    "report.html",
    "sites.csv",
    "reliability.png",
    "confidence.png",
    "uncertainty.png",
    "risk_coverage.png",
    "ood.png",
}


@pytest.fixture(scope="module")
def saved(cls_report, tmp_path_factory):
    return cls_report.save(tmp_path_factory.mktemp("saved") / "nested" / "report")


def test_save_writes_every_file(cls_report, saved):
    assert {p.name for p in saved.iterdir()} == CLS_FILES
    summary = pd.read_csv(saved / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    np.testing.assert_allclose(summary["value"], cls_report.summary["value"], rtol=1e-12)
    per_input = pd.read_csv(saved / "per_input.csv", index_col="input")
    assert list(per_input.index) == list(cls_report.per_input.index)
    np.testing.assert_allclose(
        per_input["predictive_entropy"], cls_report.per_input["predictive_entropy"], rtol=1e-6
    )
    assert len(pd.read_csv(saved / "reliability.csv")) == 15
    assert list(pd.read_csv(saved / "sites.csv")["path"].astype(str)) == ["2"]
    info = json.loads((saved / "summary.json").read_text(encoding="utf-8"))
    assert info["generator"] == "mcdrop" and info["task"] == "classification" and info["n_samples"] == 8
    assert info["metrics"]["ECE"] == pytest.approx(_values(cls_report)["ECE"], rel=1e-15)
    assert sorted(info["files"]) == sorted(CLS_FILES) and set(info["figures"]) == set(cls_report.figure_names)
    for name in cls_report.figure_names:
        image = plt.imread(saved / f"{name}.png")
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0.05  # not blank
    page = (saved / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 5
    mask = os.umask(0o022)
    os.umask(mask)
    assert saved.stat().st_mode & 0o777 == 0o777 & ~mask  # the usual mode, not mkdtemp's 0700
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]


def test_save_refuses_to_overwrite(cls_report, saved):
    before = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    with pytest.raises(ReportExistsError, match="exists and is not empty.*overwrite=True") as info:
        cls_report.save(saved)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, McdropError)
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == before


def test_save_into_an_empty_folder_and_overwrite_a_report(cls, tmp_path, fast_png):
    target = tmp_path / "out"
    target.mkdir()
    rep = mcdrop.report(cls["pred"], cls["labels"])  # no OOD, no model: fewer files
    rep.save(target)
    assert "ood.png" not in {p.name for p in target.iterdir()}
    bigger = mcdrop.report(cls["pred"], cls["labels"], ood=cls["ood"], title="second")
    bigger.save(target, overwrite=True)
    assert {p.name for p in target.iterdir()} == CLS_FILES - {"sites.csv"}
    assert json.loads((target / "summary.json").read_text())["title"] == "second"
    rep.save(target, overwrite=True)  # a smaller report replaces the whole folder
    assert "ood.png" not in {p.name for p in target.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_deletes_foreign_files(cls_report, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(ReportExistsError, match="refusing to overwrite.*thesis.tex"):
        cls_report.save(folder, overwrite=True)
    (folder / "thesis.tex").unlink()
    (folder / "summary.csv").write_text("not ours")
    with pytest.raises(ReportExistsError, match="no mcdrop summary.json"):
        cls_report.save(folder, overwrite=True)
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ReportExistsError, match="is a file"):
        cls_report.save(file, overwrite=True)


def test_save_is_atomic_when_a_figure_fails(cls_report, saved, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("figure exploded")

    monkeypatch.setattr(figures, "uncertainty_histogram", broken)  # the third figure
    target = tmp_path / "new"
    with pytest.raises(RuntimeError, match="figure exploded"):
        cls_report.save(target)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling is left
    # an existing report stays exactly as it was
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    monkeypatch.setattr(figures, "reliability_diagram", broken)  # fail fast this time
    with pytest.raises(RuntimeError, match="figure exploded"):
        cls_report.save(saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert not [p for p in saved.parent.iterdir() if p.name != saved.name]


def test_save_is_atomic_when_writing_fails_late(cls, saved, tmp_path, monkeypatch, fast_png):
    from mcdrop.report import _report

    rep = mcdrop.report(cls["pred"], cls["labels"])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_report.UncertaintyReport, "_summary_json", broken)
    with pytest.raises(OSError, match="disk full"):
        rep.save(tmp_path / "late")  # every other file was written when this fails
    assert list(tmp_path.iterdir()) == []
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        rep.save(saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_regression_report_saves(reg_report, tmp_path):
    out = reg_report.save(tmp_path / "reg")
    assert {p.name for p in out.iterdir()} == {
        "summary.csv",
        "per_input.csv",
        "reliability.csv",
        "summary.json",
        "report.html",
        "sites.csv",
        "calibration.png",
        "intervals.png",
        "residuals.png",
        "ood.png",
    }
    assert len(pd.read_csv(out / "reliability.csv")) == 100
    text = reg_report.to_markdown()
    assert "## Calibration curve" in text and "| PICP (90%) |" in text and "interval level" in text


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------
def test_compare_layout(cls, cls_report):
    small = mcdrop.report(cls["pred"], cls["labels"], title="no ood")
    table = compare([small, cls_report], names=["N=8", "with OOD"])
    assert list(table.columns) == ["group", "N=8", "with OOD", OVERLAP] and table.index.name == "metric"
    assert list(table.index) == list(cls_report.summary["metric"])  # union, in order, counts last
    assert table["group"].tolist() == cls_report.summary["group"].tolist()
    assert table.loc["ECE", "N=8"] == table.loc["ECE", "with OOD"] == _values(cls_report)["ECE"]
    assert math.isnan(table.loc["OOD AUROC (entropy)", "N=8"])
    assert table.dtypes.tolist() == [object, np.float64, np.float64, object]
    assert table.loc["n_ood", "with OOD"] == 60 and math.isnan(table.loc["n_ood", "N=8"])
    by_title = compare([small, cls_report])
    assert list(by_title.columns) == ["group", "no ood", "cls <&> test", OVERLAP]
    same_title = compare([small, small])
    assert list(same_title.columns) == ["group", "report 1", "report 2", OVERLAP]
    mapping = compare({"a": small, "b": cls_report})
    assert list(mapping.columns) == ["group", "a", "b", OVERLAP]
    with pytest.raises(InvalidInputError, match="'group' is a column"):
        compare([small, cls_report], names=["group", "x"])


def test_compare_errors(cls_report, reg_report):
    with pytest.raises(InvalidInputError, match="at least one report"):
        compare([])
    with pytest.raises(InvalidInputError, match="one task"):
        compare([cls_report, reg_report])
    with pytest.raises(InvalidInputError, match="names has 1 entries for 2 reports"):
        compare([cls_report, cls_report], names=["x"])
    with pytest.raises(InvalidInputError, match="unique.*'x'"):
        compare([cls_report, cls_report], names=["x", "x"])
    with pytest.raises(InvalidTypeError, match="reports\\[1\\] is a DataFrame"):
        compare([cls_report, cls_report.summary])
    with pytest.raises(InvalidInputError, match="not both"):
        compare({"a": cls_report}, names=["b"])


# ----------------------------------------------------------------------------------------------
# bootstrap intervals (issue 19, item 3)
# ----------------------------------------------------------------------------------------------
def _ci(rep: UncertaintyReport) -> pd.DataFrame:
    return rep.summary.set_index("metric")[["value", "ci_low", "ci_high"]]


def test_intervals_are_the_percentiles_of_the_metrics_on_the_resamples(cls, cls_report):
    probs, labels = cls["pred"].probs, cls["labels"]
    h, mi = cls["pred"].predictive_entropy, cls["pred"].mutual_information
    scores = {"entropy": h, "MI": mi}
    boot = metrics.bootstrap_classification(probs, labels, scores, scores, n_bins=15)
    ood = metrics.bootstrap_ood(h, cls["ood"].predictive_entropy)
    ci = _ci(cls_report)
    for metric, values in (
        ("ECE", boot["ECE"]),
        ("MCE", boot["MCE"]),
        ("AURC", boot["AURC (entropy)"]),
        ("misclassification AUROC (MI)", boot["misclassification AUROC (MI)"]),
        ("mean mutual information", boot["mean (MI)"]),
        ("OOD AUROC (entropy)", ood["AUROC"]),
    ):
        assert (ci.loc[metric, "ci_low"], ci.loc[metric, "ci_high"]) == metrics.percentile_interval(values)
    counts = ci.loc[["n_inputs", "n_samples", "n_ood"]]
    assert counts[["ci_low", "ci_high"]].isna().all().all()
    assert (
        cls_report.summary.set_index("metric").loc[["n_inputs", "n_samples", "n_ood"], "group"] == "counts"
    ).all()
    rest = ci.drop(["n_inputs", "n_samples", "n_ood"])
    assert rest[["ci_low", "ci_high"]].notna().all().all()
    assert (rest["ci_low"] <= rest["ci_high"]).all()
    inside = (rest["ci_low"] <= rest["value"]) & (rest["value"] <= rest["ci_high"])
    assert inside.mean() > 0.9  # the point value is almost always inside its percentile interval


def test_intervals_are_reproducible_and_the_values_unchanged(cls, cls_report):
    again = mcdrop.report(cls["pred"], cls["labels"], ood=cls["ood"])
    pd.testing.assert_frame_equal(_ci(again), _ci(cls_report))
    other = mcdrop.report(cls["pred"], cls["labels"], ood=cls["ood"], seed=1, n_resamples=300, ci_level=0.8)
    assert (other.seed, other.n_resamples, other.ci_level) == (1, 300, 0.8)
    pd.testing.assert_series_equal(_ci(other)["value"], _ci(cls_report)["value"])
    assert (_ci(other)["ci_low"] != _ci(cls_report)["ci_low"]).any()
    none = mcdrop.report(cls["pred"], cls["labels"], n_resamples=0)
    assert none.summary[["ci_low", "ci_high"]].isna().all().all()
    assert "95% interval" not in none.to_markdown() and "n_resamples=0" in none.to_markdown()
    with pytest.raises(InvalidInputError):
        mcdrop.report(cls["pred"], cls["labels"], ci_level=1.0)


def test_regression_intervals(reg, reg_report):
    ci = _ci(reg_report)
    for metric in (
        "RMSE",
        "Gaussian NLL",
        "PICP (90%)",
        "MPIW (90%)",
        "MACE",
        "mean aleatoric std",
        "OOD AUROC (epistemic std)",
    ):
        assert ci.loc[metric, "ci_low"] <= ci.loc[metric, "ci_high"], metric
    pred = reg_report.prediction
    boot = metrics.bootstrap_regression(pred.mean, pred.total_std, reg_report.targets, level=0.9)
    assert (ci.loc["PICP (90%)", "ci_low"], ci.loc["PICP (90%)", "ci_high"]) == metrics.percentile_interval(
        boot["PICP"]
    )


def test_small_bins_and_the_mce_resting_on_one_are_flagged(cls_report):
    rel = cls_report.reliability
    expected = (rel["count"] > 0) & (rel["count"] < 20)
    assert rel["few_inputs"].tolist() == expected.tolist() and expected.any()
    nonempty = rel[rel["count"] > 0]
    worst = nonempty.loc[nonempty["gap"].abs().idxmax()]
    flags = dict(zip(cls_report.summary["metric"], cls_report.summary["flag"], strict=True))
    assert worst["count"] < 20 and f"holds {int(worst['count'])} inputs" in flags["MCE"]
    assert all(flag == "" for metric, flag in flags.items() if metric != "MCE")
    assert any("reliability bins hold fewer than 20 inputs" in note for note in cls_report.notes)
    page = cls_report._repr_html_()
    assert "⚠" in page and "fewer than 20" in page and "percentile bootstrap over the inputs" in page


def test_no_flag_when_every_bin_is_large(cls):
    rep = mcdrop.report(cls["pred"], cls["labels"], n_bins=1)  # one bin of all 120 inputs
    assert rep.summary["flag"].tolist() == [""] * len(rep.summary)
    assert not rep.reliability["few_inputs"].any()
    assert not any("reliability bins" in note for note in rep.notes) and "⚠" not in rep.to_markdown()


def test_summary_json_and_csv_carry_the_intervals(cls_report, saved):
    info = json.loads((saved / "summary.json").read_text(encoding="utf-8"))
    assert info["bootstrap"]["n_resamples"] == 1000 and info["bootstrap"]["seed"] == 0
    assert info["bootstrap"]["level"] == 0.95 and info["bootstrap"]["min_bin_inputs"] == 20
    ci = _ci(cls_report)
    assert info["intervals"]["ECE"] == [ci.loc["ECE", "ci_low"], ci.loc["ECE", "ci_high"]]
    assert "n_inputs" not in info["intervals"] and "n_inputs" not in info["metrics"]
    assert info["counts"] == {"n_inputs": 120, "n_samples": 8, "n_ood": 60}
    row = next(r for r in info["summary"] if r["metric"] == "n_inputs")
    assert row["value"] == 120 and isinstance(row["value"], int) and row["group"] == "counts"
    row = next(r for r in info["summary"] if r["metric"] == "MCE")
    assert row["flag"] and row["ci_low"] <= row["ci_high"]
    csv = pd.read_csv(saved / "summary.csv")
    np.testing.assert_allclose(csv["ci_low"], cls_report.summary["ci_low"], rtol=1e-12)
    text = (saved / "summary.csv").read_text(encoding="utf-8")
    assert "\ncounts,n_inputs,120," in text and "120.0" not in text  # counts written as integers


def test_compare_says_whether_the_intervals_overlap(cls, cls_report):
    right = mcdrop.report(cls["pred"], cls["pred"].predicted, title="all right")
    table = compare([cls_report, right], names=["noisy labels", "all right"])
    assert table.loc["accuracy", OVERLAP] is False  # 1.0 against ~0.7 on 120 inputs
    assert table.loc["mean predictive entropy", OVERLAP] is True  # the same predictions
    assert table.loc["n_inputs", OVERLAP] is None
    assert table.loc["OOD AUROC (entropy)", OVERLAP] is None  # only one report has it
    assert compare([cls_report, cls_report]).loc["ECE", OVERLAP] is True
    with pytest.raises(InvalidInputError, match="intervals_overlap"):
        compare([cls_report, right], names=[OVERLAP, "x"])


# ----------------------------------------------------------------------------------------------
# baseline, recalibration, several OOD sets, counts and metadata (issue 20)
# ----------------------------------------------------------------------------------------------
VARIANT_COLUMNS = ["deterministic", "deterministic_ci_low", "deterministic_ci_high"]


@pytest.fixture(scope="module")
def kept():
    """A 4-class MC prediction with kept samples, its dropout-off baseline, a held-out set and OOD sets."""
    mc = mcdrop.MCDropout(mlp(6, 4, p=0.4), n_samples=12, keep_samples=True, seed=0)
    x = torch.randn(150, 6, generator=_gen(40)) * 2
    x_val = torch.randn(100, 6, generator=_gen(41)) * 2
    teacher = mlp(6, 4, p=0.0, seed=1)
    with torch.no_grad():
        y, y_val = teacher(x).argmax(1), teacher(x_val).argmax(1)
    x_wide, x_far = torch.randn(50, 6, generator=_gen(42)) * 6, torch.randn(30, 6, generator=_gen(43)) * 15
    wide = mc.predict(x_wide)
    wide.deterministic = mc.predict_deterministic(x_wide)
    return {
        "mc": mc,
        "pred": mc.predict(x),
        "base": mc.predict_deterministic(x),
        "y": y,
        "val": mc.predict(x_val),
        "y_val": y_val,
        "wide": wide,
        "far": mc.predict(x_far),
    }


@pytest.fixture(scope="module")
def kept_report(kept):
    return mcdrop.report(
        kept["pred"],
        kept["y"],
        baseline=kept["base"],
        calibration=(kept["val"], kept["y_val"]),
        ood={"wide": kept["wide"], "far": kept["far"]},
        model=kept["mc"],
        n_resamples=200,
        metadata={"data": Path("data/test.npz"), "split": "test", "epochs": 3},
    )


def test_baseline_column_is_the_dropout_off_prediction(kept, kept_report):
    base, y = kept["base"], kept["y"]
    summary = kept_report.summary.set_index("metric")
    assert list(kept_report.summary.columns) == [
        *SUMMARY_COLUMNS,
        *VARIANT_COLUMNS,
        "recalibrated",
        "recalibrated_ci_low",
        "recalibrated_ci_high",
    ]
    h = base.predictive_entropy
    err = base.predicted != y
    expected = {
        "accuracy": metrics.accuracy(base.probs, y),
        "NLL": metrics.negative_log_likelihood(base.probs, y),
        "ECE": metrics.expected_calibration_error(base.probs, y, n_bins=15),
        "AURC": metrics.aurc(h, err),
        "misclassification AUROC (entropy)": metrics.misclassification_auroc(h, err),
        "mean predictive entropy": float(h.double().mean()),
        "OOD AUROC (entropy) [wide]": metrics.ood_auroc(h, kept["wide"].deterministic.predictive_entropy),
    }
    for metric, value in expected.items():
        assert summary.loc[metric, "deterministic"] == pytest.approx(value, rel=1e-9), metric
    # the MC column is unchanged by the baseline
    assert summary.loc["ECE", "value"] == pytest.approx(
        metrics.expected_calibration_error(kept["pred"].probs, y, n_bins=15), rel=1e-12
    )
    # its intervals come from the same bootstrap, on the baseline's probabilities
    boot = metrics.bootstrap_classification(base.probs, y, {"entropy": h}, n_bins=15, n_resamples=200)
    assert (summary.loc["ECE", "deterministic_ci_low"], summary.loc["ECE", "deterministic_ci_high"]) == (
        metrics.percentile_interval(boot["ECE"])
    )
    # no spread with dropout off: the MI rows are NaN, and a note says why
    for metric in ("mean mutual information", "misclassification AUROC (MI)", "OOD AUROC (MI) [wide]"):
        assert math.isnan(summary.loc[metric, "deterministic"]), metric
    # no deterministic prediction of the 'far' set: its deterministic OOD rows are NaN
    assert math.isnan(summary.loc["OOD AUROC (entropy) [far]", "deterministic"])
    notes = " ".join(kept_report.notes)
    assert "no spread between passes" in notes and "'far'" in notes and "predict_deterministic" in notes
    # the baseline's counts: the same inputs, one pass each; no interval for a count
    assert summary.loc["n_inputs", "deterministic"] == 150 and summary.loc["n_samples", "deterministic"] == 1
    assert summary.loc[["n_inputs", "n_samples"], VARIANT_COLUMNS[1:]].isna().all().all()


def test_baseline_defaults_to_the_predictions_deterministic_field(kept):
    pred, y = kept["pred"], kept["y"]
    explicit = mcdrop.report(pred, y, baseline=kept["base"], n_resamples=50)
    implicit = mcdrop.report(replace(pred, deterministic=kept["base"]), y, n_resamples=50)
    pd.testing.assert_frame_equal(explicit.summary, implicit.summary)
    assert implicit.variants == {"deterministic": "deterministic (dropout off)"}
    plain = mcdrop.report(pred, y, n_resamples=0)
    assert "deterministic" not in plain.summary.columns and plain.variants == {}


def test_baseline_is_overlaid_on_the_reliability_diagram_and_shown_beside_mc(kept, kept_report, fast_png):
    fig = kept_report.figure("reliability")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    ece = kept_report.summary.set_index("metric").loc["ECE", "deterministic"]
    assert f"deterministic (dropout off) (ECE = {ece:#.3g})" in labels
    page = kept_report._repr_html_()
    assert (
        "deterministic (dropout off) [95% interval]" in page and "MC dropout (N = 12) [95% interval]" in page
    )
    text = kept_report.to_markdown()
    header = "| metric | deterministic (dropout off) | MC dropout (N = 12) | MC + temperature"
    assert any(line.startswith(header) for line in text.splitlines())


def test_baseline_errors(kept, reg):
    pred, y = kept["pred"], kept["y"]
    with pytest.raises(InvalidTypeError, match="baseline must be the same model's ClassificationPrediction"):
        mcdrop.report(pred, y, baseline=reg["pred"])
    with pytest.raises(InvalidInputError, match="baseline has 149 inputs but prediction has 150"):
        mcdrop.report(pred, y, baseline=kept["mc"].predict_deterministic(torch.randn(149, 6)))


def test_recalibrated_column_is_temperature_scaling_fitted_on_the_held_out_pair(kept, kept_report, fast_png):
    from mcdrop.recalibration import TemperatureScaling

    scaler = TemperatureScaling().fit(kept["val"], kept["y_val"])
    scaled = scaler.transform(kept["pred"])
    y = kept["y"]
    info = kept_report.recalibration
    assert info["method"] == "temperature scaling" and info["n_inputs"] == 100
    assert info["value"] == pytest.approx(scaler.temperature_, rel=1e-12) and info["value"] != 1.0
    summary = kept_report.summary.set_index("metric")
    for metric, value in {
        "NLL": metrics.negative_log_likelihood(scaled.probs, y),
        "ECE": metrics.expected_calibration_error(scaled.probs, y, n_bins=15),
        "mean mutual information": float(scaled.mutual_information.double().mean()),
    }.items():
        assert summary.loc[metric, "recalibrated"] == pytest.approx(value, rel=1e-9), metric
    # OOD sets are recalibrated too
    wide = scaler.transform(kept["wide"])
    assert summary.loc["OOD AUROC (entropy) [wide]", "recalibrated"] == pytest.approx(
        metrics.ood_auroc(scaled.predictive_entropy, wide.predictive_entropy)
    )
    label = f"MC + temperature (T = {scaler.temperature_:.3g})"
    assert kept_report.variants["recalibrated"] == label
    assert label in kept_report._repr_html_() and "recalibration" in kept_report.to_markdown()


def test_report_exposes_its_predictions_and_recalibrator(kept, kept_report):
    from mcdrop.recalibration import TemperatureScaling

    preds = kept_report.predictions
    assert list(preds) == ["mc", "deterministic", "recalibrated"]
    assert preds["mc"] is kept_report.prediction
    assert torch.equal(preds["deterministic"].probs, kept["base"].probs)
    # the recalibrated column's prediction: the report's own temperature on the same kept samples
    recalibrator = kept_report.recalibrator
    assert isinstance(recalibrator, TemperatureScaling)
    assert recalibrator.temperature_ == kept_report.recalibration["value"]
    scaled = recalibrator.transform(kept["pred"])
    assert torch.allclose(preds["recalibrated"].probs, scaled.probs, rtol=0, atol=1e-7)
    assert preds["recalibrated"].samples is None and preds["recalibrated"].probs.device.type == "cpu"
    y = kept["y"]
    assert kept_report.summary.set_index("metric").loc["accuracy", "recalibrated"] == pytest.approx(
        float((preds["recalibrated"].predicted == y).double().mean())
    )
    # without baseline and calibration: only the MC prediction, no recalibrator
    plain = mcdrop.report(kept["pred"], y, n_resamples=0)
    assert list(plain.predictions) == ["mc"] and plain.recalibrator is None


def test_calibration_errors(kept, cls):
    pred, y = kept["pred"], kept["y"]
    with pytest.raises(InvalidInputError, match="pair \\(prediction, targets\\)"):
        mcdrop.report(pred, y, calibration=kept["val"])
    with pytest.raises(InvalidTypeError, match="calibration\\[0\\] must be a prediction of the same task"):
        mcdrop.report(pred, y, calibration=(kept["y_val"], kept["y_val"]))
    with pytest.raises(InvalidInputError, match="kept samples|keep_samples"):  # temperature needs the samples
        mcdrop.report(cls["pred"], cls["labels"], calibration=(cls["pred"], cls["labels"]))


def test_several_named_ood_sets(kept, kept_report, fast_png):
    pred = kept["pred"]
    summary = kept_report.summary.set_index("metric")
    for name in ("wide", "far"):
        o = kept[name]
        assert summary.loc[f"OOD AUROC (MI) [{name}]", "value"] == pytest.approx(
            metrics.ood_auroc(pred.mutual_information, o.mutual_information)
        )
        assert summary.loc[f"OOD AUROC (MI) [{name}]", "group"] == f"OOD: {name}"
    assert kept_report.counts["n_ood [wide]"] == 50 and kept_report.counts["n_ood [far]"] == 30
    assert kept_report.n_ood == 80 and list(kept_report.ood) == ["wide", "far"]
    fig = kept_report.figure("ood")
    for ax in fig.axes:
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts[1].startswith("wide (n = 50") and texts[2].startswith("far (n = 30")
    page = kept_report._repr_html_()
    assert "OOD: wide" in page and "OOD: far" in page and "wide (50), far (30)" in page
    # a bare prediction is the set named 'ood', whose rows keep their plain names
    rep = mcdrop.report(pred, kept["y"], ood=kept["far"], n_resamples=0)
    assert "OOD AUROC (entropy)" in rep.metrics and list(rep.ood) == ["ood"]


def test_ood_errors(kept, reg):
    pred, y = kept["pred"], kept["y"]
    with pytest.raises(InvalidTypeError, match="ood\\['x'\\] must be a prediction of the same task"):
        mcdrop.report(pred, y, ood={"x": reg["ood"]})
    with pytest.raises(InvalidInputError, match="empty mapping"):
        mcdrop.report(pred, y, ood={})
    with pytest.raises(InvalidInputError, match="non-empty strings"):
        mcdrop.report(pred, y, ood={"": kept["far"]})
    with pytest.raises(InvalidTypeError, match="or a mapping"):
        mcdrop.report(pred, y, ood=[kept["far"]])


def test_counts_of_adaptive_sampling(kept):
    pred = kept["pred"]
    per_input = torch.randint(4, 13, (150,), generator=_gen(44))
    per_input[:7] = 12
    adaptive = replace(pred, samples_per_input=per_input, max_samples=12)
    rep = mcdrop.report(adaptive, kept["y"], n_resamples=0)
    counts = rep.counts
    assert counts["samples per input (min)"] == int(per_input.min())
    assert counts["samples per input (max)"] == 12
    assert counts["samples per input (mean)"] == pytest.approx(float(per_input.double().mean()))
    assert counts["inputs that reached max_samples"] == int((per_input == 12).sum()) >= 7
    assert all(type(counts[k]) is int for k in counts if "mean" not in k)
    text = rep.to_markdown()
    assert f"| inputs that reached max_samples | {counts['inputs that reached max_samples']} |" in text
    assert "samples per input" not in mcdrop.report(pred, kept["y"], n_resamples=0).counts


def test_adaptive_prediction_is_labelled_and_recorded_as_adaptive(tmp_path, fast_png):
    net = mlp(6, 4, p=0.4)
    mc = mcdrop.MCDropout(net, n_samples="auto", tolerance=0.02, min_samples=6, max_samples=40, seed=0)
    x = torch.randn(80, 6, generator=_gen(47)) * 2
    pred = mc.predict(x)
    k = pred.samples_per_input
    low, high, mean = int(k.min()), int(k.max()), float(k.double().mean())
    assert low == 6 and high > low  # some inputs needed more passes than others
    y = torch.randint(0, 4, (80,), generator=_gen(48))
    rep = mcdrop.report(pred, y, model=mc, n_resamples=0)
    from mcdrop.report._render import format_value

    label = f"MC dropout (adaptive N: {low}–{high}, mean {format_value(mean, digits=3)})"
    assert rep._main_label() == label and f"N = {high}" not in label
    assert (
        rep.counts["n_samples"] == high
        and "varies by input" in rep.summary.set_index("metric").loc["n_samples", "definition"]
    )
    header = f"adaptive, {low}–{high} (mean {format_value(mean, digits=3)}; max_samples 40)"
    text = rep.to_markdown()
    assert f"- **MC samples per input (N)**: {header}" in text and f"| metric | {label} |" in text
    assert "until the standard error of confidence is at most 0.02 (min_samples 6, max_samples 40)" in text
    page = rep._repr_html_()
    assert header in page and label in page and "adaptive sampling" in page
    fig = rep.figure("reliability")
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert f"{label}: accuracy" in legends
    info = json.loads((rep.save(tmp_path / "rep") / "summary.json").read_text(encoding="utf-8"))
    assert info["run"] == {
        "seed": 0,
        "device": "cpu",
        "n_samples": "auto",
        "samples_per_input": {"min": low, "mean": pytest.approx(mean), "max": high},
        "max_samples": 40,
        "min_samples": 6,
        "tolerance": 0.02,
        "target": "confidence",
    }
    assert info["columns"]["value"] == label
    # without model=: the prediction's own facts only
    bare = mcdrop.report(pred, y, n_resamples=0)
    assert bare.run["n_samples"] == "auto" and bare.run["max_samples"] == 40
    assert "tolerance" not in bare.run and "**adaptive sampling**" not in bare.to_markdown()
    # a model= that did not make this prediction: its settings are not recorded, and a note says so
    other = mcdrop.MCDropout(net, n_samples=10, seed=0)
    mismatched = mcdrop.report(pred, y, model=other, n_resamples=0)
    assert "tolerance" not in mismatched.run
    assert any("n_samples=10" in n and "not recorded" in n for n in mismatched.notes)
    # a fixed N keeps its plain label and an integer n_samples
    fixed = mcdrop.report(mcdrop.MCDropout(net, n_samples=7, seed=0).predict(x), y, n_resamples=0)
    assert fixed._main_label() == "MC dropout (N = 7)" and fixed.run["n_samples"] == 7


def test_summary_json_records_versions_run_and_metadata(kept_report, tmp_path, fast_png):
    import platform

    out = kept_report.save(tmp_path / "rep")
    info = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["python"] == platform.python_version()
    assert info["versions"]["mcdrop"] == mcdrop.__version__
    assert info["run"] == {"seed": 0, "device": "cpu", "n_samples": 12}
    assert info["metadata"] == {"data": "data/test.npz", "split": "test", "epochs": 3}
    assert info["recalibration"]["parameter"] == "temperature"
    assert info["columns"]["deterministic"] == "deterministic (dropout off)"
    row = next(r for r in info["summary"] if r["metric"] == "ECE")
    assert row["deterministic"] == pytest.approx(
        kept_report.summary.set_index("metric").loc["ECE", "deterministic"]
    )
    assert info["ood_sets"] == {"wide": 50, "far": 30}
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "data/test.npz" in page and "sampling seed" in page
    with pytest.raises(InvalidTypeError, match="metadata\\['x'\\] is a object"):
        mcdrop.report(kept_report.prediction, kept_report.targets, metadata={"x": object()})
    with pytest.raises(InvalidTypeError, match="metadata must be a mapping"):
        mcdrop.report(kept_report.prediction, kept_report.targets, metadata=["a"])


def test_values_show_enough_significant_digits(kept_report, fast_png):
    from mcdrop.report._render import format_value

    assert format_value(0.0010354) == "0.001035" and format_value(0.00099421) == "0.0009942"
    assert format_value(0.000367) == "0.0003670" and format_value(0.97407) == "0.9741"
    assert format_value(12345.678) == "12,346" and format_value(float("nan")) == "n/a"
    assert format_value(540.0, count=True) == "540" and format_value(2.5e-7) == "2.500e-07"
    page = kept_report._repr_html_()
    aurc = kept_report.summary.set_index("metric").loc["AURC", "value"]
    assert f">{aurc:#.4g}<" in page
    for group in ("classification", "calibration", "selective prediction", "counts"):
        assert f'<tr class="group"><th colspan="6">{group}</th></tr>' in page


def test_compare_keeps_groups_and_baselines(kept, kept_report):
    plain = mcdrop.report(kept["pred"], kept["y"], n_resamples=200)
    table = compare({"full": kept_report, "plain": plain})
    assert list(table.columns) == [
        "group",
        "full (deterministic)",
        "full",
        "full (recalibrated)",
        "plain",
        OVERLAP,
    ]
    summary = kept_report.summary.set_index("metric")
    assert table.loc["ECE", "full (deterministic)"] == summary.loc["ECE", "deterministic"]
    assert table.loc["ECE", "full"] == table.loc["ECE", "plain"]
    assert table.loc["ECE", OVERLAP] is True  # the same MC prediction, the same resamples
    assert table.loc["OOD AUROC (MI) [far]", "group"] == "OOD: far"
    assert table.index[-1] == "n_ood [far]" and table.loc["n_inputs", "group"] == "counts"


def test_regression_baseline_and_variance_scaling(reg):
    from mcdrop.recalibration import VarianceScaling

    mc, y = reg["mc"], reg["y"]
    x = torch.randn(80, 3, generator=_gen(5))  # the inputs of reg["pred"]
    base = mc.predict_deterministic(x)
    val_x = torch.randn(60, 3, generator=_gen(45))
    val = mc.predict(val_x)
    val_y = val_x.sum(1) * 0.3 + 0.5 * torch.randn(60, generator=_gen(46))
    rep = mcdrop.report(reg["pred"], y, baseline=base, calibration=(val, val_y), level=0.9, n_resamples=100)
    summary = rep.summary.set_index("metric")
    mu_d = base.mean[:, 0]
    ale_d = base.aleatoric_variance[:, 0].sqrt()
    # dropout off: the aleatoric head is the only spread; the epistemic rows are NaN
    assert summary.loc["RMSE", "deterministic"] == pytest.approx(metrics.rmse(mu_d, y), rel=1e-6)
    assert summary.loc["Gaussian NLL", "deterministic"] == pytest.approx(
        metrics.gaussian_nll(mu_d, ale_d, y), rel=1e-6
    )
    assert math.isnan(summary.loc["mean epistemic std", "deterministic"])
    scaler = VarianceScaling().fit(val, val_y)
    assert (
        rep.recalibration["value"] == pytest.approx(scaler.factor_)
        and rep.recalibration["parameter"] == "std factor"
    )
    mu, sd = reg["pred"].mean[:, 0], reg["pred"].total_std[:, 0]
    assert summary.loc["PICP (90%)", "recalibrated"] == pytest.approx(
        metrics.picp(mu, scaler.factor_ * sd, y, level=0.9)
    )
    assert summary.loc["RMSE", "recalibrated"] == pytest.approx(summary.loc["RMSE", "value"])
    assert (
        isinstance(rep.recalibrator, VarianceScaling)
        and rep.recalibrator.factor_ == rep.recalibration["value"]
    )
    recal = rep.predictions["recalibrated"]
    assert torch.allclose(recal.total_std.reshape(-1), scaler.factor_ * sd, rtol=1e-5)
    assert torch.equal(rep.predictions["deterministic"].mean.reshape(-1), mu_d)
    fig = rep.figure("calibration")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any(lab.startswith("deterministic (dropout off) (area = ") for lab in labels)
    assert any(lab.startswith("MC + std scaling (s = ") for lab in labels)


def test_regression_baseline_without_aleatoric_head_compares_point_metrics_only():
    mc = mcdrop.MCDropout(mlp(3, 1, p=0.3), n_samples=10, task="regression", seed=0)
    x = torch.randn(60, 3, generator=_gen(47))
    y = torch.randn(60, generator=_gen(48))
    rep = mcdrop.report(mc.predict(x), y, baseline=mc.predict_deterministic(x), n_resamples=50)
    summary = rep.summary.set_index("metric")
    groups = summary["group"]
    for metric in summary.index[groups != "counts"]:
        value = summary.loc[metric, "deterministic"]
        if metric in ("RMSE", "MAE"):
            assert math.isfinite(value), metric
        else:
            assert math.isnan(value), metric
    assert any("only RMSE and MAE compare" in note for note in rep.notes)


def test_a_recalibration_warning_reaches_the_notes(kept):
    from mcdrop.errors import McdropWarning

    # held-out samples that all agree and labels that match them: the NLL falls towards T = 0, so no
    # temperature fits and TemperatureScaling warns
    val = kept["val"]
    same = replace(val, samples=val.samples[:1].expand_as(val.samples).clone())
    with pytest.warns(McdropWarning, match="lower bound"):
        rep = mcdrop.report(
            kept["pred"], kept["y"], calibration=(same, same.samples[0].argmax(-1)), n_resamples=0
        )
    assert any(
        note.startswith("recalibrated: TemperatureScaling") and "lower bound" in note for note in rep.notes
    )


def test_report_figures_hold_their_legends_at_their_own_size(kept_report):
    """A tracker draws rep.figure(name) on its own canvas at its size: nothing may fall outside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for name in kept_report.figure_names:
        fig = kept_report.figure(name)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        content = fig.get_tightbbox(canvas.get_renderer())
        width, height = fig.get_size_inches()
        assert content.x0 >= -0.01 and content.y0 >= -0.01, name
        assert content.x1 <= width + 0.01 and content.y1 <= height + 0.01, name
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends, name


def test_a_fragile_mce_of_a_variant_column_is_noted(kept, kept_report):
    table = metrics.reliability_table(kept["base"].probs, kept["y"], n_bins=15)
    filled = np.flatnonzero(table.count > 0)
    worst = int(filled[np.argmax(np.abs(table.gap[filled]))])
    fragile = table.count[worst] < 20
    noted = [n for n in kept_report.notes if n.startswith("deterministic: its MCE rests on bin")]
    assert bool(noted) == bool(fragile)
    if fragile:
        assert f"bin {worst}, which holds {int(table.count[worst])} inputs" in noted[0]
