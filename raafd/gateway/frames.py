"""Server-to-client WebSocket frames, encoded directly (RFC 6455 §5.2; no I/O).

Server frames are never masked, so a text frame is a two-to-ten byte header in front of the
payload. Encoding it here instead of through a general WebSocket library is what lets one core
push well over 100k small frames a second (docs/architecture.md). Client frames, which are
masked, fragmented and interleaved with control frames, are parsed by wsproto.
"""

from __future__ import annotations

import struct

__all__ = ["close_frame", "ping_frame", "pong_frame", "text_frame"]

_OP_TEXT = 0x1
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


def close_frame(code: int, reason: str = "") -> bytes:
    # Control frame payloads are at most 125 bytes: 2 for the code, the rest for the reason.
    data = reason.encode()[:123]
    return _frame(_OP_CLOSE, struct.pack("!H", code) + data)


def ping_frame(payload: bytes = b"") -> bytes:
    return _frame(_OP_PING, payload[:125])


def pong_frame(payload: bytes = b"") -> bytes:
    return _frame(_OP_PONG, payload[:125])
