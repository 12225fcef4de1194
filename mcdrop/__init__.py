"""mcdrop: Monte Carlo dropout uncertainty for any PyTorch model.

Example:
    >>> import torch, mcdrop
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                           torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    >>> mc = mcdrop.MCDropout(net.eval(), n_samples=20, seed=0)
    >>> pred = mc.predict(torch.randn(8, 4))
    >>> pred.probs.shape
    torch.Size([8, 3])
"""

from mcdrop import metrics, nn
from mcdrop.engine.checks import checking
from mcdrop.errors import (
    GateRandomnessWarning,
    InvalidInputError,
    InvalidTypeError,
    McdropError,
    McdropWarning,
    ModelStateError,
    NoDropoutError,
    NonFiniteError,
    NoRandomnessWarning,
    ReportExistsError,
    RowCheckWarning,
    TrainModeRandomnessWarning,
    UnsupportedModelError,
)
from mcdrop.metrics.streaming import (
    StreamingClassificationMetrics,
    StreamingMetrics,
    StreamingRegressionMetrics,
)
from mcdrop.policy.activate import StochasticPolicy, describe, enable_dropout
from mcdrop.policy.classify import (
    StochasticSite,
    find_stochastic_sites,
    register_deterministic,
    register_stochastic,
)
from mcdrop.policy.edit import RateChange, add_dropout, set_dropout_rate
from mcdrop.predictions import (
    ClassificationPrediction,
    Prediction,
    RegressionPrediction,
    concat_predictions,
)
from mcdrop.recalibration import IsotonicRecalibration, TemperatureScaling, VarianceScaling
from mcdrop.wrapper import MCDropout

__version__ = "0.1.0"

__all__ = [
    "MCDropout",
    "enable_dropout",
    "find_stochastic_sites",
    "register_stochastic",
    "register_deterministic",
    "describe",
    "checking",
    "add_dropout",
    "set_dropout_rate",
    "RateChange",
    "StochasticPolicy",
    "StochasticSite",
    "Prediction",
    "ClassificationPrediction",
    "RegressionPrediction",
    "concat_predictions",
    "StreamingMetrics",
    "StreamingClassificationMetrics",
    "StreamingRegressionMetrics",
    "distributed",
    "acquisition",
    "nn",
    "metrics",
    "TemperatureScaling",
    "VarianceScaling",
    "IsotonicRecalibration",
    "InvalidInputError",
    "InvalidTypeError",
    "McdropError",
    "McdropWarning",
    "GateRandomnessWarning",
    "RowCheckWarning",
    "TrainModeRandomnessWarning",
    "ModelStateError",
    "NoDropoutError",
    "NonFiniteError",
    "NoRandomnessWarning",
    "UnsupportedModelError",
    "ReportExistsError",
    "report",
    "compare",
    "UncertaintyReport",
    "__version__",
]


def __getattr__(name: str) -> object:
    """Load the report layer (pandas, matplotlib, seaborn) and ``distributed`` only when first used."""
    if name in ("distributed", "acquisition"):
        import importlib

        return importlib.import_module(f"mcdrop.{name}")
    if name in ("report", "compare", "UncertaintyReport"):
        import importlib

        module = importlib.import_module("mcdrop.report")  # callable: mcdrop.report(pred) works
        return module if name == "report" else getattr(module, name)
    raise AttributeError(f"module 'mcdrop' has no attribute {name!r}")
