"""A byte-exact HTTP/1.1 client for tests: requests are written as given, responses are parsed
strictly (a malformed chunk fails the test), and every chunk is kept as it came."""

from __future__ import annotations

import socket
from typing import Any

import attrs
import trio


@attrs.define
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = attrs.field(factory=list)  # a chunked body, chunk by chunk
    chunked: bool = False

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def request(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    """A request with ``host`` (on HTTP/1.1) and ``content-length`` (when there is a body)."""
    lines = [f"{method} {target} {version}"]
    if version == "HTTP/1.1":
        lines.append("host: raafd.test")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def start_sse(text: str = "x", accept: str = "text/event-stream", **kw: Any) -> bytes:
    body = b'{"input": "%s"}' % text.encode()
    headers = {"accept": accept, "content-type": "application/json", **kw.pop("headers", {})}
    return request("POST", "/v1/streams", body, headers=headers, **kw)


class RawClient:
    """One connection; ``read_*`` parse what the server sends, strictly."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, address: str, *, rcvbuf: int | None = None) -> RawClient:
        host, port = address.rsplit(":", 1)
        if rcvbuf is None:
            return cls(await trio.open_tcp_stream(host, int(port)))
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: window
        await sock.connect((host, int(port)))
        return cls(trio.SocketStream(sock))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        self.buf += data
        return bool(data)

    async def at_eof(self) -> bool:
        """True when the server closed the connection with nothing more sent."""
        if self.buf:
            return False
        return not await self._more()

    async def read_until(self, sep: bytes) -> bytes:
        while (end := self.buf.find(sep)) < 0:
            if not await self._more():
                raise EOFError(f"closed before {sep!r}; have {bytes(self.buf)!r}")
        data = bytes(self.buf[:end])
        del self.buf[: end + len(sep)]
        return data

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._more():
                raise EOFError(f"closed with {len(self.buf)} of {n} bytes")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_to_eof(self) -> bytes:
        while await self._more():
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def read_head(self) -> Answer:
        head = (await self.read_until(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), line
            assert name.lower() not in headers, f"repeated header {name}"
            headers[name.lower()] = value.strip()
        chunked = headers.get("transfer-encoding") == "chunked"
        return Answer(int(status), headers, chunked=chunked)

    async def read_chunk(self) -> bytes:
        """The next chunk of a chunked body; ``b""`` for the last one (and its CRLF)."""
        line = await self.read_until(b"\r\n")
        assert line and all(c in b"0123456789abcdef" for c in line), line
        size = int(line, 16)
        data = await self.read_exact(size)
        assert await self.read_exact(2) == b"\r\n"
        return data

    async def read_body(self, answer: Answer) -> Answer:
        if answer.status in (204, 304):
            return answer  # never a body (RFC 9112 6.3)
        if answer.chunked:
            while chunk := await self.read_chunk():
                answer.chunks.append(chunk)
            answer.body = b"".join(answer.chunks)
        elif "content-length" in answer.headers:
            answer.body = await self.read_exact(int(answer.headers["content-length"]))
        else:
            answer.body = await self.read_to_eof()
        return answer

    async def read_response(self) -> Answer:
        return await self.read_body(await self.read_head())

    async def exchange(self, data: bytes) -> Answer:
        await self.send(data)
        return await self.read_response()
