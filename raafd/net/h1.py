"""HTTP/1.1 framing for raafd's own request paths: request heads in, response bytes out.

No I/O here (the h11 rule): these are functions of bytes. The listener uses
:func:`parse_request_head` to route a connection's first request; the raw streaming server
(:mod:`raafd.http.raw`) uses it in its strict form, where anything it does not fully understand
is ``None`` and the request goes to hypercorn, which answers it properly (400, 431, ...).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import parse_qsl

import attrs

__all__ = [
    "LAST_CHUNK",
    "RequestHead",
    "chunk",
    "parse_request_head",
    "response_head",
]

LAST_CHUNK = b"0\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form: no spaces, no controls, ASCII
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_SINGLE = frozenset({"host", "content-length", "transfer-encoding"})  # repeated: refused


@attrs.frozen
class RequestHead:
    """A request line and its headers (names lower-cased; repeated headers joined with
    ``", "``)."""

    method: str
    target: str
    headers: dict[str, str]
    version: str = "HTTP/1.1"

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        _, _, query = self.target.partition("?")
        return dict(parse_qsl(query)) if query else {}

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and "websocket" in self.headers.get("upgrade", "").lower()
            and "upgrade" in self.headers.get("connection", "").lower()
        )

    @property
    def keep_alive(self) -> bool:
        """Whether the client lets the connection serve another request after this one. An
        HTTP/1.0 client is answered once: a streaming body can only be close-delimited."""
        if self.version != "HTTP/1.1":
            return False
        return "close" not in self.connection_options

    @property
    def connection_options(self) -> list[str]:
        return [
            option.strip().lower()
            for option in self.headers.get("connection", "").split(",")
            if option.strip()
        ]


def parse_request_head(data: bytes, *, strict: bool = False) -> RequestHead | None:
    """Parse a request head ending in a blank line; ``None`` when it is not one we can route
    (hypercorn will then answer it, with a 400 if it is malformed).

    ``strict`` also refuses what h11 would refuse or what a small server should not guess at:
    a method or header name that is not a token, a target that is not an origin-form path,
    whitespace before a colon, folded lines, control characters in values, an HTTP version
    other than 1.0 and 1.1, a repeated ``host``, ``content-length`` or ``transfer-encoding``."""
    lines = data.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    method, target, version = parts
    if strict and (
        not _TOKEN.fullmatch(method)
        or not _TARGET.fullmatch(target)
        or version not in (b"HTTP/1.0", b"HTTP/1.1")
    ):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        if strict and (not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value)):
            return None
        key = name.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        if strict and key in headers and key in _SINGLE:
            return None
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return RequestHead(
        method.decode("latin-1"), target.decode("latin-1"), headers, version.decode("latin-1")
    )


def response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """A response's status line and headers, ``date`` included, ending in the blank line."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"date: {_http_date()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The ``date`` header's value, formatted once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (``data`` must not be empty: that would end
    the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
