"""The public listener: one port for HTTP, SSE, NDJSON and WebSocket.

raafd owns the accept loop and reads the head of each connection's first request itself.
A WebSocket upgrade for ``/v1/ws`` goes to the gateway, which frames pre-encoded events straight
onto the socket (see docs/architecture.md for why). A streaming HTTP request (SSE or NDJSON of
``/v1/streams``) goes to the raw HTTP server (:mod:`raafd.http.raw`), which does the same for
HTTP and serves the connection's requests until one it does not serve arrives; then it hands the
connection back. Everything else is handed, bytes already read included, to hypercorn's
per-connection HTTP/1.1 server running the ASGI app, for the rest of the connection's life. So
one nursery owns every connection of any kind, the connection limit and draining apply to all,
and the streaming hot paths pay no ASGI cost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket as stdsocket
import stat
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HyperConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext

from raafd.config import ServerConfig
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.net.h1 import RequestHead, parse_request_head

__all__ = [
    "HttpHandler",
    "PrefixedStream",
    "PublicListener",
    "RequestHead",
    "parse_request_head",
]

log = get_logger("raafd.listener")


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return bytes already read from it, for hypercorn.

    Its sends take turns: hypercorn's close (``send_eof``, from one task) could otherwise meet
    an error response being written (``send_all``, from another, under hypercorn's own send
    lock, which its close does not take), and trio refuses two senders at once with
    ``BusyResourceError``, which failed the connection's handler (the fuzzer found it after
    malformed requests). A ``send_all`` now waits out a ``send_eof`` in progress (and then meets
    the closed stream, which hypercorn handles); a ``send_eof`` while a ``send_all`` is under
    way raises ``BusyResourceError`` at once, as before, which hypercorn's close takes as "the
    peer is gone" before closing the socket."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self.inner = inner
        self.socket = inner.socket
        self._prefix = prefix
        self._sending = trio.Lock()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        async with self._sending:
            await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self._sending.locked():
            raise trio.BusyResourceError("another task is sending on this stream")
        async with self._sending:
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


# The connection's socket stream, the bytes already read from it (the request head, perhaps
# more), and the parsed head.
WebSocketHandler = Callable[[trio.SocketStream, bytes, RequestHead], Awaitable[None]]


class HttpHandler(Protocol):
    """An HTTP server of raafd's own that takes the connections whose first request it
    serves (:class:`raafd.http.raw.RawHttpServer`)."""

    def serves(self, head: RequestHead) -> bool:
        """Whether a connection beginning with this request is for this server."""
        ...

    async def serve(
        self, stream: trio.SocketStream, prefix: bytes
    ) -> tuple[trio.SocketStream, bytes] | None:
        """Serve the connection (``prefix``: the bytes already read from it). Returns
        ``None`` once it is closed, or the socket and the bytes read but not served, for
        hypercorn to serve the rest of the connection."""
        ...

    def close_idle(self) -> None:
        """Draining: close idle keep-alive connections now, and each other one once its
        response ends."""
        ...


def _simple_response(status: int, reason: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    ).encode() + body


_UNAVAILABLE = _simple_response(
    503,
    "Service Unavailable",
    b'{"error":{"code":"unavailable","message":"too many connections; retry shortly"}}',
    "retry-after: 1\r\n",
)
_RATE_LIMITED = _simple_response(
    429,
    "Too Many Requests",
    b'{"error":{"code":"rate_limited","message":"too many new connections from this address"}}',
    "retry-after: 1\r\n",
)
_TIMEOUT = _simple_response(
    408,
    "Request Timeout",
    b'{"error":{"code":"timeout","message":"the request head did not arrive in time"}}',
)
_HEAD_TOO_LARGE = _simple_response(
    431,
    "Request Header Fields Too Large",
    b'{"error":{"code":"too_large","message":"the request head is over the limit"}}',
)
_NO_HTTP2 = _simple_response(
    505,
    "HTTP Version Not Supported",
    b'{"error":{"code":"bad_request","message":"HTTP/2 is not served here: use HTTP/1.1"}}',
)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _refusal(
    buf: bytearray, head_end: int, limit: int, *, timed_out: bool
) -> tuple[str, bytes] | None:
    """What a connection's first bytes earn before any routing, as (metric reason, answer):
    an HTTP/2 prior-knowledge preface (505: raafd serves HTTP/1.1 only, and an h2 connection
    would otherwise be held by the HTTP/2 server with no deadline), a head over
    ``max_header_bytes`` however it arrived (431), a head not complete by ``header_timeout``
    (408); None to route it (no bytes at all: closed quietly)."""
    if len(buf) >= 3 and buf.startswith(_H2_PREFACE[: min(len(buf), len(_H2_PREFACE))]):
        return "http2", _NO_HTTP2
    if head_end + 4 > limit or (head_end < 0 and len(buf) > limit):
        return "head_too_large", _HEAD_TOO_LARGE
    if head_end < 0 and buf and timed_out:
        return "head_timeout", _TIMEOUT
    return None


_DRAINING = _simple_response(
    503,
    "Service Unavailable",
    b'{"error":{"code":"unavailable","message":"the server is draining; reconnect elsewhere"}}',
    "retry-after: 1\r\n",
)


class PublicListener:
    """Accepts connections and routes each to the WebSocket gateway or the HTTP app."""

    def __init__(
        self,
        config: ServerConfig,
        asgi_app: Callable[..., Awaitable[None]],
        metrics: Metrics,
        websocket_handler: WebSocketHandler | None = None,
        *,
        http_handler: HttpHandler | None = None,
        admit: Callable[[str], float] | None = None,
        websocket_paths: frozenset[str] = frozenset({"/v1/ws"}),
    ) -> None:
        self.config = config
        # The paths whose upgrades go to the gateway: /v1/ws, and websocket.echo_path if set.
        self.websocket_paths = websocket_paths
        self.metrics = metrics
        # A new connection's client address -> 0.0 to serve it, else seconds until it may
        # come back (the per-IP connection rate limit; refused with 429 before any parsing).
        self.admit = admit
        self.websocket_handler = websocket_handler
        self.http_handler = http_handler
        self.open_connections = 0
        self.draining = False
        self._accept_scope = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()
        self._hyper = HyperConfig()
        self._hyper.keep_alive_timeout = config.keep_alive_timeout
        self._hyper.h11_max_incomplete_size = config.max_header_bytes
        self._hyper.include_server_header = False
        self._hyper.errorlog = None
        self._hyper.accesslog = None
        self._context = WorkerContext(None)
        self._app = ASGIWrapper(asgi_app)
        self._state: dict[str, Any] = {}

    async def _open_listeners(self) -> list[trio.SocketListener]:
        if self.config.unix_socket:
            path = self.config.unix_socket
            sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
            if stat.S_ISSOCK(_lstat_mode(path)):
                os.unlink(path)  # stale from a previous run; the admin socket guards liveness
            await sock.bind(path)
            sock.listen(self.config.backlog)
            return [trio.SocketListener(sock)]
        return await trio.open_tcp_listeners(
            self.config.port, host=self.config.host, backlog=self.config.backlog
        )

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen; ``task_status.started`` hands back ``host:port`` (or the unix path)."""
        try:
            listeners = await self._open_listeners()
        except OSError as exc:
            where = self.config.unix_socket or f"{self.config.host}:{self.config.port}"
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"{where} is already in use by another process") from None
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
        address = self._describe(listeners[0])
        log.info("listening", address=address)
        async with trio.open_nursery() as connections:
            task_status.started(address)
            with self._accept_scope:
                await trio.serve_listeners(self._handle, listeners, handler_nursery=connections)
            # Accepting has stopped (drain); connections finish in their own time, or are
            # cancelled by the daemon when the grace runs out.
        if self.config.unix_socket:
            with contextlib.suppress(OSError):
                os.unlink(self.config.unix_socket)

    @staticmethod
    def _describe(listener: trio.SocketListener) -> str:
        name = listener.socket.getsockname()
        if isinstance(name, tuple):
            host, port = name[0], name[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(name)

    async def stop_accepting(self) -> None:
        """Close the listening sockets and ask idle keep-alive connections to close."""
        self._accept_scope.cancel()
        if self.http_handler is not None:
            self.http_handler.close_idle()
        await self._context.terminated.set()

    async def wait_idle(self) -> None:
        """Return once no connection is open."""
        await self._idle.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self.admit is not None and self.admit(_address(stream)):
            self.metrics.connections_refused.labels("rate_limited").inc()
            with trio.move_on_after(1):
                await _send_and_close(stream, _RATE_LIMITED)
            return
        if self.open_connections >= self.config.max_connections:
            self.metrics.connections_refused.labels("max_connections").inc()
            with trio.move_on_after(1):
                await _send_and_close(stream, _UNAVAILABLE)
            return
        self.open_connections += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            await self._route(stream)
        except Exception:
            # Contain a failure to its own connection; the accept loop and the others go on.
            log.exception("connection handler failed")
        finally:
            self.open_connections -= 1
            if self.open_connections == 0:
                self._idle.set()

    async def _route(self, stream: trio.SocketStream) -> None:
        if stream.socket.family != stdsocket.AF_UNIX:
            with contextlib.suppress(OSError):
                stream.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, True)
        buf = bytearray()
        limit = self.config.max_header_bytes
        with trio.move_on_after(self.config.header_timeout) as deadline:
            while b"\r\n\r\n" not in buf and len(buf) <= limit:
                if buf.startswith(_H2_PREFACE[: len(buf)]) and len(buf) >= 3:
                    break  # HTTP/2 with prior knowledge: refused below, not waited for
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
        head_end = buf.find(b"\r\n\r\n")
        refusal = _refusal(buf, head_end, limit, timed_out=deadline.cancelled_caught)
        if refusal is not None:
            reason, answer = refusal
            self.metrics.connections_refused.labels(reason).inc()
            with trio.move_on_after(1):
                await _send_and_close(stream, answer)
            return
        head = parse_request_head(bytes(buf[: head_end + 4])) if head_end >= 0 else None
        websocket = (
            head is not None and head.is_websocket_upgrade and head.path in self.websocket_paths
        )
        if head is not None and websocket and self.websocket_handler is not None:
            if self.draining:
                self.metrics.connections_refused.labels("draining").inc()
                with trio.move_on_after(1):
                    await _send_and_close(stream, _DRAINING)
                return
            serving = self.websocket_handler(stream, bytes(buf), head)
            del buf, head  # not kept in this frame for the connection's life (idle memory)
            await serving
            return
        if not buf:
            with contextlib.suppress(OSError), trio.move_on_after(1):
                await stream.aclose()
            return
        self.metrics.connections_total.labels("http").inc()
        self.metrics.connections.labels("http").inc()
        try:
            prefix = bytes(buf)
            raw = self.http_handler
            if head is not None and raw is not None and raw.serves(head):
                handed = await raw.serve(stream, prefix)
                if handed is None:
                    return
                stream, prefix = handed
            # hypercorn types the stream as SSLStream; it duck-types any Stream.
            stream_arg: Any = PrefixedStream(stream, prefix)
            server = TCPServer(self._app, self._hyper, self._context, self._state, stream_arg)
            try:
                await server
            finally:
                # hypercorn's connection objects refer to each other (the server holds its
                # protocol, which holds the server's send method): about 30 objects per
                # connection that only a collection of an old generation would free, and the
                # daemon runs those rarely (server.gc_thresholds). Drop the finished server's
                # references, so reference counting frees the connection at once.
                getattr(server, "__dict__", {}).clear()
        finally:
            # hypercorn closes the socket itself, except when cancelled in its own close (its
            # send_eof is a checkpoint); never leave that to the garbage collector.
            stream.socket.close()
            self.metrics.connections.labels("http").dec()


async def _send_and_close(stream: trio.SocketStream, data: bytes) -> None:
    """Answer and close without a reset: half-close, then drain what the client already sent
    (closing with unread input makes the kernel send RST, which can destroy the answer)."""
    try:
        await stream.send_all(data)
        await stream.send_eof()
        with trio.move_on_after(0.5):
            drained = 0
            while drained < 65536 and (chunk := await stream.receive_some(16384)):
                drained += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


def _lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def _address(stream: trio.SocketStream) -> str:
    """The client's IP address ("" on a unix socket)."""
    try:
        name = stream.socket.getpeername()
    except OSError:
        return ""
    return str(name[0]) if isinstance(name, tuple) else ""
