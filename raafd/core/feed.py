"""A feed: one sequenced, bounded log that many subscribers read as cursors.

Everything raafd delivers is a feed: an agent run, a room, a job's output, the event bus. The
rule of this file, which everything else in it serves:

    A feed's log is seq 1, 2, 3, ... with no gap; a subscriber gets every event after its
    cursor exactly once and in order, or is told why not (:class:`~raafd.errors.Gone`,
    :class:`SlowConsumer`, :class:`SubscriberFailed`); and what one subscriber does never
    ends the feed or costs another subscriber anything.

How it is kept:

- Every event enters through :meth:`Feed.append`, which is synchronous (so atomic under trio)
  and takes ``head + 1``. The log refuses anything after a terminal event.
- Subscribers are cursors into the log, not copies of it: a :class:`Subscription` holds the
  last seq it delivered and reads ``log.after(cursor)``. Replay and live delivery are the same
  code, so subscribing with ``after=N`` while events are appended can neither miss nor repeat
  one.
- The one shortcut: a subscriber that is caught up (cursor at the previous head, no batch in
  hand) may set ``push``, a synchronous callback that takes the new event in the appending task
  (a transport writes it straight to its socket); the cursor moves only when ``push`` says it
  took the event, so a refused push leaves the event to the pull path.
- **A push that raises drops that subscriber alone**: it is unregistered, its reader gets
  :class:`SubscriberFailed` (code ``internal``), its ``on_drop`` is told, the error is logged
  with the subscriber's ``context`` (its ``conn``/``req`` ids), and the feed delivers on to
  everyone else. ``on_drop`` itself is guarded the same way.

Backpressure (DESIGN invariant 3), chosen per feed (:class:`Backpressure`):

- ``SOLE_WAITS`` (a private agent stream): with exactly one subscriber the producer waits while
  ``head - cursor >= subscriber_buffer`` (:meth:`Feed.backlogged`; the producer parks in
  :meth:`Feed.wait_moved`), so the provider stops reading upstream; with two or more it is a
  shared feed, as below.
- ``NEVER_WAITS`` (a room, the event bus): the producer waits for nobody. A subscriber more
  than ``subscriber_buffer`` behind gets adjacent ``content`` events of its batch coalesced
  (lossless); one with more than ``max_lag`` unread events appended since it subscribed is
  dropped with :class:`SlowConsumer` and resumes from its cursor on a new subscription. A
  finished feed's replay is never coalesced, and history found at subscribe time is replay,
  not lag.

Two options of a subscription, for a feed of many kinds of events (the event bus):

- ``view``: what this subscriber sees of each event: the event itself, another event in its
  place (one marked terminal ends this subscriber's delivery, for "once"), or None to skip
  it. The cursor moves past skipped events all the same, so a subscriber that wants few of a
  feed's events is still caught up (and pushed to) when the others go by. A terminal event of
  the feed is never skipped. A ``view`` that raises in the producer's task drops that
  subscriber alone, like a raising ``push``.
- ``on_lag``: instead of being dropped past ``max_lag`` (or when the events after its cursor
  were evicted), the subscriber *skips ahead*: its cursor jumps to the head and its next
  batch is the single notice ``on_lag(missed_from, missed_to)`` names, so its reader learns
  exactly which seqs it did not get (and may re-read them from the log while it holds them),
  then goes on live. Nothing is pushed to it until it has taken the notice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Literal

import attrs
import trio

from raafd.core.log import EventLog
from raafd.errors import Gone, RaafdError
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.protocol.codes import ErrorCode
from raafd.protocol.events import StreamEvent, build_event, coalesce

__all__ = [
    "Backpressure",
    "Feed",
    "FeedLimits",
    "SlowConsumer",
    "SubscriberFailed",
    "Subscription",
]

log = get_logger("raafd.feed")

_NO_CONTEXT: Final[Mapping[str, Any]] = {}


class SlowConsumer(RaafdError):
    """A subscriber of a shared feed fell more than ``max_lag`` events behind and was dropped.

    The gateway closes with 4001; the client resumes from its last seq."""

    code = ErrorCode.SLOW_CONSUMER
    http_status = 409


class SubscriberFailed(RaafdError):
    """A subscriber's own code raised while taking an event; it was dropped, the feed went on.
    Its connection is answered ``internal`` (a bug costs only its own connection)."""

    code = ErrorCode.INTERNAL
    http_status = 500


class Backpressure(enum.Enum):
    """What a feed does when its subscribers fall behind; see the module docstring."""

    SOLE_WAITS = "sole_waits"
    NEVER_WAITS = "never_waits"


@attrs.frozen
class FeedLimits:
    """A feed's bounds: its log (events and encoded bytes), the batch a subscriber takes at once
    (and, with one subscriber under ``SOLE_WAITS``, how far it may fall behind before the
    producer waits), and how far a subscriber of a shared feed may lag before it is dropped."""

    max_events: int
    max_bytes: int
    subscriber_buffer: int
    max_lag: int


Build = Callable[[str, int, str, dict[str, Any]], StreamEvent]
View = Callable[[StreamEvent], StreamEvent | None]
"""What one subscriber sees of an event (see the module docstring)."""
LagNotice = Callable[[int, int], StreamEvent]
"""The notice a subscriber that skipped ahead reads first: ``(missed_from, missed_to)``."""


class Feed:
    """See the module docstring. ``feed_id`` names the feed in every event (the wire's
    ``stream`` field for agent streams); ``build`` encodes an event once, for every subscriber
    on every transport; ``on_subscribers`` is told the new count after each subscribe and
    unsubscribe (an agent stream's detach grace starts at 0); ``on_evict`` is handed each event
    the log evicts (see :class:`~raafd.core.log.EventLog`); ``start`` is the seq the feed
    continues from (a room's last stored message: its first event is ``start + 1``)."""

    __slots__ = (
        "_build",
        "_metrics",
        "_on_subscribers",
        "_room",
        "_solo",
        "_subs",
        "id",
        "limits",
        "log",
        "policy",
    )

    def __init__(
        self,
        feed_id: str,
        limits: FeedLimits,
        *,
        metrics: Metrics,
        policy: Backpressure = Backpressure.NEVER_WAITS,
        build: Build = build_event,
        on_subscribers: Callable[[int], None] | None = None,
        on_evict: Callable[[StreamEvent], None] | None = None,
        start: int = 0,
    ) -> None:
        self.id = feed_id
        self.limits = limits
        self.policy = policy
        self.log = EventLog(limits.max_events, limits.max_bytes, on_evict, start=start)
        self._metrics = metrics
        self._build = build
        self._on_subscribers = on_subscribers
        # Bounded by each transport's per-connection limits; a dict keeps subscription order.
        self._subs: dict[Subscription, None] = {}
        # The subscriber while there is exactly one and the policy lets it hold the producer.
        self._solo: Subscription | None = None
        # The producer, parked until a subscriber moves (made when first needed: most feeds
        # never wait, and an object per feed costs on a stream's cold start).
        self._room: trio.lowlevel.ParkingLot | None = None

    # --- reading ------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        """The seq of the newest event; 0 before the first."""
        return self.log.head

    @property
    def closed(self) -> bool:
        """True once a terminal event is in the log."""
        return self.log.closed

    @property
    def terminal(self) -> StreamEvent | None:
        return self.log.terminal

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(
        self,
        after: int = 0,
        *,
        context: Mapping[str, Any] | None = None,
        view: View | None = None,
        on_lag: LagNotice | None = None,
        lead: StreamEvent | None = None,
    ) -> Subscription:
        """A subscription delivering every event with seq greater than ``after``.

        Use it as ``async with feed.subscribe(n) as sub: async for batch in sub: ...``, or
        :meth:`Subscription.open` / :meth:`Subscription.close` around ``take_nowait`` and
        pushes. Raises :class:`~raafd.errors.Gone` when events after ``after`` were evicted and
        :class:`~raafd.errors.BadRequest` when ``after`` is negative or beyond the head.
        ``context`` (``conn``, ``req`` ids) is logged if the subscriber fails; ``view`` and
        ``on_lag``: see the module docstring. ``lead`` (a snapshot covering the events up to
        ``after``) is handed out first, in the first batch, before any event is pushed."""
        self.log.check(after)
        sub = Subscription(self, after, context or _NO_CONTEXT)
        sub.view = view
        sub._on_lag = on_lag
        if lead is not None:
            sub._lead = lead
            sub._held = True  # no push before the lead has been taken
        return sub

    # --- writing ------------------------------------------------------------------------------

    def append(self, kind: str, fields: dict[str, Any]) -> StreamEvent:
        """Append the next event (``fields`` is kept, not copied) and hand it to the
        subscribers; a shared feed first drops the subscribers that lag past ``max_lag``."""
        event = self._build(self.id, self.log.head + 1, kind, fields)
        self.log.append(event)  # refuses anything after the terminal event
        if self._subs:
            if self._solo is None and not event.terminal:  # shared: see _solo_changed
                self._drop_laggards()
            self._deliver(event)
        if event.terminal:
            # What subscriber counts drove (an agent stream's detach grace) is over. Letting go
            # of the callback also lets go of its owner: a cycle (owner -> feed -> its bound
            # method) that reference counting alone would never free.
            self._on_subscribers = None
        return event

    def backlogged(self) -> bool:
        """Under ``SOLE_WAITS``, whether the sole subscriber is ``subscriber_buffer`` or more
        behind: the producer should wait (:meth:`wait_moved`) before it appends more."""
        solo = self._solo
        return solo is not None and self.log.head - solo._cursor >= self.limits.subscriber_buffer

    async def wait_moved(self) -> None:
        """Park the producer until a subscriber moves, subscribes or leaves, or :meth:`wake`.
        Callers loop on their own condition (``while backlogged(): await wait_moved()``)."""
        if self._room is None:
            self._room = trio.lowlevel.ParkingLot()
        await self._room.park()

    def wake(self) -> None:
        """Wake a producer parked in :meth:`wait_moved` (its condition may have changed)."""
        if self._room:  # None, or empty (unpark_all on an empty lot costs ~2 µs)
            self._room.unpark_all()

    # --- fan-out ------------------------------------------------------------------------------

    def _deliver(self, event: StreamEvent) -> None:
        """Hand a new event to each subscriber: pushed straight through to one that is caught
        up and whose ``push`` takes it (no task switch), else its reader is woken to pull."""
        seq = event.seq
        solo = self._solo
        terminal = event.terminal
        for sub in (solo,) if solo is not None else [*self._subs]:
            push = sub.push
            if push is not None and not sub._held and sub._cursor == seq - 1:
                seen = event
                try:
                    if sub.view is not None:
                        viewed = sub.view(event)
                        if viewed is not None:
                            seen = viewed
                        elif not terminal:
                            sub._cursor = seq  # not for this subscriber: it stays caught up
                            continue
                    took = push(seen)
                except Exception as exc:
                    self._failed(sub, exc)
                    continue
                if took:
                    sub._cursor = seq
                    if not seen.terminal:
                        continue
                    sub._done = True
            if sub._wake:  # its reader is parked (unpark_all on an empty lot costs ~2 µs)
                sub._wake.unpark_all()

    def _failed(self, sub: Subscription, exc: Exception) -> None:
        log.error(
            "a subscriber failed and was dropped; the feed goes on",
            feed=self.id,
            cursor=sub._cursor,
            exc_info=exc,
            **sub.context,
        )
        self._metrics.subscriber_failures.inc()
        self._unregister(sub)
        sub._drop(SubscriberFailed("internal error"))

    def _drop_laggards(self) -> None:
        max_lag = self.limits.max_lag
        # _lag() > max_lag, inlined: this runs at every append of a shared feed, once per
        # subscriber (a method call and a max() each cost more than the comparison).
        below = self.log.head - max_lag
        for sub in [s for s in self._subs if s._cursor < below and s._attach_head < below]:
            if sub._on_lag is not None:
                sub._skip(self.log.head)
                continue
            self._unregister(sub)
            sub._drop(
                SlowConsumer(
                    f"more than {max_lag} events behind on {self.id}; resume after seq {sub.cursor}"
                )
            )
            self._metrics.slow_consumers.inc()
            log.info("slow consumer dropped", feed=self.id, cursor=sub.cursor, head=self.head)

    # --- subscribers --------------------------------------------------------------------------

    def _register(self, sub: Subscription) -> None:
        self.log.check(sub.cursor)
        self._subs[sub] = None
        self._solo_changed()
        sub._attach_head = self.log.head
        self.wake()
        if self._on_subscribers is not None:
            self._on_subscribers(len(self._subs))

    def _unregister(self, sub: Subscription) -> None:
        if sub in self._subs:
            del self._subs[sub]
            self._solo_changed()
            self.wake()
            if self._on_subscribers is not None:
                self._on_subscribers(len(self._subs))

    def _solo_changed(self) -> None:
        # _solo is None exactly when the subscribers (if any) share the feed: two or more of
        # them, or a NEVER_WAITS feed.
        subs = self._subs
        if len(subs) == 1 and self.policy is Backpressure.SOLE_WAITS:
            self._solo = next(iter(subs))
        else:
            self._solo = None

    def _next_batch(self, sub: Subscription) -> list[StreamEvent]:
        limits = self.limits
        backlog = self.log.head - sub._cursor
        self._metrics.subscriber_lag.observe(backlog)
        lagging = not self.log.closed and backlog > limits.subscriber_buffer and self._solo is None
        limit = (
            max(limits.max_lag, limits.subscriber_buffer) if lagging else limits.subscriber_buffer
        )
        try:
            events = self.log.after(sub._cursor, limit)
        except Gone:
            sub.close()
            raise
        sub._cursor = events[-1].seq
        sub._done = events[-1].terminal
        self.wake()
        if sub.view is not None:
            events = _viewed(sub, events)
        return self._coalesced(events) if lagging else events

    def _coalesced(self, events: list[StreamEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        merged = 0
        for event in events:
            if event.kind == "content" and out and out[-1].kind == "content":
                out[-1] = coalesce(out[-1], event)
                merged += 1
            else:
                out.append(event)
        if merged:
            self._metrics.coalesced.inc(merged)
        return out


class Subscription:
    """A cursor into one feed's log: an async iterator of non-empty batches of events.

    Each batch is everything after the cursor, up to ``subscriber_buffer`` events (up to
    ``max_lag`` when coalesced). Iteration ends after the batch holding the terminal event;
    it raises :class:`SlowConsumer` once dropped for lagging, :class:`SubscriberFailed` once
    dropped because its own ``push`` raised, and :class:`~raafd.errors.Gone` when the events it
    needs were evicted. ``cursor`` is the last seq delivered: resume from it.

    ``__anext__`` is cancel-safe: it only waits before it takes a batch, so a read cancelled by
    a timeout (a heartbeat, say) consumes nothing.
    """

    __slots__ = (
        "_attach_head",
        "_cursor",
        "_done",
        "_error",
        "_held",
        "_lead",
        "_missed",
        "_on_lag",
        "_state",
        "_wake",
        "context",
        "feed",
        "on_drop",
        "push",
        "view",
    )

    def __init__(self, feed: Feed, after: int, context: Mapping[str, Any]) -> None:
        self.feed = feed
        self.context = context
        self._cursor = after
        self._attach_head = after
        self._state: Literal["new", "open", "closed"] = "new"
        self._error: RaafdError | None = None
        self._done = False
        # The reader: the log grew or the feed ended (made on its first wait).
        self._wake: trio.lowlevel.ParkingLot | None = None
        self._held = False  # a batch was handed out and its reader has not asked for more yet
        self._lead: StreamEvent | None = None  # handed out before the first batch (a snapshot)
        #: Called (synchronously, from the producer) when the subscriber is dropped, so a reader
        #: blocked on a stalled socket can be closed now rather than on its next read.
        self.on_drop: Callable[[RaafdError], None] | None = None
        #: Set by a reader that can take a live event without waiting (see the module
        #: docstring): True when it took it. Called only while caught up and no batch is held.
        self.push: Callable[[StreamEvent], bool] | None = None
        #: What this subscriber sees of each event (see the module docstring).
        self.view: View | None = None
        self._on_lag: LagNotice | None = None
        self._missed: tuple[int, int] | None = None  # skipped ahead; the notice is not taken

    @property
    def cursor(self) -> int:
        """The last seq delivered (``after`` before the first batch)."""
        return self._cursor

    @property
    def dropped(self) -> bool:
        """True once dropped (slow, or failed)."""
        return self._error is not None

    @property
    def done(self) -> bool:
        """True once the batch holding the terminal event was handed out (or pushed)."""
        return self._done

    @property
    def closed(self) -> bool:
        """True once closed (unsubscribed) or dropped."""
        return self._state == "closed"

    @property
    def registered(self) -> bool:
        """True while the feed delivers to it (already False inside the feed's
        ``on_subscribers`` call that reports its leaving)."""
        return self in self.feed._subs

    def _lag(self) -> int:
        # Live events appended since subscribing and not yet read. The history a subscriber
        # found when it subscribed is replay, not lag: it is never dropped for reading history.
        return self.feed.log.head - max(self._cursor, self._attach_head)

    def _skip(self, to: int) -> None:
        """Skip ahead to ``to`` (the feed's ``on_lag`` option): the next batch is the notice."""
        first = self._missed[0] if self._missed is not None else self._cursor + 1
        self._missed = (first, to)
        self._cursor = self._attach_head = to
        self._held = True  # no push before the notice is taken
        metrics = self.feed._metrics
        metrics.lag_skips.inc()
        log.info("subscriber skipped ahead", feed=self.feed.id, missed_from=first, missed_to=to)
        if self._wake:
            self._wake.unpark_all()

    def _drop(self, error: RaafdError) -> None:
        self._error = error
        self._state = "closed"
        self.push = None
        if self._wake:
            self._wake.unpark_all()
        on_drop = self.on_drop
        if on_drop is not None:
            try:
                on_drop(error)
            except Exception:
                log.exception("a subscriber's on_drop failed", feed=self.feed.id, **self.context)

    def open(self) -> None:
        """Register with the feed, synchronously: what ``async with`` does on entry, for a
        reader that takes batches with :meth:`take_nowait` and pushes. Pair it with
        :meth:`close`."""
        if self._state != "new":
            raise RuntimeError("a subscription is entered once")
        self.feed._register(self)
        self._state = "open"

    async def __aenter__(self) -> Subscription:
        await trio.lowlevel.checkpoint()
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unregister (idempotent), and let go of the reader's callbacks: nothing is pushed to
        or dropped from a closed subscription, and they refer back to the reader (a cycle
        that reference counting alone would never free)."""
        if self._state == "open":
            self.feed._unregister(self)
        self._state = "closed"
        self.push = None
        self.on_drop = None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> list[StreamEvent]:
        await trio.lowlevel.checkpoint()
        while True:
            batch = self.take_nowait()
            if batch is not None:
                return batch
            if self._done or self._state == "closed":
                raise StopAsyncIteration
            await self.wait()

    async def wait(self) -> None:
        """Park until the feed has more for this subscriber, ends, or drops it. May return
        with nothing new (callers loop on :meth:`take_nowait`)."""
        if self._wake is None:
            self._wake = trio.lowlevel.ParkingLot()
        await self._wake.park()

    def take_nowait(self) -> list[StreamEvent] | None:
        """The next batch without waiting, or None when there is none now (caught up, ended or
        closed). Asking again says the batch before was delivered: until then ``push`` is not
        called. Raises the error it was dropped with, and :class:`~raafd.errors.Gone` when the
        events it needs were evicted."""
        self._held = False  # asking for more: the last batch is delivered
        if self._error is not None:
            raise self._error
        if self._done or self._state == "closed":
            return None
        if self._state == "new":
            raise RuntimeError("enter the subscription (`async with`) before iterating it")
        feed = self.feed
        if self._lead is not None:
            lead, self._lead = self._lead, None
            self._held = True
            return [lead, *feed._next_batch(self)] if feed.log.head > self._cursor else [lead]
        if self._on_lag is not None:
            if feed.log.head > self._cursor and feed.log.oldest > self._cursor + 1:
                self._skip(feed.log.oldest - 1)  # evicted while it was behind
            if self._missed is not None:
                missed_from, missed_to = self._missed
                self._missed = None
                self._held = True
                return [self._on_lag(missed_from, missed_to)]
        while feed.log.head > self._cursor:
            batch = feed._next_batch(self)
            if batch:  # empty when its view skipped every event of it (never a terminal one)
                self._held = True
                return batch
        return None


def _viewed(sub: Subscription, events: list[StreamEvent]) -> list[StreamEvent]:
    """``events`` as ``sub``'s view shows them, up to the first one marked terminal."""
    view = sub.view
    assert view is not None
    out: list[StreamEvent] = []
    for event in events:
        seen = view(event)
        if seen is None:
            if not event.terminal:
                continue
            seen = event
        out.append(seen)
        if seen.terminal:
            sub._done = True
            break
    return out
