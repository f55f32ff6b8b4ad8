"""HTTP/1.1 as the upstream client speaks it, without I/O: the request head written, the
response head and the body read. Bytes in, bytes or values out (the h11 rule), so every piece
is tested byte by byte; :mod:`raafd.providers.upstream` does the I/O and the pool.

Why not h11: a streamed token is one chunk of a chunked body, and h11 spends about ten times
what :class:`ChunkedBody` does on one that arrives whole (the streaming case), as much again as
the rest of a token's path through raafd; a fresh h11 connection per request also costs about
ten times :func:`request_head` and :func:`parse_response_head`. h11 is the reference instead:
property tests (tests/test_upstream.py) feed both any response of the common grammar, cut
anywhere, and require the same head, payload, end and keep-alive verdict. Where this parser is
laxer (a bare LF in the chunked framing, blanks before a chunk extension) or stricter (control
characters in a header value), its own tests pin what it does.

A failure is an :class:`UpstreamTransportError`: ``protocol`` for what the upstream sent,
``config`` for a header that cannot be sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

__all__ = [
    "KINDS",
    "MAX_HEAD",
    "MAX_LINE",
    "MAX_TRAILERS",
    "BodyDecoder",
    "ChunkedBody",
    "CloseDelimitedBody",
    "ContentLengthBody",
    "Headers",
    "Kind",
    "ResponseHead",
    "UpstreamTransportError",
    "decoder_for",
    "keep_alive",
    "parse_response_head",
    "protocol_error",
    "request_head",
]

Kind = Literal["connect", "connect_timeout", "pool", "timeout", "config", "protocol", "disconnect"]
KINDS: tuple[Kind, ...] = (
    "connect",  # refused, unreachable, DNS, TLS handshake, a proxy that refused the tunnel
    "connect_timeout",  # connecting (DNS, TCP, tunnel, TLS) took longer than connect_timeout
    "pool",  # no free connection within connect_timeout (max_connections in use)
    "timeout",  # a read or a write waited longer than read_timeout
    "config",  # a bad URL, an unsupported scheme, a header that cannot be sent
    "protocol",  # a malformed response head or body framing
    "disconnect",  # the connection broke, or closed before the end the framing announced
)

MAX_HEAD = 64 << 10  # bytes of a response head (status line and headers)
MAX_LINE = 4096  # bytes of a chunk-size line or a trailer line
MAX_TRAILERS = 16 << 10  # bytes of all trailer lines of a chunked body


class UpstreamTransportError(Exception):
    """An exchange with an upstream failed; ``kind`` (one of :data:`KINDS`) says how."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"UpstreamTransportError({self.kind!r}, {self.message!r})"


def protocol_error(message: str) -> UpstreamTransportError:
    return UpstreamTransportError("protocol", message)


# --- the body (pure) --------------------------------------------------------------------------


class BodyDecoder:
    """Feed the bytes that follow a response head with :meth:`feed`; get the body's payload.

    How the bytes are cut never changes the payload: feeding a body whole or one byte at a time
    gives the same bytes in the same order. :attr:`done` is set once the framing says the body
    ended; :attr:`extra` then holds the bytes that came after it (a well-behaved server sends
    none). :meth:`eof` is called when the connection closes."""

    __slots__ = ("done", "extra")

    def __init__(self) -> None:
        self.done = False
        self.extra = b""

    def feed(self, data: bytes) -> bytes:
        """The payload carried by the next ``data`` (possibly ``b""``)."""
        raise NotImplementedError

    def eof(self) -> None:
        """The connection closed: a ``disconnect`` error unless the body was complete."""
        if not self.done:
            raise UpstreamTransportError(
                "disconnect", "the upstream closed the connection before the end of the body"
            )


class ContentLengthBody(BodyDecoder):
    """A body of ``Content-Length`` bytes."""

    __slots__ = ("_left",)

    def __init__(self, length: int) -> None:
        super().__init__()
        self._left = length
        self.done = length == 0

    def feed(self, data: bytes) -> bytes:
        left = self._left
        if self.done:
            self.extra += data
            return b""
        if len(data) < left:
            self._left = left - len(data)
            return data
        self._left = 0
        self.done = True
        if len(data) == left:
            return data
        self.extra = data[left:]
        return data[:left]


class CloseDelimitedBody(BodyDecoder):
    """A body without framing: everything until the server closes the connection."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;|\Z)")
_WHOLE_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedBody(BodyDecoder):
    """A ``Transfer-Encoding: chunked`` body: ``SIZE[;ext]CRLF DATA CRLF`` … ``0`` CRLF,
    trailer lines, a blank line. Lines may end in a bare LF; a size line or trailer line
    longer than :data:`MAX_LINE` bytes, trailers longer than :data:`MAX_TRAILERS` bytes, a size
    that is not hex, or chunk data not followed by its CRLF are ``protocol`` errors. Extensions
    and trailers are read and dropped."""

    __slots__ = ("_left", "_partial", "_state", "_trailers")

    def __init__(self) -> None:
        super().__init__()
        self._state = _SIZE
        self._left = 0  # bytes of the current chunk's data still due
        self._partial = b""  # an incomplete line (or CR) carried to the next feed
        self._trailers = 0

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.extra += data
            return b""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        end = len(data)
        state = self._state
        if state == _SIZE:
            # The streaming case: each read brings exactly one whole chunk ("SIZE CRLF DATA CRLF").
            match = _WHOLE_CHUNK.match(data)
            if match is not None:
                start = match.end()
                stop = start + int(match.group(1), 16)
                if stop + 2 == end and stop > start and data.endswith(b"\r\n"):
                    return data[start:stop]
        elif state == _DATA and end <= self._left:  # a large chunk's next piece
            self._left -= end
            if not self._left:
                self._state = _DATA_END
            return data
        out: list[bytes] = []
        pos = 0
        while pos < end:
            if state == _DATA:
                take = min(self._left, end - pos)
                out.append(data[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    state = _DATA_END
            elif state == _DATA_END:
                if data.startswith(b"\r\n", pos):
                    pos += 2
                elif data[pos] == 0x0A:  # a bare LF
                    pos += 1
                elif data[pos] == 0x0D and pos + 1 == end:  # CR now, LF in the next feed
                    self._partial = b"\r"
                    break
                else:
                    raise protocol_error("a chunk's data is not followed by CRLF")
                state = _SIZE
            else:  # a size line or a trailer line
                if state == _SIZE:  # a whole chunk here: take it without walking its states
                    match = _WHOLE_CHUNK.match(data, pos)
                    if match is not None:
                        start = match.end()
                        stop = start + int(match.group(1), 16)
                        if stop > start and data.startswith(b"\r\n", stop):
                            out.append(data[start:stop])
                            pos = stop + 2
                            continue
                eol = data.find(b"\n", pos)
                if eol < 0:
                    if end - pos > MAX_LINE:
                        raise protocol_error(f"a chunked-body line is longer than {MAX_LINE} bytes")
                    self._partial = data[pos:]
                    break
                line = data[pos:eol]
                pos = eol + 1
                if len(line) > MAX_LINE:
                    raise protocol_error(f"a chunked-body line is longer than {MAX_LINE} bytes")
                if line.endswith(b"\r"):
                    line = line[:-1]
                if state == _SIZE:
                    match = _SIZE_LINE.match(line)
                    if match is None:
                        raise protocol_error(f"bad chunk size line {line[:32]!r}")
                    self._left = int(match.group(1), 16)
                    state = _DATA if self._left else _TRAILER
                elif line:
                    self._trailers += len(line)
                    if self._trailers > MAX_TRAILERS:
                        raise protocol_error(
                            f"chunked-body trailers longer than {MAX_TRAILERS} bytes"
                        )
                else:
                    state = _DONE
                    self.done = True
                    self.extra = data[pos:]
                    break
        self._state = state
        if len(out) == 1:
            return out[0]
        return b"".join(out)


# --- the response head (pure) -----------------------------------------------------------------

_HEAD_END = re.compile(rb"\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CONTINUATION = re.compile(rb"[ \t]+([\t\x20-\x7e\x80-\xff]*?)[ \t]*")


class ResponseHead:
    """A response's status line and headers: ``headers`` are ``(name, value)`` byte pairs in
    order, names lower-cased; ``http_version`` is ``b"1.1"`` or the like."""

    __slots__ = ("headers", "http_version", "reason", "status_code")

    def __init__(
        self,
        http_version: bytes,
        status_code: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.http_version = http_version
        self.status_code = status_code
        self.reason = reason
        self.headers = headers


def parse_response_head(data: bytes | bytearray) -> tuple[ResponseHead, int] | None:
    """The final response head at the start of ``data`` and the offset of the bytes after it;
    ``None`` while ``data`` holds no complete head yet. Interim ``1xx`` heads before it are
    skipped. Lines may end in a bare LF, and a folded header line (RFC 9112 §5.2) continues
    the previous value. A head longer than :data:`MAX_HEAD`, a malformed status or header
    line, a ``101``, a ``transfer-encoding`` other than ``chunked``, and a bad or
    contradictory ``content-length`` are ``protocol`` errors."""
    pos = 0
    while True:
        end = _HEAD_END.search(data, pos)
        if end is None:
            if len(data) - pos > MAX_HEAD:
                raise protocol_error(f"the response head is longer than {MAX_HEAD} bytes")
            return None
        if end.start() - pos > MAX_HEAD:
            raise protocol_error(f"the response head is longer than {MAX_HEAD} bytes")
        head = _parse_head_lines(bytes(data[pos : end.start()]).split(b"\n"))
        pos = end.end()
        if head.status_code >= 200:
            return head, pos
        if head.status_code == 101:
            raise protocol_error("the upstream switched protocols (101) on a plain request")
        # 1xx (100 Continue, 103 Early Hints, ...): the answer follows.


def _parse_head_lines(lines: list[bytes]) -> ResponseHead:
    status = _STATUS_LINE.fullmatch(lines[0].removesuffix(b"\r"))
    if status is None:
        raise protocol_error(f"malformed status line {lines[0][:64]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for raw in lines[1:]:
        line = raw.removesuffix(b"\r")
        match = _HEADER_LINE.fullmatch(line)
        if match is not None:
            headers.append((match.group(1).lower(), match.group(2)))
            continue
        folded = _CONTINUATION.fullmatch(line)
        if folded is None or not headers:
            raise protocol_error(f"malformed header line {line[:64]!r}")
        name, value = headers[-1]
        headers[-1] = (name, value + b" " + folded.group(1) if value else folded.group(1))
    _check_framing(headers)
    return ResponseHead(status.group(1), int(status.group(2)), status.group(3) or b"", headers)


def _check_framing(headers: list[tuple[bytes, bytes]]) -> None:
    length: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            for item in value.split(b","):
                item = item.strip()
                if not item.isdigit() or len(item) > 18 or (length is not None and item != length):
                    raise protocol_error(f"bad content-length {value[:32]!r}")
                length = item
        elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            raise protocol_error(f"unsupported transfer-encoding {value[:32]!r} (chunked only)")


class Headers(Mapping[str, str]):
    """Response headers: lower-cased names, a repeated header's values joined by ``", "``;
    lookups ignore case."""

    __slots__ = ("_items",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        items: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            items[key] = f"{items[key]}, {text}" if key in items else text
        self._items = items

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


# --- the framing of a response (pure) -------------------------------------------------------------


def keep_alive(head: ResponseHead) -> bool:
    """Whether the connection outlives this response: HTTP/1.1 (or a later 1.x, read as 1.1,
    RFC 9112 §2.3) without ``connection: close``."""
    if head.http_version == b"1.0":
        return False
    for name, value in head.headers:
        if name == b"connection" and b"close" in (t.strip() for t in value.lower().split(b",")):
            return False
    return True


def decoder_for(head: ResponseHead) -> BodyDecoder:
    status = head.status_code
    if status in (204, 304):
        return ContentLengthBody(0)
    length = None
    for name, value in head.headers:
        if name == b"transfer-encoding":
            return ChunkedBody()  # parse_response_head refused every other coding
        if name == b"content-length":
            length = int(value.split(b",", 1)[0])  # parse_response_head validated it
    return CloseDelimitedBody() if length is None else ContentLengthBody(length)


# --- the request head (pure) ----------------------------------------------------------------------

_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_REQUEST_TARGET = re.compile(r"[\x21-\x7e]+")
_BLANKS = " \t"


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """``METHOD target HTTP/1.1`` and the header lines, without the blank line that ends a
    head. A header name that is not a token or a value with a control character (a newline at
    the end of an API key read from a file, say) is a ``config`` error that names the header,
    not its value (it may be a key); values lose surrounding blanks. Only ASCII is sent."""
    if not _REQUEST_TARGET.fullmatch(target):
        raise UpstreamTransportError("config", "the request target is not plain ASCII")
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name):
            raise UpstreamTransportError("config", f"bad request header name {name[:64]!r}")
        if not _FIELD_VALUE.fullmatch(value):
            raise UpstreamTransportError(
                "config", f"the request header {name!r} has a character HTTP does not allow in it"
            )
        lines.append(f"{name}: {value.strip(_BLANKS)}")
    lines.append("")
    return "\r\n".join(lines).encode("ascii")
