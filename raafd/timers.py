"""Many lazily moved timers in one heap, fired by one task.

A stream has four timers (detach grace, pause timeout, first-token/idle, ``max_duration``) and a
WebSocket connection one (its heartbeat). Each keeps its own due times as plain floats and
registers only the earliest with :class:`Timers` (:meth:`Timers.arm`); the timer task calls the
item's ``_on_timer(now)`` when that time comes, and the item acts on whatever is due and arms its
next time. A due time that moves *later* (every token moves the idle timer, every frame read a
connection's silence deadline) costs nothing here: the old entry fires, the item finds nothing
due yet and arms the new time. Only a due time *earlier* than the armed one adds an entry; the
entry it supersedes stays in the heap, stale, and is skipped when popped (its time no longer
matches the item's ``_timer_at``).

Why not a cancel scope with a deadline around each wait, or a timer task per stream: at
hundreds of stream starts and tens of thousands of tokens and frames a second, a deadline moved
on every one of them, and a task, a nursery and two deadline scopes per stream, cost more than
the work they guard. Here an item costs one heap push when armed and one per timeout period
while it stays busy. The price: an item's ``_on_timer`` runs in the timer task, so it acts on
the item from outside (cancels a scope, closes a connection) rather than raising in the waiting
task itself. (An upstream read is bounded by a cancel scope of its own exchange instead, see
:mod:`raafd.providers.upstream`: one deadline moved per read, and no timer task.)

Bounds: stale entries are dropped when the heap grows past twice the armed items plus
:data:`_COMPACT_SLACK`, so the heap holds no more than that whatever the churn.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Final, Protocol

import trio

from raafd.logging import get_logger

__all__ = ["Timed", "Timers"]

log = get_logger("raafd.timers")

_COMPACT_SLACK: Final = 1024


class Timed(Protocol):
    """What :class:`Timers` fires: ``_timer_at`` is the armed time (``math.inf`` when none),
    kept by :meth:`Timers.arm` and :meth:`Timers.disarm` only."""

    _timer_at: float

    def _on_timer(self, now: float) -> None: ...


class Timers:
    """See the module docstring. :meth:`run` must run (in the owner's nursery) for any timer to
    fire."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        self._order = itertools.count()  # ties never compare items
        self._wake = trio.lowlevel.ParkingLot()
        # The time the task sleeps until; -inf while it is awake (it looks at the heap again
        # before it sleeps, so nothing needs to wake it).
        self._sleeping_until = -math.inf
        self._armed = 0  # items with _timer_at < inf

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def armed(self) -> int:
        return self._armed

    def arm(self, item: Timed, due: float) -> None:
        """Call ``item._on_timer`` at ``due``, or earlier if it is armed earlier already."""
        if due >= item._timer_at:
            return
        if item._timer_at == math.inf:
            self._armed += 1
        item._timer_at = due
        heapq.heappush(self._heap, (due, next(self._order), item))
        if due < self._sleeping_until:
            self._wake.unpark_all()
        if len(self._heap) > 2 * self._armed + _COMPACT_SLACK:
            self._heap = [e for e in self._heap if e[0] == e[2]._timer_at]
            heapq.heapify(self._heap)

    def disarm(self, item: Timed) -> None:
        """Forget ``item``'s armed time (its heap entry goes stale)."""
        if item._timer_at != math.inf:
            self._armed -= 1
            item._timer_at = math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire due timers until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            # self._heap, not a local: an item acting on its timer may arm, which may compact
            # the heap into a new list.
            while self._heap and self._heap[0][0] <= now:
                due, _, item = heapq.heappop(self._heap)
                if due != item._timer_at:
                    continue  # stale: superseded by an earlier time, or disarmed
                self.disarm(item)
                try:
                    item._on_timer(now)
                except Exception:
                    # A bug in one item's timer must not stop everyone else's.
                    log.exception("timer failed", item=repr(item))
            self._sleeping_until = self._heap[0][0] if self._heap else math.inf
            try:
                with trio.move_on_at(self._sleeping_until):
                    await self._wake.park()
            finally:
                self._sleeping_until = -math.inf
