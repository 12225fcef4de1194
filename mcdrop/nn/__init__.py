"""mcdrop's own training-time dropout: layers and functional ops (layer 1: knows only torch).

:class:`Dropout` and :class:`Dropout2d` are drop-in replacements for :class:`torch.nn.Dropout` and
:class:`torch.nn.Dropout2d`; :mod:`mcdrop.nn.functional` holds :func:`~mcdrop.nn.functional.dropout`
and :func:`~mcdrop.nn.functional.dropout2d`, which also accept a :class:`torch.Generator`.

Example:
    >>> import torch
    >>> from mcdrop.nn import Dropout, Dropout2d, functional
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), Dropout2d(0.1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 8), Dropout(0.5), torch.nn.Linear(8, 2))
    >>> net(torch.randn(5, 1, 8, 8)).shape
    torch.Size([5, 2])
    >>> gen = torch.Generator().manual_seed(0)
    >>> functional.dropout(torch.ones(4), p=0.0, generator=gen).tolist()
    [1.0, 1.0, 1.0, 1.0]
"""

from mcdrop.nn import functional
from mcdrop.nn.modules import Dropout, Dropout2d

__all__ = ["Dropout", "Dropout2d", "functional"]
