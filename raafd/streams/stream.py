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

The log, its subscribers and backpressure are the stream's :class:`~raafd.core.feed.Feed`
(policy ``SOLE_WAITS``: a sole subscriber that falls behind holds the provider back; with two or
more the feed is shared). The stream adds what makes it an agent run: its status, the pause,
the timers, and the body's task.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, Final, Literal, cast

import trio

from raafd.config import StreamsConfig
from raafd.core.feed import Backpressure, Feed, FeedLimits, SlowConsumer, Subscription
from raafd.errors import BadRequest, Conflict
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.protocol.codes import ErrorCode
from raafd.protocol.events import CANCEL_REASONS, TERMINAL_KINDS, StreamEvent
from raafd.streams.body import Body, StreamWriter
from raafd.streams.snapshot import Fold, snapshot_event
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


@functools.lru_cache(maxsize=8)
def _feed_limits(config: StreamsConfig) -> FeedLimits:
    """One :class:`FeedLimits` per config (shared by every stream, not built per stream)."""
    return FeedLimits(
        max_events=config.log_max_events,
        max_bytes=config.log_max_bytes,
        subscriber_buffer=config.subscriber_buffer,
        max_lag=config.max_lag,
    )


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


class Stream:
    """One agent run; see the module docstring. Built by :class:`StreamManager`, whose nursery
    runs :meth:`run`."""

    # Slots: a finished stream is retained for `retention`, and its 32 attributes would
    # overflow an instance dict's compact layout (about 1.6 KB of a retained stream's 10 KB).
    __slots__ = (
        "_detach_grace",
        "_detached_since",
        "_done",
        "_ended_clock",
        "_evicted",
        "_first_token_at",
        "_gap_due",
        "_gap_left",
        "_gap_on",
        "_holds",
        "_last_content_at",
        "_metrics",
        "_on_finish",
        "_paused",
        "_paused_since",
        "_ran",
        "_scope",
        "_t0",
        "_timer_at",
        "_timers",
        "_total_due",
        "_unyielded",
        "agent",
        "config",
        "created_at",
        "ended_at",
        "feed",
        "id",
        "log",
        "model",
        "owner",
        "session",
        "status",
    )

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
        self.feed = Feed(
            self.id,
            _feed_limits(config),
            metrics=metrics,
            policy=Backpressure.SOLE_WAITS,
            on_subscribers=self._subscribers_changed,
            on_evict=self._fold_evicted,
        )
        self.log = self.feed.log
        self._metrics = metrics
        self._evicted: Fold | None = None  # the events the log evicted, folded (snapshots)
        self._detach_grace = config.detach_grace if detach_grace is None else detach_grace
        self._on_finish = on_finish
        self._t0 = trio.current_time()
        self._ended_clock: float | None = None
        # Made when first needed (objects built per stream cost several times their hot cost on
        # the cold path of a stream's start):
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
        return self.feed.subscribers

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
            "subscribers": self.feed.subscribers,
            "age": round(self.age, 3),
            "owner": self.owner,
            "session": self.session,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
        }

    def subscribe(
        self, after: int = 0, *, context: dict[str, Any] | None = None, snapshot: bool = False
    ) -> Subscription:
        """A subscription to the stream's feed from ``after``: see
        :meth:`raafd.core.feed.Feed.subscribe`. The detach grace runs while it has none.

        With ``snapshot`` and ``after`` 0, the subscription starts with one ``snapshot`` event
        covering every event up to the newest one that is not terminal, then gives exactly the
        events after it (see :mod:`raafd.streams.snapshot`); when the text and tool calls are
        more than ``max_snapshot_bytes``, it is a plain subscription from 0 (``gone`` when the
        log no longer holds the start). A later ``after`` is a resume: no snapshot."""
        if not snapshot or after:
            return self.feed.subscribe(after, context=context)
        fold = self.snapshot()
        if fold is None:
            return self.feed.subscribe(0, context=context)
        return self.feed.subscribe(fold.seq, context=context, lead=snapshot_event(self.id, fold))

    def snapshot(self) -> Fold | None:
        """The fold of every event up to the newest one that is not terminal; None when it is
        more than ``max_snapshot_bytes``."""
        log = self.log
        upto = log.head - 1 if log.closed else log.head
        evicted = self._evicted
        fold = evicted.copy() if evicted is not None else Fold(self.config.max_snapshot_bytes)
        for event in log.after(fold.seq):
            if event.seq > upto or fold.overflow:
                break
            fold.add(event)
        return None if fold.overflow else fold

    def _fold_evicted(self, event: StreamEvent) -> None:
        if self._evicted is None:
            self._evicted = Fold(self.config.max_snapshot_bytes)
        self._evicted.add(event)

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
        self.feed.wake()
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
            self._finish("error", error={"code": ErrorCode.INTERNAL, "message": "internal error"})

    def _timed_out(self, message: str) -> None:
        log.info("stream timed out", stream=self.id, reason=message)
        self._finish("error", error={"code": ErrorCode.TIMEOUT, "message": message})

    def _crashed(self, group: BaseExceptionGroup[Exception]) -> None:
        if self.finished:
            log.warning("stream body failed after the stream ended", exc_info=group)
            return
        log.error("stream failed", exc_info=group)
        self._finish("error", error={"code": ErrorCode.INTERNAL, "message": "internal error"})

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
        event = self.feed.append(kind, fields)
        self._metrics.count_event(kind)
        return event

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
        self.feed.wake()
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
        return self._paused or self.feed.backlogged()

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
                await self.feed.wait_moved()
        finally:
            self._release()
        if self.finished:
            # Woken by the end: the body's scope is cancelled, so this raises Cancelled.
            await trio.lowlevel.checkpoint()

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

    def _subscribers_changed(self, count: int) -> None:
        if count:
            self._detached_since = None
        elif self._detached_since is None:
            self._detached_since = trio.current_time()  # the grace starts (again)
            self._arm()


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
