"""WebSocket frames (RFC 6455 §5), without I/O: server frames encoded, client frames parsed.

Server frames are never masked, so a text frame is a two-to-ten byte header in front of the
payload. Encoding it here instead of through a general WebSocket library is what lets one core
push well over 100k small frames a second (docs/architecture.md).

Client frames (masked, maybe fragmented, with control frames between the fragments) are parsed
by :class:`ClientFrames`, which yields wsproto's events and fails where wsproto's frame
protocol fails, with the same close codes: wsproto does the opening handshake, this class the
frames after it. Rule of the class: it reports exactly what wsproto's ``Connection`` would for
the same bytes fed in the same pieces (a data frame's payload as one event per piece that holds
some of it), so the connection behaves as it did on wsproto; ``tests/test_frames.py`` checks
that against wsproto itself. Why not wsproto for this too: its frame protocol costs about
1.7 KB per connection (a deque, a buffer, a parser generator, three more objects) and about
10 µs per small frame; this parser keeps one small object per idle connection and takes about
a third of the time.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Iterator

from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.frame_protocol import LOCAL_ONLY_CLOSE_REASONS, CloseReason, Opcode

__all__ = [
    "ClientFrames",
    "binary_frame",
    "close_frame",
    "ping_frame",
    "pong_frame",
    "text_frame",
]

_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA
_FIN = 0x80


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((_FIN | opcode, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", _FIN | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN | opcode, 127, n)
    return header + payload


def text_frame(payload: bytes) -> bytes:
    """A final text frame carrying ``payload`` (UTF-8 JSON)."""
    return _frame(_OP_TEXT, payload)


def binary_frame(payload: bytes) -> bytes:
    """A final binary frame (only the opt-in echo endpoint sends these)."""
    return _frame(_OP_BINARY, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    # Control frame payloads are at most 125 bytes: 2 for the code, the rest for the reason.
    data = reason.encode()[:123]
    return _frame(_OP_CLOSE, struct.pack("!H", code) + data)


def ping_frame(payload: bytes = b"") -> bytes:
    return _frame(_OP_PING, payload[:125])


def pong_frame(payload: bytes = b"") -> bytes:
    return _frame(_OP_PONG, payload[:125])


# --- client frames --------------------------------------------------------------------------

_OP_CONTINUATION = 0x0
_OPCODES = frozenset((_OP_CONTINUATION, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG))
_PROTOCOL_ERROR = 1002
_INVALID_DATA = 1007
_XOR = [bytes(a ^ b for a in range(256)) for b in range(256)]
_utf8 = codecs.getincrementaldecoder("utf-8")


class _Failed(Exception):
    def __init__(self, reason: str, code: int = _PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if n <= 512:
        key = (mask * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR[mask[i]])
    return bytes(out)


class ClientFrames:
    """The frames a client sends after the handshake: :meth:`receive_data`, then
    :meth:`events` (see the module docstring). A protocol error comes as a
    :class:`~wsproto.events.CloseConnection` with code 1002 (1007: text that is not UTF-8),
    as does a close frame; nothing is parsed after either."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_decoder",
        "_fin",
        "_mask",
        "_message",
        "_opcode",
        "_pos",
        "_rest",
    )

    def __init__(self) -> None:
        # Received bytes, parsed up to _pos (an offset, not a slice per frame: a read may hold
        # thousands of small frames). Between reads only a part of a header or of a control
        # frame is kept: a data frame's payload is handed on as it comes.
        self._buffer = b""
        self._pos = 0
        self._closed = False  # after a close frame or an error
        # The frame being read, once its header is: the opcode of its next piece (a data
        # frame's later pieces are continuations, as in wsproto), FIN, the payload bytes
        # still to come, and the mask turned to the next of them. _opcode is None between
        # frames.
        self._opcode: int | None = None
        self._fin = False
        self._rest = 0
        self._mask = b""
        # The message being read: TEXT or BINARY, and a text message's UTF-8 decoder.
        self._message: int | None = None
        self._decoder: codecs.IncrementalDecoder | None = None

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            return
        if self._pos < len(self._buffer):
            self._buffer = self._buffer[self._pos :] + data
        else:
            self._buffer = data
        self._pos = 0

    def events(self) -> Iterator[Event]:
        try:
            while not self._closed:
                event = self._next()
                if event is None:
                    if self._pos == len(self._buffer):
                        self._buffer, self._pos = b"", 0  # an idle connection keeps nothing
                    return
                yield event
        except _Failed as exc:
            self._closed = True
            self._buffer, self._pos = b"", 0
            yield CloseConnection(code=exc.code, reason=str(exc))

    def _next(self) -> Event | None:
        if self._opcode is None and not self._header():
            return None
        opcode = self._opcode
        assert opcode is not None
        if opcode & 0x8:  # a control frame: whole, never fragmented, at most 125 bytes
            if len(self._buffer) - self._pos < self._rest:
                return None
            payload = self._take(self._rest)
            self._opcode = None
            if opcode == _OP_PING:
                return Ping(payload=payload)
            if opcode == _OP_PONG:
                return Pong(payload=payload)
            self._closed = True
            return _close_event(payload)
        # A data frame: what has come of its payload (an empty frame is a piece too).
        size = min(self._rest, len(self._buffer) - self._pos)
        if not size and self._rest:
            return None
        payload = self._take(size)
        self._rest -= size
        frame_finished = not self._rest
        self._opcode = None if frame_finished else _OP_CONTINUATION
        if self._message is None:
            if opcode == _OP_CONTINUATION:
                raise _Failed("unexpected CONTINUATION")
            self._message = opcode
        elif opcode != _OP_CONTINUATION:
            raise _Failed(f"expected CONTINUATION, got {Opcode(opcode)!r}")
        finished = frame_finished and self._fin
        if opcode == _OP_TEXT:
            # A fresh decoder; a whole message in one piece (the usual command) needs none.
            self._decoder = None if finished else _utf8()
        event: Event
        if opcode == _OP_TEXT or self._decoder is not None:
            try:
                if self._decoder is None:
                    text = payload.decode("utf-8")
                else:
                    text = self._decoder.decode(payload, finished)
            except UnicodeDecodeError as exc:
                raise _Failed(str(exc), _INVALID_DATA) from None
            event = TextMessage(data=text, frame_finished=frame_finished, message_finished=finished)
        else:
            event = BytesMessage(
                data=payload, frame_finished=frame_finished, message_finished=finished
            )
        if finished:
            self._message = self._decoder = None
        return event

    def _header(self) -> bool:
        # The checks, and the bytes each needs first, in wsproto's order (FrameDecoder).
        buf, pos = self._buffer, self._pos
        if len(buf) - pos < 2:
            return False
        first, second = buf[pos], buf[pos + 1]
        opcode = first & 0x0F
        fin = bool(first & _FIN)
        if opcode not in _OPCODES:
            raise _Failed(f"Invalid opcode {opcode:#x}")
        if opcode & 0x8 and not fin:
            raise _Failed("Invalid attempt to fragment control frame")
        size = second & 0x7F
        if opcode & 0x8 and size > 125:
            raise _Failed("Control frame with payload len > 125")
        start = pos + 2
        if size == 126:
            if len(buf) < start + 2:
                return False
            size, start = int.from_bytes(buf[start : start + 2], "big"), start + 2
            if size <= 125:
                raise _Failed("Payload length used 2 bytes when 1 would have sufficed")
        elif size == 127:
            if len(buf) < start + 8:
                return False
            size, start = int.from_bytes(buf[start : start + 8], "big"), start + 8
            if size <= 0xFFFF:
                raise _Failed("Payload length used 8 bytes when 2 would have sufficed")
            if size >> 63:
                raise _Failed("8-byte payload length with non-zero MSB")
        if first & 0x70:  # no extension is ever negotiated
            raise _Failed("Reserved bit set unexpectedly")
        if not second & 0x80:
            raise _Failed("server received unexpected unmasked frame")
        if len(buf) < start + 4:
            return False
        self._mask = buf[start : start + 4]
        self._pos = start + 4
        self._opcode, self._fin, self._rest = opcode, fin, size
        return True

    def _take(self, size: int) -> bytes:
        if not size:
            return b""
        pos = self._pos
        data = self._buffer[pos : pos + size]
        self._pos = pos + size
        mask = self._mask
        turn = size % 4
        if turn:
            self._mask = mask[turn:] + mask[:turn]
        return _unmask(data, mask)


def _close_event(payload: bytes) -> CloseConnection:
    # wsproto's FrameProtocol._process_close.
    if not payload:
        return CloseConnection(code=CloseReason.NO_STATUS_RCVD, reason="")
    if len(payload) == 1:
        raise _Failed("CLOSE with 1 byte payload")
    code: int = int.from_bytes(payload[:2], "big")
    if code < 1000 or code > 4999:
        raise _Failed("CLOSE with invalid code")
    try:
        code = CloseReason(code)
    except ValueError:
        if code <= 2999:
            raise _Failed("CLOSE with unknown reserved code") from None
    if code in LOCAL_ONLY_CLOSE_REASONS:
        raise _Failed("remote CLOSE with local-only reason")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Failed(f"Error decoding CLOSE reason: {exc}", _INVALID_DATA) from None
    return CloseConnection(code=code, reason=reason)
