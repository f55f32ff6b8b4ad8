"""One agent run: its event log, its subscribers, its controls and its timers.

The rule of this file, which everything else in it serves:

    A stream's log is seq 1, 2, 3, ... with no gap, and it ends with exactly one terminal event
    (``complete``, ``error`` or ``cancelled``), whatever happens and in whatever order.

How it is kept:

- Every event enters through :meth:`Stream._append`, which is synchronous (so atomic under trio)
  and takes ``head + 1``. A terminal event enters only through :meth:`Stream._finish`, which
  does nothing once the log holds one: the first terminal wins, a second is never written, and
  the log itself refuses anything after it.
- ``_finish`` cancels the body's cancel scope *before* it appends. So cancellation reaches the
  provider at once (DESIGN invariant 5), and the body's next checkpoint raises ``Cancelled``:
  it cannot write after the terminal event. The body's writer checkpoints before each append.
- ``start`` is appended when the :class:`Stream` is built, so a stream cancelled before its
  task ever ran still reads ``start``, ``cancelled``.
- A body that fails writes ``error`` {code: internal}; one that returns without a terminal event
  gets one; a task cancelled from outside (the manager's nursery closing) writes ``cancelled``
  {reason: drain} in its ``finally``, synchronously.

Subscribers are cursors into the log, not copies of it: a :class:`Subscription` holds the last
seq it delivered and reads ``log.after(cursor)``. Replay and live delivery are the same code,
so attaching with ``after=N`` while events are appended can neither miss nor repeat one. The
one shortcut: a subscriber that is caught up (cursor at the previous head, no batch in hand)
may set ``push``, a synchronous callback that takes the new event in the appending task
(the gateway writes it straight to the socket); the cursor moves only when ``push`` says it
took the event, so a refused push simply leaves the event to the pull path.
Backpressure (DESIGN invariant 3):

- exactly one subscriber: the producer waits while ``head - cursor >= subscriber_buffer``; the
  provider's bounded channel then fills and the provider stops reading upstream;
- two or more: the producer waits for nobody. A subscriber more than ``subscriber_buffer``
  behind gets adjacent ``content`` events of its batch coalesced (lossless); one with more than
  ``max_lag`` unread events appended since it attached is dropped with :class:`SlowConsumer`
  and resumes from its cursor on a new subscription. A finished stream's replay is never
  coalesced.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Literal, Protocol, cast

import trio

from raafd.config import StreamsConfig
from raafd.errors import BadRequest, Conflict, Gone, RaafdError
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.protocol.events import (
    CANCEL_REASONS,
    TERMINAL_KINDS,
    StreamEvent,
    build_event,
    coalesce,
)
from raafd.streams.log import EventLog
from raafd.timers import Timers

__all__ = [
    "STATUSES",
    "Body",
    "SlowConsumer",
    "Status",
    "Stream",
    "StreamWriter",
    "Subscription",
    "new_stream_id",
]

log = get_logger("raafd.streams")

Status = Literal["running", "paused", "complete", "error", "cancelled"]
STATUSES: Final[tuple[Status, ...]] = ("running", "paused", "complete", "error", "cancelled")
_TOKEN_KINDS: Final = frozenset({"content", "tool_call"})
_YIELD_EVERY: Final = 8  # see Stream._wait_ready


class _RandomPool:
    """Bytes from the OS's CSPRNG, fetched 4 KiB at a time: ``os.urandom`` is a system call
    (several µs on a stream's cold start path), and an id needs only 12 bytes. A forked child
    starts with an empty pool, so parent and child never hand out the same bytes."""

    __slots__ = ("_at", "_bytes")

    SIZE: Final = 4096

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        at = self._at
        if at + n > len(self._bytes):
            self._bytes, at = os.urandom(max(self.SIZE, n)), 0
        self._at = at + n
        return self._bytes[at : at + n]

    def reset(self) -> None:
        self._bytes = b""
        self._at = 0


_random = _RandomPool()
os.register_at_fork(after_in_child=_random.reset)


def new_stream_id() -> str:
    """A fresh stream id: ``st_`` and 24 random hex digits (96 bits from the OS's CSPRNG)."""
    return "st_" + _random.take(12).hex()


class SlowConsumer(RaafdError):
    """A subscriber of a shared stream fell more than ``max_lag`` events behind and was dropped.

    The gateway closes with 4001; the client resumes from its last seq."""

    code = "slow_consumer"
    http_status = 409


class StreamWriter(Protocol):
    """What a stream's body (the provider runner, later the agent loop) writes through."""

    async def emit(self, kind: str, **fields: Any) -> None:
        """Append an event. A non-terminal one first waits while the stream is paused or its
        single subscriber is behind (backpressure); a terminal one ends the stream."""
        ...

    async def wait_ready(self) -> None:
        """Return once the stream takes more upstream output (not paused, subscriber keeping
        up). Call it before reading the upstream, so that pausing stops the reads."""
        ...

    def progress(self) -> None:
        """Upstream made progress without an event yet (a tool-call fragment): counts as a
        token for the first-token and idle timeouts."""
        ...

    def ready_now(self) -> bool:
        """Whether a non-terminal event would be taken now without a wait (the stream running,
        not paused, its single subscriber keeping up): :meth:`emit_now`'s precondition."""
        ...

    def emit_now(self, kind: str, **fields: Any) -> None:
        """Append a non-terminal event synchronously; only right after :meth:`ready_now` said
        True (a provider's synchronous read callback, which must not wait)."""
        ...


Body = Callable[[StreamWriter], Awaitable[None]]


class Stream:
    """One agent run; see the module docstring. Built by :class:`StreamManager`, whose nursery
    runs :meth:`run`."""

    def __init__(
        self,
        *,
        agent: str,
        model: str,
        config: StreamsConfig,
        metrics: Metrics,
        timers: Timers,
        stream_id: str | None = None,
        owner: str = "",
        session: str | None = None,
        detach_grace: float | None = None,
        on_finish: Callable[[Stream], None] | None = None,
    ) -> None:
        self.id = stream_id or new_stream_id()
        self.agent = agent
        self.model = model
        self.owner = owner
        self.session = session
        self.config = config
        self.status: Status = "running"
        self.created_at = time.time()
        self.ended_at: float | None = None
        self.log = EventLog(config.log_max_events, config.log_max_bytes)
        self._metrics = metrics
        self._detach_grace = config.detach_grace if detach_grace is None else detach_grace
        self._on_finish = on_finish
        self._t0 = trio.current_time()
        self._ended_clock: float | None = None
        # Bounded by the gateway's per-connection limits; a dict keeps attach order.
        self._subs: dict[Subscription, None] = {}
        self._solo: Subscription | None = None  # the subscriber, while there is exactly one
        # Made when first needed (most streams never wait, and objects built per stream cost
        # several times their hot cost on the cold path of a stream's start):
        self._room: trio.lowlevel.ParkingLot | None = None  # producer: a reader moved, resume
        self._scope = trio.CancelScope()  # around the body; cancelled by _finish
        self._done: trio.Event | None = None  # set at the terminal event, for wait()
        self._ran = False
        self._paused = False
        # The timers (see raafd.timers): due times as plain floats, inf when off; the earliest
        # is armed with the manager's shared Timers (_timer_at is theirs to keep).
        self._timers = timers
        self._timer_at = math.inf
        self._detached_since: float | None = self._t0  # no subscriber since
        self._paused_since: float | None = None
        self._total_due = math.inf  # max_duration, while the body runs
        # The first-token/idle timer runs while the body does (_gap_on). A token moves
        # _gap_due: a float store, nothing else unless it moves earlier than _timer_at. It is
        # frozen (_gap_due inf, remaining time in _gap_left) while anything holds it: a pause,
        # or the producer waiting for its subscriber.
        self._gap_on = False
        self._gap_due = math.inf
        self._gap_left: float | None = None
        self._unyielded = 0  # _wait_ready calls since it last yielded
        self._holds = 0
        self._first_token_at: float | None = None
        self._last_content_at: float | None = None
        metrics.streams.labels("running").inc()
        self._append("start", {"agent": agent, "model": model})

    # --- reading ------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        """The seq of the newest event."""
        return self.log.head

    @property
    def finished(self) -> bool:
        """True once the terminal event is in the log."""
        return self.log.closed

    @property
    def terminal(self) -> StreamEvent | None:
        return self.log.terminal

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def age(self) -> float:
        """Seconds since the stream was started (trio clock)."""
        return trio.current_time() - self._t0

    @property
    def ended_clock(self) -> float | None:
        """The trio clock at the terminal event."""
        return self._ended_clock

    async def wait(self) -> None:
        """Return once the stream has its terminal event."""
        if self.log.closed:
            await trio.lowlevel.checkpoint()
            return
        if self._done is None:
            self._done = trio.Event()
        await self._done.wait()

    def info(self) -> dict[str, Any]:
        """A summary for ``streams`` listings and status replies."""
        return {
            "id": self.id,
            "agent": self.agent,
            "model": self.model,
            "status": self.status,
            "seq": self.log.head,
            "subscribers": len(self._subs),
            "age": round(self.age, 3),
            "owner": self.owner,
            "session": self.session,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
        }

    def subscribe(self, after: int = 0) -> Subscription:
        """A subscription delivering every event with seq greater than ``after``.

        Use it as ``async with stream.subscribe(n) as sub: async for batch in sub: ...``; it is
        registered on entry and unregistered on exit. Raises :class:`~raafd.errors.Gone` when
        events after ``after`` were evicted and :class:`~raafd.errors.BadRequest` when ``after``
        is negative or beyond the head.
        """
        self.log.check(after)
        return Subscription(self, after)

    # --- control ------------------------------------------------------------------------------

    def cancel(self, reason: str = "client") -> bool:
        """Cancel the body at once (closing the upstream request), then append ``cancelled``.
        False when the stream had already ended."""
        if reason not in CANCEL_REASONS:
            raise BadRequest(
                f"reason must be one of {', '.join(sorted(CANCEL_REASONS))}", field="reason"
            )
        return self._finish("cancelled", reason=reason)

    def pause(self) -> bool:
        """Stop taking upstream output and append ``paused``. False when already paused;
        :class:`~raafd.errors.Conflict` once the stream has ended. A pause longer than
        ``pause_timeout`` cancels the stream with reason ``timeout``."""
        if self.finished:
            raise Conflict(f"stream {self.id} has ended ({self.status})", field="stream")
        if self._paused:
            return False
        self._paused = True
        self._paused_since = trio.current_time()
        self._arm()
        self._set_status("paused")
        self._hold()
        self._append("paused", {})
        return True

    def resume(self) -> bool:
        """Append ``resumed`` and take upstream output again. False when not paused."""
        if self.finished:
            raise Conflict(f"stream {self.id} has ended ({self.status})", field="stream")
        if not self._paused:
            return False
        self._paused = False
        self._paused_since = None
        self._set_status("running")
        self._append("resumed", {})
        self._release()
        self._wake_producer()
        return True

    # --- running ------------------------------------------------------------------------------

    async def run(self, body: Body) -> None:
        """Run ``body`` under the stream's timers and watchers until the terminal event.

        Returns once the stream has ended; never raises but ``Cancelled``."""
        if self._ran:
            raise RuntimeError("a stream runs once")
        self._ran = True
        try:
            if self.finished:
                return
            await self._run_body(body)
        finally:
            if not self.finished:
                self._finish("cancelled", reason="drain")

    async def _run_body(self, body: Body) -> None:
        cfg = self.config
        # The timeouts end the stream from the timer task (_on_timer), through _finish, which
        # cancels _scope first: the body unwinds with Cancelled after the terminal event.
        self._total_due = self._t0 + cfg.max_duration
        self._gap_on = True
        if self._holds:
            self._gap_left = cfg.first_token_timeout
        else:
            self._gap_due = trio.current_time() + cfg.first_token_timeout
        self._arm()
        try:
            with self._scope:
                try:
                    await body(_Writer(self))
                except* Exception as group:
                    self._crashed(group)
        finally:
            self._gap_on = False
            self._gap_due = self._total_due = math.inf
            self._gap_left = None
        if not self.finished:
            log.error("stream body returned without a terminal event")
            self._finish("error", error={"code": "internal", "message": "internal error"})

    def _timed_out(self, message: str) -> None:
        log.info("stream timed out", stream=self.id, reason=message)
        self._finish("error", error={"code": "timeout", "message": message})

    def _crashed(self, group: BaseExceptionGroup[Exception]) -> None:
        if self.finished:
            log.warning("stream body failed after the stream ended", exc_info=group)
            return
        log.error("stream failed", exc_info=group)
        self._finish("error", error={"code": "internal", "message": "internal error"})

    # --- timers (see raafd.timers) ------------------------------------------------------------

    def _dues(self) -> tuple[float, float]:
        """The detach grace's and the pause timeout's due times (inf when off)."""
        detached, paused = self._detached_since, self._paused_since
        return (
            math.inf if detached is None else detached + self._detach_grace,
            math.inf if paused is None else paused + self.config.pause_timeout,
        )

    def _arm(self) -> None:
        """Arm the earliest due time (a no-op when one at or before it is armed already). Call
        it whenever a due time may have moved earlier."""
        if not self.log.closed:
            self._timers.arm(self, min(*self._dues(), self._total_due, self._gap_due))

    def _on_timer(self, now: float) -> None:
        """Called by the timer task at ``_timer_at``: cancel with reason ``detached`` after
        ``detach_grace`` with no subscriber, with ``timeout`` after ``pause_timeout`` in one
        pause; end with ``error`` {timeout} past ``max_duration`` or when no token came before
        ``_gap_due``; else arm the next due time."""
        if self.log.closed:
            return
        detach_due, pause_due = self._dues()
        if now >= detach_due:
            self.cancel("detached")
        elif now >= pause_due:
            self.cancel("timeout")
        elif now >= self._total_due:
            cfg = self.config
            self._timed_out(f"the stream ran longer than max_duration ({cfg.max_duration:g} s)")
        elif now >= self._gap_due:
            cfg = self.config
            if self._first_token_at is None:
                what = f"no first token within first_token_timeout ({cfg.first_token_timeout:g} s)"
            else:
                what = f"no token within idle_timeout ({cfg.idle_timeout:g} s)"
            self._timed_out(what)
        else:
            self._arm()

    # --- the one way in -----------------------------------------------------------------------

    def _append(self, kind: str, fields: dict[str, Any]) -> StreamEvent:
        event = build_event(self.id, self.log.head + 1, kind, fields)
        self.log.append(event)  # refuses anything after the terminal event
        self._metrics.count_event(kind)
        if self._subs:
            if not event.terminal and len(self._subs) >= 2:
                self._drop_laggards()
            self._deliver(event)
        return event

    def _deliver(self, event: StreamEvent) -> None:
        """Hand a new event to each subscriber: pushed straight through to one that is caught
        up and whose ``push`` takes it (no task switch), else its reader is woken to pull."""
        seq = event.seq
        solo = self._solo
        for sub in (solo,) if solo is not None else [*self._subs]:
            push = sub.push
            if push is not None and not sub._held and sub._cursor == seq - 1 and push(event):
                sub._cursor = seq
                if not event.terminal:
                    continue
                sub._done = True
            if sub._wake:  # its reader is parked (unpark_all on an empty lot costs ~2 µs)
                sub._wake.unpark_all()

    def _finish(self, kind: str, **fields: Any) -> bool:
        if self.finished:
            return False
        self._scope.cancel()  # first: the upstream request closes now
        self._timers.disarm(self)
        self._append(kind, fields)
        self._paused = False
        self._set_status(cast(Status, kind))
        self.ended_at = time.time()
        self._ended_clock = trio.current_time()
        self._metrics.streams_ended.labels(kind).inc()
        if self._done is not None:
            self._done.set()
        self._wake_producer()
        if self._on_finish is not None:
            self._on_finish(self)
        return True

    def _set_status(self, status: Status) -> None:
        self._metrics.streams.labels(self.status).dec()
        self._metrics.streams.labels(status).inc()
        self.status = status

    # --- backpressure and timers --------------------------------------------------------------

    def _must_wait(self) -> bool:
        if self.log.closed:
            return False
        if self._paused:
            return True
        solo = self._solo
        return solo is not None and self.log.head - solo._cursor >= self.config.subscriber_buffer

    def _go_on_now(self) -> bool:
        """``_wait_ready``'s common case, synchronously: running, no need to wait and no yield
        due (the call is counted towards the next yield). Every token's path."""
        if self._unyielded < _YIELD_EVERY - 1 and not self.log.closed and not self._must_wait():
            self._unyielded += 1
            return True
        return False

    async def _wait_ready(self) -> None:
        if self._go_on_now():
            return
        if not self._must_wait():
            # A checkpoint per token costs a reschedule (several µs of a ~40 µs budget), and a
            # network provider yields on every upstream read anyway; so only every
            # _YIELD_EVERY-th call yields, which still bounds what a provider that never waits
            # (a burst already in the socket buffer) can do before others run. Once ended from
            # elsewhere (cancel, timeout) the body's scope is cancelled and the checkpoint
            # raises Cancelled before anything is appended after the terminal event.
            self._unyielded = 0
            await trio.lowlevel.checkpoint()
            return
        self._hold()
        try:
            while self._must_wait():
                if self._room is None:
                    self._room = trio.lowlevel.ParkingLot()
                await self._room.park()
        finally:
            self._release()
        if self.finished:
            # Woken by the end: the body's scope is cancelled, so this raises Cancelled.
            await trio.lowlevel.checkpoint()

    def _wake_producer(self) -> None:
        if self._room:  # None, or empty (unpark_all on an empty lot costs ~2 µs)
            self._room.unpark_all()

    def _hold(self) -> None:
        self._holds += 1
        if self._holds == 1 and self._gap_on:
            self._gap_left = self._gap_due - trio.current_time()
            self._gap_due = math.inf

    def _release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self._gap_on and self._gap_left is not None:
            self._gap_due = trio.current_time() + self._gap_left
            self._gap_left = None
            self._arm()

    def _progress(self, *, content: bool) -> None:
        now = trio.current_time()
        if self._first_token_at is None:
            self._first_token_at = now
            self._metrics.ttft.observe(now - self._t0)
        if content:
            if self._last_content_at is not None:
                self._metrics.token_gap.observe(now - self._last_content_at)
            self._last_content_at = now
        if self._gap_on:
            if self._holds:
                self._gap_left = self.config.idle_timeout
            else:
                self._gap_due = due = now + self.config.idle_timeout
                if due < self._timer_at:
                    self._arm()  # earlier (idle_timeout < what was left of the first-token one)

    # --- subscribers --------------------------------------------------------------------------

    def _register(self, sub: Subscription) -> None:
        self.log.check(sub.cursor)
        self._subs[sub] = None
        self._solo = sub if len(self._subs) == 1 else None
        self._detached_since = None
        sub._attach_head = self.log.head
        self._wake_producer()

    def _unregister(self, sub: Subscription) -> None:
        if sub in self._subs:
            del self._subs[sub]
            self._solo = next(iter(self._subs)) if len(self._subs) == 1 else None
            self._wake_producer()
            if not self._subs:
                self._detached_since = trio.current_time()  # the grace starts (again)
                self._arm()

    def _drop_laggards(self) -> None:
        max_lag = self.config.max_lag
        for sub in [s for s in self._subs if s._lag() > max_lag]:
            self._unregister(sub)
            sub._drop(
                SlowConsumer(
                    f"more than {max_lag} events behind on stream {self.id}; resume after seq"
                    f" {sub.cursor}"
                )
            )
            self._metrics.slow_consumers.inc()
            log.info("slow consumer dropped", stream=self.id, cursor=sub.cursor, head=self.log.head)

    def _next_batch(self, sub: Subscription) -> list[StreamEvent]:
        cfg = self.config
        backlog = self.log.head - sub.cursor
        self._metrics.subscriber_lag.observe(backlog)
        lagging = not self.finished and len(self._subs) >= 2 and backlog > cfg.subscriber_buffer
        limit = max(cfg.max_lag, cfg.subscriber_buffer) if lagging else cfg.subscriber_buffer
        try:
            events = self.log.after(sub.cursor, limit)
        except Gone:
            sub.close()
            raise
        sub._cursor = events[-1].seq
        sub._done = events[-1].terminal
        self._wake_producer()
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
    """A cursor into one stream's log: an async iterator of non-empty batches of events.

    Each batch is everything after the cursor, up to ``subscriber_buffer`` events (up to
    ``max_lag`` when coalesced). Iteration ends after the batch holding the terminal event;
    it raises :class:`SlowConsumer` once dropped for lagging and :class:`~raafd.errors.Gone`
    when the events it needs were evicted. ``cursor`` is the last seq delivered: resume from it.

    ``__anext__`` is cancel-safe: it only waits before it takes a batch, so a read cancelled by
    a timeout (an SSE heartbeat, say) consumes nothing.
    """

    def __init__(self, stream: Stream, after: int) -> None:
        self.stream = stream
        self._cursor = after
        self._attach_head = after
        self._state: Literal["new", "open", "closed"] = "new"
        self._error: RaafdError | None = None
        self._done = False
        # The reader: the log grew or the stream ended (made on its first wait).
        self._wake: trio.lowlevel.ParkingLot | None = None
        self._held = False  # a batch was handed out and its reader has not asked for more yet
        # Called (synchronously, from the producer) when the subscriber is dropped for lagging,
        # so a reader blocked on a stalled socket can be closed now rather than on its next read.
        self.on_drop: Callable[[RaafdError], None] | None = None
        # Set by a reader that can take a live event without waiting (see the module
        # docstring): True when it took it. Called only while caught up and no batch is held.
        self.push: Callable[[StreamEvent], bool] | None = None

    @property
    def cursor(self) -> int:
        """The last seq delivered (``after`` before the first batch)."""
        return self._cursor

    @property
    def dropped(self) -> bool:
        """True once dropped as a slow consumer."""
        return self._error is not None

    def _lag(self) -> int:
        # Live events appended since attach and not yet read. The history a subscriber found
        # when it attached is replay, not lag: it is never dropped for reading history.
        return self.stream.log.head - max(self._cursor, self._attach_head)

    def _drop(self, error: RaafdError) -> None:
        self._error = error
        self._state = "closed"
        if self._wake:
            self._wake.unpark_all()
        if self.on_drop is not None:
            self.on_drop(error)

    @property
    def done(self) -> bool:
        """True once the batch holding the terminal event was handed out (or pushed)."""
        return self._done

    def open(self) -> None:
        """Register with the stream, synchronously: what ``async with`` does on entry, for a
        reader that takes batches with :meth:`take_nowait` and pushes. Pair it with
        :meth:`close`."""
        if self._state != "new":
            raise RuntimeError("a subscription is entered once")
        self.stream._register(self)
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
        """Unregister (idempotent). The stream may hit its detach grace if it was the last."""
        if self._state == "open":
            self.stream._unregister(self)
        self._state = "closed"

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
            if self._wake is None:
                self._wake = trio.lowlevel.ParkingLot()
            await self._wake.park()

    def take_nowait(self) -> list[StreamEvent] | None:
        """The next batch without waiting, or None when there is none now (caught up, ended or
        closed). Asking again says the batch before was delivered: until then ``push`` is not
        called. Raises :class:`SlowConsumer` once dropped, :class:`~raafd.errors.Gone` when the
        events it needs were evicted."""
        self._held = False  # asking for more: the last batch is delivered
        if self._error is not None:
            raise self._error
        if self._done or self._state == "closed":
            return None
        if self._state == "new":
            raise RuntimeError("enter the subscription (`async with`) before iterating it")
        stream = self.stream
        if stream.log.head > self._cursor:
            batch = stream._next_batch(self)
            self._held = True
            return batch
        return None


class _Writer:
    """The :class:`StreamWriter` a stream hands its body."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    async def emit(self, kind: str, **fields: Any) -> None:
        stream = self._stream
        if kind in TERMINAL_KINDS:
            await trio.lowlevel.checkpoint()  # raises Cancelled once the stream has ended
            stream._finish(kind, **fields)
            return
        if kind in _TOKEN_KINDS:
            stream._progress(content=kind == "content")
        if not stream._go_on_now():
            await stream._wait_ready()
        stream._append(kind, fields)

    async def wait_ready(self) -> None:
        await self._stream._wait_ready()

    def progress(self) -> None:
        self._stream._progress(content=False)

    def ready_now(self) -> bool:
        stream = self._stream
        return not stream.log.closed and not stream._must_wait()

    def emit_now(self, kind: str, **fields: Any) -> None:
        stream = self._stream
        if kind in TERMINAL_KINDS or stream.log.closed:
            raise RuntimeError(f"emit_now({kind!r}) on an ended stream or of a terminal event")
        if kind in _TOKEN_KINDS:
            stream._progress(content=kind == "content")
        stream._append(kind, fields)
