"""Dropout layers: drop-in replacements for :class:`torch.nn.Dropout` and :class:`torch.nn.Dropout2d`.

The layers take the same constructor arguments, expose the same attributes (``p``, ``inplace``),
print the same ``extra_repr``, hold no state in ``state_dict`` and script with
:func:`torch.jit.script`. In training mode they apply :func:`mcdrop.nn.functional.dropout` /
:func:`mcdrop.nn.functional.dropout2d`; in eval mode they are the identity.

Example:
    >>> import torch
    >>> from mcdrop.nn import Dropout
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), Dropout(p=0.2), torch.nn.Linear(8, 2))
    >>> net[1]
    Dropout(p=0.2, inplace=False)
    >>> net.eval()(torch.randn(3, 4)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mcdrop._checks import check_rate
from mcdrop.nn import functional as F
from mcdrop.nn.functional import _check_channel_shape, _dropout2d_impl, _dropout_impl

__all__ = ["Dropout", "Dropout2d"]


class _DropoutBase(nn.Module):
    """Shared constructor, validation and ``extra_repr`` of the dropout layers."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = p
        self.inplace = inplace

    def __setattr__(self, name: str, value: Any) -> None:
        # Validate on every assignment (constructor or later ``layer.p = ...``), so the kernels can
        # rely on 0 <= p <= 1. Coerced to float/bool so TorchScript sees stable attribute types.
        if name == "p":
            value = check_rate(value)
        elif name == "inplace":
            value = bool(value)
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        """Return ``"p=..., inplace=..."``, the same text :mod:`torch.nn` dropout layers print.

        Returns:
            The text shown between the parentheses of the layer's ``repr``.

        Example:
            >>> from mcdrop.nn import Dropout
            >>> Dropout(0.1, inplace=True).extra_repr()
            'p=0.1, inplace=True'
        """
        return f"p={self.p}, inplace={self.inplace}"


class Dropout(_DropoutBase):
    """Element-wise inverted dropout layer, a drop-in replacement for :class:`torch.nn.Dropout`.

    In training mode each element is zeroed with probability ``p`` and the kept elements are
    scaled by ``1 / (1 - p)``; in eval mode the layer is the identity. Randomness comes from the
    global torch RNG (seed it with :func:`torch.manual_seed`); for an explicit
    :class:`torch.Generator`, call :func:`mcdrop.nn.functional.dropout`.

    Args:
        p: Probability of zeroing an element, in ``[0, 1]``. Stored as a float.
        inplace: If True, the input tensor is overwritten in training mode.

    Attributes:
        p: The drop probability; re-validated on assignment.
        inplace: Whether the forward pass works in place.

    Raises:
        InvalidTypeError: ``p`` is not a real number.
        InvalidInputError: ``p`` is NaN or outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> from mcdrop.nn import Dropout
        >>> layer = Dropout(p=0.5)
        >>> _ = torch.manual_seed(0)
        >>> out = layer(torch.ones(2, 6))
        >>> sorted(set(out.flatten().tolist()))
        [0.0, 2.0]
        >>> x = torch.ones(2, 6)
        >>> layer.eval()(x) is x
        True
    """

    def forward(self, input: Tensor) -> Tensor:
        """Apply element-wise dropout in training mode; return ``input`` itself in eval mode.

        Args:
            input: Floating-point tensor of any shape.

        Returns:
            A tensor shaped like ``input``.

        Example:
            >>> import torch
            >>> from mcdrop.nn import Dropout
            >>> Dropout(p=1.0)(torch.ones(3))
            tensor([0., 0., 0.])
        """
        if not torch.jit.is_scripting():
            return F.dropout(input, self.p, self.training, inplace=self.inplace)
        if not self.training or self.p == 0.0:
            return input
        return _dropout_impl(input, self.p, self.inplace, None)


class Dropout2d(_DropoutBase):
    """Channel-wise (feature) dropout layer, a drop-in replacement for :class:`torch.nn.Dropout2d`.

    For an input ``(N, C, *spatial)`` (``ndim >= 3``: 1-d ``(N, C, L)``, 2-d ``(N, C, H, W)`` or
    3-d ``(N, C, D, H, W)`` feature maps) each channel is zeroed entirely with probability ``p``
    and the kept channels are scaled by ``1 / (1 - p)``; in eval mode the layer is the identity.
    One class covers what :mod:`torch.nn` splits into ``Dropout1d``, ``Dropout2d`` and ``Dropout3d``.

    Args:
        p: Probability of zeroing a channel, in ``[0, 1]``. Stored as a float.
        inplace: If True, the input tensor is overwritten in training mode.

    Attributes:
        p: The drop probability; re-validated on assignment.
        inplace: Whether the forward pass works in place.

    Raises:
        InvalidTypeError: ``p`` is not a real number.
        InvalidInputError: ``p`` is NaN or outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> from mcdrop.nn import Dropout2d
        >>> _ = torch.manual_seed(0)
        >>> out = Dropout2d(p=0.5)(torch.ones(2, 4, 3, 3))
        >>> out.sum(dim=(2, 3)).unique().tolist()  # each channel sums to 0 or 9 * 2
        [0.0, 18.0]
    """

    def forward(self, input: Tensor) -> Tensor:
        """Zero whole channels in training mode; return ``input`` itself in eval mode.

        Args:
            input: Floating-point tensor of shape ``(N, C, *spatial)``, ``ndim >= 3``; the shape
                is checked in eval mode too.

        Returns:
            A tensor shaped like ``input``.

        Example:
            >>> import torch
            >>> from mcdrop.nn import Dropout2d
            >>> Dropout2d(p=0.0)(torch.ones(1, 2, 3)).tolist()
            [[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
        """
        if not torch.jit.is_scripting():
            return F.dropout2d(input, self.p, self.training, inplace=self.inplace)
        _check_channel_shape(input)
        if not self.training or self.p == 0.0:
            return input
        return _dropout2d_impl(input, self.p, self.inplace, None)
