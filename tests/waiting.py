"""Waiting in tests for what the code under test does, never for a guessed number of seconds.

- :func:`wait_until` returns once a condition holds. In a trio program state changes only
  while some task takes a step (a worker thread's result arrives as one), so the condition is
  checked after every step of every task: no polling interval, no sleep, and it works the same
  on real time and on an autojump clock. Callers bound it with ``trio.fail_after``.
- :func:`let_loopback_land` sets the autojump threshold for a test whose code talks over real
  loopback sockets.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing

__all__ = ["LOOPBACK_SETTLE", "let_loopback_land", "wait_until"]

# Real seconds an autojump clock waits, with every task blocked, before it jumps. Bytes written
# to a loopback TCP socket usually reach the peer's receive queue before send() returns, but the
# kernel may finish that delivery a little later (later still on a loaded machine): a clock that
# jumped at once could skip past a deadline while a segment is in flight. A jump waits this long
# only when nothing at all is happening, so minutes of timeouts still take milliseconds.
LOOPBACK_SETTLE = 0.02


def let_loopback_land(clock: trio.testing.MockClock) -> None:
    """Make ``clock`` wait :data:`LOOPBACK_SETTLE` real seconds of idleness before jumping."""
    clock.autojump_threshold = max(clock.autojump_threshold, LOOPBACK_SETTLE)


class _Watch(trio.abc.Instrument):
    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate
        self.held = trio.Event()
        self.error: Exception | None = None

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.held.is_set():
            return
        try:
            if self.predicate():
                self.held.set()
        except Exception as exc:  # raised in the waiting task, not swallowed by trio
            self.error = exc
            self.held.set()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Return once ``predicate()`` is true, checked now and after every task step."""
    if predicate():
        await trio.lowlevel.checkpoint()
        return
    watch = _Watch(predicate)
    trio.lowlevel.add_instrument(watch)
    try:
        await watch.held.wait()
    finally:
        trio.lowlevel.remove_instrument(watch)
    if watch.error is not None:
        raise watch.error
