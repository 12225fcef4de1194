"""Who may draw from torch's process-wide generators while mcdrop samples (private).

torch's default CPU generator (and each CUDA device's default generator) is one object shared by
every thread of the process. A seeded :class:`~mcdrop.MCDropout` samples by seeding it inside
:func:`torch.random.fork_rng` and restoring it afterwards, so while it samples, no other mcdrop
sampling may draw from the same generator: the two streams would interleave (neither seeded run
reproducible) and each ``fork_rng`` exit would restore a state the other had moved on from.

:func:`rng_access` is a readers-writer lock over that: a seeded sampling block is a *writer* (alone),
unseeded ones are *readers* (any number at once, the generator's own lock keeps each draw atomic),
and a waiting writer stops new readers from starting, so seeded calls are not starved. A thread that
already holds access (a wrapper called from inside another wrapper's sampling, as in an ``output=``
callable) goes on without waiting, whatever it asks for: waiting there would deadlock on itself.

Draws from the same generators made by the user's own code in other threads at the same time are
not covered: nothing can see them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["rng_access"]

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
