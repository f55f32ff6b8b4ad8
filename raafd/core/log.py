"""A feed's event log: the one buffer that replay and live delivery both read.

Pure: no I/O, no clock, no trio. The log holds the newest events of one feed (an agent run, a
room, a job's output, the event bus) in seq order.
Rules:

- ``append`` takes exactly ``head + 1``; after a terminal event nothing more is taken.
- Bounds: ``max_events`` events and ``max_bytes`` bytes of encoded JSON. At either bound the
  *oldest* events are evicted, one by one, until both hold again — but the newest event is never
  evicted (an event larger than ``max_bytes`` alone is still held, alone). Since the terminal
  event is always the newest one, it is never evicted.
- ``after(seq)`` answers every held event with a greater seq; asking for events that were
  evicted raises :class:`~raafd.errors.Gone` naming the oldest seq still held, so a client can
  tell "too late" from "nothing new".
- ``on_evict`` (when given) is handed each event as it is evicted, oldest first, before the log
  lets it go: an agent stream folds them into what answers a snapshot. It costs nothing until
  the log is full.

What it holds is flat: the events' JSON back to back in one ``bytearray``, their end offsets in
an ``array`` and their kinds in a ``bytearray``; not the
:class:`~raafd.protocol.events.StreamEvent` objects it was given. The garbage collector walks
every object a container refers to on each full collection; with an object per event, the logs
of the thousands of streams a busy daemon retains (hundreds of thousands of events) made each
full collection stall the daemon for hundreds of milliseconds. Flat, a log is four objects
whatever it holds. ``after`` rebuilds the events it answers (their ``fields`` are decoded from
``json`` only if someone reads them).

A closed log is sealed: at the terminal event the evicted slots are cut off and the buffers are
copied to their exact size, since a finished feed's log is kept unchanged for a long time (a
finished stream for ``retention``, thousands of them) while appends leave up to an eighth of
each buffer unused. ``sys.getsizeof(log)`` counts the buffers.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable
from typing import Final

from raafd.errors import BadRequest, Gone
from raafd.protocol.events import EVENT_KINDS, TERMINAL_KINDS, StreamEvent

__all__ = ["EventLog"]

# A kind's code in a log is its index in _KINDS. Kinds are names written in raafd's code (never
# taken from client input), so the table stays small; a code is one byte.
_KINDS: list[str] = sorted(EVENT_KINDS)
_CODE: dict[str, int] = {kind: code for code, kind in enumerate(_KINDS)}
_MAX_KINDS: Final = 256
_MAX_I: Final = 2 ** (8 * array("I").itemsize) - 1  # the largest offset array("I") holds


def _code(kind: str) -> int:
    code = _CODE.get(kind)
    if code is None:
        if len(_KINDS) >= _MAX_KINDS:
            raise ValueError(f"more than {_MAX_KINDS} event kinds")
        code = _CODE[kind] = len(_KINDS)
        _KINDS.append(kind)
    return code


class EventLog:
    """See the module docstring."""

    __slots__ = (
        "_base",
        "_blob",
        "_ends",
        "_feed",
        "_first",
        "_head",
        "_kinds",
        "closed",
        "max_bytes",
        "max_events",
        "on_evict",
    )

    def __init__(
        self,
        max_events: int,
        max_bytes: int,
        on_evict: Callable[[StreamEvent], None] | None = None,
        start: int = 0,
    ) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("an event log holds at least one event and one byte")
        if start < 0:
            raise ValueError("a log starts after seq 0 or later")
        self.max_events = max_events
        self.max_bytes = max_bytes
        # Slot i (from 0) is the event with seq _base + i: its JSON is _blob[end(i-1):end(i)]
        # (end(-1) is 0), its kind _KINDS[_kinds[i]]. Held events are the slots from _first;
        # evicting moves _first, and the evicted slots are cut off now and then (_compact), so
        # eviction stays cheap and the buffers bounded.
        self._blob = bytearray()
        self._ends = array("Q")
        self._kinds = bytearray()
        # ``start``: the seq before the first event this log will hold. A feed whose earlier
        # events live elsewhere (a room's history in the store) starts after them; asking for
        # those is ``Gone``, and the caller reads them from where they are.
        self._base = start + 1
        self._first = 0
        self._feed = ""  # the feed's id, from the first event
        self._head = start
        self.closed = False  # a terminal event is in the log (read on every append)
        #: Told each evicted event (see the module docstring); dropped once the log is sealed.
        self.on_evict = on_evict

    def _start(self, slot: int) -> int:
        return self._ends[slot - 1] if slot else 0

    @property
    def head(self) -> int:
        """The seq of the newest event; 0 before the first."""
        return self._head

    @property
    def oldest(self) -> int:
        """The seq of the oldest event still held (``head + 1`` while the log is empty)."""
        return self._base + self._first

    @property
    def nbytes(self) -> int:
        """Encoded size of the held events."""
        if self._first >= len(self._ends):
            return 0
        return self._ends[-1] - self._start(self._first)

    @property
    def terminal(self) -> StreamEvent | None:
        """The terminal event, once appended."""
        if not self.closed:
            return None
        return self._event(len(self._ends) - 1)

    def __len__(self) -> int:
        return len(self._ends) - self._first

    def append(self, event: StreamEvent) -> None:
        """Add the next event, evicting the oldest ones at the bounds."""
        if event.seq != self._head + 1:
            raise ValueError(f"expected seq {self._head + 1}, got {event.seq}")
        if self.closed:
            raise ValueError("the log already holds a terminal event")
        blob, ends = self._blob, self._ends
        blob += event.json
        ends.append(len(blob))  # the blob starts at the oldest slot kept: its end is len(blob)
        self._kinds.append(_code(event.kind))
        self._feed = event.stream
        self._head = event.seq
        self.closed = event.kind in TERMINAL_KINDS
        first = self._first
        if len(ends) - first > self.max_events or (
            len(blob) - (ends[first - 1] if first else 0) > self.max_bytes
        ):
            self._evict()
        if self.closed:
            self._seal()

    def _evict(self) -> None:
        """Drop the oldest events until both bounds hold (never the newest one)."""
        on_evict = self.on_evict
        while len(self) > 1 and (len(self) > self.max_events or self.nbytes > self.max_bytes):
            if on_evict is not None:
                on_evict(self._event(self._first))
            self._first += 1
        if self._first > 64 and self._first * 2 > len(self._ends):
            self._compact()

    def _compact(self) -> None:
        """Cut off the evicted slots."""
        first = self._first
        cut = self._ends[first - 1]
        del self._blob[:cut]
        self._ends = array("Q", [end - cut for end in self._ends[first:]])
        del self._kinds[:first]
        self._base += first
        self._first = 0

    def _seal(self) -> None:
        """Hold the events of a closed log in exact-size buffers: nothing is appended any more,
        and the log may be kept for long (see the module docstring)."""
        if self._first:
            self._compact()
        self.on_evict = None  # nothing is evicted any more (and a retained log refers to less)
        # A bytearray copied, or an array built from a list, is allocated at its exact size; the
        # originals keep the slack of their growth (and a bytearray may keep the prefix _compact
        # cut off). The end offsets take 4 bytes each instead of 8 when the blob allows (it
        # nearly always does: after the cut it holds only the held events, within max_bytes).
        self._blob = bytearray(self._blob)
        self._ends = array("I" if len(self._blob) <= _MAX_I else "Q", self._ends.tolist())
        self._kinds = bytearray(self._kinds)

    def __sizeof__(self) -> int:
        return (
            object.__sizeof__(self)
            + sys.getsizeof(self._blob)
            + sys.getsizeof(self._ends)
            + sys.getsizeof(self._kinds)
        )

    def _event(self, slot: int) -> StreamEvent:
        json = bytes(self._blob[self._start(slot) : self._ends[slot]])
        return StreamEvent(self._feed, self._base + slot, _KINDS[self._kinds[slot]], None, json)

    def check(self, seq: int) -> None:
        """Raise unless ``after(seq)`` can answer: ``seq`` must be within ``0..head`` and no
        event after it may have been evicted."""
        if seq < 0:
            raise BadRequest(f"after must be 0 or more, got {seq}", field="after")
        if seq > self._head:
            raise BadRequest(
                f"after is {seq} but the last event is seq {self._head}", field="after"
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
        start = seq + 1 - self._base
        stop = len(self._ends) if limit is None else min(len(self._ends), start + limit)
        return [self._event(slot) for slot in range(start, stop)]
