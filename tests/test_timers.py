"""The shared timer heap (raafd.timers): the timeouts that are not cancel scopes, exact times on
a mock clock."""

from __future__ import annotations

import math

import trio
import trio.testing

from raafd.timers import _COMPACT_SLACK, Timers


class Item:
    """A timed item that records when it fired and can re-arm itself."""

    def __init__(self, timers: Timers, name: str, log: list[tuple[str, float]]) -> None:
        self._timer_at = math.inf
        self.timers = timers
        self.name = name
        self.log = log
        self.then: float | None = None  # re-arm for this time when fired

    def _on_timer(self, now: float) -> None:
        self.log.append((self.name, now))
        if self.then is not None:
            due, self.then = self.then, None
            self.timers.arm(self, due)


async def _running(nursery: trio.Nursery) -> Timers:
    timers = Timers()
    await nursery.start(timers.run)
    return timers


async def test_items_fire_at_their_times_in_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    timers = await _running(nursery)
    fired: list[tuple[str, float]] = []
    for name, due in (("c", 30.0), ("a", 10.0), ("b", 20.0)):
        timers.arm(Item(timers, name, fired), due)
    assert timers.armed == 3
    await trio.sleep(31)
    assert fired == [("a", 10.0), ("b", 20.0), ("c", 30.0)]
    assert timers.armed == 0


async def test_arming_later_keeps_the_earlier_time_and_earlier_replaces_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    timers = await _running(nursery)
    fired: list[tuple[str, float]] = []
    item = Item(timers, "x", fired)
    timers.arm(item, 50.0)
    timers.arm(item, 80.0)  # later: a no-op, the item re-arms itself when it fires
    assert item._timer_at == 50.0
    timers.arm(item, 20.0)  # earlier: wakes the sleeping task, the 50 s entry goes stale
    assert item._timer_at == 20.0 and len(timers) == 2
    await trio.sleep(60)
    assert fired == [("x", 20.0)]  # the stale 50 s entry did not fire it again


async def test_an_item_moved_later_fires_once_finds_nothing_and_rearms(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    # What the idle timer does: every token moves its due time later without touching the
    # heap; the old entry fires and the item arms the new time.
    timers = await _running(nursery)
    fired: list[tuple[str, float]] = []
    item = Item(timers, "idle", fired)
    timers.arm(item, 10.0)
    item.then = 25.0
    await trio.sleep(30)
    assert fired == [("idle", 10.0), ("idle", 25.0)]


async def test_a_disarmed_item_never_fires(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    timers = await _running(nursery)
    fired: list[tuple[str, float]] = []
    item = Item(timers, "gone", fired)
    timers.arm(item, 5.0)
    timers.disarm(item)
    timers.disarm(item)  # idempotent
    assert timers.armed == 0 and item._timer_at == math.inf
    await trio.sleep(10)
    assert fired == []


async def test_a_failing_item_does_not_stop_the_others(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    timers = await _running(nursery)
    fired: list[tuple[str, float]] = []

    class Broken(Item):
        def _on_timer(self, now: float) -> None:
            raise ValueError("a bug in one item")

    timers.arm(Broken(timers, "broken", fired), 1.0)
    timers.arm(Item(timers, "fine", fired), 2.0)
    await trio.sleep(3)
    assert fired == [("fine", 2.0)]


def test_stale_entries_are_bounded_whatever_the_churn() -> None:
    timers = Timers()  # not running: nothing fires, only arm's bookkeeping is exercised
    fired: list[tuple[str, float]] = []
    items = [Item(timers, str(n), fired) for n in range(10)]
    due = 1_000_000.0
    for _ in range(500):  # every item moved earlier 500 times: 5,000 entries, 10 live
        for item in items:
            due -= 1
            timers.arm(item, due)
    assert timers.armed == 10
    assert len(timers) <= 2 * timers.armed + _COMPACT_SLACK + 1
