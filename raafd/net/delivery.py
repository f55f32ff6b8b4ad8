"""Delivery: one feed subscription, framed for one transport, written to one connection.

Every transport delivers every feed through :class:`Delivery`: the WebSocket gateway, raafd's
raw HTTP/1.1 path (SSE, NDJSON), responses served by hypercorn, and the OpenAI-compatible chunk
stream. A transport only chooses a :class:`Framing` (how events become bytes) and a
:class:`Sink` (where bytes go); the order of writes, replay, live pushes, catch-up, heartbeats
and the terminal event are decided here, once.

The rule of this file:

    Bytes reach the sink in seq order, each event once: the first batch (behind the
    transport's ``prefix``, in the same write), then either pushes or pulled batches, never
    both for one event; and the delivery has ``ended`` exactly when the terminal event's bytes
    were handed to the sink.

How it is kept: the subscription's cursor is the only position. A live event is pushed (in the
feed's task, no task switch) only while the subscriber is caught up and holds no batch, which
the feed checks before it calls :meth:`Delivery.push`; anything else (replay past the first
batch, an event the sink refused because its queue was full) is pulled by :meth:`Delivery.pump`
in order. A push the sink refuses leaves its event unread, so the pull takes it next.

Two ways to run it:

- :meth:`Delivery.run` in a task that lives as long as the response (HTTP): the prefix and first
  batch, then pulls with heartbeats until the terminal event, while pushes go on beside it.
- :meth:`Delivery.begin`, synchronously (the WebSocket gateway, many feeds on one connection):
  the prefix and first batch without waiting, then pushes; a subclass's :meth:`_behind` starts
  a puller only while the subscriber is behind (see :mod:`raafd.gateway.connection`).
"""

from __future__ import annotations

from typing import Protocol

import trio

from raafd.core.feed import Subscription
from raafd.metrics import LoopValue
from raafd.protocol.events import StreamEvent

__all__ = ["Delivery", "Framing", "Sink"]


class Framing(Protocol):
    """How one transport frames a feed's events. A stateless framing is shared by every
    delivery; one that keeps state (the OpenAI chunks collect tool calls for the end) is made
    per delivery."""

    @property
    def transport(self) -> str:
        """The ``transport`` label of ``raafd_events_sent_total``."""
        ...

    @property
    def heartbeat(self) -> bytes:
        """What goes out after ``heartbeat`` seconds without a write (``b""``: nothing)."""
        ...

    def event(self, event: StreamEvent) -> bytes:
        """One event's bytes (a pushed live event)."""
        ...

    def batch(self, events: list[StreamEvent]) -> bytes:
        """A batch's bytes, in one piece (replay, catch-up)."""
        ...


class Sink(Protocol):
    """Where a delivery's bytes go: a connection's ordered output."""

    def write_nowait(self, data: bytes) -> bool:
        """Take ``data`` now, or return False (full) with nothing taken. May raise
        :class:`trio.BrokenResourceError` or :class:`trio.ClosedResourceError`."""
        ...

    async def write(self, data: bytes) -> None:
        """Take ``data``, waiting for room."""
        ...


class Delivery:
    """See the module docstring. ``sent`` counts delivered events (``raafd_events_sent_total``
    for the framing's transport); ``heartbeat`` is the idle interval in seconds, or None."""

    __slots__ = ("_heartbeat", "_last_write", "_sent", "ended", "framing", "sink", "subscription")

    def __init__(
        self,
        subscription: Subscription,
        framing: Framing,
        sink: Sink,
        sent: LoopValue,
        *,
        heartbeat: float | None = None,
    ) -> None:
        self.subscription = subscription
        self.framing = framing
        self.sink = sink
        self._sent = sent
        self._heartbeat = heartbeat
        self._last_write = trio.current_time() if heartbeat is not None else 0.0
        #: True once the terminal event's bytes were handed to the sink.
        self.ended = False

    # --- hooks for a transport ----------------------------------------------------------------

    def _behind(self, pending: bytes, count: int, terminal: bool) -> None:
        """The sink refused bytes (``pending``, holding ``count`` events), or more replay
        waits after the first batch: something must pull. :meth:`run` pulls anyway; a
        transport that uses :meth:`begin` starts a puller here."""

    def _delivered(self, count: int) -> None:
        """``count`` events were handed to the sink (a transport's own counters)."""

    def _finished(self) -> None:
        """The terminal event was handed to the sink."""

    # --- the delivery -------------------------------------------------------------------------

    def push(self, event: StreamEvent) -> bool:
        """In the feed's task: the live event to the sink, or refused (full, broken, closed)
        and left to the pull. Whatever it raises drops this subscriber alone (the feed's
        guard)."""
        data = self.framing.event(event)  # may be empty: the OpenAI chunks skip `start`
        try:
            taken = not data or self.sink.write_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            taken = False
        if not taken:
            self._behind(b"", 0, False)
            return False
        self._wrote(1, event.terminal)
        return True

    def begin(self, prefix: bytes = b"") -> None:
        """``prefix`` and the first batch in one write without waiting, then live pushes. What
        the sink refuses, and replay past the first batch, go to :meth:`_behind`."""
        sub = self.subscription
        sub.push = self.push
        batch = sub.take_nowait() or []
        data = prefix + self.framing.batch(batch) if batch else prefix
        terminal = bool(batch) and batch[-1].terminal
        try:
            taken = not data or self.sink.write_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            taken = False
        if not taken:
            self._behind(data, len(batch), terminal)
            return
        self._wrote(len(batch), terminal)
        if not self.ended and (more := sub.take_nowait()):
            self._behind(self.framing.batch(more), len(more), more[-1].terminal)

    async def run(self, prefix: bytes = b"", *, live: bool = True) -> bool:
        """The whole delivery in this task: ``prefix`` and the first batch in one write, then
        pulls (and heartbeats) until the terminal event, with live pushes beside it unless
        ``live`` is False (a sink that cannot take bytes synchronously). True once the terminal
        event went to the sink; False when the subscription ended without it (closed).
        Raises what the subscription raises: ``slow_consumer``, ``gone``, ``internal``."""
        sub = self.subscription
        if live:
            sub.push = self.push
        try:
            batch = sub.take_nowait()
            if batch:
                data = prefix + self.framing.batch(batch)
                await self._write(data, len(batch), batch[-1].terminal)
            elif prefix:
                await self._write(prefix, 0, False)
            await self.pump()
        finally:
            sub.push = None
        return self.ended

    async def pump(
        self,
        pending: bytes = b"",
        count: int = 0,
        *,
        terminal: bool = False,
        until_caught_up: bool = False,
    ) -> None:
        """Write ``pending`` (``count`` events, the last one terminal or not), then batches
        until the terminal event or the subscription's end; with ``until_caught_up`` (a
        puller beside :meth:`begin`'s pushes) only until nothing waits."""
        if pending:
            await self._write(pending, count, terminal)
        sub = self.subscription
        framing = self.framing
        while not self.ended:
            batch = sub.take_nowait()
            if batch is None:
                if until_caught_up or sub.done or sub.closed:
                    return
                await self._wait()
                continue
            await self._write(framing.batch(batch), len(batch), batch[-1].terminal)

    # --- inside -------------------------------------------------------------------------------

    async def _wait(self) -> None:
        sub = self.subscription
        if self._heartbeat is None:
            await sub.wait()
            return
        with trio.move_on_at(self._last_write + self._heartbeat):
            await sub.wait()
            return
        await self._write(self.framing.heartbeat, 0, False)

    async def _write(self, data: bytes, count: int, terminal: bool) -> None:
        if data:
            await self.sink.write(data)
        self._wrote(count, terminal)

    def _wrote(self, count: int, terminal: bool) -> None:
        if self._heartbeat is not None:
            self._last_write = trio.current_time()
        if count:
            self._sent.inc(count)
            self._delivered(count)
        if terminal:
            self.ended = True
            self._finished()
