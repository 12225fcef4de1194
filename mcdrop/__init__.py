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

__version__ = "0.1.0"

__all__ = [
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
