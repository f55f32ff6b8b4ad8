"""An incremental Server-Sent Events parser: bytes in, events out, no I/O.

The rule of this module: how a byte stream is cut into chunks never changes the events it
yields. Feeding ``b"data: a\\n\\n"`` at once or one byte at a time gives the same events; a line
ending split across chunks (``\\r`` now, ``\\n`` in the next chunk) is one line ending; a
multi-byte UTF-8 character split across chunks is decoded whole (lines are split on bytes, where
CR and LF can never be part of a multi-byte character, and decoded only when complete).

It follows the WHATWG "event stream interpretation" rules: CRLF, LF and CR all end a line; a
leading UTF-8 BOM is dropped once; lines starting with ``:`` are comments; ``field: value``
drops one space after the colon; a line without a colon is a field with an empty value; a blank
line dispatches the event, unless no ``data`` field was seen; ``id`` persists across events and
is ignored when it contains NUL; ``retry`` is honoured only when all ASCII digits; unknown
fields are ignored; an event not ended by a blank line when the stream ends is discarded.

Memory is bounded: a line longer than ``max_line`` bytes or an event whose data grows past
``max_event`` characters raises :class:`SSEError`, so a peer that never sends a newline cannot
make the parser buffer without end.
"""

from __future__ import annotations

import re

from attrs import frozen

__all__ = ["SSEError", "SSEParser", "ServerSentEvent"]

_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"\r\n|\r|\n")


class SSEError(ValueError):
    """The byte stream broke a bound of the parser (a line or an event too large)."""


@frozen
class ServerSentEvent:
    """One dispatched event. ``id`` is the last event id seen so far in the stream (it persists
    across events, as the spec says); ``retry`` is the reconnection time (milliseconds) set by a
    ``retry`` field of this event's block, if any."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEParser:
    """Feed bytes with :meth:`feed`; get the events completed by them."""

    def __init__(self, *, max_line: int = 1 << 20, max_event: int = 8 << 20) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self.last_event_id = ""
        self.reconnection_time: int | None = None  # milliseconds, from the last valid ``retry``
        self._buf = b""  # the incomplete last line
        self._bom_checked = False
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._retry: int | None = None

    @property
    def pending(self) -> bool:
        """Whether bytes or fields of an event not yet ended by a blank line are buffered."""
        return bool(self._buf or self._data or self._event or self._retry is not None)

    def data_only(self, chunk: bytes) -> list[bytes] | None:
        """The ``data`` values of ``chunk``, undecoded, when feeding it would give events made
        of one ``data`` line each and nothing else: the parser holds nothing, and ``chunk`` is
        whole events of the shape ``data: VALUE\\n\\n`` (LF only). Else None, and nothing is
        taken: feed ``chunk`` instead. Such events change no parser state (no ``id``, ``event``
        or ``retry``), so this is :meth:`feed` without building the events: the shape of
        nearly every streamed token (OpenAI-compatible servers send exactly this)."""
        if self._buf or self._data or self._event or self._retry is not None:
            return None  # pending (inlined: this runs for every token)
        if self._skip_lf or not self._bom_checked:
            return None
        if len(chunk) > self.max_line or len(chunk) > self.max_event:
            return None  # let feed raise
        end = len(chunk) - 2
        if chunk.find(b"\n") == end:  # one line, and the blank line after it
            if chunk[:6] == b"data: " and chunk[-1:] == b"\n" and b"\r" not in chunk:
                return [chunk[6:end]]
            return None
        if chunk[end:] != b"\n\n" or b"\r" in chunk:
            return None
        values = chunk[:end].split(b"\n\n")
        if chunk.count(b"\n") != 2 * len(values):
            return None  # a line that is not alone in its event
        for value in values:
            if value[:6] != b"data: ":
                return None
        return [value[6:] for value in values]

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Parse the next bytes of the stream; return the events they complete, in order."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        if not self._bom_checked:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._buf = buf  # might still become a BOM
                return []
            if buf.startswith(_BOM):
                buf = buf[len(_BOM) :]
            self._bom_checked = True

        events: list[ServerSentEvent] = []
        if b"\r" not in buf:
            # The common case, LF only: a plain split cuts the same lines as _EOL, faster.
            lines = buf.split(b"\n")
            rest = lines.pop()
            for raw in lines:
                self._line(raw, events)
        else:
            pos = 0
            for match in _EOL.finditer(buf):
                self._line(buf[pos : match.start()], events)
                pos = match.end()
            # A CR that ends the buffer may be the first half of a CRLF split across chunks.
            self._skip_lf = buf.endswith(b"\r")
            rest = buf[pos:]
        if len(rest) > self.max_line:
            raise SSEError(f"an event-stream line is longer than {self.max_line} bytes")
        self._buf = rest
        return events

    def _line(self, raw: bytes, events: list[ServerSentEvent]) -> None:
        if not raw:
            self._dispatch(events)
            return
        if len(raw) > self.max_line:
            raise SSEError(f"an event-stream line is longer than {self.max_line} bytes")
        if raw[:6] == b"data: ":  # the common line: ``data`` and its one space (ASCII)
            self._append_data(raw[6:].decode("utf-8", "replace"))
            return
        if raw[:1] == b":":
            return  # comment (heartbeats)
        line = raw.decode("utf-8", "replace")
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._append_data(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = self.reconnection_time = int(value)

    def _append_data(self, value: str) -> None:
        self._data_size += len(value) + 1
        if self._data_size > self.max_event:
            raise SSEError(f"an event's data is larger than {self.max_event} characters")
        self._data.append(value)

    def _dispatch(self, events: list[ServerSentEvent]) -> None:
        if self._data:
            events.append(
                ServerSentEvent(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    id=self.last_event_id,
                    retry=self._retry,
                )
            )
        self._data = []
        self._data_size = 0
        self._event = ""
        self._retry = None
