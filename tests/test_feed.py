"""The feed core: fan-out, policies, and subscribers that fail alone (no transport, no clock)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import trio
import trio.testing

from raafd.config import StreamsConfig
from raafd.core import (
    Backpressure,
    Feed,
    FeedLimits,
    SlowConsumer,
    SubscriberFailed,
    Subscription,
)
from raafd.errors import Gone, RaafdError
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.streams import Stream
from raafd.timers import Timers

LIMITS = FeedLimits(max_events=100, max_bytes=1 << 20, subscriber_buffer=4, max_lag=10)


def _feed(policy: Backpressure = Backpressure.NEVER_WAITS, **kwargs: Any) -> Feed:
    return Feed("fd_1", LIMITS, metrics=Metrics(), policy=policy, **kwargs)


def _raising(event: StreamEvent) -> bool:
    raise ValueError("a bug in this subscriber")


def test_a_raising_push_drops_that_subscriber_alone() -> None:
    feed = _feed()
    bad = feed.subscribe(0, context={"conn": "c_bad"})
    good = feed.subscribe(0)
    bad.open()
    good.open()
    dropped: list[RaafdError] = []
    bad.on_drop = dropped.append
    bad.push = _raising
    seen: list[int] = []

    def take(event: StreamEvent) -> bool:
        seen.append(event.seq)
        return True

    good.push = take
    for n in range(3):
        feed.append("content", {"delta": str(n)})
    assert seen == [1, 2, 3]
    assert feed.subscribers == 1
    assert [type(e) for e in dropped] == [SubscriberFailed]
    assert dropped[0].code == "internal"
    with pytest.raises(SubscriberFailed):
        bad.take_nowait()
    assert feed._metrics.registry.get_sample_value("raafd_subscriber_failures_total") == 1


def test_a_raising_on_drop_does_not_reach_the_feed() -> None:
    feed = _feed()
    sub = feed.subscribe(0)
    sub.open()
    sub.push = _raising

    def explode(err: RaafdError) -> None:
        raise RuntimeError("and its drop handler too")

    sub.on_drop = explode
    feed.append("content", {"delta": "a"})  # must not raise
    assert sub.dropped
    assert feed.head == 1


def test_a_shared_feed_never_waits_and_drops_a_lone_laggard() -> None:
    feed = _feed(Backpressure.NEVER_WAITS)
    sub = feed.subscribe(0)
    sub.open()
    for n in range(LIMITS.max_lag):
        feed.append("content", {"delta": str(n)})
        assert not feed.backlogged()
    assert not sub.dropped
    feed.append("content", {"delta": "one too many"})
    assert sub.dropped
    with pytest.raises(SlowConsumer):
        sub.take_nowait()


def test_a_shared_feed_coalesces_a_lagging_subscribers_batch() -> None:
    feed = _feed(Backpressure.NEVER_WAITS)
    sub = feed.subscribe(0)
    sub.open()
    for n in range(LIMITS.subscriber_buffer + 2):
        feed.append("content", {"delta": str(n)})
    batch = sub.take_nowait()
    assert batch is not None
    assert [(e.seq, e.fields["delta"]) for e in batch] == [(6, "012345")]


def test_a_sole_subscriber_holds_a_private_feed_back() -> None:
    feed = _feed(Backpressure.SOLE_WAITS)
    sub = feed.subscribe(0)
    sub.open()
    for n in range(LIMITS.subscriber_buffer):
        feed.append("content", {"delta": str(n)})
    assert feed.backlogged()
    assert sub.take_nowait() is not None
    assert not feed.backlogged()
    second = feed.subscribe(feed.head)
    second.open()
    for n in range(LIMITS.subscriber_buffer):
        feed.append("content", {"delta": str(n)})
    assert not feed.backlogged()  # two subscribers share it: nobody holds the producer


def test_subscriber_counts_are_reported() -> None:
    counts: list[int] = []
    feed = _feed(on_subscribers=counts.append)
    a, b = feed.subscribe(0), feed.subscribe(0)
    a.open()
    b.open()
    b.close()
    b.close()  # idempotent
    a.close()
    assert counts == [1, 2, 1, 0]


def test_a_feed_holds_kinds_of_its_own() -> None:
    def build(feed_id: str, seq: int, kind: str, fields: dict[str, Any]) -> StreamEvent:
        return StreamEvent(feed_id, seq, kind, fields, b'{"kind":"%s"}' % kind.encode())

    feed = _feed(build=build)
    feed.append("room.message", {"text": "hi"})
    feed.append("room.member", {"user": "ann"})
    assert [e.kind for e in feed.log.after(0)] == ["room.message", "room.member"]


def test_a_subscriber_behind_the_log_is_told_gone() -> None:
    small = FeedLimits(max_events=2, max_bytes=1 << 20, subscriber_buffer=4, max_lag=100)
    feed = Feed("fd_2", small, metrics=Metrics())
    for n in range(5):
        feed.append("content", {"delta": str(n)})
    with pytest.raises(Gone, match="oldest available is seq 4"):
        feed.subscribe(1)


async def test_a_raising_subscriber_on_a_two_subscriber_stream_costs_only_itself() -> None:
    """Failed on 88ca7e5: the ValueError ended the stream with error {internal} for both."""
    stream = Stream(
        agent="a", model="m", config=StreamsConfig(), metrics=Metrics(), timers=Timers()
    )
    bad = stream.subscribe(stream.head)  # caught up (past `start`): pushed to live
    bad.open()
    bad.push = _raising
    received: list[StreamEvent] = []

    async def body(out: Any) -> None:
        await out.emit("content", delta="hel")
        await out.emit("content", delta="lo")
        await out.emit("complete", final_response="hello", usage={}, finish_reason="stop")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, stream.subscribe(0) as good:
            nursery.start_soon(stream.run, body)
            async for batch in good:
                received.extend(batch)
    assert [e.kind for e in received] == ["start", "content", "content", "complete"]
    assert stream.status == "complete"
    assert bad.dropped
    with pytest.raises(SubscriberFailed):
        bad.take_nowait()


async def test_a_reader_parked_on_a_dropped_subscription_wakes_with_its_error() -> None:
    feed = _feed()
    sub = feed.subscribe(0)
    sub.open()
    failed = trio.Event()

    async def read() -> None:
        with pytest.raises(SubscriberFailed):
            await sub.__anext__()
        failed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            sub.push = _raising
            # The reader is parked, so the cursor is at the head and the push is tried.
            feed.append("content", {"delta": "x"})
            await failed.wait()


class _Owner:
    """What owns a feed (an agent stream) or reads one (a delivery), holding it as they do."""

    def __init__(self) -> None:
        self.feed: Feed | None = None
        self.subscription: Subscription | None = None

    def subscribers_changed(self, count: int) -> None:
        pass

    def push(self, event: StreamEvent) -> bool:
        return True

    def dropped(self, error: RaafdError) -> None:
        pass


def test_an_ended_feed_and_a_closed_subscription_let_go_of_their_owners() -> None:
    # The daemon runs the collector rarely (server.gc_thresholds): an owner and its feed, or a
    # reader and its subscription, holding each other would stay in memory long after both
    # are done (the soak's RSS grew 6 KB per stream so). Reference counting alone frees them.
    owner, reader = _Owner(), _Owner()
    feed = owner.feed = _feed(on_subscribers=owner.subscribers_changed)
    subscription = reader.subscription = feed.subscribe(0)
    subscription.open()
    subscription.push, subscription.on_drop = reader.push, reader.dropped
    feed.append("content", {"delta": "x"})
    feed.append("complete", {"final_response": "x", "finish_reason": "stop"})
    subscription.close()
    owners = [weakref.ref(owner), weakref.ref(reader)]
    del owner, reader, feed, subscription
    gc.disable()
    try:
        assert [ref() for ref in owners] == [None, None]
    finally:
        gc.enable()
