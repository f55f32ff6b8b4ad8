"""Writes held back while one burst of events is made, then sent together.

One upstream read often carries several tokens: the upstream sent them close together, or
raafd read them late because its core was busy. Each token becomes an event, and each event
written straight to a subscriber's socket costs a ``send`` system call (about 10 µs on
loopback, a quarter of a token's CPU at 500 streams). Between :func:`hold` and :func:`release`,
an :class:`~raafd.gateway.sockio.Output` with nothing queued keeps the frame it is handed and
registers itself here; :func:`release` then has each such output send what it holds in one
system call.

Rules:

- The section between :func:`hold` and :func:`release` is synchronous: it never awaits, so
  nothing else runs in between and nothing is held past the end of the work that made it.
- Order is kept: a held frame is at the head of its output's queue, and later writes go behind
  it.
- Sections nest: only the outermost :func:`hold` (the one that answered True) releases.

trio runs its tasks on one thread, so the state is one module-level object.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["hold", "holding", "later", "release"]


class _Held:
    __slots__ = ("flushes", "open")

    def __init__(self) -> None:
        self.open = False
        self.flushes: list[Callable[[], None]] = []


_held = _Held()


def hold() -> bool:
    """Start holding writes; True when this call started it (the caller must then call
    :func:`release`, in a ``finally``)."""
    if _held.open:
        return False
    _held.open = True
    return True


def holding() -> bool:
    """Whether writes are held now."""
    return _held.open


def later(flush: Callable[[], None]) -> None:
    """Call ``flush`` at :func:`release` (an output that holds a frame). ``flush`` must not
    raise."""
    _held.flushes.append(flush)


def release() -> None:
    """Stop holding and send what is held, in the order the outputs first held something."""
    _held.open = False
    flushes = _held.flushes
    if flushes:
        _held.flushes = []
        for flush in flushes:
            flush()
