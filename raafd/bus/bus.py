"""The event bus: one feed of subject-named events, emitted by every component.

The rule of this file:

    ``emit`` never blocks and never fails the emitter; every event gets the next bus-wide
    ``seq`` (from 1, no gap) and is kept in a bounded history; a subscriber sees, in seq
    order, exactly the events its pattern (and ``where``) selects after its cursor, or an
    ``events.lagged`` notice naming the seqs it did not get.

How it is kept: the bus is a :class:`~raafd.core.feed.Feed` (``NEVER_WAITS``) whose log is the
history (``events.history`` events within ``events.history_bytes``). Each subscription is a
cursor into it with two options of the feed (see :mod:`raafd.core.feed`): a ``view`` that
selects the events of its pattern and ``where`` filter (a compiled regular expression and a few
comparisons; the others move its cursor without waking anyone, so a subscriber of rare subjects
is still caught up and pushed to), and ``on_lag``: a subscriber more than ``events.queue``
events behind (its socket is not taking them) skips ahead to the head and reads one
``events.lagged {missed_from, missed_to}`` notice first, instead of being disconnected; it may
re-read that range from the history while the history holds it. The one ``Delivery`` frames a
subscription for the WebSocket and SSE like any feed.

An event's JSON is ``{"seq", "subject", "ts", "data"}``, encoded once at emit; ``ts`` is unix
time in seconds. ``emit`` from inside a delivery of the bus (a subscriber's code that emits) is
queued and appended right after, in order (bounded by :data:`MAX_NESTED`), so a feed is never
appended to while it hands out an event.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson
import trio
from attrs import frozen

from raafd.config import EventsConfig
from raafd.core.feed import Backpressure, Feed, FeedLimits, Subscription
from raafd.errors import BadRequest, Gone
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.protocol.subjects import Pattern, check_subject, compile_pattern

__all__ = [
    "EVENT",
    "LAGGED",
    "MAX_NESTED",
    "MAX_WHERE",
    "Bus",
    "BusEvent",
    "Emit",
    "Where",
    "bus_event",
    "check_where",
    "no_emit",
]

log = get_logger("raafd.bus")

Emit = Callable[[str, dict[str, Any]], None]
"""What a component is given to put events on the bus: ``emit(subject, data)``."""

EVENT: Final = "event"  # the log's kind of a bus event
LAGGED: Final = "events.lagged"  # the kind of a subscriber's lag notice (never in the log)
MAX_NESTED: Final = 1024  # emits queued while the bus delivers (beyond: dropped, logged)
MAX_WHERE: Final = 8  # fields of one `where` filter
_MAX_WHERE_KEY: Final = 128
_FEED_ID: Final = "bus"
_BATCH: Final = 64  # the events a subscriber takes at once (at most events.queue)

Where = Mapping[str, str | int | float | bool | None]
"""A subscription's field filter: each key (a dotted path into ``data``) must hold exactly
that value."""


def no_emit(subject: str, data: dict[str, Any]) -> None:
    """The ``emit`` of a component that is not wired to a bus."""


@frozen
class BusEvent:
    """One event as a subscriber in Python sees it."""

    seq: int
    subject: str
    ts: float
    data: dict[str, Any]


def bus_event(event: StreamEvent) -> BusEvent:
    """The :class:`BusEvent` of a bus feed's event."""
    fields = event.fields
    return BusEvent(event.seq, fields["subject"], fields["ts"], fields["data"])


def _build(feed_id: str, seq: int, kind: str, fields: dict[str, Any]) -> StreamEvent:
    encoded = orjson.dumps({"seq": seq, **fields})
    return StreamEvent(feed_id, seq, kind, fields, memoryview(encoded).tobytes())


def _lagged(missed_from: int, missed_to: int) -> StreamEvent:
    fields = {"missed_from": missed_from, "missed_to": missed_to}
    encoded = orjson.dumps({"seq": missed_to, **fields})
    return StreamEvent(_FEED_ID, missed_to, LAGGED, fields, encoded)


class _Last(StreamEvent):
    """A subscriber's last event (``once``): its delivery ends with it."""

    __slots__ = ()

    @property
    def terminal(self) -> bool:
        return True


def check_where(where: Any) -> dict[str, Any]:
    """A ``where`` filter from client input, checked: an object of at most :data:`MAX_WHERE`
    dotted paths, each to a JSON string, number, boolean or null. Raises ``bad_request``."""
    if not isinstance(where, dict):
        raise BadRequest("where must be an object of field: value", field="where")
    if len(where) > MAX_WHERE:
        raise BadRequest(f"where has at most {MAX_WHERE} fields", field="where")
    for key, value in where.items():
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_WHERE_KEY:
            raise BadRequest(f"a where field is 1 to {_MAX_WHERE_KEY} characters", field="where")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise BadRequest(
                "a where value is a string, number, boolean or null", field=f"where.{key}"
            )
    return dict(where)


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


_MISSING: Final = object()


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(data, dict):
            return _MISSING
        data = data.get(part, _MISSING)
        if data is _MISSING:
            return _MISSING
    return data


_last: list[Any] = [None, ""]  # the event whose subject was asked for last, and its subject


def _subject(event: StreamEvent) -> str:
    """``event``'s subject; every subscriber's view asks for the same event in a row, so the
    last answer is kept (the fields of a replayed event are decoded once)."""
    if _last[0] is not event:
        _last[0] = event
        _last[1] = event.fields["subject"]
    subject: str = _last[1]
    return subject


def _view(
    pattern: Pattern, where: Where | None, deny: Sequence[Pattern], once: bool
) -> Callable[[StreamEvent], StreamEvent | None]:
    match = pattern.regex.fullmatch
    refuse = (
        re.compile("|".join(f"(?:{p.regex.pattern})" for p in deny)).fullmatch if deny else None
    )
    tests = [(tuple(key.split(".")), value) for key, value in (where or {}).items()]
    spent = False

    def view(event: StreamEvent) -> StreamEvent | None:
        nonlocal spent
        if spent:
            return None
        subject = _subject(event)
        if match(subject) is None or (refuse is not None and refuse(subject) is not None):
            return None
        if tests:
            data = event.fields["data"]
            for path, value in tests:
                if not _same(_lookup(data, path), value):
                    return None
        if once:
            spent = True
            return _Last(event.stream, event.seq, event.kind, event.fields, event.json)
        return event

    return view


class Bus:
    """See the module docstring. ``clock`` gives each event's ``ts`` (unix seconds)."""

    def __init__(
        self,
        config: EventsConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self.feed = Feed(
            _FEED_ID,
            FeedLimits(
                max_events=config.history,
                max_bytes=config.history_bytes,
                subscriber_buffer=min(_BATCH, config.queue),
                max_lag=config.queue,
            ),
            metrics=metrics,
            policy=Backpressure.NEVER_WAITS,
            build=_build,
        )
        self._emitting = False
        self._nested: deque[tuple[str, dict[str, Any]]] = deque()

    @property
    def head(self) -> int:
        """The seq of the newest event (0 before the first)."""
        return self.feed.head

    @property
    def oldest(self) -> int:
        """The seq of the oldest event the history holds (``head + 1`` while it is empty)."""
        return self.feed.log.oldest

    def emit(self, subject: str, data: dict[str, Any]) -> None:
        """Put an event on the bus, synchronously; never blocks, never raises for the
        emitter (a bad subject is a bug of the emitter: logged, dropped). ``data`` is kept,
        not copied: the caller must not change it afterwards."""
        if self._emitting:
            if len(self._nested) >= MAX_NESTED:
                log.error("nested emits over the bound; event dropped", subject=subject)
                return
            self._nested.append((subject, data))
            return
        self._emitting = True
        try:
            self._append(subject, data)
            while self._nested:
                self._append(*self._nested.popleft())
        finally:
            self._emitting = False

    def _append(self, subject: str, data: dict[str, Any]) -> None:
        try:
            check_subject(subject)
            ts = round(self._clock(), 3)
            if not math.isfinite(ts):
                raise ValueError("the clock is not finite")
            self.feed.append(EVENT, {"subject": subject, "ts": ts, "data": data})
        except (BadRequest, TypeError, ValueError, orjson.JSONEncodeError):
            log.exception("an event could not be emitted; dropped", subject=subject)
            return
        self._metrics.bus_events.inc()

    def check_since(self, since: int) -> None:
        """Raise ``bad_request`` (beyond the head, negative) or ``gone`` (no longer held,
        naming the oldest seq held) unless a subscription may start after ``since``."""
        head = self.head
        if since < 0:
            raise BadRequest("since must be 0 or more", field="since")
        if since > head:
            raise BadRequest(
                f"since is {since} but the last event is seq {head} (the bus's seqs start"
                " again at 1 when the daemon restarts)",
                field="since",
            )
        if since + 1 < self.oldest:
            raise Gone(
                f"events after seq {since} are no longer held; the oldest available is seq"
                f" {self.oldest}",
                field="since",
            )

    def subscribe(
        self,
        pattern: Pattern | str,
        *,
        since: int | None = None,
        where: Where | None = None,
        deny: Sequence[Pattern] = (),
        once: bool = False,
        context: Mapping[str, Any] | None = None,
    ) -> Subscription:
        """A subscription to the events matching ``pattern`` (and ``where``; never those
        ``deny`` matches) with a seq greater than ``since`` (default: from now on). With
        ``once`` it ends after the first one. Its batches hold bus events (kind
        :data:`EVENT`) and lag notices (kind :data:`LAGGED`); open it with ``async with`` or
        hand it to a delivery. Raises ``bad_request`` / ``gone`` for ``since``."""
        compiled = compile_pattern(pattern) if isinstance(pattern, str) else pattern
        after = self.feed.head if since is None else since
        if since is not None:
            self.check_since(since)
        return self.feed.subscribe(
            after,
            context=context,
            view=_view(compiled, where, deny, once),
            on_lag=_lagged,
        )

    async def wait_for(
        self,
        pattern: Pattern | str,
        predicate: Callable[[BusEvent], bool] | None = None,
        *,
        since: int | None = None,
    ) -> BusEvent:
        """The first event after ``since`` (default: from now on) matching ``pattern`` and
        ``predicate``. Waits as long as it takes: bound it with the caller's cancel scope
        (``with trio.fail_after(...)``)."""
        subscription = self.subscribe(pattern, since=since)
        async with subscription:
            async for batch in subscription:
                for event in batch:
                    if event.kind != EVENT:
                        continue  # a lag notice: the skipped events are not looked at
                    found = bus_event(event)
                    if predicate is None or predicate(found):
                        return found
        raise trio.ClosedResourceError("the bus subscription ended")  # pragma: no cover

    async def once(self, pattern: Pattern | str) -> BusEvent:
        """The next event matching ``pattern`` (:meth:`wait_for` without a predicate)."""
        return await self.wait_for(pattern)

    def replay(
        self, pattern: Pattern | str, since: int, *, limit: int, where: Where | None = None
    ) -> tuple[list[BusEvent], int]:
        """Held events after ``since`` matching ``pattern`` (at most ``limit``), and the seq
        to ask from next. Raises like :meth:`subscribe`."""
        compiled = compile_pattern(pattern) if isinstance(pattern, str) else pattern
        self.check_since(since)
        view = _view(compiled, where, (), False)
        found: list[BusEvent] = []
        cursor = since
        for event in self.feed.log.after(since):
            cursor = event.seq
            if view(event) is not None:
                found.append(bus_event(event))
                if len(found) >= limit:
                    break
        return found, cursor

    def stats(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "oldest": self.oldest,
            "held": len(self.feed.log),
            "subscribers": self.feed.subscribers,
        }
