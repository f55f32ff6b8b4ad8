"""Wall-clock time that moves with trio's clock.

Chat keeps times people read and that outlive the process (``last_seen``, a message's ``ts``,
an offline message's expiry): unix seconds. Its timers run on trio's clock. A
:class:`WallClock` is the unix time when it was made, advanced by trio's clock since, so one
clock serves both: a due time in unix seconds becomes a trio deadline by subtracting
:attr:`offset`, and a test's ``MockClock`` (or ``autojump_clock``) moves both together, which
makes expiry and linger tests exact. The price, a drift from the system clock if NTP steps it
while the daemon runs, does not matter for lingers and TTLs.
"""

from __future__ import annotations

import time

import trio

__all__ = ["WallClock"]


class WallClock:
    """Call it for the current unix time (must be made and called inside ``trio.run``)."""

    __slots__ = ("offset",)

    def __init__(self, at: float | None = None) -> None:
        # trio time t corresponds to unix time t + offset
        self.offset = (time.time() if at is None else at) - trio.current_time()

    def __call__(self) -> float:
        return trio.current_time() + self.offset

    def deadline(self, wall: float) -> float:
        """The trio time at which the unix time is ``wall``."""
        return wall - self.offset
