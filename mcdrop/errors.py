"""The exceptions and warnings mcdrop raises.

Every error the library raises derives from :class:`McdropError`, so a caller can catch all of them
with one ``except`` clause. Errors about bad arguments also derive from :class:`ValueError` (or
:class:`TypeError`), so code written against plain Python conventions keeps working. The one
exception is :class:`CliError`, the ``mcdrop`` command's own: it never leaves :func:`mcdrop.cli.main`,
which turns it into a message and exit code 2.

Each message says what was wrong, what was expected, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "McdropError",
    "InvalidInputError",
    "InvalidTypeError",
    "NoDropoutError",
    "NonFiniteError",
    "ModelStateError",
    "UnsupportedModelError",
    "ReportExistsError",
    "NotFittedError",
    "MissingDependencyError",
    "CliError",
    "McdropWarning",
    "NoRandomnessWarning",
    "GateRandomnessWarning",
    "RowCheckWarning",
]


class McdropError(Exception):
    """Base class of every error raised by mcdrop.

    Example:
        >>> import mcdrop
        >>> try:
        ...     mcdrop.nn.Dropout(p=1.5)
        ... except mcdrop.McdropError as err:
        ...     print(type(err).__name__)
        InvalidInputError
    """


class InvalidInputError(McdropError, ValueError):
    """An argument or an input tensor has a wrong value, shape or range."""


class InvalidTypeError(McdropError, TypeError):
    """An argument has a type mcdrop cannot use."""


class NoDropoutError(McdropError):
    """The model has no source of dropout randomness that MC dropout could sample."""


class NonFiniteError(InvalidInputError):
    """An input holds NaN or +inf (or overflows the model's dtype), or a model output holds NaN or +inf.

    ``-inf`` is allowed in inputs, where additive attention masks put it.
    """


class ModelStateError(McdropError):
    """Sampling would have changed (and was prevented from changing) the user's model state."""


class UnsupportedModelError(McdropError):
    """The model uses a construct mcdrop cannot sample correctly."""


class ReportExistsError(McdropError, FileExistsError):
    """A report folder already exists with content, and overwriting it was not allowed (or not safe)."""


class NotFittedError(McdropError, ValueError, AttributeError):
    """A recalibrator was used before :meth:`fit` was called.

    Also re-exported as ``mcdrop.recalibration.NotFittedError``.
    """


class MissingDependencyError(McdropError, ImportError):
    """An optional dependency of the feature used is not installed; the message names the extra.

    Example:
        >>> import mcdrop
        >>> issubclass(mcdrop.errors.MissingDependencyError, ImportError)
        True
    """


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2.

    Raised and caught inside the ``mcdrop`` command (also re-exported as ``mcdrop.cli.CliError``).
    Unlike the library's errors it does not derive from :class:`McdropError`.
    """


class McdropWarning(UserWarning):
    """Base class of the warnings mcdrop emits."""


class NoRandomnessWarning(McdropWarning):
    """The model's stochastic sites are all inactive (rate 0), or every sample came out identical."""


class TrainModeRandomnessWarning(McdropWarning):
    """Train mode draws randomness that is not dropout, or that mcdrop found but cannot sample safely.

    Raised at sampling time, naming the module and the ``include=``/``exclude=`` that settles it:
    a sampled gate whose train mode adds noise, a coin for the whole pass (a random flip) or
    integers (a permutation) rather than dropout masks, which every MC sample then carries; or a
    module whose train-gated randomness the static scan did not see, found at run time (see
    :mod:`mcdrop.engine.discover`), which is not dropout or whose train mode also changes more than
    randomness, so it is left off.

    Example:
        >>> import warnings
        >>> import torch, mcdrop
        >>> class Noise(torch.nn.Module):  # train-mode Gaussian noise, not dropout
        ...     def forward(self, x):
        ...         return x + 0.1 * torch.randn_like(x) if self.training else x
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), Noise(), torch.nn.Dropout(0.2)).eval()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = mcdrop.MCDropout(net, n_samples=4, seed=0).predict(torch.ones(2, 3))
        >>> [w.category.__name__ for w in caught]
        ['TrainModeRandomnessWarning']
    """


class GateRandomnessWarning(McdropWarning):
    """A module sampled in train mode draws from numpy's or Python's RNG, not torch's.

    Such randomness is not one of the dropout operations mcdrop knows (it is often data
    augmentation, such as SpecAugment masking), and ``seed=`` cannot make it reproducible.

    Example:
        >>> import warnings
        >>> import numpy as np, torch, mcdrop
        >>> class Augment(torch.nn.Module):  # train-mode noise from numpy, not dropout
        ...     def forward(self, x):
        ...         return x * float(np.random.rand() > 0.1) if self.training else x
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), Augment(), torch.nn.Dropout(0.2))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = mcdrop.MCDropout(net, n_samples=4, seed=0).predict(torch.ones(2, 3))
        >>> [type(w.message).__name__ for w in caught]
        ['GateRandomnessWarning']
    """


class RowCheckWarning(McdropWarning):
    """Replicas or a split batch were asked for, but mcdrop could not check that rows are independent.

    The check that a row's output does not depend on the other rows of its pass (see
    ``docs/performance.md``) gives no verdict when the model fails on the check's rows or draws
    randomness it cannot make constant (``torch.randint``, ``torch.randperm``, numpy). With
    ``strategy="auto"`` and no ``max_batch_size`` mcdrop then gives every pass the whole batch
    once, which is always correct; ``strategy="replicate"`` or a ``max_batch_size`` below the batch
    size is honoured, with this warning.

    Example:
        >>> import warnings
        >>> import torch, mcdrop
        >>> class CoinMask(torch.nn.Module):  # randomness the row check cannot make constant
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin, self.drop = torch.nn.Linear(4, 4), torch.nn.Dropout(0.3)
        ...     def forward(self, x):
        ...         h = self.drop(self.lin(x))
        ...         return h * torch.randint(0, 2, h.shape) if self.training else h
        >>> net = CoinMask()
        >>> mc = mcdrop.MCDropout(net, n_samples=4, seed=0, task="regression", include=[CoinMask], max_batch_size=2)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = mc.predict(torch.ones(4, 4))
        >>> [type(w.message).__name__ for w in caught]
        ['RowCheckWarning']
    """
