"""A stream's event log: the one buffer that replay and live delivery both read.

Pure: no I/O, no clock, no trio. The log holds the newest events of one stream in seq order.
Rules:

- ``append`` takes exactly ``head + 1``; after a terminal event nothing more is taken.
- Bounds: ``max_events`` events and ``max_bytes`` bytes of encoded JSON. At either bound the
  *oldest* events are evicted, one by one, until both hold again — but the newest event is never
  evicted (an event larger than ``max_bytes`` alone is still held, alone). Since the terminal
  event is always the newest one, it is never evicted.
- ``after(seq)`` answers every held event with a greater seq; asking for events that were
  evicted raises :class:`~raafd.errors.Gone` naming the oldest seq still held, so a client can
  tell "too late" from "nothing new".
"""

from __future__ import annotations

from raafd.errors import BadRequest, Gone
from raafd.protocol.events import StreamEvent

__all__ = ["EventLog"]


class EventLog:
    """See the module docstring."""

    __slots__ = ("_events", "_first", "_head", "_nbytes", "closed", "max_bytes", "max_events")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("an event log holds at least one event and one byte")
        self.max_events = max_events
        self.max_bytes = max_bytes
        # Held events are _events[_first:]; evicting moves _first and compacts the list now and
        # then, so both eviction and reading a slice near the head stay cheap.
        self._events: list[StreamEvent] = []
        self._first = 0
        self._head = 0
        self._nbytes = 0
        self.closed = False  # a terminal event is in the log (read on every append)

    @property
    def head(self) -> int:
        """The seq of the newest event; 0 before the first."""
        return self._head

    @property
    def oldest(self) -> int:
        """The seq of the oldest event still held (``head + 1`` while the log is empty)."""
        if self._first < len(self._events):
            return self._events[self._first].seq
        return self._head + 1

    @property
    def nbytes(self) -> int:
        """Encoded size of the held events."""
        return self._nbytes

    @property
    def terminal(self) -> StreamEvent | None:
        """The terminal event, once appended."""
        if self._first < len(self._events) and self._events[-1].terminal:
            return self._events[-1]
        return None

    def __len__(self) -> int:
        return len(self._events) - self._first

    def append(self, event: StreamEvent) -> None:
        """Add the next event, evicting the oldest ones at the bounds."""
        if event.seq != self._head + 1:
            raise ValueError(f"expected seq {self._head + 1}, got {event.seq}")
        if self.closed:
            raise ValueError("the log already holds a terminal event")
        self._events.append(event)
        self._head = event.seq
        self.closed = event.terminal
        self._nbytes += event.size
        while len(self) > 1 and (len(self) > self.max_events or self._nbytes > self.max_bytes):
            self._nbytes -= self._events[self._first].size
            self._first += 1
        if self._first > 64 and self._first * 2 > len(self._events):
            del self._events[: self._first]
            self._first = 0

    def check(self, seq: int) -> None:
        """Raise unless ``after(seq)`` can answer: ``seq`` must be within ``0..head`` and no
        event after it may have been evicted."""
        if seq < 0:
            raise BadRequest(f"after must be 0 or more, got {seq}", field="after")
        if seq > self._head:
            raise BadRequest(
                f"after is {seq} but the stream's last event is seq {self._head}", field="after"
            )
        oldest = self.oldest
        if seq + 1 < oldest:
            raise Gone(
                f"events after seq {seq} are no longer held; the oldest available is seq {oldest}",
                field="after",
            )

    def after(self, seq: int, limit: int | None = None) -> list[StreamEvent]:
        """Held events with a seq greater than ``seq``, oldest first, at most ``limit``.

        Raises :class:`Gone` when events after ``seq`` were evicted. A ``seq`` at or beyond the
        head answers ``[]``.
        """
        if seq >= 0 and seq >= self._head:
            return []
        self.check(seq)
        start = self._first + (seq + 1 - self.oldest)
        stop = len(self._events) if limit is None else min(len(self._events), start + limit)
        return self._events[start:stop]
