"""One WebSocket connection: handshake, then the reader in the connection's own task, as the
body of its one nursery, which also holds, only while needed, a puller per attached stream that
is behind (:class:`_Delivery`) and the output's drain task. An idle connection is one task:
tens of thousands of them are what the memory goes on, and a connection whose client keeps up
has no task per stream either. Its heartbeat (a ping every ``heartbeat_interval``, close 4408
after ``heartbeat_timeout`` of silence or an ``auth_timeout`` without authentication) is a
timer in the gateway's shared heap (:mod:`raafd.timers`), not a deadline around each read: a
read costs no cancel scope. A client command goes to its handler in the gateway's command table
(:mod:`raafd.gateway.table`), which sees the connection only as a
:class:`~raafd.gateway.table.Peer` (reply, attach a feed, detach): the connection knows no
stream manager, and a new subsystem's commands need no change here.

Ordering rule of this file: everything the connection sends goes through ``_out``
(:class:`~raafd.net.sockio.Output`), which writes straight to the socket when nothing is
queued and otherwise queues, bounded, for a drain task; so frames never interleave and a slow
socket pushes back on whatever feeds it (for a private stream, all the way to the provider's
read). A live event reaches a caught-up subscriber through ``push``, in the stream's own task;
the reply to ``stream.start``/``stream.attach`` goes out with the first batch of events in one
write; a puller task pulls only replay past that batch and what a full queue refused, and ends
once caught up. Closing ends the nursery first (a drain task cancelled while it waits loses
nothing: the queue keeps what the socket did not take), unsubscribes every attachment, then
queues the close frame behind what is still queued and sends it all from the connection's
task, bounded: the client always sees the last events before the close.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import structlog
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from raafd.auth import ANONYMOUS, Principal, authenticate
from raafd.core.feed import SlowConsumer, SubscriberFailed, Subscription
from raafd.errors import (
    BadRequest,
    Conflict,
    NotFound,
    RaafdError,
    RateLimited,
    TooManyStreams,
    Unauthorized,
)
from raafd.gateway.frames import (
    ClientFrames,
    binary_frame,
    close_frame,
    ping_frame,
    pong_frame,
    text_frame,
)
from raafd.logging import get_logger
from raafd.net.delivery import Delivery, Framing
from raafd.net.h1 import RequestHead
from raafd.net.sockio import Output, RawSocket
from raafd.protocol.codes import SUBPROTOCOL, CloseCode
from raafd.protocol.commands import parse_command
from raafd.protocol.events import StreamEvent
from raafd.security.limiter import ConnectionLimits

if TYPE_CHECKING:
    from raafd.gateway.gateway import Gateway

__all__ = ["Connection"]

log = get_logger("raafd.gateway")
_conn_ids = itertools.count(1)
_EVENT_PREFIX = b'{"type":"stream.event",'
_FRAMES_PER_YIELD = 8


class _Close(Exception):
    """Raised inside the connection's work to close it with a code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# Commands limited beyond ``commands`` (limits.connection / limits.principal keys).
LIMITED_COMMANDS = {
    "stream.start": "stream_starts",
    "workflow.start": "stream_starts",
    "room.send": "room_sends",
    "dm.send": "room_sends",
    "typing": "typing",
    "job.submit": "job_submits",
    "batch.submit": "job_submits",
}


def _peer(stream: RawSocket) -> str:
    try:
        name = stream.sock.getpeername()
    except OSError:
        return ""
    return str(name[0]) if isinstance(name, tuple) else str(name)


def event_frame(event_json: bytes) -> bytes:
    """A stream event's JSON wrapped as a ``stream.event`` message, without re-encoding."""
    return text_frame(_EVENT_PREFIX + event_json[1:])


def _reply(message: dict[str, Any]) -> bytes:
    """A reply's frame; a ``ref`` that is None is left out."""
    if message.get("ref", 0) is None:
        del message["ref"]
    return text_frame(orjson.dumps(message))


def _frames(batch: list[StreamEvent]) -> bytes:
    return b"".join([event_frame(event.json) for event in batch])


class Connection:
    __slots__ = (
        "_announced",
        "_binary",
        "_close",
        "_message",
        "_message_size",
        "_out",
        "_peer_closed",
        "_ping_at",
        "_timer_at",
        "_work",
        "_ws",
        "attachments",
        "authenticated",
        "draining",
        "echo",
        "events_sent",
        "gateway",
        "head",
        "id",
        "last_seen",
        "limits",
        "principal",
        "started_at",
        "stream",
        "user",
    )

    def __init__(
        self,
        gateway: Gateway,
        stream: trio.SocketStream,
        prefix: bytes,
        head: RequestHead,
        *,
        echo: bool = False,
    ) -> None:
        self.gateway = gateway
        # The opt-in echo endpoint (websocket.echo_path, for conformance suites): every
        # message comes back as it came; no hello, no commands, no welcome.
        self.echo = echo
        self.stream = RawSocket(stream, prefix)
        self.head: RequestHead | None = head  # dropped once authenticated (idle memory)
        self.id = f"c_{next(_conn_ids)}_{secrets.token_hex(3)}"
        self.principal = ANONYMOUS
        self.user = ANONYMOUS.user  # = principal.user, read on every command
        self.authenticated = False
        self.limits: ConnectionLimits | None = None  # rate-limit buckets, from the 1st command
        self.attachments: dict[str, _Delivery] = {}
        self.draining = False
        self.started_at = trio.current_time()
        self.last_seen = self.started_at
        self.events_sent = 0
        self._ping_at = math.inf  # the next heartbeat ping (armed once the reader runs)
        self._timer_at = math.inf  # the heartbeat's armed time (raafd.timers keeps it)
        # wsproto for the handshake, then (from the upgrade on) only raafd's frame parser: the
        # handshake's h11 state and wsproto's frame protocol would otherwise stay with every
        # idle connection (see raafd.gateway.frames).
        self._ws: WSConnection | ClientFrames = WSConnection(ConnectionType.SERVER)
        self._out = Output(self.stream, gateway.config().websocket.send_queue)
        self._work: trio.Nursery | None = None
        self._close: _Close | None = None
        self._peer_closed = False
        self._announced = False  # the gateway's observers were told of this connection
        self._message: list[str] | None = None  # the parts of a fragmented message
        self._binary: list[bytes] | None = None  # the same for binary (echo only)
        self._message_size = 0

    # --- entry point --------------------------------------------------------------------------

    async def serve(self) -> None:
        structlog.contextvars.bind_contextvars(conn=self.id)
        try:
            upgraded = await self._handshake()
        finally:
            if isinstance(self._ws, WSConnection):
                self.stream.close()  # refused, or the client went away or was cancelled
        if not upgraded:
            return
        self.gateway.metrics.connections_total.labels("websocket").inc()
        try:
            try:
                async with trio.open_nursery() as work:
                    self._work = self._out.nursery = work
                    await self._after_handshake()
                    await self._reader()
                    # The client sent EOF: its streams go on to their end, then it closes
                    # (_end_if_done cancels the work then). The nursery stays open meanwhile:
                    # a delivery that falls behind starts its puller in it.
                    self._end_if_done()
                    if self.attachments:
                        await trio.sleep_forever()
            except* _Close as group:
                self._close = group.exceptions[0]  # type: ignore[assignment]
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except* Exception as group:
                # A bug must cost this connection, never the daemon or other clients.
                log.error("connection failed", exc_info=group)
                self._close = _Close(CloseCode.INTERNAL, "internal error")
            finally:
                self._work = self._out.nursery = None
                self.gateway.timers.disarm(self)
                # Attachments without a puller were subscriptions only: unsubscribe them (the
                # streams' detach grace starts), before the close frame goes out.
                for delivery in [*self.attachments.values()]:
                    delivery.close()
                self.attachments.clear()
                if self._announced:
                    self._announced = False
                    for observer in self.gateway.observers:
                        try:
                            observer.disconnected(self)
                        except Exception:
                            log.exception("connection observer failed", observer=repr(observer))
            await self._finish()
        finally:
            self.stream.close()
            log.debug("connection closed", code=self._close.code if self._close else None)

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to close (from any task); its work is cancelled."""
        if self._close is None:
            self._close = _Close(code, reason)
        if self._work is not None:
            self._work.cancel_scope.cancel()

    def _end_if_done(self) -> None:
        # Draining, or the client sent EOF: close once no stream is attached any more. (After
        # an EOF the work is cancelled rather than left to end by itself: a drain task would
        # wait as long as a client that does not read; _finish sends the rest, bounded.)
        if self.attachments:
            return
        if self.draining:
            self.close(CloseCode.GOING_AWAY, "server going away")
        elif self._peer_closed and self._work is not None:
            self._work.cancel_scope.cancel()

    async def _finish(self) -> None:
        close = self._close or _Close(CloseCode.NORMAL, "")
        with trio.move_on_after(2) as scope:
            # The close frame goes behind what is queued; what a drain task (cancelled with
            # the work) did not send is sent from here.
            self._out.close(close_frame(close.code, close.reason))
            try:
                await self._out.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if scope.cancelled_caught:
            return
        if not self._peer_closed:
            # RFC 6455 §7.1.1: after our close frame, wait (briefly) for the client's, so it
            # can finish its side of the handshake before the TCP connection goes away.
            with trio.move_on_after(1):
                await self._await_peer_close()

    async def _await_peer_close(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    return

    # --- handshake ----------------------------------------------------------------------------

    async def _handshake(self) -> bool:
        cfg = self.gateway.config()
        handshake = self._ws
        assert isinstance(handshake, WSConnection)
        request: Request | None = None
        with trio.move_on_after(cfg.server.header_timeout):
            while request is None:
                data = await self.stream.receive_some()
                if not data:
                    return False
                try:
                    handshake.receive_data(data)
                    for event in handshake.events():
                        if isinstance(event, Request):
                            request = event
                            break
                except (RemoteProtocolError, ValueError) as exc:
                    # ValueError: wsproto decodes Host as IDNA, and some bytes are not that.
                    await self._refuse_upgrade(exc)
                    return False
        if request is None:
            return False
        if self.gateway.draining:
            await self._reject(503, "the server is draining")
            return False
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.subprotocols else None
        try:
            await self.stream.send_all(handshake.send(AcceptConnection(subprotocol=subprotocol)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        # Bytes the client sent past its request (it must wait for our response first, RFC
        # 6455 §4.1) are dropped with the handshake, as wsproto's own server handshake does.
        self._ws = ClientFrames()
        return True

    async def _refuse_upgrade(self, exc: RemoteProtocolError | ValueError) -> None:
        """A malformed upgrade (RFC 6455 §4.2.1): 400, or 426 for a version other than 13,
        both naming the version this server speaks; then the connection closes."""
        hint = getattr(exc, "event_hint", None)
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        why = str(exc) if isinstance(exc, RemoteProtocolError) else "a header is not valid"
        log.info("websocket upgrade refused", status=status, reason=why)
        self.gateway.metrics.connections_refused.labels("bad_upgrade").inc()
        body = orjson.dumps(
            {"error": {"code": "bad_request", "message": f"not a WebSocket upgrade: {why}"}}
        )
        reason = "Upgrade Required" if status == 426 else "Bad Request"
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"sec-websocket-version: 13\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        with trio.move_on_after(1):
            try:
                await self.stream.send_all(head.encode() + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _reject(self, status: int, message: str) -> None:
        assert isinstance(self._ws, WSConnection)
        body = orjson.dumps({"error": {"code": "unavailable", "message": message}})
        data = self._ws.send(
            RejectConnection(
                status_code=status,
                headers=[(b"content-type", b"application/json"), (b"retry-after", b"1")],
                has_body=True,
            )
        )
        from wsproto.events import RejectData

        data += self._ws.send(RejectData(data=body))
        with trio.move_on_after(1):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _after_handshake(self) -> None:
        try:
            await self._check_access()
        finally:
            self.head = None  # not needed again

    async def _check_access(self) -> None:
        cfg = self.gateway.config()
        assert self.head is not None
        origin = self.head.headers.get("origin")
        allowed = cfg.websocket.allowed_origins
        if origin is not None and allowed and origin not in allowed:
            raise _Close(CloseCode.FORBIDDEN, "origin not allowed")
        check = self.gateway.authenticator()
        if self.echo:
            # No hello on the echo endpoint: the token comes with the upgrade, or no echo.
            found = None
            if check.enabled:
                try:
                    found = authenticate(self.head.headers, self.head.query, check)
                except Unauthorized as err:
                    raise self._refused(err) from None
                if found is None:
                    raise self._refused(Unauthorized("the echo endpoint needs a token"))
            self._authenticated_as(found or ANONYMOUS)
            return
        if not check.enabled:
            self.authenticated = True
            await self._welcome()
            await self._announce()
            return
        try:
            principal = authenticate(self.head.headers, self.head.query, check)
        except Unauthorized as err:
            raise self._refused(err) from None
        if principal is not None:
            self._authenticated_as(principal)
            await self._welcome()
            await self._announce()
        # else: the first frame must be a `hello` with a token, within auth_timeout.

    def _refused(self, err: Unauthorized) -> _Close:
        """Close 4401 with the refusal's reason (it names no secret), audited."""
        self.gateway.guard.auth_failed("websocket", err.message, _peer(self.stream))
        generic = err.message == "the token is not valid"
        return _Close(CloseCode.UNAUTHORIZED, "invalid token" if generic else err.message)

    @property
    def close_code(self) -> int:
        """The close code sent (or to be sent): 1000 unless something else closed it."""
        return int(self._close.code) if self._close is not None else int(CloseCode.NORMAL)

    async def _welcome(self) -> None:
        self.gateway.emit(
            "connection.opened", {"conn": self.id, "user": self.user, "transport": "websocket"}
        )
        cfg = self.gateway.config()
        await self.send_json(
            {
                "type": "welcome",
                "conn": self.id,
                "user": self.user,
                "heartbeat": cfg.websocket.heartbeat_interval,
                "limits": {
                    "max_frame": cfg.websocket.max_frame,
                    "max_streams": cfg.streams.max_streams_per_connection,
                    # Over all this principal's connections (not counted with auth off).
                    "max_streams_per_principal": cfg.streams.max_streams_per_principal,
                    "heartbeat_timeout": cfg.websocket.heartbeat_timeout,
                },
            }
        )

    async def _announce(self) -> None:
        # The gateway's connection observers (presence, offline queues): after `welcome`, in
        # this task, before the next frame is read.
        self._announced = True
        for observer in self.gateway.observers:
            await observer.connected(self)

    # --- tasks --------------------------------------------------------------------------------

    async def _reader(self) -> None:
        """Reads client frames, in the connection's own task, until the client's EOF; the
        heartbeat runs beside it (:meth:`_on_timer`)."""
        self._ping_at = self.started_at + self.gateway.config().websocket.heartbeat_interval
        self._on_timer(trio.current_time())  # arms the heartbeat
        while True:
            data = await self.stream.receive_some()
            if not data:
                self._peer_closed = True
                return
            self.last_seen = trio.current_time()  # moves the silence deadline: a float store
            self._ws.receive_data(data)
            for n, event in enumerate(self._ws.events(), 1):
                if n % _FRAMES_PER_YIELD == 0:
                    # Replies do not yield (see _send): a read full of small frames shares the
                    # loop every few frames instead of holding it for the whole read.
                    await trio.lowlevel.checkpoint()
                if isinstance(event, TextMessage):
                    await self._on_text(event)
                elif isinstance(event, BytesMessage):
                    await self._on_bytes(event)
                elif isinstance(event, Ping):
                    await self._out.write(pong_frame(event.payload))
                elif isinstance(event, CloseConnection):
                    self._peer_closed = True
                    raise _Close(event.code if event.code != 1005 else CloseCode.NORMAL, "")

    def _heartbeat_deadline(self) -> float:
        cfg = self.gateway.config().websocket
        if self.authenticated:
            return self.last_seen + cfg.heartbeat_timeout
        return self.started_at + cfg.auth_timeout

    def _on_timer(self, now: float) -> None:
        """The heartbeat, in the gateway's timer task: a ping when one is due, close 4408 past
        the silence (or authentication) deadline, else armed again for the next of the two."""
        if self._work is None or self._close is not None:
            return
        if now >= self._ping_at:
            self._ping_at = now + self.gateway.config().websocket.heartbeat_interval
            try:
                # A client whose queue is full is behind anyway; it gets the next one.
                self._out.write_nowait(ping_frame(b"hb"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reader or the delivery meets it and ends the connection
        deadline = self._heartbeat_deadline()
        if now >= deadline:
            if self.authenticated:
                self.close(CloseCode.TIMEOUT, "no frame from the client within the timeout")
            else:
                self.close(CloseCode.TIMEOUT, "authentication timed out")
            return
        self.gateway.timers.arm(self, min(deadline, self._ping_at))

    def _count(self, size: int) -> None:
        """Add a message piece's bytes; close 1009 once the message passes ``max_frame``
        (checked as each piece arrives: nothing over the bound is ever kept)."""
        max_frame = self.gateway.config().websocket.max_frame
        self._message_size += size
        if self._message_size > max_frame:
            raise _Close(CloseCode.TOO_BIG, f"message over {max_frame} bytes")

    async def _on_bytes(self, event: BytesMessage) -> None:
        # Binary messages carry nothing raafd reads: bounded like text, answered once each.
        self._count(len(event.data))
        if self.echo:
            if self._binary is None:
                self._binary = []
            self._binary.append(bytes(event.data))
        if not event.message_finished:
            return
        self._message_size = 0
        if self._binary is not None:
            data, self._binary = b"".join(self._binary), None
            await self._out.write(binary_frame(data))
            return
        if not self.authenticated:
            raise _Close(CloseCode.UNAUTHORIZED, "authenticate with a hello frame first")
        await self.send_error(BadRequest("binary frames are not supported"))

    async def _on_text(self, event: TextMessage) -> None:
        data = event.data
        # max_frame counts bytes, as received: UTF-8 of non-ASCII text is longer than its
        # characters (isascii is O(1) on a str).
        self._count(len(data) if data.isascii() else len(data.encode()))
        if event.message_finished and self._message is None:
            text = event.data  # a message in one frame: the usual case
        else:
            if self._message is None:
                self._message = []
            self._message.append(event.data)
            if not event.message_finished:
                return
            text = "".join(self._message)
            self._message = None
        self._message_size = 0
        if self.echo:
            await self._out.write(text_frame(text.encode()))
            return
        await self._command(text)

    # --- commands (the gateway's table: raafd.gateway.table) ---------------------------------

    async def _command(self, text: str) -> None:
        commands = self.gateway.commands
        ref: str | None = None
        try:
            kind, command = parse_command(text, commands.types)
            ref = getattr(command, "ref", None)
            if not self.authenticated and kind != "hello":
                raise _Close(CloseCode.UNAUTHORIZED, "authenticate with a hello frame first")
            self._limit(kind)
            for observer in self.gateway.observers:
                observer.activity(self, kind)
            await commands.handlers[kind](self, command)
        except RaafdError as err:
            await self.send_error(err, ref if ref is not None else getattr(err, "ref", None))

    def _limit(self, kind: str) -> None:
        """The rate limits of a command: every command, and its own kind's (``stream.start``
        …); a refusal is ``rate_limited``, and ``limits.hard_limit`` refusals in a row close
        the connection 4429."""
        guard = self.gateway.guard
        limits = self.limits
        if limits is None:
            limits = self.limits = ConnectionLimits()
        try:
            guard.limit("commands", limits, self.principal)
            action = LIMITED_COMMANDS.get(kind)
            if action is not None:
                guard.limit(action, limits, self.principal)
        except RateLimited:
            if limits.refused(self.gateway.config().limits.hard_limit):
                raise _Close(
                    CloseCode.RATE_LIMITED, "rate limited: too many refused commands"
                ) from None
            raise
        limits.accepted()

    async def authenticate(self, token: str | None) -> None:
        """A ``hello``'s token: welcome the client, or close 4401."""
        if token is None:
            raise self._refused(Unauthorized("a hello needs a token"))
        try:
            principal = self.gateway.authenticator().authenticate(token)
        except Unauthorized as err:
            raise self._refused(err) from None
        self._authenticated_as(principal)
        await self._welcome()
        await self._announce()

    def _authenticated_as(self, principal: Principal) -> None:
        self.principal = principal
        self.user = principal.user
        self.authenticated = True

    # --- feed delivery ------------------------------------------------------------------------

    def check_room(self) -> None:
        """``too_many_streams`` when one more attachment would pass the limit."""
        limit = self.gateway.config().streams.max_streams_per_connection
        if len(self.attachments) >= limit:
            raise TooManyStreams(f"at most {limit} attached streams per connection")

    def attach(
        self,
        feed_id: str,
        subscribe: Callable[[], Subscription],
        reply: dict[str, Any] | None,
        ref: str | None = None,
        *,
        framing: Framing | None = None,
    ) -> None:
        """Subscribe and send ``reply`` with the first batch of events, synchronously, framed
        by ``framing`` (default: ``stream.event`` frames). The command's errors (``conflict``,
        ``too_many_streams``, then what ``subscribe`` raises: ``not_found``, ``gone``,
        ``bad_request``) are raised before anything is registered or sent."""
        if feed_id in self.attachments:
            raise Conflict(f"stream {feed_id} is already attached", field="stream")
        self.check_room()
        subscription = subscribe()
        subscription.open()
        delivery = _Delivery(self, feed_id, subscription, ref, framing or _WEBSOCKET)
        self.attachments[feed_id] = delivery
        delivery.begin(b"" if reply is None else _reply(reply))

    def detach(self, feed_id: str) -> None:
        """Stop delivering ``feed_id`` (its stream's detach grace starts)."""
        delivery = self.attachments.pop(feed_id, None)
        if delivery is None:
            raise NotFound(f"stream {feed_id} is not attached here", field="stream")
        delivery.close()

    # --- sending ------------------------------------------------------------------------------

    async def send_json(self, message: dict[str, Any]) -> None:
        await self._send(_reply(message))

    def send_nowait(self, message: dict[str, Any]) -> None:
        """A frame pushed from another task: written now or queued, never waited for. A full
        queue means this client is too far behind: close 4001 (it reconnects and is sent what
        it missed then: presence on asking, queued messages unacknowledged)."""
        if self._close is not None:
            return
        try:
            if not self._out.write_nowait(_reply(message)):
                self.close(CloseCode.SLOW_CONSUMER, "too far behind; reconnect")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader or the delivery meets it and ends the connection

    async def send_error(self, err: RaafdError, ref: str | None = None) -> None:
        self.gateway.metrics.errors.labels(err.code).inc()
        body: dict[str, Any] = {"type": "error", **err.to_dict()}
        if ref is not None:
            body["ref"] = ref
        await self._send(text_frame(orjson.dumps(body)))

    async def _send(self, frame: bytes) -> None:
        # A reply the socket takes (or the queue holds) at once does not yield: the reader
        # yields at its next read anyway, and a stream it just started then gets the loop
        # without the reader's rest of the command in between. A full queue waits for room.
        if not self._out.write_nowait(frame):
            await self._out.write(frame)

    def notify_shutdown(self, reconnect_after: float) -> None:
        """Tell the client the server is draining; close 1001 once its streams end."""
        self.draining = True
        message = {"type": "shutdown", "reason": "drain", "reconnect_after": reconnect_after}
        try:
            self._out.write_nowait(text_frame(orjson.dumps(message)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a client this far behind (a full queue) learns from the 1001 close
        self._end_if_done()


class _WebSocketFraming:
    """Stream events as ``stream.event`` text frames (the gateway pings on its own: no
    heartbeat bytes)."""

    __slots__ = ()

    transport = "websocket"
    heartbeat = b""

    def event(self, event: StreamEvent) -> bytes:
        return event_frame(event.json)

    def batch(self, events: list[StreamEvent]) -> bytes:
        return _frames(events)


_WEBSOCKET = _WebSocketFraming()


class _Delivery(Delivery):
    """One stream attached to a connection (see :mod:`raafd.net.delivery`): live events are
    pushed from the stream's own task; a puller task (:meth:`_pull`) runs only while the
    subscriber is behind, for replay past the first batch or an event the output refused (its
    queue full), and ends once caught up. So a client that keeps up costs no task per attached
    stream, and the reply to ``stream.start``/``stream.attach`` leaves with the first events in
    one write.

    Whoever delivers the terminal event ends the attachment (:meth:`_end`); a detach, or the
    connection's end, closes it (:meth:`close`)."""

    __slots__ = ("_conn", "_ref", "_scope", "stream_id")

    def __init__(
        self,
        conn: Connection,
        stream_id: str,
        subscription: Subscription,
        ref: str | None,
        framing: Framing,
    ) -> None:
        super().__init__(
            subscription,
            framing,
            conn._out,
            conn.gateway.metrics.events_sent.labels(framing.transport),
        )
        self._conn = conn
        self._ref = ref
        self._scope: trio.CancelScope | None = None  # the puller's, while one runs
        self.stream_id = stream_id
        subscription.on_drop = self._dropped

    def close(self) -> None:
        """Detach (idempotent): unsubscribe (the stream's detach grace applies), stop the
        puller."""
        self.subscription.close()
        if self._scope is not None:
            self._scope.cancel()

    def _delivered(self, count: int) -> None:
        self._conn.events_sent += count

    def _finished(self) -> None:
        self._end()

    def _end(self) -> None:
        self.close()
        conn = self._conn
        if conn.attachments.get(self.stream_id) is self:
            del conn.attachments[self.stream_id]
        conn._end_if_done()

    def _dropped(self, err: RaafdError) -> None:
        if isinstance(err, SlowConsumer):
            self._conn.close(
                CloseCode.SLOW_CONSUMER,
                f"too far behind on {self.stream_id}; resume from your last seq",
            )
        else:  # this connection's own delivery failed: it alone ends
            self._conn.close(CloseCode.INTERNAL, "internal error")

    def _behind(self, pending: bytes, count: int, terminal: bool) -> None:
        work = self._conn._work
        if self._scope is not None or work is None or work.cancel_scope.cancel_called:
            return  # one runs; or the connection is ending, and closes this attachment
        self._scope = scope = trio.CancelScope()
        work.start_soon(self._pull, pending, count, terminal, scope)

    async def _pull(
        self, pending: bytes, count: int, terminal: bool, scope: trio.CancelScope
    ) -> None:
        """Write ``pending``, then batches until caught up (or the terminal event)."""
        structlog.contextvars.bind_contextvars(stream=self.stream_id)
        try:
            with scope:
                await self.pump(pending, count, terminal=terminal, until_caught_up=True)
        except (SlowConsumer, SubscriberFailed):
            pass  # on_drop has closed the connection already
        except RaafdError as err:  # gone: evicted while this subscriber was behind
            try:
                await self._conn.send_error(err, self._ref)
            finally:
                self._end()
            return
        finally:
            if self._scope is scope:
                self._scope = None
