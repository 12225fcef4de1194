"""HTML and Markdown rendering of an uncertainty report (private; no template engine, no tabulate).

This module renders anything shaped like a report (:class:`ReportView`, which
:class:`~mcdrop.report.UncertaintyReport` satisfies) and does not import ``_report``: the report
module depends on the renderer, never the other way round.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import pandas as pd

from mcdrop.report._tables import COUNTS, VARIANTS


class ReportView(Protocol):
    """What the renderer reads from a report (``UncertaintyReport`` provides all of it)."""

    title: str
    task: str
    version: str
    created: datetime
    n_bins: int
    level: float
    sort_by: str
    n_resamples: int
    seed: int
    ci_level: float
    notes: list[str]
    summary: pd.DataFrame
    reliability: pd.DataFrame
    per_input: pd.DataFrame
    sites: pd.DataFrame | None
    ood: dict[str, Any] | None
    variants: dict[str, str]
    recalibration: dict[str, Any] | None
    run: dict[str, Any]

    @property
    def counts(self) -> dict[str, int | float]:
        """The count rows, ``{name: value}``."""

    @property
    def n_inputs(self) -> int:
        """Number of evaluated inputs."""

    @property
    def n_samples(self) -> int:
        """MC passes per input."""

    @property
    def n_ood(self) -> int | None:
        """Number of OOD inputs, or ``None``."""

    @property
    def figure_names(self) -> tuple[str, ...]:
        """Figure names in display order."""

    @property
    def figure_captions(self) -> dict[str, str]:
        """One caption per figure name."""

    def _figsize(self, name: str) -> tuple[float, float]:
        """Width and height (inches) of figure ``name``."""

    def _main_label(self) -> str:
        """The heading of the MC dropout column."""


#: rows of the per-input table shown in the HTML and Markdown (the CSV has all of them)
TOP_ROWS = 20

_CSS = """
.mcdrop-report { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
  line-height: 1.45; max-width: 1180px; margin: 0 auto; padding: 8px 16px 32px; background: #ffffff; }
.mcdrop-report h1 { font-size: 1.65em; margin: 0.4em 0 0.2em; }
.mcdrop-report h2 { font-size: 1.25em; margin: 1.6em 0 0.5em; padding-bottom: 0.2em;
  border-bottom: 1px solid #d0d7de; }
.mcdrop-report .meta { color: #57606a; margin: 0 0 1em; }
.mcdrop-report .meta span { display: inline-block; margin-right: 1.2em; }
.mcdrop-report .notes { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px;
  padding: 8px 14px; margin: 1em 0; }
.mcdrop-report .notes li { margin: 0.2em 0; }
.mcdrop-report table { border-collapse: collapse; font-size: 0.88em; margin: 0.4em 0 0.8em; }
.mcdrop-report th, .mcdrop-report td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: left;
  vertical-align: top; }
.mcdrop-report th { background: #f6f8fa; font-weight: 600; position: sticky; top: 0; }
.mcdrop-report tr:nth-child(even) td { background: #fafbfc; }
.mcdrop-report td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.mcdrop-report td.def { color: #57606a; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 0.92em; }
.mcdrop-report .scroll { overflow: auto; max-height: 460px; border: 1px solid #eaeef2; margin-bottom: 0.8em; }
.mcdrop-report .scroll table { margin: 0; }
.mcdrop-report .figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr));
  gap: 18px; }
.mcdrop-report figure { margin: 0; border: 1px solid #eaeef2; border-radius: 6px; padding: 8px; }
.mcdrop-report figure.wide { grid-column: 1 / -1; }
.mcdrop-report figure.wide img { max-width: 1100px; margin: 0 auto; }
.mcdrop-report figure img { width: 100%; height: auto; display: block; }
.mcdrop-report figcaption { color: #57606a; font-size: 0.88em; margin-top: 6px; }
.mcdrop-report dl.glossary dt { font-weight: 600; }
.mcdrop-report dl.glossary dd { margin: 0 0 0.4em 1.4em; color: #3d444d; }
.mcdrop-report tr.group th { background: #eaeef2; text-align: left; font-size: 0.95em; }
.mcdrop-report td.num .ci { display: block; color: #57606a; font-size: 0.86em; }
.mcdrop-report table.summary td.num { min-width: 7.5em; }
.mcdrop-report dl.run { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0.4em 0; }
.mcdrop-report dl.run dt { font-weight: 600; }
.mcdrop-report dl.run dd { margin: 0; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.9em;
  word-break: break-all; }
.mcdrop-report footer { color: #8c959f; font-size: 0.82em; margin-top: 2em; }
"""

GLOSSARY = {
    "classification": [
        ("n, N", "n inputs are evaluated; each gets N stochastic (MC dropout) forward passes t = 1..N."),
        (
            "p_it, p̄_i",
            "p_it is the class-probability vector of pass t for input i; p̄_i = (1/N) Σ_t p_it is "
            "the predictive distribution (mean of the per-pass softmax).",
        ),
        (
            "conf, acc",
            "conf_i = max_k p̄_ik (top-label confidence); acc(B) is the fraction of correct "
            "predictions argmax_k p̄_ik = y_i among the inputs of bin B, conf(B) their mean confidence.",
        ),
        (
            "H[p̄], MI",
            "H[p] = −Σ_k p_k ln p_k (nats). Predictive entropy H[p̄_i] is the total uncertainty; "
            "mutual information MI_i = H[p̄_i] − (1/N) Σ_t H[p_it] ≥ 0 is its epistemic part (BALD).",
        ),
        ("e_(j)", "0-1 errors e_i = [argmax_k p̄_ik ≠ y_i] ordered by increasing uncertainty."),
        (
            "OOD",
            "AUROC, AUPR-In (in-distribution inputs as positives) and FPR at 95% TPR of separating "
            "in-distribution from out-of-distribution inputs by the score; higher score = more OOD-like.",
        ),
    ],
    "regression": [
        ("n, N", "n inputs are evaluated; each gets N stochastic (MC dropout) forward passes t = 1..N."),
        (
            "μ_i, σ_i",
            "μ_i = (1/N) Σ_t y_it is the MC mean; σ_i = √(epistemic variance + aleatoric "
            "variance) is the total predictive std (the MC std alone without an aleatoric head).",
        ),
        ("Φ, φ", "The standard normal CDF and density; the predictive distribution is N(μ_i, σ_i²)."),
        (
            "p_obs(p)",
            "The fraction of targets inside the central interval μ_i ± Φ⁻¹((1 + p)/2)·σ_i of "
            "nominal coverage p (the calibration curve).",
        ),
        (
            "OOD",
            "AUROC, AUPR-In (in-distribution inputs as positives) and FPR at 95% TPR of separating "
            "in-distribution from out-of-distribution inputs by the predicted std.",
        ),
    ],
}


def format_value(value: Any, *, count: bool = False, digits: int = 4) -> str:
    """A summary value for display: counts as integers, NaN as ``n/a``, others to ``digits`` significant digits.

    Significant digits, not decimals, so that small values stay apart: ``0.001035`` and ``0.0009942``,
    not ``0.0010`` twice.

    Example:
        >>> from mcdrop.report._render import format_value
        >>> format_value(0.0010354), format_value(0.97407), format_value(540.0, count=True)
        ('0.001035', '0.9741', '540')
    """
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "n/a"
    value = float(value)
    if count and value == int(value):
        return f"{int(value):,}"
    if value == 0:
        return "0"
    if 1e-4 <= abs(value) < 10**digits:
        return f"{value:#.{digits}g}".rstrip(".")
    if 10**digits <= abs(value) < 1e9:
        return f"{value:,.0f}"
    return f"{value:.{digits - 1}e}"


def format_cell(value: Any) -> str:
    """A table cell for display: floats with 4 significant digits, NaN/None empty."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return f"{float(value):.4g}"
    return str(value)


def better_arrow(value: Any) -> str:
    """↑ when higher is better, ↓ when lower is, blank when neither applies."""
    if value is True:
        return "↑"
    if value is False:
        return "↓"
    return ""


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def markdown_table(
    frame: pd.DataFrame, *, index: bool = False, formatters: dict[str, Callable[[Any], str]] | None = None
) -> str:
    r"""A GitHub-flavoured Markdown table; numeric columns right-aligned, ``|`` escaped.

    Example:
        >>> import pandas as pd
        >>> from mcdrop.report._render import markdown_table
        >>> print(markdown_table(pd.DataFrame({"name": ["a|b"], "x": [0.5]})))
        | name | x |
        |:---|---:|
        | a\|b | 0.5 |
    """
    formatters = formatters or {}
    if index:
        frame = frame.reset_index()
    columns = [str(c) for c in frame.columns]
    numeric = [
        pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        for c in frame.columns
    ]
    lines = ["| " + " | ".join(_md_escape(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---:" if num else ":---" for num in numeric) + "|")
    for row in frame.itertuples(index=False, name=None):
        cells = [formatters.get(col, format_cell)(value) for col, value in zip(columns, row, strict=True)]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines)


def format_interval(low: Any, high: Any) -> str:
    """A bootstrap interval for display, ``[low, high]`` to 3 significant digits; blank without one."""
    if low is None or high is None or math.isnan(float(low)) or math.isnan(float(high)):
        return ""
    return f"[{format_value(low, digits=3)}, {format_value(high, digits=3)}]"


def _value_columns(report: ReportView) -> list[tuple[str, str]]:
    """``(summary column, heading)`` of the value columns, in display order."""
    columns = []
    if "deterministic" in report.variants:
        columns.append(("deterministic", report.variants["deterministic"]))
    columns.append(("value", report._main_label()))
    columns += [(key, report.variants[key]) for key in VARIANTS[1:] if key in report.variants]
    return columns


def _cell(report: ReportView, row: dict[str, Any], column: str) -> tuple[str, str]:
    """The value and the interval text of one summary cell."""
    if row["group"] == COUNTS:
        value = report.counts.get(row["metric"], row["value"]) if column == "value" else row[column]
        return format_value(value, count=True), ""
    low, high = ("ci_low", "ci_high") if column == "value" else (f"{column}_ci_low", f"{column}_ci_high")
    flag = " ⚠" if column == "value" and row["flag"] else ""
    return format_value(row[column]) + flag, format_interval(row[low], row[high])


def _groups(report: ReportView) -> list[tuple[str, list[dict[str, Any]]]]:
    """The summary's rows by group, in order of first appearance."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in report.summary.to_dict("records"):
        out.setdefault(str(row["group"]), []).append(row)
    return list(out.items())


def _summary_markdown(report: ReportView) -> list[str]:
    columns = _value_columns(report)
    lines: list[str] = []
    for group, rows in _groups(report):
        frame = pd.DataFrame(
            {
                "metric": [r["metric"] for r in rows],
                **{
                    heading: [" ".join(t for t in _cell(report, r, col) if t) for r in rows]
                    for col, heading in columns
                },
                "better": [better_arrow(r["higher_is_better"]) for r in rows],
                "definition": [r["definition"] + (f" ⚠ {r['flag']}" if r["flag"] else "") for r in rows],
            }
        )
        lines += [f"### {group}", "", markdown_table(frame), ""]
    return lines


def _summary_html(report: ReportView) -> str:
    columns = _value_columns(report)
    ci = f" [{report.ci_level * 100:g}% interval]" if report.n_resamples > 0 else ""
    head = (
        "<th>metric</th>"
        + "".join(f"<th>{_esc(heading)}{_esc(ci)}</th>" for _, heading in columns)
        + "<th>better</th><th>definition</th>"
    )
    width = 3 + len(columns)
    body = []
    for group, rows in _groups(report):
        body.append(f'<tr class="group"><th colspan="{width}">{_esc(group)}</th></tr>')
        for r in rows:
            cells = [f"<td>{_esc(r['metric'])}</td>"]
            for col, _ in columns:
                value, interval = _cell(report, r, col)
                extra = f'<span class="ci">{_esc(interval)}</span>' if interval else ""
                cells.append(f'<td class="num">{_esc(value)}{extra}</td>')
            cells.append(f"<td>{better_arrow(r['higher_is_better'])}</td>")
            definition = r["definition"] + (f" ⚠ {r['flag']}" if r["flag"] else "")
            cells.append(f'<td class="def">{_esc(definition)}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _interval_text(report: ReportView) -> str:
    if report.n_resamples <= 0:
        return "No bootstrap intervals (n_resamples=0)."
    return (
        f"Intervals: {report.ci_level * 100:g}% percentile bootstrap over the inputs ({report.n_resamples:,} "
        f"resamples, seed {report.seed}); they show how much a metric would move on another sample of "
        "inputs, not the Monte Carlo noise of the dropout passes."
    ) + (" ⚠: the value rests on fewer than 20 inputs." if (report.summary["flag"] != "").any() else "")


def _reliability_display(report: ReportView) -> tuple[pd.DataFrame, str]:
    rel = report.reliability
    if report.task == "classification" or len(rel) <= 12:
        return rel, ""
    keep = np.unique(np.round(np.linspace(0, len(rel) - 1, 11)).astype(int))
    return rel.iloc[
        keep
    ], f"Every ~{len(rel) // 10}th of the {len(rel)} levels; all of them are in reliability.csv."


def samples_label(report: ReportView) -> str:
    """The samples per input as the MC column's heading gives them.

    ``N = 50``, or, with adaptive sampling (per-input sample numbers in the counts), the fewest, the
    most and the mean passes per input: ``adaptive N: 20–365, mean 131``.
    """
    counts = report.counts
    if "samples per input (min)" not in counts:
        return f"N = {report.n_samples}"
    low, high = counts["samples per input (min)"], counts["samples per input (max)"]
    return f"adaptive N: {low}–{high}, mean {format_value(counts['samples per input (mean)'], digits=3)}"


def _samples_meta(report: ReportView) -> str:
    """The header's samples per input: N, or the adaptive range, mean and cap."""
    counts = report.counts
    if "samples per input (min)" not in counts:
        return f"{report.n_samples:,}"
    low, high = counts["samples per input (min)"], counts["samples per input (max)"]
    text = f"adaptive, {low:,}–{high:,} (mean {format_value(counts['samples per input (mean)'], digits=3)}"
    cap = report.run.get("max_samples")
    return text + (f"; max_samples {cap:,})" if cap is not None else ")")


def _meta(report: ReportView) -> list[tuple[str, str]]:
    items = [
        ("generated", report.created.strftime("%Y-%m-%d %H:%M %Z").strip()),
        ("mcdrop", report.version),
        ("task", report.task),
        ("inputs (n)", f"{report.n_inputs:,}"),
        ("MC samples per input (N)", _samples_meta(report)),
    ]
    if report.ood is not None:
        sets = ", ".join(f"{name} ({len(o):,})" for name, o in report.ood.items())
        items.append(("OOD sets (inputs)", sets))
    if report.task == "regression":
        items.append(("interval level", f"{report.level:g}"))
    else:
        items.append(("calibration bins", f"{report.n_bins}"))
    if report.recalibration is not None:
        r = report.recalibration
        items.append(
            (
                "recalibration",
                f"{r['method']}, {r['parameter']} = {r['value']:.4g} (fitted on {r['n_inputs']:,} inputs)",
            )
        )
    return items


def _run_items(report: ReportView) -> list[tuple[str, str]]:
    """The run's seed, device and metadata (input paths and the like), as text."""
    items = []
    run = report.run
    if run.get("seed") is not None:
        items.append(("sampling seed", str(run["seed"])))
    if run.get("device"):
        items.append(("device", str(run["device"])))
    if run.get("tolerance") is not None:
        items.append(
            (
                "adaptive sampling",
                f"until the standard error of {run['target']} is at most {run['tolerance']:g} "
                f"(min_samples {run['min_samples']:,}, max_samples {run['max_samples']:,})",
            )
        )
    for key, value in (run.get("metadata") or {}).items():
        items.append((str(key), value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    return items


def to_markdown(report: ReportView) -> str:
    """The report as Markdown text (tables and definitions; figures are listed by file name)."""
    out = [f"# {report.title}", ""]
    out += [f"- **{key}**: {value}" for key, value in _meta(report)]
    out.append("")
    if report.notes:
        out += ["> **Notes**", ">"] + [f"> - {_md_escape(n)}" for n in report.notes] + [""]
    run = _run_items(report)
    if run:
        out += ["## Run", ""] + [f"- **{_md_escape(k)}**: {_md_escape(v)}" for k, v in run] + [""]
    out += ["## Summary", "", *_summary_markdown(report), _interval_text(report), ""]
    rel, caption = _reliability_display(report)
    heading = "Reliability (per confidence bin)" if report.task == "classification" else "Calibration curve"
    if len(rel):
        out += [f"## {heading}", "", markdown_table(rel), ""]
        if caption:
            out += [caption, ""]
    if report.sites is not None:
        out += ["## Stochastic sites", "", markdown_table(report.sites), ""]
    top = report.per_input.head(TOP_ROWS)
    out += [
        f"## Most uncertain inputs (top {len(top)} of {len(report.per_input)})",
        "",
        markdown_table(top, index=True),
        "",
    ]
    out += ["## Figures", ""]
    out += [f"- `{name}.png`: {report.figure_captions[name]}" for name in report.figure_names]
    out += ["", "## Notation", ""]
    out += [f"- **{sym}**: {text}" for sym, text in GLOSSARY[report.task]]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def html_table(
    frame: pd.DataFrame,
    *,
    index: bool = False,
    classes: dict[str, str] | None = None,
    formatters: dict[str, Callable[[Any], str]] | None = None,
) -> str:
    """An escaped HTML table; numeric columns get ``class="num"`` (right-aligned)."""
    classes = dict(classes or {})
    formatters = formatters or {}
    if index:
        frame = frame.reset_index()
    columns = [str(c) for c in frame.columns]
    for c, col in zip(columns, frame.columns, strict=True):
        if (
            c not in classes
            and pd.api.types.is_numeric_dtype(frame[col])
            and not pd.api.types.is_bool_dtype(frame[col])
        ):
            classes[c] = "num"
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = []
    for row in frame.itertuples(index=False, name=None):
        cells = []
        for col, value in zip(columns, row, strict=True):
            cls = f' class="{classes[col]}"' if col in classes else ""
            cells.append(f"<td{cls}>{_esc(formatters.get(col, format_cell)(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(name: str, png: bytes, caption: str, wide: bool = False) -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure id="fig-{_esc(name)}"{cls}><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
        f"<figcaption><b>{_esc(name)}.png</b> — {_esc(caption)}</figcaption></figure>"
    )


def body_html(report: ReportView, images: dict[str, bytes]) -> str:
    """The report as an HTML fragment inside ``<div class="mcdrop-report">`` with its own ``<style>``."""
    parts = [f"<style>{_CSS}</style>", '<div class="mcdrop-report">', f"<h1>{_esc(report.title)}</h1>"]
    meta = "".join(f"<span><b>{_esc(k)}:</b> {_esc(v)}</span>" for k, v in _meta(report))
    parts.append(f'<p class="meta">{meta}</p>')
    run = _run_items(report)
    if run:
        items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in run)
        parts.append(f'<dl class="run">{items}</dl>')
    if report.notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in report.notes)
        parts.append(f'<div class="notes"><b>Notes</b><ul>{items}</ul></div>')
    parts.append("<h2>Summary</h2>")
    parts.append(_summary_html(report))
    parts.append(f'<p class="intervals">{_esc(_interval_text(report))}</p>')
    if images:
        parts.append("<h2>Figures</h2>")
        captions = report.figure_captions
        figs = "".join(
            _figure_html(n, images[n], captions[n], wide=report._figsize(n)[0] > 8)
            for n in report.figure_names
            if n in images
        )
        parts.append(f'<div class="figures">{figs}</div>')
    rel, caption = _reliability_display(report)
    if len(rel):
        heading = (
            "Reliability (per confidence bin)" if report.task == "classification" else "Calibration curve"
        )
        parts.append(f"<h2>{heading}</h2>")
        parts.append(html_table(rel))
        if caption:
            parts.append(f"<p>{_esc(caption)}</p>")
    if report.sites is not None:
        parts.append("<h2>Stochastic sites</h2>")
        parts.append(
            "<p>The modules MC dropout switches on at inference (<code>MCDropout.describe()</code>).</p>"
        )
        parts.append(html_table(report.sites))
    top = report.per_input.head(TOP_ROWS)
    parts.append(f"<h2>Most uncertain inputs (top {len(top)} of {len(report.per_input):,})</h2>")
    parts.append(f"<p>Sorted by {_esc(report.sort_by)}; the full table is <code>per_input.csv</code>.</p>")
    parts.append(f'<div class="scroll">{html_table(top, index=True)}</div>')
    parts.append("<h2>Notation</h2>")
    glossary = "".join(f"<dt>{_esc(s)}</dt><dd>{_esc(t)}</dd>" for s, t in GLOSSARY[report.task])
    parts.append(f'<dl class="glossary">{glossary}</dl>')
    parts.append(
        f"<footer>Generated by mcdrop {_esc(report.version)} on {_esc(_meta(report)[0][1])}. "
        "Every number comes from <code>mcdrop.metrics</code>.</footer>"
    )
    parts.append("</div>")
    return "\n".join(parts)


def document_html(report: ReportView, images: dict[str, bytes]) -> str:
    """A complete, self-contained HTML document (no external resources)."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="mcdrop {_esc(report.version)}">\n'
        f'<title>{_esc(report.title)}</title>\n</head>\n<body style="margin:0;background:#ffffff">\n'
        f"{body_html(report, images)}\n</body>\n</html>\n"
    )


def names_list(names: Sequence[str]) -> str:
    """``'a', 'b' and 'c'``."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
