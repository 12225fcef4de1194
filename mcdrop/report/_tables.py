"""The report's tables: summary (one row per metric), per-input table and reliability table (private).

Every number in the summary comes from a function of :mod:`mcdrop.metrics`, called once here; this
module only chooses the inputs, names the rows and states their definitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import torch

from mcdrop import metrics
from mcdrop.errors import InvalidInputError
from mcdrop.predictions import ClassificationPrediction, Prediction, RegressionPrediction

SUMMARY_COLUMNS = ["group", "metric", "value", "ci_low", "ci_high", "definition", "higher_is_better", "flag"]
#: the group of the count rows (numbers of inputs and samples, not metrics)
COUNTS = "counts"
#: the predictions a report can score besides the MC one, each a column triple of the summary
#: (``<variant>``, ``<variant>_ci_low``, ``<variant>_ci_high``), in display order around ``value``
VARIANTS = ("deterministic", "recalibrated")
#: the default name of an OOD set given as a bare prediction (its rows carry no ``[name]``)
DEFAULT_OOD = "ood"
#: a reliability bin, or an MCE, resting on fewer inputs than this is flagged
MIN_BIN_INPUTS = 20


@dataclass(frozen=True)
class Intervals:
    """How the summary's bootstrap intervals are computed (``n_resamples = 0``: none)."""

    n_resamples: int = metrics.bootstrap.DEFAULT_RESAMPLES
    seed: int = metrics.bootstrap.DEFAULT_SEED
    level: float = metrics.bootstrap.DEFAULT_LEVEL


@dataclass
class Tables:
    """What the report's constructor needs: the three tables, notes and the data for the figures."""

    summary: pd.DataFrame
    per_input: pd.DataFrame
    reliability: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class _Rows:
    """Collects summary rows; a metric that is undefined for these data becomes NaN plus a note."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.flags: dict[str, str] = {}
        self.group = ""

    def add(self, metric: str, value: float | int, definition: str, higher_is_better: bool | None) -> None:
        self.rows.append(
            {
                "group": self.group,
                "metric": metric,
                "value": float(value),
                "definition": definition,
                "higher_is_better": higher_is_better,
            }
        )

    def try_add(
        self, metric: str, compute: Callable[[], float], definition: str, higher_is_better: bool | None
    ) -> None:
        try:
            value = compute()
        except InvalidInputError as err:
            self.notes.append(f"{metric} is undefined for these data (reported as NaN): {err}")
            value = float("nan")
        self.add(metric, value, definition, higher_is_better)

    def intervals(self, resamples: dict[str, np.ndarray], level: float) -> None:
        """Percentile intervals of the rows named in ``resamples`` (each: its values on the resamples)."""
        for row in self.rows:
            values = resamples.get(row["metric"])
            if values is not None and np.isfinite(row["value"]):
                row["ci_low"], row["ci_high"] = metrics.percentile_interval(values, level)

    def frame(self) -> pd.DataFrame:
        rows = [
            {"ci_low": np.nan, "ci_high": np.nan, **row, "flag": self.flags.get(row["metric"], "")}
            for row in self.rows
        ]
        frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
        for column in ("value", "ci_low", "ci_high"):
            frame[column] = frame[column].astype(np.float64)
        frame["flag"] = frame["flag"].astype(object)
        frame["higher_is_better"] = frame["higher_is_better"].astype(object)
        return frame


def _ood_resamples(
    scores_in: dict[str, Any], ood: dict[str, dict[str, Any] | None], opts: dict[str, Any]
) -> dict[str, Any]:
    """The bootstrap values of every OOD row (AUROC, AUPR-In, FPR@95TPR), per set and score."""
    named: dict[str, Any] = {}
    for name, scores_out in ood.items():
        sfx = ood_suffix(name)
        for tag, s_in in scores_in.items():
            s_out = None if scores_out is None else scores_out.get(tag)
            if s_in is None or s_out is None:
                continue
            o = metrics.bootstrap_ood(s_in, s_out, tpr=0.95, **opts)
            named[f"OOD AUROC ({tag}){sfx}"] = o["AUROC"]
            named[f"OOD AUPR-In ({tag}){sfx}"] = o["AUPR-In"]
            named[f"OOD FPR@95TPR ({tag}){sfx}"] = o["FPR@TPR"]
    return named


def ood_suffix(name: str) -> str:
    """What OOD row names of the set ``name`` end with: ``""`` for the default set, else ``" [name]"``."""
    return "" if name == DEFAULT_OOD else f" [{name}]"


def ood_group(name: str) -> str:
    """The summary group of the OOD set ``name``."""
    return f"OOD: {name}"


def merge_variants(main: pd.DataFrame, variants: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``main`` with a column triple per variant (its value and interval for each of main's metrics)."""
    out = main.copy()
    for key, frame in variants.items():
        indexed = frame.set_index("metric")
        for column, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            out[key + suffix] = out["metric"].map(indexed[column]).astype(np.float64)
    return out


def counts_of(pred: Prediction, ood: dict[str, Prediction]) -> dict[str, tuple[int | float, str]]:
    """The count rows: ``{name: (value, definition)}``; integers but the mean samples per input.

    With per-input sample numbers (``samples_per_input``, adaptive sampling) also their minimum,
    mean and maximum, and with ``max_samples`` the number of inputs that reached it.
    """
    counts: dict[str, tuple[int | float, str]] = {
        "n_inputs": (len(pred), "number of evaluated inputs n"),
        "n_samples": (int(pred.n_samples), "stochastic forward passes per input N"),
    }
    per_input = getattr(pred, "samples_per_input", None)
    if isinstance(per_input, torch.Tensor) and per_input.numel() == len(pred) and len(pred):
        k = per_input.detach().cpu().reshape(-1).to(torch.int64)
        counts["n_samples"] = (
            int(pred.n_samples),
            "the most stochastic forward passes any input got (adaptive sampling: N varies by input)",
        )
        counts["samples per input (min)"] = (int(k.min()), "fewest stochastic passes any input got")
        counts["samples per input (mean)"] = (float(k.double().mean()), "mean stochastic passes per input")
        counts["samples per input (max)"] = (int(k.max()), "most stochastic passes any input got")
        cap = getattr(pred, "max_samples", None)
        if cap is not None:
            counts["inputs that reached max_samples"] = (
                int((k >= int(cap)).sum()),
                f"inputs that stopped at max_samples = {int(cap)} (their uncertainty may not have settled)",
            )
    for name, o in ood.items():
        counts[f"n_ood{ood_suffix(name)}"] = (len(o), f"number of out-of-distribution inputs of {name!r}")
    return counts


def with_counts(summary: pd.DataFrame, counts: dict[str, tuple[int | float, str]]) -> pd.DataFrame:
    """The summary with one row per count appended, in the group ``counts``, without an interval."""
    rows = pd.DataFrame(
        {
            "group": COUNTS,
            "metric": list(counts),
            "value": [float(v) for v, _ in counts.values()],
            "ci_low": np.nan,
            "ci_high": np.nan,
            "definition": [d for _, d in counts.values()],
            "higher_is_better": pd.Series([None] * len(counts), dtype=object),
            "flag": "",
        }
    )
    for column in summary.columns:
        if column not in rows.columns:
            rows[column] = np.nan
    # The variants' counts: the same inputs; dropout off is one pass per input, none at max_samples.
    per_pass = {"n_samples", "samples per input (min)", "samples per input (mean)", "samples per input (max)"}
    for variant in VARIANTS:
        if variant in summary.columns:
            rows[variant] = [
                (1.0 if name in per_pass else 0.0 if name == "inputs that reached max_samples" else float(v))
                if variant == "deterministic"
                else float(v)
                for name, (v, _) in counts.items()
            ]
    frame = pd.concat([summary, rows[list(summary.columns)]], ignore_index=True)
    frame["higher_is_better"] = frame["higher_is_better"].astype(object)
    return frame


def _pct(level: float) -> str:
    return f"{level * 100:g}%"


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().reshape(-1).numpy()


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def resolve_targets(prediction: Prediction, targets: Any) -> torch.Tensor:
    """The targets to evaluate against: ``targets`` if given, else the prediction's, as a CPU tensor."""
    if targets is None:
        targets = prediction.targets
    if targets is None:
        raise InvalidInputError(
            "the report needs targets: pass them, mcdrop.report(pred, targets=y), or predict with "
            "MCDropout.predict_loader on a loader that yields (inputs, targets), which keeps them in "
            "pred.targets."
        )
    try:
        t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(
            f"targets must be a tensor or an array of numbers; got {type(targets).__name__} ({err})."
        ) from None
    t = t.detach().cpu()
    if t.dim() == 0 or t.shape[0] != len(prediction):
        got = "a scalar" if t.dim() == 0 else f"{t.shape[0]} rows (shape {tuple(t.shape)})"
        raise InvalidInputError(
            f"targets must have one row per input: the prediction has {len(prediction)} inputs but the "
            f"targets have {got}. Pass the targets of exactly the inputs that were predicted, in order."
        )
    return t


def select_output(
    pred: RegressionPrediction, targets: torch.Tensor | None, output: int | None, name: str
) -> tuple[RegressionPrediction, torch.Tensor | None]:
    """One output of a (possibly multi-output) regression prediction, as ``(n,)`` tensors."""
    mean = pred.mean
    d = 1 if mean.dim() == 1 else int(np.prod(mean.shape[1:]))
    if mean.dim() > 2:
        raise InvalidInputError(
            f"the report handles one or several scalar outputs per input; {name} has mean of shape "
            f"{tuple(mean.shape)}. Reduce or flatten it to (n, d) first."
        )
    if d > 1 and output is None:
        raise InvalidInputError(
            f"{name} has {d} outputs per input (mean of shape {tuple(mean.shape)}); a report covers one "
            f"output. Choose it with output=j (0 <= j < {d}), e.g. mcdrop.report(pred, output=0), and "
            "make one report per output (mcdrop.compare puts them side by side)."
        )
    j = 0 if output is None else output
    if not 0 <= j < d:
        raise InvalidInputError(f"output must be in [0, {d - 1}] for {name} with {d} output(s); got {j}.")

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach().cpu()
        return t if t.dim() == 1 else t.reshape(t.shape[0], -1)[:, j]

    if targets is not None:
        if targets.dim() > 1 and targets[0].numel() != d:
            raise InvalidInputError(
                f"targets have {targets[0].numel()} values per input but {name} has {d} output(s)."
            )
        targets = pick(targets)
    picked = replace(
        pred,
        mean=pick(pred.mean),
        variance=pick(pred.variance),
        aleatoric_variance=pick(pred.aleatoric_variance),
        samples=None,
        targets=None,
    )
    return picked, targets


def check_classification(pred: ClassificationPrediction, name: str) -> None:
    """Raise unless the prediction has one ``(K,)`` distribution per input."""
    if pred.probs.dim() != 2:
        raise InvalidInputError(
            f"the report needs one class distribution per input, {name}.probs of shape (n, K); got "
            f"{tuple(pred.probs.shape)} (dense predictions?). Treat every pixel as an input: "
            "move the class axis last and flatten the probabilities and labels, or reduce the "
            "uncertainty per image."
        )


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------
#: what the OOD rows of a classifier are scored by: (tag, symbol)
_CLS_SCORES = (("entropy", "H[p̄]"), ("MI", "MI"))


def _classification_rows(
    probs: torch.Tensor,
    labels: torch.Tensor,
    entropy: torch.Tensor,
    mi: torch.Tensor | None,
    ood: dict[str, dict[str, torch.Tensor | None] | None],
    n_bins: int,
    intervals: Intervals,
) -> _Rows:
    """The metric rows of one set of class probabilities (``mi=None``: no MC spread, MI rows NaN).

    ``ood`` maps each OOD set to its ``{"entropy": ..., "MI": ...}`` scores, or to ``None`` when this
    prediction has none for it (its rows are then NaN).
    """
    errors = (probs.argmax(1) != labels.long()).to(torch.int64)
    k = probs.shape[1]
    m = n_bins
    nan = float("nan")
    rows = _Rows()
    rows.group = "classification"
    rows.add("accuracy", metrics.accuracy(probs, labels), "(1/n) Σ_i [argmax_k p̄_ik = y_i]", True)
    rows.add(
        "NLL",
        metrics.negative_log_likelihood(probs, labels),
        "−(1/n) Σ_i ln max(p̄_i,y_i, ε), ε = machine epsilon (nats)",
        False,
    )
    rows.add("Brier", metrics.brier_score(probs, labels), "(1/n) Σ_i Σ_k (p̄_ik − [y_i = k])²", False)
    rows.group = "calibration"
    rows.add(
        "ECE",
        metrics.expected_calibration_error(probs, labels, n_bins=m, norm="l1"),
        f"Σ_m (|B_m|/n)·|acc(B_m) − conf(B_m)|, {m} equal-width bins of conf = max_k p̄_ik",
        False,
    )
    rows.add(
        "MCE",
        metrics.expected_calibration_error(probs, labels, n_bins=m, norm="max"),
        f"max_m |acc(B_m) − conf(B_m)| over the non-empty ones of {m} equal-width bins",
        False,
    )
    rows.add(
        "adaptive ECE",
        metrics.expected_calibration_error(probs, labels, n_bins=m, norm="l1", binning="quantile"),
        f"ECE with {m} equal-mass (quantile) bins of the confidence",
        False,
    )
    rows.add(
        "classwise ECE",
        float(metrics.classwise_calibration_error(probs, labels, n_bins=m)),
        f"(1/K) Σ_k Σ_m (|B_mk|/n)·|freq(y = k | B_mk) − mean p̄_k(B_mk)|, {m} bins per class, K = {k}",
        False,
    )
    rows.group = "selective prediction"
    rows.add(
        "AURC",
        metrics.aurc(entropy, errors),
        "(1/n) Σ_k (1/k) Σ_{j≤k} e_(j), inputs by increasing H[p̄], e = 0-1 error",
        False,
    )
    rows.add(
        "E-AURC",
        metrics.e_aurc(entropy, errors),
        "AURC − AURC of the oracle that ranks inputs by their own errors",
        False,
    )
    rows.try_add(
        "misclassification AUROC (entropy)",
        lambda: metrics.misclassification_auroc(entropy, errors),
        "P(H[p̄] of a wrong prediction > H[p̄] of a right one) + ½ P(tie)",
        True,
    )
    mi_auroc = "misclassification AUROC (MI)"
    mi_definition = "P(MI of a wrong prediction > MI of a right one) + ½ P(tie)"
    if mi is None:
        rows.add(mi_auroc, nan, mi_definition, True)
    else:
        rows.try_add(mi_auroc, lambda: metrics.misclassification_auroc(mi, errors), mi_definition, True)
    rows.group = "uncertainty"
    rows.add(
        "mean predictive entropy",
        float(entropy.double().mean()),
        "(1/n) Σ_i H[p̄_i], H[p] = −Σ_k p_k ln p_k (nats; total uncertainty)",
        None,
    )
    rows.add(
        "mean mutual information",
        nan if mi is None else float(mi.double().mean()),
        "(1/n) Σ_i (H[p̄_i] − (1/N) Σ_t H[p_it]) (nats; epistemic uncertainty)",
        None,
    )
    scores_in = {"entropy": entropy, "MI": mi}
    for name, scores_out in ood.items():
        rows.group = ood_group(name)
        sfx = ood_suffix(name)
        for tag, sym in _CLS_SCORES:
            s_in = scores_in[tag]
            s_out = None if scores_out is None else scores_out.get(tag)
            ok = s_in is not None and s_out is not None
            rows.add(
                f"OOD AUROC ({tag}){sfx}",
                metrics.ood_auroc(s_in, s_out) if ok else nan,
                f"P({sym} of an OOD input > {sym} of an in-distribution input) + ½ P(tie)",
                True,
            )
            rows.add(
                f"OOD AUPR-In ({tag}){sfx}",
                metrics.ood_aupr(s_in, s_out, positive="in") if ok else nan,
                f"average precision with in-distribution inputs as positives, scored by −{sym}",
                True,
            )
            rows.add(
                f"OOD FPR@95TPR ({tag}){sfx}",
                metrics.fpr_at_tpr(s_in, s_out, tpr=0.95, positive="in") if ok else nan,
                f"fraction of OOD inputs with {sym} ≤ the threshold that keeps 95% of in-distribution inputs",
                False,
            )

    if intervals.n_resamples > 0:
        opts = {"n_resamples": intervals.n_resamples, "seed": intervals.seed}
        scores = {"entropy": entropy} if mi is None else {"entropy": entropy, "MI": mi}
        boot = metrics.bootstrap_classification(probs, labels, scores, scores, n_bins=m, **opts)
        named = {
            "AURC": boot["AURC (entropy)"],
            "E-AURC": boot["E-AURC (entropy)"],
            "mean predictive entropy": boot["mean (entropy)"],
        }
        if mi is not None:
            named["mean mutual information"] = boot["mean (MI)"]
        named.update(_ood_resamples(scores_in, ood, opts))
        rows.intervals({**boot, **named}, intervals.level)
    return rows


def _cls_scores(pred: ClassificationPrediction, spread: bool = True) -> dict[str, torch.Tensor | None]:
    return {
        "entropy": pred.predictive_entropy.detach().cpu(),
        "MI": pred.mutual_information.detach().cpu() if spread else None,
    }


def classification_tables(
    pred: ClassificationPrediction,
    targets: torch.Tensor,
    ood: dict[str, ClassificationPrediction],
    n_bins: int,
    intervals: Intervals = Intervals(),
    variants: dict[str, tuple[ClassificationPrediction, dict[str, ClassificationPrediction | None]]]
    | None = None,
) -> Tables:
    """Summary, per-input and reliability tables of a classifier, with bootstrap intervals.

    ``variants`` maps ``"deterministic"`` and/or ``"recalibrated"`` to another prediction of the
    same inputs and its OOD predictions (``None`` where it has none for a set); their metrics become
    the column triples of the summary. A deterministic prediction has no MC spread: its rows that
    need one (mutual information) are NaN.
    """
    if targets.dim() != 1:
        raise InvalidInputError(
            f"classification targets must be integer class labels of shape (n,); got shape "
            f"{tuple(targets.shape)}."
            + (" One-hot rows? Use targets.argmax(-1)." if targets.dim() == 2 else "")
        )
    probs = pred.probs.detach().cpu()
    labels = targets
    entropy = pred.predictive_entropy.detach().cpu()
    mi = pred.mutual_information.detach().cpu()
    # validation (shapes, ranges, label values) happens in the metric functions, with their messages
    reliability = metrics.reliability_table(probs, labels, n_bins=n_bins)
    errors = (probs.argmax(1) != labels.long()).to(torch.int64)
    ood_scores = {name: _cls_scores(o) for name, o in ood.items()}
    rows = _classification_rows(probs, labels, entropy, mi, ood_scores, n_bins, intervals)

    data: dict[str, Any] = {
        "probs": probs,
        "labels": labels,
        "errors": errors,
        "entropy": entropy,
        "mi": mi,
        "ood": ood_scores,
        "variants": {},
    }
    frames: dict[str, pd.DataFrame] = {}
    notes: list[str] = []
    for key, (other, other_ood) in (variants or {}).items():
        spread = key != "deterministic"
        other_scores = {name: None if o is None else _cls_scores(o, spread) for name, o in other_ood.items()}
        o_probs = other.probs.detach().cpu()
        o_rows = _classification_rows(
            o_probs,
            labels,
            other.predictive_entropy.detach().cpu(),
            other.mutual_information.detach().cpu() if spread else None,
            other_scores,
            n_bins,
            intervals,
        )
        frames[key] = o_rows.frame()
        notes += [f"{key}: {n}" for n in o_rows.notes]
        o_rel = metrics.reliability_table(o_probs, labels, n_bins=n_bins)
        filled = np.flatnonzero(o_rel.count > 0)
        if filled.size:
            worst = int(filled[np.argmax(np.abs(o_rel.gap[filled]))])
            if o_rel.count[worst] < MIN_BIN_INPUTS:
                notes.append(
                    f"{key}: its MCE rests on bin {worst}, which holds {int(o_rel.count[worst])} inputs (fewer "
                    f"than {MIN_BIN_INPUTS}): a rough estimate."
                )
        missing = [name for name, o in other_ood.items() if o is None]
        if missing:
            notes.append(
                f"{key}: no {key} prediction of the OOD set(s) {', '.join(repr(n) for n in missing)}, so "
                f"their {key} OOD rows are NaN"
                + (
                    " (predict them with MCDropout.predict_deterministic, or predict_loader(..., "
                    "deterministic=True), and pass that as the OOD prediction's deterministic field)."
                    if key == "deterministic"
                    else "."
                )
            )
        data["variants"][key] = o_probs
    if "deterministic" in frames:
        notes.append(
            "deterministic: dropout off gives one output per input and no spread between passes, so "
            "its mutual-information rows (mean MI, misclassification and OOD AUROC by MI) are NaN."
        )

    per_input = replace(pred.cpu(), targets=labels, samples=None).to_frame()
    per_input.insert(per_input.columns.get_loc("correct") + 1, "error", errors.numpy())
    rel = reliability.to_frame()
    rel.insert(0, "bin", np.arange(len(rel)))
    rel["weight"] = reliability.weight
    rel["few_inputs"] = (rel["count"] > 0) & (rel["count"] < MIN_BIN_INPUTS)
    _flag_small_bins(rows, rel)
    summary = merge_variants(rows.frame(), frames)
    return Tables(summary, per_input, rel, rows.notes + notes, data)


def _flag_small_bins(rows: _Rows, rel: pd.DataFrame) -> None:
    """Flag the MCE when its bin holds fewer than MIN_BIN_INPUTS inputs, and note the small bins."""
    small = rel[rel["few_inputs"]]
    nonempty = rel[rel["count"] > 0]
    if len(nonempty):
        worst = nonempty.loc[nonempty["gap"].abs().idxmax()]
        if worst["count"] < MIN_BIN_INPUTS:
            rows.flags["MCE"] = (
                f"rests on bin {int(worst['bin'])}, which holds {int(worst['count'])} inputs "
                f"(fewer than {MIN_BIN_INPUTS})"
            )
    if len(small):
        rows.notes.append(
            f"{len(small)} of the {len(nonempty)} non-empty reliability bins hold fewer than {MIN_BIN_INPUTS} "
            f"inputs (bins {', '.join(str(int(b)) for b in small['bin'])}; few_inputs in the reliability "
            "table): their accuracy is a rough estimate"
            + (", and the MCE rests on one of them." if "MCE" in rows.flags else ".")
        )


# ----------------------------------------------------------------------------------------------
# regression
# ----------------------------------------------------------------------------------------------
def _regression_rows(
    mean: np.ndarray,
    y: np.ndarray,
    sigma: np.ndarray | None,
    epistemic: np.ndarray | None,
    aleatoric: np.ndarray | None,
    scores_in: dict[str, np.ndarray | None],
    ood: dict[str, dict[str, np.ndarray | None] | None],
    level: float,
    intervals: Intervals,
) -> tuple[_Rows, bool]:
    """The metric rows of one regression prediction; ``sigma=None``: no predictive spread (NaN rows).

    Returns the rows and whether every predicted std is positive (the Gaussian metrics defined).
    """
    z = NormalDist().inv_cdf((1 + level) / 2)
    std_ok = sigma is not None and bool((sigma > 0).all())
    sigma_text = "σ_i = total std" if aleatoric is not None else "σ_i = MC std"
    nan = float("nan")
    rows = _Rows()
    rows.group = "regression"
    rows.add("RMSE", metrics.rmse(mean, y), "√((1/n) Σ_i (μ_i − y_i)²), μ_i = MC mean", False)
    rows.add("MAE", metrics.mae(mean, y), "(1/n) Σ_i |μ_i − y_i|", False)
    s: np.ndarray = sigma if sigma is not None else np.ones_like(mean)
    gaussian: list[tuple[str, str, Callable[[], float], str, bool | None]] = [
        (
            "regression",
            "Gaussian NLL",
            lambda: metrics.gaussian_nll(mean, s, y),
            f"(1/n) Σ_i [½ ln(2πσ_i²) + (y_i − μ_i)²/(2σ_i²)], {sigma_text} (nats)",
            False,
        ),
        (
            "regression",
            "CRPS",
            lambda: metrics.crps_gaussian(mean, s, y),
            "(1/n) Σ_i σ_i [z_i(2Φ(z_i) − 1) + 2φ(z_i) − 1/√π], z_i = (y_i − μ_i)/σ_i",
            False,
        ),
        (
            "calibration",
            f"PICP ({_pct(level)})",
            lambda: metrics.picp(mean, s, y, level=level),
            f"(1/n) Σ_i [|y_i − μ_i| ≤ z·σ_i], z = Φ⁻¹((1 + {level:g})/2) = {z:.3f}; ideal {level:g}",
            None,
        ),
        (
            "calibration",
            f"MPIW ({_pct(level)})",
            lambda: metrics.mpiw(s, level=level),
            f"(1/n) Σ_i 2·z·σ_i, z = {z:.3f}",
            False,
        ),
        (
            "calibration",
            "miscalibration area",
            lambda: metrics.miscalibration_area(mean, s, y),
            "area between observed and expected coverage of central intervals, 100 levels on [0, 1]",
            False,
        ),
        (
            "calibration",
            "MACE",
            lambda: metrics.mean_absolute_calibration_error(mean, s, y),
            "(1/L) Σ_j |p_obs(p_j) − p_j|, L = 100 coverage levels p_j on [0, 1]",
            False,
        ),
        (
            "calibration",
            "RMSCE",
            lambda: metrics.root_mean_squared_calibration_error(mean, s, y),
            "√((1/L) Σ_j (p_obs(p_j) − p_j)²), L = 100 coverage levels",
            False,
        ),
        ("calibration", "sharpness", lambda: metrics.sharpness(s), "√((1/n) Σ_i σ_i²)", False),
    ]
    for group, metric, compute, definition, better in gaussian:
        rows.group = group
        rows.add(metric, compute() if std_ok else nan, definition, better)
    rows.group = "uncertainty"
    rows.add(
        "mean epistemic std",
        nan if epistemic is None else float(epistemic.mean()),
        "(1/n) Σ_i √((1/N) Σ_t (y_it − μ_i)²), the spread of the N passes",
        None,
    )
    if aleatoric is not None:
        rows.add(
            "mean aleatoric std",
            float(aleatoric.mean()),
            "(1/n) Σ_i √((1/N) Σ_t σ²_it), the noise the model predicts",
            None,
        )
    for name, scores_out in ood.items():
        rows.group = ood_group(name)
        sfx = ood_suffix(name)
        for tag, s_in in scores_in.items():
            s_out = None if scores_out is None else scores_out.get(tag)
            ok = s_in is not None and s_out is not None
            rows.add(
                f"OOD AUROC ({tag}){sfx}",
                metrics.ood_auroc(s_in, s_out) if ok else nan,
                f"P({tag} of an OOD input > {tag} of an in-distribution input) + ½ P(tie)",
                True,
            )
            rows.add(
                f"OOD AUPR-In ({tag}){sfx}",
                metrics.ood_aupr(s_in, s_out, positive="in") if ok else nan,
                f"average precision with in-distribution inputs as positives, scored by −({tag})",
                True,
            )
            rows.add(
                f"OOD FPR@95TPR ({tag}){sfx}",
                metrics.fpr_at_tpr(s_in, s_out, tpr=0.95, positive="in") if ok else nan,
                f"fraction of OOD inputs with {tag} ≤ the threshold that keeps 95% of in-distribution inputs",
                False,
            )

    if intervals.n_resamples > 0:
        opts = {"n_resamples": intervals.n_resamples, "seed": intervals.seed}
        averaged = {
            tag: v for tag, v in (("epistemic", epistemic), ("aleatoric", aleatoric)) if v is not None
        }
        boot = metrics.bootstrap_regression(
            mean, sigma if std_ok else None, y, averaged or None, level=level, **opts
        )
        named = {f"PICP ({_pct(level)})": boot.get("PICP"), f"MPIW ({_pct(level)})": boot.get("MPIW")}
        named.update({f"mean {tag} std": boot[f"mean ({tag})"] for tag in averaged})
        named.update(_ood_resamples(scores_in, ood, opts))
        rows.intervals({**boot, **{k: v for k, v in named.items() if v is not None}}, intervals.level)
    return rows, std_ok


def _reg_arrays(
    pred: RegressionPrediction, spread: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``(mean, sigma, epistemic, aleatoric)`` of one output; without MC spread sigma is the aleatoric std."""
    mean = _flat(pred.mean)
    aleatoric = None if pred.aleatoric_variance is None else np.sqrt(_flat(pred.aleatoric_variance))
    if spread:
        return mean, _flat(pred.total_std), _flat(pred.std), aleatoric
    return mean, aleatoric, None, aleatoric


def _reg_scores(
    sigma: np.ndarray | None, epistemic: np.ndarray | None, with_aleatoric: bool
) -> dict[str, np.ndarray | None]:
    if with_aleatoric:
        return {"total std": sigma, "epistemic std": epistemic}
    return {"std": sigma if epistemic is not None else None}


def regression_tables(
    pred: RegressionPrediction,
    targets: torch.Tensor,
    ood: dict[str, RegressionPrediction],
    level: float,
    intervals: Intervals = Intervals(),
    variants: dict[str, tuple[RegressionPrediction, dict[str, RegressionPrediction | None]]] | None = None,
) -> Tables:
    """Summary, per-input and calibration-curve tables of a regression model (one output).

    ``variants`` as for :func:`classification_tables`. A deterministic prediction (dropout off) has
    no epistemic spread: its Gaussian rows use the aleatoric std when the model has an aleatoric
    head and are NaN otherwise; its epistemic rows are NaN.
    """
    mean, sigma, epistemic, aleatoric = _reg_arrays(pred, spread=True)
    assert sigma is not None
    y = _flat(targets)
    z = NormalDist().inv_cdf((1 + level) / 2)
    with_aleatoric = aleatoric is not None
    scores_in = _reg_scores(sigma, epistemic, with_aleatoric)
    ood_scores: dict[str, dict[str, np.ndarray | None] | None] = {}
    for name, o in ood.items():
        _, s_out, e_out, _ = _reg_arrays(o, spread=True)
        ood_scores[name] = _reg_scores(s_out, e_out, with_aleatoric)
    rows, std_ok = _regression_rows(
        mean, y, sigma, epistemic, aleatoric, scores_in, ood_scores, level, intervals
    )
    notes: list[str] = []
    if not std_ok:
        n_zero = int((sigma <= 0).sum())
        notes.append(
            f"{n_zero} of {sigma.size} inputs have a predicted std of 0 (all N = {pred.n_samples} passes "
            "agreed), so the Gaussian metrics and the interval figures are undefined (NaN, omitted). "
            "Use more samples, a higher dropout rate, or an aleatoric head."
        )
    data: dict[str, Any] = {
        "mean": mean,
        "std": sigma,
        "targets": y,
        "std_ok": std_ok,
        "ood_scores": {
            name: {tag: (scores_in[tag], s[tag]) for tag in scores_in} for name, s in ood_scores.items() if s
        },
        "variants": {},
    }
    frames: dict[str, pd.DataFrame] = {}
    for key, (other, other_ood) in (variants or {}).items():
        spread = key != "deterministic"
        o_mean, o_sigma, o_epi, o_ale = _reg_arrays(other, spread)
        o_ood = {}
        for name, o in other_ood.items():
            if o is None:
                o_ood[name] = None
            else:
                _, s_out, e_out, _ = _reg_arrays(o, spread)
                o_ood[name] = _reg_scores(s_out, e_out, with_aleatoric)
        o_rows, o_ok = _regression_rows(
            o_mean,
            y,
            o_sigma,
            o_epi,
            o_ale,
            _reg_scores(o_sigma, o_epi, with_aleatoric),
            o_ood,
            level,
            intervals,
        )
        frames[key] = o_rows.frame()
        notes += [f"{key}: {n}" for n in o_rows.notes]
        if key == "deterministic":
            notes.append(
                "deterministic: dropout off gives one output per input and no epistemic spread; "
                + (
                    "its Gaussian metrics use the aleatoric std alone and its epistemic rows are NaN."
                    if with_aleatoric
                    else "without an aleatoric head it has no predictive std, so its Gaussian, interval "
                    "and OOD rows are NaN: only RMSE and MAE compare."
                )
            )
        elif not o_ok:
            notes.append(f"{key}: some predicted std is 0, so its Gaussian rows are NaN.")
        if o_ok:
            assert o_sigma is not None
            data["variants"][key] = (o_mean, o_sigma)

    per_input = replace(pred.cpu(), targets=torch.as_tensor(y), samples=None).to_frame(level=level)
    residual = y - mean
    per_input["error"] = residual
    per_input["abs_error"] = np.abs(residual)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_input["z_score"] = np.where(sigma > 0, residual / np.where(sigma > 0, sigma, 1.0), np.nan)
    per_input[f"inside_{level:g}"] = np.abs(residual) <= z * sigma

    if std_ok:
        curve = metrics.calibration_curve(mean, sigma, y)
        calib = pd.DataFrame({"expected": curve.expected, "observed": curve.observed})
        calib["gap"] = calib["observed"] - calib["expected"]
    else:
        calib = pd.DataFrame({"expected": [], "observed": [], "gap": []}, dtype=np.float64)
    summary = merge_variants(rows.frame(), frames)
    return Tables(summary, per_input, calib, rows.notes + notes, data)
