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

SUMMARY_COLUMNS = ["metric", "value", "ci_low", "ci_high", "definition", "higher_is_better", "flag"]
COUNT_METRICS = ("n_inputs", "n_samples", "n_ood")
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
        self.resamples: dict[str, np.ndarray] = {}

    def add(self, metric: str, value: float | int, definition: str, higher_is_better: bool | None) -> None:
        self.rows.append(
            {
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
        self.resamples.update(resamples)
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
        frame["value"] = frame["value"].astype(np.float64)
        frame["ci_low"] = frame["ci_low"].astype(np.float64)
        frame["ci_high"] = frame["ci_high"].astype(np.float64)
        frame["flag"] = frame["flag"].astype(object)
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
def classification_tables(
    pred: ClassificationPrediction,
    targets: torch.Tensor,
    ood: ClassificationPrediction | None,
    n_bins: int,
    intervals: Intervals = Intervals(),
) -> Tables:
    """Summary, per-input and reliability tables of a classifier, with bootstrap intervals."""
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
    k = pred.n_classes
    m = n_bins

    rows = _Rows()
    rows.add("accuracy", metrics.accuracy(probs, labels), "(1/n) Σ_i [argmax_k p̄_ik = y_i]", True)
    rows.add(
        "NLL",
        metrics.negative_log_likelihood(probs, labels),
        "−(1/n) Σ_i ln max(p̄_i,y_i, ε), ε = machine epsilon (nats)",
        False,
    )
    rows.add("Brier", metrics.brier_score(probs, labels), "(1/n) Σ_i Σ_k (p̄_ik − [y_i = k])²", False)
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
    rows.try_add(
        "misclassification AUROC (MI)",
        lambda: metrics.misclassification_auroc(mi, errors),
        "P(MI of a wrong prediction > MI of a right one) + ½ P(tie)",
        True,
    )
    rows.add(
        "mean predictive entropy",
        float(entropy.double().mean()),
        "(1/n) Σ_i H[p̄_i], H[p] = −Σ_k p_k ln p_k (nats; total uncertainty)",
        None,
    )
    rows.add(
        "mean mutual information",
        float(mi.double().mean()),
        "(1/n) Σ_i (H[p̄_i] − (1/N) Σ_t H[p_it]) (nats; epistemic uncertainty)",
        None,
    )
    rows.add("n_inputs", len(pred), "number of evaluated inputs n", None)
    rows.add("n_samples", pred.n_samples, "stochastic forward passes per input N", None)

    data: dict[str, Any] = {"probs": probs, "labels": labels, "errors": errors, "entropy": entropy, "mi": mi}
    if ood is not None:
        ent_out = ood.predictive_entropy.detach().cpu()
        mi_out = ood.mutual_information.detach().cpu()
        for tag, s_in, s_out, sym in (("entropy", entropy, ent_out, "H[p̄]"), ("MI", mi, mi_out, "MI")):
            rows.add(
                f"OOD AUROC ({tag})",
                metrics.ood_auroc(s_in, s_out),
                f"P({sym} of an OOD input > {sym} of an in-distribution input) + ½ P(tie)",
                True,
            )
            rows.add(
                f"OOD AUPR-In ({tag})",
                metrics.ood_aupr(s_in, s_out, positive="in"),
                f"average precision with in-distribution inputs as positives, scored by −{sym}",
                True,
            )
            rows.add(
                f"OOD FPR@95TPR ({tag})",
                metrics.fpr_at_tpr(s_in, s_out, tpr=0.95, positive="in"),
                f"fraction of OOD inputs with {sym} ≤ the threshold that keeps 95% of in-distribution inputs",
                False,
            )
        rows.add("n_ood", len(ood), "number of out-of-distribution inputs", None)
        data.update(ood_entropy=ent_out, ood_mi=mi_out)

    if intervals.n_resamples > 0:
        opts = {"n_resamples": intervals.n_resamples, "seed": intervals.seed}
        scores = {"entropy": entropy, "MI": mi}
        boot = metrics.bootstrap_classification(probs, labels, scores, scores, n_bins=m, **opts)
        named = {
            "AURC": boot["AURC (entropy)"],
            "E-AURC": boot["E-AURC (entropy)"],
            "mean predictive entropy": boot["mean (entropy)"],
            "mean mutual information": boot["mean (MI)"],
        }
        if ood is not None:
            for tag, s_in, s_out in (("entropy", entropy, ent_out), ("MI", mi, mi_out)):
                o = metrics.bootstrap_ood(s_in, s_out, tpr=0.95, **opts)
                named.update(
                    {
                        f"OOD AUROC ({tag})": o["AUROC"],
                        f"OOD AUPR-In ({tag})": o["AUPR-In"],
                        f"OOD FPR@95TPR ({tag})": o["FPR@TPR"],
                    }
                )
        rows.intervals({**boot, **named}, intervals.level)

    per_input = replace(pred.cpu(), targets=labels, samples=None).to_frame()
    per_input.insert(per_input.columns.get_loc("correct") + 1, "error", errors.numpy())
    rel = reliability.to_frame()
    rel.insert(0, "bin", np.arange(len(rel)))
    rel["weight"] = reliability.weight
    rel["few_inputs"] = (rel["count"] > 0) & (rel["count"] < MIN_BIN_INPUTS)
    _flag_small_bins(rows, rel)
    return Tables(rows.frame(), per_input, rel, rows.notes, data)


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
def regression_tables(
    pred: RegressionPrediction,
    targets: torch.Tensor,
    ood: RegressionPrediction | None,
    level: float,
    intervals: Intervals = Intervals(),
) -> Tables:
    """Summary, per-input and calibration-curve tables of a regression model (one output)."""
    mean = _flat(pred.mean)
    y = _flat(targets)
    sigma = _flat(pred.total_std)
    epistemic = _flat(pred.std)
    aleatoric = None if pred.aleatoric_variance is None else np.sqrt(_flat(pred.aleatoric_variance))
    z = NormalDist().inv_cdf((1 + level) / 2)
    std_ok = bool((sigma > 0).all())
    sigma_text = "σ_i = total std" if aleatoric is not None else "σ_i = MC std"
    notes: list[str] = []

    rows = _Rows()
    rows.add("RMSE", metrics.rmse(mean, y), "√((1/n) Σ_i (μ_i − y_i)²), μ_i = MC mean", False)
    rows.add("MAE", metrics.mae(mean, y), "(1/n) Σ_i |μ_i − y_i|", False)
    gaussian: list[tuple[str, Callable[[], float], str, bool | None]] = [
        (
            "Gaussian NLL",
            lambda: metrics.gaussian_nll(mean, sigma, y),
            f"(1/n) Σ_i [½ ln(2πσ_i²) + (y_i − μ_i)²/(2σ_i²)], {sigma_text} (nats)",
            False,
        ),
        (
            "CRPS",
            lambda: metrics.crps_gaussian(mean, sigma, y),
            "(1/n) Σ_i σ_i [z_i(2Φ(z_i) − 1) + 2φ(z_i) − 1/√π], z_i = (y_i − μ_i)/σ_i",
            False,
        ),
        (
            f"PICP ({_pct(level)})",
            lambda: metrics.picp(mean, sigma, y, level=level),
            f"(1/n) Σ_i [|y_i − μ_i| ≤ z·σ_i], z = Φ⁻¹((1 + {level:g})/2) = {z:.3f}; ideal {level:g}",
            None,
        ),
        (
            f"MPIW ({_pct(level)})",
            lambda: metrics.mpiw(sigma, level=level),
            f"(1/n) Σ_i 2·z·σ_i, z = {z:.3f}",
            False,
        ),
        (
            "miscalibration area",
            lambda: metrics.miscalibration_area(mean, sigma, y),
            "area between observed and expected coverage of central intervals, 100 levels on [0, 1]",
            False,
        ),
        (
            "MACE",
            lambda: metrics.mean_absolute_calibration_error(mean, sigma, y),
            "(1/L) Σ_j |p_obs(p_j) − p_j|, L = 100 coverage levels p_j on [0, 1]",
            False,
        ),
        (
            "RMSCE",
            lambda: metrics.root_mean_squared_calibration_error(mean, sigma, y),
            "√((1/L) Σ_j (p_obs(p_j) − p_j)²), L = 100 coverage levels",
            False,
        ),
        ("sharpness", lambda: metrics.sharpness(sigma), "√((1/n) Σ_i σ_i²)", False),
    ]
    for metric, compute, definition, better in gaussian:
        if std_ok:
            rows.add(metric, compute(), definition, better)
        else:
            rows.add(metric, float("nan"), definition, better)
    if not std_ok:
        n_zero = int((sigma <= 0).sum())
        notes.append(
            f"{n_zero} of {sigma.size} inputs have a predicted std of 0 (all N = {pred.n_samples} passes "
            "agreed), so the Gaussian metrics and the interval figures are undefined (NaN, omitted). "
            "Use more samples, a higher dropout rate, or an aleatoric head."
        )
    rows.add(
        "mean epistemic std",
        float(epistemic.mean()),
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
    rows.add("n_inputs", len(pred), "number of evaluated inputs n", None)
    rows.add("n_samples", pred.n_samples, "stochastic forward passes per input N", None)

    data: dict[str, Any] = {"mean": mean, "std": sigma, "targets": y, "std_ok": std_ok}
    if ood is not None:
        sigma_out = _flat(ood.total_std)
        scores = [("total std" if aleatoric is not None else "std", sigma, sigma_out)]
        if aleatoric is not None:
            scores.append(("epistemic std", epistemic, _flat(ood.std)))
        for tag, s_in, s_out in scores:
            rows.add(
                f"OOD AUROC ({tag})",
                metrics.ood_auroc(s_in, s_out),
                f"P({tag} of an OOD input > {tag} of an in-distribution input) + ½ P(tie)",
                True,
            )
            rows.add(
                f"OOD AUPR-In ({tag})",
                metrics.ood_aupr(s_in, s_out, positive="in"),
                f"average precision with in-distribution inputs as positives, scored by −({tag})",
                True,
            )
            rows.add(
                f"OOD FPR@95TPR ({tag})",
                metrics.fpr_at_tpr(s_in, s_out, tpr=0.95, positive="in"),
                f"fraction of OOD inputs with {tag} ≤ the threshold that keeps 95% of in-distribution inputs",
                False,
            )
        rows.add("n_ood", len(ood), "number of out-of-distribution inputs", None)
        data["ood_scores"] = {tag: (s_in, s_out) for tag, s_in, s_out in scores}

    if intervals.n_resamples > 0:
        opts = {"n_resamples": intervals.n_resamples, "seed": intervals.seed}
        averaged = (
            {"epistemic": epistemic}
            if aleatoric is None
            else {"epistemic": epistemic, "aleatoric": aleatoric}
        )
        boot = metrics.bootstrap_regression(mean, sigma if std_ok else None, y, averaged, level=level, **opts)
        named = {f"PICP ({_pct(level)})": boot.get("PICP"), f"MPIW ({_pct(level)})": boot.get("MPIW")}
        named.update({f"mean {tag} std": boot[f"mean ({tag})"] for tag in averaged})
        if ood is not None:
            for tag, s_in, s_out in scores:
                o = metrics.bootstrap_ood(s_in, s_out, tpr=0.95, **opts)
                named.update(
                    {
                        f"OOD AUROC ({tag})": o["AUROC"],
                        f"OOD AUPR-In ({tag})": o["AUPR-In"],
                        f"OOD FPR@95TPR ({tag})": o["FPR@TPR"],
                    }
                )
        rows.intervals({**boot, **{k: v for k, v in named.items() if v is not None}}, intervals.level)

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
    return Tables(rows.frame(), per_input, calib, rows.notes + notes, data)
