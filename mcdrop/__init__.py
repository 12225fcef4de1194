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

from mcdrop import nn
from mcdrop.errors import (
    InvalidInputError,
    InvalidTypeError,
    McdropError,
    McdropWarning,
    ModelStateError,
    NoDropoutError,
    NonFiniteError,
    NoRandomnessWarning,
    UnsupportedModelError,
)
from mcdrop.predictions import (
    ClassificationPrediction,
    Prediction,
    RegressionPrediction,
    concat_predictions,
)
from mcdrop.stochastic import (
    StochasticPolicy,
    StochasticSite,
    enable_dropout,
    find_stochastic_sites,
    register_deterministic,
    register_stochastic,
)
from mcdrop.wrapper import MCDropout

__version__ = "0.1.0"

__all__ = [
    "MCDropout",
    "enable_dropout",
    "find_stochastic_sites",
    "register_stochastic",
    "register_deterministic",
    "StochasticPolicy",
    "StochasticSite",
    "Prediction",
    "ClassificationPrediction",
    "RegressionPrediction",
    "concat_predictions",
    "nn",
    "InvalidInputError",
    "InvalidTypeError",
    "McdropError",
    "McdropWarning",
    "ModelStateError",
    "NoDropoutError",
    "NonFiniteError",
    "NoRandomnessWarning",
    "UnsupportedModelError",
    "__version__",
]
