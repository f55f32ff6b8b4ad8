"""Every stream's timers in one heap, run by one task.

A stream has four: detach grace (no subscriber), pause timeout, first-token/idle, and
``max_duration``. Each stream keeps its own due times as plain floats and registers only the
earliest with :class:`StreamTimers` (``Stream._arm``); the timer task calls ``Stream._on_timer``
when that time comes, and the stream acts on whatever is due and registers its next one. A due
time that moves *later* (every token moves the idle timer) costs nothing here: the old entry
fires, the stream finds nothing due yet and registers the new time. Only a due time that moves
*earlier* than the registered one adds an entry; the entry it supersedes stays in the heap,
stale, and is skipped when popped (its time no longer matches the stream's ``_timer_at``).

Why not cancel scopes with deadlines in each stream's task, or a timer task per stream: at
hundreds of stream starts a second, a task, a nursery and two deadline scopes per stream cost
more than everything else a stream does before its first token, and trio's deadline heap then
holds several entries per stream. Here a stream costs one heap push when it starts and one per
``idle_timeout`` while it runs.

Bounds: stale entries are dropped when the heap grows past twice the streams with a timer plus
:data:`_COMPACT_SLACK`, so the heap holds no more than that whatever the churn.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, Final

import trio

from raafd.logging import get_logger

if TYPE_CHECKING:
    from raafd.streams.stream import Stream

__all__ = ["StreamTimers"]

log = get_logger("raafd.streams")

_COMPACT_SLACK: Final = 1024


class StreamTimers:
    """See the module docstring. :meth:`run` must run (the stream manager's nursery runs it) for
    any stream timer to fire."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Stream]] = []
        self._order = itertools.count()  # ties never compare streams
        self._wake = trio.lowlevel.ParkingLot()
        # The time the task sleeps until; -inf while it is awake (it looks at the heap again
        # before it sleeps, so nothing needs to wake it).
        self._sleeping_until = -math.inf
        self.armed = 0  # streams with a registered time (kept by Stream._arm/_disarm)

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, due: float, stream: Stream) -> None:
        """Call ``stream._on_timer`` at ``due`` unless the stream registers another time first."""
        heapq.heappush(self._heap, (due, next(self._order), stream))
        if due < self._sleeping_until:
            self._wake.unpark_all()
        if len(self._heap) > 2 * self.armed + _COMPACT_SLACK:
            self._heap = [e for e in self._heap if e[0] == e[2]._timer_at]
            heapq.heapify(self._heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire due timers until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            # self._heap, not a local: a stream acting on its timer may schedule, which may
            # compact the heap into a new list.
            while self._heap and self._heap[0][0] <= now:
                due, _, stream = heapq.heappop(self._heap)
                if due != stream._timer_at:
                    continue  # stale: superseded by an earlier time, or the stream has ended
                try:
                    stream._on_timer(now)
                except Exception:
                    # A bug in one stream's timer must not stop every other stream's.
                    log.exception("stream timer failed", stream=stream.id)
            self._sleeping_until = self._heap[0][0] if self._heap else math.inf
            try:
                with trio.move_on_at(self._sleeping_until):
                    await self._wake.park()
            finally:
                self._sleeping_until = -math.inf
