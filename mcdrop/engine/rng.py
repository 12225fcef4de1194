"""RNG handling of the engine: who may draw from torch's generators, snapshots, untouched blocks, seeded streams.

* :func:`rng_access`: torch's default CPU generator (and each CUDA device's default generator) is
  one object shared by every thread of the process. A seeded :class:`~mcdrop.MCDropout` samples by
  seeding it inside :func:`torch.random.fork_rng` and restoring it afterwards, so while it samples,
  no other mcdrop sampling may draw from the same generator: the two streams would interleave
  (neither seeded run reproducible) and each ``fork_rng`` exit would restore a state the other had
  moved on from. :func:`rng_access` is a readers-writer lock over that: a seeded sampling block is
  a *writer* (alone), unseeded ones are *readers* (any number at once, the generator's own lock
  keeps each draw atomic), and a waiting writer stops new readers from starting, so seeded calls
  are not starved. A thread that already holds access (a wrapper called from inside another
  wrapper's sampling, as in an ``output=`` callable) goes on without waiting, whatever it asks
  for: waiting there would deadlock on itself. Draws from the same generators made by the user's
  own code in other threads at the same time are not covered: nothing can see them.
* :class:`SeededStream`: a seeded wrapper's own stream of random numbers, continued from call to
  call and saved in checkpoints.
* :func:`rng_snapshot` / :func:`rng_restore`: undo a failed strategy attempt.
* :func:`rng_untouched`: run a check pass from a fixed seed and put every generator back.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RngState",
    "SeededStream",
    "cuda_devices",
    "rng_access",
    "rng_restore",
    "rng_snapshot",
    "rng_untouched",
]

_CONDITION = threading.Condition(threading.Lock())


_STATE = {"readers": 0, "writer": False, "writers_waiting": 0}


_HELD = threading.local()


@contextlib.contextmanager
def rng_access(exclusive: bool) -> Iterator[None]:
    """Hold access to the global generators for one sampling block.

    Args:
        exclusive: ``True`` for a seeded block (no other mcdrop sampling meanwhile), ``False`` for an
            unseeded one (shared with other unseeded blocks).

    Yields:
        Nothing; access is released on exit, also when the body raises.
    """
    depth = getattr(_HELD, "depth", 0)
    if depth:
        _HELD.depth = depth + 1
        try:
            yield
        finally:
            _HELD.depth -= 1
        return
    acquired = False
    try:
        with _CONDITION:
            if exclusive:
                _STATE["writers_waiting"] += 1
                try:
                    while _STATE["writer"] or _STATE["readers"]:
                        _CONDITION.wait()
                finally:
                    _STATE["writers_waiting"] -= 1
                    _CONDITION.notify_all()  # readers held back by this writer may go if it gave up
                _STATE["writer"] = acquired = True
            else:
                while _STATE["writer"] or _STATE["writers_waiting"]:
                    _CONDITION.wait()
                _STATE["readers"] += 1
                acquired = True
        _HELD.depth = 1
        yield
    finally:
        _HELD.depth = 0
        if acquired:
            with _CONDITION:
                if exclusive:
                    _STATE["writer"] = False
                else:
                    _STATE["readers"] -= 1
                _CONDITION.notify_all()


@dataclass
class RngState:
    """Torch's CPU and CUDA generator states and the numpy mask generator's state."""

    cpu: Tensor
    cuda: list[Tensor]
    numpy: dict[str, Any] | None


def rng_snapshot(generator: np.random.Generator | None) -> RngState:
    """Snapshot every generator a pass may draw from, to undo a failed attempt."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [g.get_state() for g in torch.cuda.default_generators]
    numpy_state = generator.bit_generator.state if generator is not None else None
    return RngState(torch.default_generator.get_state(), cuda, numpy_state)


def rng_restore(state: RngState, generator: np.random.Generator | None) -> None:
    """Put the generators back as :func:`rng_snapshot` found them."""
    torch.default_generator.set_state(state.cpu)
    for g, s in zip(torch.cuda.default_generators if state.cuda else (), state.cuda, strict=False):
        g.set_state(s)
    if generator is not None and state.numpy is not None:
        generator.bit_generator.state = state.numpy


def cuda_devices(device: torch.device | None) -> list[int]:
    """The CUDA device indices whose generators a check pass on ``device`` may draw from."""
    if device is None or device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def rng_untouched(seed: int, cuda_devices: list[int]) -> Iterator[None]:
    """Run from seed ``seed`` (torch's, numpy's and Python's generators); put them back afterwards."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class SeededStream:
    """A seeded wrapper's own stream of random numbers, continued from one sampling block to the next.

    Inside :meth:`active`, torch's default CPU generator (and the model's CUDA device's) draw from
    this stream; outside, they are as they were (:func:`torch.random.fork_rng`). The first block
    starts from ``seed``; each later one continues where the previous one stopped, so a fresh
    stream with the same seed reproduces the same sequence of blocks.

    Args:
        seed: An integer in ``[0, 2**64)``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        #: Where the stream stopped (``{"cpu": ..., "cuda": ...}``), ``None`` before the first block.
        self.state: dict[str, Tensor] | None = None

    @contextlib.contextmanager
    def active(self, device: torch.device | None) -> Iterator[None]:
        """Draw from this stream inside the block (on the CPU and on ``device`` when it is CUDA)."""
        cuda_index = None
        if device is not None and device.type == "cuda":
            cuda_index = device.index if device.index is not None else torch.cuda.current_device()
        devices = [] if cuda_index is None else [cuda_index]
        with torch.random.fork_rng(devices=devices):
            if self.state is None:
                torch.random.default_generator.manual_seed(self.seed)
                if cuda_index is not None:
                    torch.cuda.default_generators[cuda_index].manual_seed(self.seed)
            else:
                torch.set_rng_state(self.state["cpu"])
                if cuda_index is not None and "cuda" in self.state:
                    torch.cuda.set_rng_state(self.state["cuda"], cuda_index)
            try:
                yield
            finally:
                state = {"cpu": torch.get_rng_state()}
                if cuda_index is not None:
                    state["cuda"] = torch.cuda.get_rng_state(cuda_index)
                self.state = state
