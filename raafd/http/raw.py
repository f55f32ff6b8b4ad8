"""raafd's own HTTP/1.1 server for streaming responses: SSE and NDJSON straight to the socket.

Through hypercorn, every streamed event wakes a pump task and climbs h11 and the ASGI send path
(about 200 µs a token at 100 streams, against 60-150 µs over WebSocket; docs/architecture.md
has the figures). This server serves the streaming requests itself, ``POST /v1/streams`` asking
for SSE or NDJSON, ``GET /v1/streams/{id}/events``, ``stream: true`` chat completions and the
Vercel AI SDK's ``POST /v1/ui/chat``, and delivers them the way the WebSocket
gateway does: a live event is written as one chunk straight to the socket by the stream's own
task. Any other request, and anything unusual about one (a chunked body, ``Expect``, an
upgrade, a head it does not fully understand), is left whole in the buffer and handed, with the
socket, back to the listener, which gives the connection to hypercorn for the rest of its life.
So this server stays small, and hypercorn remains the HTTP server for everything else.

Rules of this file:

- One connection, one nursery: the writer task of the connection's
  :class:`~raafd.net.sockio.Output`, the request loop, and a reader that appends what the
  client sends to the connection's buffer (pipelined requests included, up to one request's
  worth) and ends a streaming response the moment the client closes or resets the connection.
  The request loop waits on the reader, never on the socket, so a response needs no task of its
  own to watch the client.
- Everything the connection sends goes through its ``Output``, in order: a live event is pushed
  by the stream's task as one chunk (``Output.write_nowait``), or refused when the queue is full
  and then pulled by the delivery loop, which also sends replay, batches (several events of a
  batch share a chunk) and heartbeats.
- Errors before the response head are answered as the ASGI path answers them
  (:func:`~raafd.http.asgi.error_response`); after it, the connection is closed and the client
  resumes from its last seq. A bug costs its own connection only: logged, closed.
- Every wait is bounded: the keep-alive idle time (``server.keep_alive_timeout``, cut short by a
  drain), a request's head and body (``server.header_timeout``), a socket that takes nothing
  (``http.send_timeout``); a response lasts as long as its stream, which has its own bounds.
- The body is chunked on HTTP/1.1 and ends with the last chunk right behind the terminal event
  (usually in the same write), so the connection serves the next request; HTTP/1.0 or
  ``connection: close`` get a close-delimited body and the connection closes after it.
"""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING

import attrs
import orjson
import structlog
import trio

from raafd.auth import Principal, check_http
from raafd.errors import RaafdError, RequestTimeout, TooLarge, Unauthorized
from raafd.http.asgi import Response, error_response, next_request_id
from raafd.http.context import StreamingContext
from raafd.http.cors import Headers, cors
from raafd.http.openai_compat import ChunkFraming, Completion, start_completion
from raafd.http.streams import (
    FRAMINGS,
    SSE,
    Framing,
    framing_for,
    replay_after,
    snapshot_param,
    start_stream,
)
from raafd.http.ui_chat import UI_HEADERS, failure_chunk, start_ui_chat
from raafd.logging import get_logger
from raafd.net.delivery import Framing as DeliveryFraming
from raafd.net.h1 import LAST_CHUNK, RequestHead, chunk, parse_request_head, response_head
from raafd.net.sockio import Output, RawSocket
from raafd.protocol.events import StreamEvent
from raafd.protocol.ui_stream import UIStreamFraming

if TYPE_CHECKING:
    from raafd.streams import Stream, Subscription

__all__ = ["RawHttpServer", "StreamRequest", "route"]

log = get_logger("raafd.http")

_EVENTS_PATH = re.compile(r"/v1/streams/([^/]+)/events")
_LINGER_SECONDS = 0.5  # after a last response: how long unread input is drained before close
_LINGER_BYTES = 65536

Handover = tuple[trio.SocketStream, bytes]


@attrs.frozen
class StreamRequest:
    """A request this server serves: start a stream and follow it (``stream_id`` None), or
    follow the stream ``stream_id``; or, with ``openai``, a ``POST /v1/chat/completions``
    (served here only when its body asks for ``stream: true``); or, with ``ui``, a
    ``POST /v1/ui/chat`` (the Vercel AI SDK's chat, always streamed)."""

    framing: Framing
    stream_id: str | None
    body_length: int
    openai: bool = False
    ui: bool = False


def route(head: RequestHead) -> StreamRequest | None:
    """The streaming request ``head`` asks for, or ``None`` when hypercorn should serve it."""
    headers = head.headers
    if head.version == "HTTP/1.1" and "host" not in headers:
        return None  # h11 answers it with a 400
    if "transfer-encoding" in headers or "expect" in headers or "upgrade" in headers:
        return None
    if any(option not in ("keep-alive", "close") for option in head.connection_options):
        return None
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):
        return None
    path = head.path
    if "%" in path:
        return None  # ids never need escapes; leave decoding to hypercorn
    accept = headers.get("accept", "")
    if head.method == "POST" and path == "/v1/streams":
        framing = framing_for(accept, None)
        if framing is None:
            return None  # the plain JSON answer (201)
        return StreamRequest(FRAMINGS[framing], None, int(length))
    if head.method == "POST" and path == "/v1/chat/completions":
        return StreamRequest(FRAMINGS[SSE], None, int(length), openai=True)
    if head.method == "POST" and path == "/v1/ui/chat":
        return StreamRequest(FRAMINGS[SSE], None, int(length), ui=True)
    if head.method == "GET" and int(length) == 0:
        match = _EVENTS_PATH.fullmatch(path)
        if match is not None:
            return StreamRequest(FRAMINGS[framing_for(accept, SSE) or SSE], match[1], 0)
    return None


class _Chunked:
    """A framing's bytes as chunks of a chunked body; the terminal event's chunk and the
    body's last chunk leave together."""

    __slots__ = ("_inner", "heartbeat", "transport")

    def __init__(self, inner: DeliveryFraming) -> None:
        self._inner = inner
        self.transport = inner.transport
        self.heartbeat = chunk(inner.heartbeat)

    def event(self, event: StreamEvent) -> bytes:
        data = self._inner.event(event)
        end = LAST_CHUNK if event.terminal else b""
        # An empty chunk would end the body: a framing that has nothing for an event (the
        # OpenAI chunks skip `start`) sends nothing.
        return b"%x\r\n%s\r\n%s" % (len(data), data, end) if data else end

    def batch(self, events: list[StreamEvent]) -> bytes:
        data = self._inner.batch(events)
        end = LAST_CHUNK if events[-1].terminal else b""
        return chunk(data) + end if data else end


class RawHttpServer:
    """Serves the streaming requests of the connections the listener gives it (see the module
    docstring); implements :class:`raafd.net.listener.HttpHandler`."""

    def __init__(self, ctx: StreamingContext) -> None:
        self.ctx = ctx
        self.closing = False
        # The keep-alive waits of idle connections, cancelled by a drain. At most one per open
        # connection, so bounded by server.max_connections.
        self.idle: set[trio.CancelScope] = set()

    def serves(self, head: RequestHead) -> bool:
        return route(head) is not None

    async def serve(self, stream: trio.SocketStream, prefix: bytes) -> Handover | None:
        return await _Connection(self, stream, prefix).run()

    def close_idle(self) -> None:
        self.closing = True
        for scope in self.idle:
            scope.cancel()


class _Connection:
    def __init__(self, server: RawHttpServer, stream: trio.SocketStream, prefix: bytes) -> None:
        self.server = server
        self.ctx = server.ctx
        self.sock = RawSocket(stream)
        self.buf = bytearray(prefix)  # read, not yet served: the next request's bytes
        self.out = Output(self.sock, self.ctx.config().http.send_queue)
        self.eof = False  # the client closed (or reset) its side
        self.broken = False  # a send failed
        self.linger = False  # a last response went out: half-close and drain before closing
        self._writer_done = trio.Event()
        self._reading = trio.CancelScope()  # the reader's; cancelled once requests are over
        self._arrived = trio.lowlevel.ParkingLot()  # the request loop waits here for bytes
        self._taken = trio.lowlevel.ParkingLot()  # the reader waits here while the buffer is full
        self._response: trio.CancelScope | None = None  # a streaming response, while it runs
        self._cors: Headers = ()  # the CORS headers of the request being answered

    async def run(self) -> Handover | None:
        hand_over = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, nursery.cancel_scope)
                    nursery.start_soon(self._reader)
                    try:
                        hand_over = await self._serve_requests()
                    finally:
                        self._reading.cancel()  # what it read is in the buffer (handed over)
                        self.out.close()
                    # What is queued goes out before the socket is closed or handed over.
                    with trio.move_on_after(self.ctx.config().http.send_timeout):
                        await self._writer_done.wait()
                    if not self._writer_done.is_set():
                        hand_over = self.linger = False
                        nursery.cancel_scope.cancel()
            except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                hand_over = self.linger = False
            except* Exception as group:
                # A bug costs this connection only, never the listener or other clients.
                log.error("HTTP connection failed", exc_info=group)
                hand_over = self.linger = False
            if hand_over and not self.broken:
                return self.sock.release(), bytes(self.buf)
            if self.linger and not self.eof and not self.broken:
                await self._linger()
            return None
        finally:
            self.sock.close()  # no-op once released

    async def _reader(self) -> None:
        """Append what the client sends to the buffer, up to one request's worth beyond what
        the request loop has taken; at the client's end, end a streaming response at once."""
        cfg = self.ctx.config()
        limit = cfg.server.max_header_bytes + cfg.http.max_body_bytes
        with self._reading:
            while True:
                while len(self.buf) > limit:
                    await self._taken.park()
                try:
                    data = await self.sock.receive_some()
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.eof = True
                    if self._response is not None:
                        self._response.cancel()
                    self._arrived.unpark_all()
                    return
                self.buf += data
                if self._arrived:  # the request loop waits (unpark_all on none costs ~2 µs)
                    self._arrived.unpark_all()

    async def _writer(self, connection: trio.CancelScope) -> None:
        try:
            await self.out.run_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            connection.cancel()
        finally:
            self._writer_done.set()

    # --- requests -----------------------------------------------------------------------------

    async def _serve_requests(self) -> bool:
        """Serve requests until the connection should close (False) or the next request is
        hypercorn's (True; it is at the start of the buffer)."""
        while True:
            if not self.buf and not await self._wait_for_request():
                return False
            deadline = trio.current_time() + self.ctx.config().server.header_timeout
            head_end = await self._read_head(deadline)
            if head_end is None:
                return False
            head = parse_request_head(bytes(self.buf[:head_end]), strict=True) if head_end else None
            request = route(head) if head is not None else None
            if head is None or request is None:
                return True
            if request.openai:
                try:
                    streaming = await self._asks_to_stream(head_end, request.body_length, deadline)
                except RequestTimeout as err:
                    self.ctx.metrics.errors.labels(err.code).inc()
                    await self._answer(head.method, error_response(err), False)
                    return False
                if streaming is None:
                    return False
                if not streaming:
                    return True  # a whole answer (or an error): hypercorn's
            if not await self._serve(head, head_end, request, deadline):
                return False
            if self.server.closing:
                self.linger = True
                return False

    async def _wait_for_request(self) -> bool:
        """Keep-alive: the next request's first bytes, within ``keep_alive_timeout``; False
        at its end, when the client closes, or when a drain closes idle connections."""
        server = self.server
        if server.closing:
            return False
        scope = trio.CancelScope(
            deadline=trio.current_time() + self.ctx.config().server.keep_alive_timeout
        )
        server.idle.add(scope)
        try:
            with scope:
                return await self._receive()
            return False
        finally:
            server.idle.discard(scope)

    async def _read_head(self, deadline: float) -> int | None:
        """The length of the request head at the start of the buffer, blank line included;
        0 when it is over ``max_header_bytes`` (hypercorn answers that); None when the client
        left or did not finish it by ``deadline``."""
        limit = self.ctx.config().server.max_header_bytes
        end = self.buf.find(b"\r\n\r\n")
        if 0 <= end <= limit:
            return end + 4  # the usual case, the whole head in one read: no deadline needed
        searched = 0
        with trio.move_on_at(deadline):
            while True:
                end = self.buf.find(b"\r\n\r\n", max(0, searched - 3))
                if end >= 0:
                    return end + 4 if end <= limit else 0
                if len(self.buf) > limit:
                    return 0
                searched = len(self.buf)
                if not await self._receive():
                    return None
        return None

    async def _asks_to_stream(self, head_end: int, length: int, deadline: float) -> bool | None:
        """Whether the body after the head is JSON with ``"stream": true``, read without taking
        it (so hypercorn can serve the request whole when not); None when the client left;
        ``RequestTimeout`` when it did not send it by ``deadline``."""
        if length > self.ctx.config().http.max_body_bytes:
            return False  # hypercorn answers 413
        end = head_end + length
        if len(self.buf) < end:
            with trio.move_on_at(deadline):
                while len(self.buf) < end:
                    if not await self._receive():
                        return None
            if len(self.buf) < end:
                raise RequestTimeout("the request body did not arrive in time")
        try:
            body = orjson.loads(bytes(self.buf[head_end:end]))
        except orjson.JSONDecodeError:
            return False
        return isinstance(body, dict) and body.get("stream") is True

    async def _read_body(self, length: int, deadline: float) -> bytes | None:
        if len(self.buf) < length:  # not all of it came with the head (the rare case)
            with trio.move_on_at(deadline):
                while len(self.buf) < length:
                    if not await self._receive():
                        return None
            if len(self.buf) < length:  # past the deadline: answered 408, then closed
                raise RequestTimeout("the request body did not arrive in time")
        body = bytes(self.buf[:length])
        self._take(length)
        return body

    async def _receive(self) -> bool:
        """Wait until the reader added to the buffer; False at the client's end (or a reset)."""
        if not self.eof:
            await self._arrived.park()
        return not self.eof

    def _take(self, length: int) -> None:
        """Drop the first ``length`` bytes of the buffer (served); the reader may read on."""
        del self.buf[:length]
        if self._taken:
            self._taken.unpark_all()

    async def _serve(
        self, head: RequestHead, head_end: int, request: StreamRequest, deadline: float
    ) -> bool:
        """Answer one request; True when the connection may serve another."""
        ctx = self.ctx
        cfg = ctx.config()
        request_id = next_request_id()
        structlog.contextvars.bind_contextvars(req=request_id)
        self._take(head_end)
        origin = head.headers.get("origin")  # none from non-browser clients: nothing to decide
        self._cors = (
            cors(origin, head.method, head.headers, cfg.http.cors_origins).headers
            if origin is not None
            else ()
        )
        keep = head.keep_alive
        query = head.query
        subscription: Subscription | None = None
        try:
            try:
                if request.body_length > cfg.http.max_body_bytes:
                    keep = False  # the body stays unread: the connection is unusable after
                    self._authorize(head, query)
                    raise TooLarge(
                        f"request body is over the limit of {cfg.http.max_body_bytes} bytes"
                    )
                body = await self._read_body(request.body_length, deadline)
                if body is None:
                    return False
                principal = self._authorize(head, query)
                if request.openai:
                    started = start_completion(ctx, body, request_id, principal)
                    if isinstance(started, Response):
                        return await self._answer(head.method, started, keep)
                    return await self._complete(head.method, started, keep)
                if request.ui:
                    stream, cancel = start_ui_chat(
                        ctx, body, request_id, principal, head.headers, query
                    )
                    return await self._ui_chat(head.method, stream, cancel, keep)
                if request.stream_id is None:
                    stream_id = start_stream(ctx, body, request_id, principal).id
                    after = 0
                    snapshot = False
                else:
                    stream_id = request.stream_id
                    after = replay_after(head.headers, query)
                    snapshot = snapshot_param(query)
                # Registered before the head goes out: not_found, gone and a bad `after`
                # are answered with their status, as on the ASGI path.
                subscription = ctx.streams.subscribe(stream_id, after, snapshot=snapshot)
                subscription.open()
            except RaafdError as err:
                ctx.metrics.errors.labels(err.code).inc()
                return await self._answer(head.method, error_response(err), keep)
            except Exception:
                log.exception("unhandled error in an HTTP request", path=head.path)
                return await self._answer(
                    head.method, error_response(RaafdError("internal error")), False
                )
            return await self._respond(head.method, stream_id, subscription, request.framing, keep)
        finally:
            if subscription is not None:
                subscription.close()  # detaches: the stream's detach grace applies

    def _authorize(self, head: RequestHead, query: dict[str, str]) -> Principal:
        address = self._address()
        self.ctx.guard.limit_ip("http_requests", address)
        try:
            return check_http(
                head.method,
                head.path,
                head.headers,
                query,
                self.ctx.authenticator(),
                public_metrics=self.ctx.config().http.public_metrics,
            )
        except Unauthorized as err:
            self.ctx.guard.auth_failed("http", err.message, address)
            raise

    def _address(self) -> str:
        try:
            name = self.sock.sock.getpeername()
        except OSError:
            return ""
        return str(name[0]) if isinstance(name, tuple) else ""

    async def _answer(self, method: str, response: Response, keep: bool) -> bool:
        """A whole (error) response; True when the connection may serve another request."""
        if response.headers.get("connection") == "close":
            keep = False
        headers = [("content-type", response.content_type), *response.headers.items()]
        headers += self._cors
        headers.append(("content-length", str(len(response.body))))
        if not keep and "connection" not in response.headers:
            headers.append(("connection", "close"))
        await self._send(response_head(response.status, headers) + response.body)
        self.ctx.metrics.http_requests.labels(method, str(response.status)).inc()
        self.linger = not keep
        return keep

    async def _send(self, data: bytes) -> None:
        """Queue ``data`` behind what is queued; ``TooSlowError`` when the socket took
        nothing for ``http.send_timeout`` and the queue stayed full."""
        if self.out.write_nowait(data):  # the usual case, without the cost of a deadline
            await trio.lowlevel.checkpoint()
        else:
            with trio.fail_after(self.ctx.config().http.send_timeout):
                await self.out.write(data)

    # --- streaming responses ------------------------------------------------------------------

    async def _respond(
        self,
        method: str,
        stream_id: str,
        subscription: Subscription,
        framing: Framing | ChunkFraming | UIStreamFraming,
        keep: bool,
        opening: bytes = b"",
    ) -> bool:
        """Deliver ``subscription`` as the response (``opening`` first in its body); True when
        the connection may serve another request."""
        headers = [
            ("content-type", framing.content_type if isinstance(framing, Framing) else SSE),
            *(UI_HEADERS.items() if isinstance(framing, UIStreamFraming) else ()),
            ("x-raafd-stream", stream_id),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
            ("transfer-encoding", "chunked") if keep else ("connection", "close"),
            *self._cors,
        ]
        self.ctx.metrics.http_requests.labels(method, "200").inc()
        if opening and keep:
            opening = chunk(opening)
        delivery = self.ctx.delivery(subscription, _Chunked(framing) if keep else framing, self)
        ended = False
        with trio.CancelScope() as response:  # cancelled by the reader when the client leaves
            self._response = response
            if self.eof:
                response.cancel()
            try:
                ended = await delivery.run(response_head(200, headers) + opening)
            except RaafdError as err:  # slow_consumer on a shared stream, gone while replaying
                log.info("HTTP stream delivery ended", code=err.code, cursor=subscription.cursor)
            finally:
                self._response = None
        if self.eof or not ended:
            return False  # the client left, or the stream could not be delivered to its end
        self.linger = not keep
        return keep

    async def _complete(self, method: str, completion: Completion, keep: bool) -> bool:
        """A streaming OpenAI-compatible completion. The client's leaving cancels the stream
        (nobody can re-attach to an OpenAI API call); an end without the terminal event gets
        the error chunk, as on the ASGI path."""
        stream = completion.stream
        framing = completion.framing()
        subscription = stream.subscribe(0)
        subscription.open()
        try:
            if await self._respond(
                method, stream.id, subscription, framing, keep, framing.opening()
            ):
                return True
            if not self.eof and not self.broken:
                with trio.move_on_after(self.ctx.config().http.send_timeout):
                    failure = framing.failure(None)
                    await self._send(chunk(failure) + LAST_CHUNK if keep else failure)
            return False
        finally:
            subscription.close()
            if not stream.finished:
                stream.cancel("client")

    async def _ui_chat(self, method: str, stream: Stream, cancel: bool, keep: bool) -> bool:
        """A Vercel AI SDK chat answer (the UI message stream). The client's leaving detaches
        (a resume finds the stream), or cancels it when the request asked; an end without the
        terminal event gets the protocol's error chunk, as on the ASGI path."""
        subscription = stream.subscribe(0)
        subscription.open()
        try:
            framing = UIStreamFraming()
            if await self._respond(method, stream.id, subscription, framing, keep):
                return True
            if not self.eof and not self.broken:
                with trio.move_on_after(self.ctx.config().http.send_timeout):
                    failure = failure_chunk(None)
                    await self._send(chunk(failure) + LAST_CHUNK if keep else failure)
            return False
        finally:
            subscription.close()
            if cancel and not stream.finished:
                stream.cancel("client")

    # The delivery's sink (raafd.net.delivery.Sink): this connection's output.

    def write_nowait(self, data: bytes) -> bool:
        return self.out.write_nowait(data)

    async def write(self, data: bytes) -> None:
        await self._send(data)

    async def _linger(self) -> None:
        """After a last response: half-close, then read (briefly, boundedly) what the client
        still sends, so the kernel does not answer unread input with a reset that could
        destroy the response before the client has read it."""
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                self.sock.sock.shutdown(socket.SHUT_WR)
                drained = 0
                while drained < _LINGER_BYTES:
                    data = await self.sock.receive_some()
                    if not data:
                        return
                    drained += len(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
