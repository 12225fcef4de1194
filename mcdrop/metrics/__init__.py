"""Calibration and uncertainty metrics: pure functions on tensors or arrays, for any model.

Every metric accepts ``torch.Tensor`` (any device) or ``numpy.ndarray`` inputs (plain lists work
too) and returns a Python ``float``, or a small documented structure of numpy arrays for curves and
tables. Each states its exact definition in its docstring; ``docs/metrics.md`` lists them with
references and notes where the reference libraries differ.

Families:

* :mod:`mcdrop.metrics.calibration`: ECE / RMSCE / MCE, classwise ECE, reliability tables.
* :mod:`mcdrop.metrics.classification`: Brier score, negative log-likelihood, accuracy.
* :mod:`mcdrop.metrics.selective`: risk–coverage curve, AURC, E-AURC, misclassification AUROC.
* :mod:`mcdrop.metrics.ood`: OOD AUROC, AUPR, FPR at a TPR.
* :mod:`mcdrop.metrics.regression`: Gaussian NLL, CRPS, RMSE, MAE, sharpness, PICP, MPIW, calibration
  curves and errors, check and interval scores, the MC dropout test log-likelihood.
* :mod:`mcdrop.metrics.bootstrap`: percentile bootstrap intervals over inputs, vectorised over resamples.

Example:
    >>> import torch
    >>> from mcdrop import metrics
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> labels = torch.tensor([0, 1, 1])
    >>> round(metrics.expected_calibration_error(probs, labels), 4)
    0.3
    >>> round(metrics.accuracy(probs, labels), 4)
    0.6667
"""

from mcdrop.metrics.bootstrap import (
    BootstrapInterval,
    bootstrap_classification,
    bootstrap_indices,
    bootstrap_interval,
    bootstrap_ood,
    bootstrap_regression,
    percentile_interval,
)
from mcdrop.metrics.calibration import (
    ReliabilityTable,
    classwise_calibration_error,
    expected_calibration_error,
    reliability_table,
)
from mcdrop.metrics.classification import accuracy, brier_score, negative_log_likelihood
from mcdrop.metrics.ood import fpr_at_tpr, ood_aupr, ood_auroc
from mcdrop.metrics.regression import (
    CalibrationCurve,
    calibration_curve,
    check_score,
    crps_gaussian,
    gaussian_nll,
    interval_score,
    mae,
    mc_log_likelihood,
    mean_absolute_calibration_error,
    miscalibration_area,
    mpiw,
    picp,
    predictive_moments,
    rmse,
    root_mean_squared_calibration_error,
    sharpness,
)
from mcdrop.metrics.selective import (
    RiskCoverageCurve,
    aurc,
    e_aurc,
    misclassification_auroc,
    risk_coverage_curve,
)

__all__ = [
    # calibration
    "ReliabilityTable",
    "classwise_calibration_error",
    "expected_calibration_error",
    "reliability_table",
    # classification
    "accuracy",
    "brier_score",
    "negative_log_likelihood",
    # selective prediction and failure detection
    "RiskCoverageCurve",
    "aurc",
    "e_aurc",
    "misclassification_auroc",
    "risk_coverage_curve",
    # out-of-distribution detection
    "fpr_at_tpr",
    "ood_aupr",
    "ood_auroc",
    # regression
    "CalibrationCurve",
    "calibration_curve",
    "check_score",
    "crps_gaussian",
    "gaussian_nll",
    "interval_score",
    "mae",
    "mc_log_likelihood",
    "mean_absolute_calibration_error",
    "miscalibration_area",
    "mpiw",
    "picp",
    "predictive_moments",
    "rmse",
    "root_mean_squared_calibration_error",
    "sharpness",
    # bootstrap confidence intervals
    "BootstrapInterval",
    "bootstrap_classification",
    "bootstrap_indices",
    "bootstrap_interval",
    "bootstrap_ood",
    "bootstrap_regression",
    "percentile_interval",
]
