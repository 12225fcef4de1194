"""Functional dropout: element-wise and channel-wise inverted dropout, written without ``torch.dropout``.

Both functions draw a Bernoulli(1 - p) keep-mask with one ``torch.rand`` call (optionally from a
caller-supplied :class:`torch.Generator`) and scale the kept values by ``1 / (1 - p)``, so the
expectation of the output equals the input.

Example:
    >>> import torch
    >>> from mcdrop.nn import functional as F
    >>> gen = torch.Generator().manual_seed(0)
    >>> out = F.dropout(torch.ones(1000), p=0.75, generator=gen)
    >>> sorted(set(out.tolist()))  # dropped, or kept and scaled by 1 / (1 - 0.75)
    [0.0, 4.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mcdrop._checks import check_rate
from mcdrop.errors import InvalidInputError, InvalidTypeError

__all__ = ["dropout", "dropout2d"]


def _check_tensor(x: Any, fn: str) -> Tensor:
    """Return ``x`` if it is a floating-point tensor, else raise :class:`InvalidTypeError`."""
    if not isinstance(x, Tensor):
        raise InvalidTypeError(
            f"{fn} expects a torch.Tensor; got {type(x).__name__}. Convert the input with torch.as_tensor."
        )
    if not x.is_floating_point():
        raise InvalidTypeError(
            f"{fn} expects a floating-point tensor; got dtype {x.dtype}. "
            "Cast the input first, e.g. x.float()."
        )
    return x


def _check_generator(generator: Any, x: Tensor, fn: str) -> None:
    """Raise unless ``generator`` is None or a :class:`torch.Generator` on ``x``'s device type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise InvalidTypeError(
            f"{fn}: generator must be a torch.Generator or None; got {type(generator).__name__}."
        )
    if generator.device.type != x.device.type:
        raise InvalidInputError(
            f"{fn}: generator is on device {generator.device} but the input is on {x.device}; "
            f"create the generator with torch.Generator(device={str(x.device)!r})."
        )


def _dropout_impl(x: Tensor, p: float, inplace: bool, generator: torch.Generator | None) -> Tensor:
    """Element-wise inverted dropout kernel; assumes validated ``0 < p <= 1`` (TorchScript-compatible)."""
    if p == 1.0:
        return x.mul_(0.0) if inplace else x * 0.0
    # One draw; ge_ turns u into the 0/1 keep-mask in place, mul_ folds in the 1/(1-p) scale.
    mask = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    mask = mask.ge_(p).mul_(1.0 / (1.0 - p))
    return x.mul_(mask) if inplace else x * mask


def _check_channel_shape(x: Tensor) -> None:
    """Raise unless ``x`` is batched ``(N, C, *spatial)`` with ``ndim >= 3`` (TorchScript-compatible)."""
    if x.dim() < 3:
        raise InvalidInputError(
            "dropout2d expects a batched input of shape (N, C, *spatial) with at least one spatial dim "
            f"(ndim >= 3); got shape {list(x.shape)}. Add a batch dim with x.unsqueeze(0), or use "
            "mcdrop.nn.functional.dropout for element-wise dropout."
        )


def _dropout2d_impl(x: Tensor, p: float, inplace: bool, generator: torch.Generator | None) -> Tensor:
    """Channel-wise inverted dropout kernel; assumes validated ``0 < p <= 1`` and ``ndim >= 3``."""
    if p == 1.0:
        return x.mul_(0.0) if inplace else x * 0.0
    # Mask (N, C, 1, ..., 1) broadcasts over the spatial dims.
    mask_shape = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
    mask = torch.rand(mask_shape, generator=generator, dtype=x.dtype, device=x.device)
    mask = mask.ge_(p).mul_(1.0 / (1.0 - p))
    return x.mul_(mask) if inplace else x * mask


def dropout(
    x: Tensor,
    p: float = 0.5,
    training: bool = True,
    generator: torch.Generator | None = None,
    *,
    inplace: bool = False,
) -> Tensor:
    """Element-wise inverted dropout.

    Each element is kept independently with probability ``1 - p`` and scaled by ``1 / (1 - p)``;
    dropped elements become 0, so ``E[dropout(x)] == x``. The mask comes from one
    ``torch.rand`` draw on ``x``'s device and dtype (keep where ``u >= p``).

    Args:
        x: Floating-point input tensor of any shape.
        p: Probability of dropping an element, in ``[0, 1]``.
        training: If False, return ``x`` unchanged (the same object).
        generator: Optional random generator (on ``x``'s device type) for a reproducible mask;
            when given, the global RNG state is left untouched.
        inplace: If True, overwrite ``x`` with the result and return it (keyword-only; in
            :func:`torch.nn.functional.dropout` it is the fourth positional argument).

    Returns:
        A tensor shaped like ``x``. ``x`` itself when ``training`` is False or ``p == 0``;
        zeros when ``p == 1`` (no division by zero).

    Raises:
        InvalidTypeError: ``x`` is not a floating-point tensor, ``p`` is not a real number, or
            ``generator`` is not a :class:`torch.Generator`.
        InvalidInputError: ``p`` is NaN or outside ``[0, 1]``, or ``generator`` is on another device.

    Example:
        >>> import torch
        >>> from mcdrop.nn.functional import dropout
        >>> gen = torch.Generator().manual_seed(0)
        >>> out = dropout(torch.full((2, 5), 3.0), p=0.5, generator=gen)
        >>> bool(((out == 0) | (out == 6.0)).all())
        True
        >>> x = torch.ones(3)
        >>> dropout(x, p=0.5, training=False) is x
        True
    """
    x = _check_tensor(x, "dropout")
    p = check_rate(p)
    _check_generator(generator, x, "dropout")
    if not training or p == 0.0:
        return x
    return _dropout_impl(x, p, bool(inplace), generator)


def dropout2d(
    x: Tensor,
    p: float = 0.5,
    training: bool = True,
    generator: torch.Generator | None = None,
    *,
    inplace: bool = False,
) -> Tensor:
    """Channel-wise (feature) inverted dropout: zero whole channels of a feature map.

    For an input of shape ``(N, C, *spatial)`` each of the ``N * C`` channels is kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``, or zeroed entirely. The mask has shape
    ``(N, C, 1, ..., 1)`` and is drawn with one ``torch.rand`` call. Works for 1-d ``(N, C, L)``,
    2-d ``(N, C, H, W)`` and 3-d ``(N, C, D, H, W)`` feature maps (any ``ndim >= 3``).

    Args:
        x: Floating-point input of shape ``(N, C, *spatial)`` with ``ndim >= 3``. Unbatched
            inputs are not accepted: add a batch dim with ``x.unsqueeze(0)``.
        p: Probability of dropping a channel, in ``[0, 1]``.
        training: If False, return ``x`` unchanged (the same object).
        generator: Optional random generator (on ``x``'s device type) for a reproducible mask.
        inplace: If True, overwrite ``x`` with the result and return it (keyword-only).

    Returns:
        A tensor shaped like ``x``. ``x`` itself when ``training`` is False or ``p == 0``;
        zeros when ``p == 1``.

    Raises:
        InvalidTypeError: ``x`` is not a floating-point tensor, ``p`` is not a real number, or
            ``generator`` is not a :class:`torch.Generator`.
        InvalidInputError: ``p`` is NaN or outside ``[0, 1]``, ``x.ndim < 3`` (checked in eval mode
            too), or ``generator`` is on another device.

    Example:
        >>> import torch
        >>> from mcdrop.nn.functional import dropout2d
        >>> gen = torch.Generator().manual_seed(0)
        >>> out = dropout2d(torch.ones(4, 8, 5, 5), p=0.5, generator=gen)
        >>> per_channel = out.flatten(2)
        >>> bool((per_channel.amin(-1) == per_channel.amax(-1)).all())  # each channel all 0 or all 2
        True
    """
    x = _check_tensor(x, "dropout2d")
    p = check_rate(p)
    _check_generator(generator, x, "dropout2d")
    _check_channel_shape(x)  # also in eval mode, so a wrong shape surfaces before training
    if not training or p == 0.0:
        return x
    return _dropout2d_impl(x, p, bool(inplace), generator)
