"""The raafd WebSocket client: one connection at a time, reconnected on its own, streams resumed.

The rule of this file, which everything else in it serves:

    A :class:`StreamHandle` yields every event of its stream exactly once and in seq order,
    however many times the connection drops.

How it is kept:

- Only the reader task takes messages off the connection. It resolves replies (matched by
  ``ref``) and routes ``stream.event`` messages to their handle synchronously: it never waits
  for a consumer, so one slow stream cannot hold up replies, pings or the other streams.
- A handle remembers ``_received``, the seq of the last event it queued, and queues only events
  above it. A delivery may coalesce content events (a seq may jump; the event covers the seqs
  it skips), so the test is ``seq <= _received``, never ``seq == _received + 1``.
- After a reconnect every open handle attaches again with ``after=_received``. Events already
  queued stay queued: the buffer belongs to the handle, not to the connection.
- A handle whose bounded buffer is full stops queueing (``_overflow``) instead of blocking the
  reader. Once its consumer has emptied the buffer it detaches and attaches again from
  ``_received``. The server sends nothing of a detached attachment after its
  ``stream.detached`` reply, so an event after a gap is never queued.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from raafd.client.jobs import JobHandle
from raafd.client.queued import QueuedHandler, QueuedInbox
from raafd.client.rooms import HISTORY_PAGE, RoomHandle
from raafd.errors import RaafdError
from raafd.protocol.codes import SUBPROTOCOL, CloseCode, ErrorCode
from raafd.protocol.events import TERMINAL_KINDS

__all__ = [
    "DEFAULT_URL",
    "SUBPROTOCOL",
    "ClientError",
    "RaafdClient",
    "StreamHandle",
    "backoff_delay",
    "open_client",
]

# A library logs through the standard library, so it stays quiet unless the application that
# embeds it configures logging (``raafd chat`` must not print log lines into the transcript).
log = logging.getLogger("raafd.client")

DEFAULT_URL: Final = "ws://127.0.0.1:8080/v1/ws"
# Close codes after which reconnecting cannot help: the caller gets a ClientError instead.
FATAL_CLOSE_CODES: Final[dict[int, str]] = {
    CloseCode.UNAUTHORIZED: ErrorCode.UNAUTHORIZED,
    CloseCode.FORBIDDEN: ErrorCode.FORBIDDEN,
}
CONNECT_TIMEOUT: Final = 10.0  # TCP and WebSocket handshake, per attempt
WELCOME_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 2.0  # the closing handshake, when we close
MAX_MESSAGE: Final = 64 << 20  # a `complete` event carries the whole reply
_OUTBOX: Final = 16  # commands queued for the writer task
_HELLO: Final = '{"type":"hello","client":"raafd-python"}'


class ClientError(RaafdError):
    """An ``error`` from the server, raised from the call whose ``ref`` it carries, or one the
    client makes itself:

    - ``connection_lost``: the connection dropped while the command was in flight; it may or
      may not have been applied (only ``start`` raises it: the other commands are idempotent
      and are sent again on the next connection);
    - ``unavailable``: no connection could be made, or reconnecting gave up;
    - ``closed``: the client has been closed.

    ``code``, ``message``, ``field`` and ``retry_after`` are the server's when it sent them.
    """

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, field=field, retry_after=retry_after)
        self.code = str(code)  # type: ignore[misc]  # the server's code, per instance

    def __repr__(self) -> str:
        return f"ClientError({self.code!r}, {self.message!r}, field={self.field!r})"

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.code}: {self.message}{where}"

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> ClientError:
        """From an ``error`` message (or an ``error`` object inside a stream event)."""
        retry_after = body.get("retry_after")
        field = body.get("field")
        return cls(
            str(body.get("code", "internal")),
            str(body.get("message", "")),
            field if isinstance(field, str) else None,
            retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
        )

    def copy(self) -> ClientError:
        """A fresh instance, so one error can be raised in several tasks."""
        return ClientError(self.code, self.message, self.field, retry_after=self.retry_after)


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    floor: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before reconnect ``attempt`` (1, 2, ...): exponential from ``base`` up to
    ``cap``, with "equal jitter" (somewhere in the upper half, so clients kicked together do not
    come back together), and never less than ``floor`` (a ``shutdown``'s ``reconnect_after``)."""
    ceiling = min(cap, base * 2.0 ** max(attempt - 1, 0))
    jitter = (rng or random).uniform(0.0, ceiling / 2)
    return max(floor, ceiling / 2 + jitter)


class _Dropped(Exception):
    """The connection ended or could not be made; reconnecting may help."""


class _Backoff:
    """Consecutive reconnect attempts since the last good connection, and the next delay."""

    def __init__(self, base: float, cap: float, max_attempts: int | None) -> None:
        self.base = base
        self.cap = cap
        self.max_attempts = max_attempts
        self.attempt = 0
        self.floor = 0.0  # a `shutdown`'s reconnect_after, until a connection succeeds

    def succeeded(self) -> None:
        self.attempt = 0
        self.floor = 0.0

    def next_delay(self) -> float | None:
        """Seconds before the next attempt; None once ``max_attempts`` have failed."""
        self.attempt += 1
        if self.max_attempts is not None and self.attempt > self.max_attempts:
            return None
        return backoff_delay(self.attempt, base=self.base, cap=self.cap, floor=self.floor)


class _Target:
    """Where a ``ws://`` or ``wss://`` URL points, and how to open a stream to it."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        self.host = parts.hostname
        secure = parts.scheme == "wss"
        self.ssl_context = (ssl_context or ssl.create_default_context()) if secure else None
        self.port = parts.port or (443 if secure else 80)
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if self.port in (80, 443) else f"{name}:{self.port}"
        self.resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    async def open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                if self.ssl_context is None:
                    return await trio.open_tcp_stream(self.host, self.port)
                return await trio.open_ssl_over_tcp_stream(
                    self.host, self.port, ssl_context=self.ssl_context, https_compatible=True
                )
            except OSError as exc:
                raise _Dropped(exc.strerror or str(exc)) from None
        raise _Dropped(f"no TCP connection within {CONNECT_TIMEOUT} s")


class _Pending:
    """A command waiting for its reply. ``on_reply`` runs in the reader, before any message
    that follows the reply is handled (so a new handle is routable before its first event)."""

    __slots__ = ("done", "error", "on_error", "on_reply", "reply")

    def __init__(
        self,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        on_error: Callable[[ClientError], None] | None = None,
    ) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.error: ClientError | None = None
        self.on_reply = on_reply
        self.on_error = on_error

    def resolve(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        if self.on_reply is not None:
            self.on_reply(reply)
        self.done.set()

    def fail(self, error: ClientError) -> None:
        self.error = error
        if self.on_error is not None:
            self.on_error(error)
        self.done.set()


class _Connection:
    """One WebSocket connection's state, from ``welcome`` until it closes."""

    def __init__(self, ws: WebSocketConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.id = str(welcome.get("conn", ""))
        self.user = str(welcome.get("user", ""))
        heartbeat = welcome.get("heartbeat")
        self.heartbeat = 20.0
        if isinstance(heartbeat, int | float) and heartbeat > 0:
            self.heartbeat = float(heartbeat)
        self.pending: dict[str, _Pending] = {}
        self.outbox, self._outbox_recv = trio.open_memory_channel[str](_OUTBOX)
        self.closed = False
        self.scope: trio.CancelScope | None = None  # cancelling it ends the connection
        self.close_code: int | None = None
        self.close_reason = ""
        self.reconnect_after = 0.0  # from `shutdown`

    async def writer(self) -> None:
        """The one task that sends: commands go out whole and in the order they were queued."""
        async for text in self._outbox_recv:
            try:
                await self.ws.send_message(text)
            except ConnectionClosed:
                return  # the reader sees the close and ends the connection

    def end(self) -> None:
        """Mark closed and fail what waits on it (synchronous: no command slips in between)."""
        self.closed = True
        self._outbox_recv.close()
        pending = list(self.pending.values())
        self.pending.clear()
        for entry in pending:
            entry.fail(ClientError("connection_lost", "the connection to the server dropped"))


class StreamHandle:
    """One stream, attached through a :class:`RaafdClient`: an async iterator of its events.

    Each event is the protocol's stream event object, a dict with ``stream``, ``seq``,
    ``event`` and the event's fields (``delta``, ``final_response``, ...); a handle attached
    from 0 with a snapshot starts with a ``snapshot`` event (see :meth:`RaafdClient.attach`).
    Iteration ends after the terminal event (``complete``, ``error`` or ``cancelled``, kept in
    :attr:`terminal`), or after :meth:`detach`. It raises :class:`ClientError` when the stream
    cannot be followed any more (the client gave up reconnecting, the stream was forgotten by
    the server, ...).

    Iterate a handle from one task at a time.
    """

    def __init__(
        self, client: RaafdClient, stream_id: str, after: int, buffer: int, snapshot: bool = False
    ) -> None:
        self._client = client
        self.stream_id = stream_id
        #: Whether an attach from seq 0 asks for a snapshot (see :meth:`RaafdClient.attach`).
        self.snapshot = snapshot
        #: The seq of the last event iteration returned (``after`` before the first).
        self.last_seq = after
        #: The terminal event, once iteration has returned it.
        self.terminal: dict[str, Any] | None = None
        #: True once :meth:`detach` was called.
        self.detached = False
        self._received = after
        self._overflow = False
        self._ended = False
        self._error: ClientError | None = None
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](buffer)

    def __repr__(self) -> str:
        return f"<StreamHandle {self.stream_id} last_seq={self.last_seq}>"

    @property
    def done(self) -> bool:
        """True once iteration has returned the terminal event."""
        return self.terminal is not None

    # --- iteration ----------------------------------------------------------------------------

    def __aiter__(self) -> StreamHandle:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._overflow and not self._ended and self._recv.statistics().current_buffer_used == 0:
            await self._client._resync(self)
        try:
            event = await self._recv.receive()
        except trio.EndOfChannel:
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None
        self.last_seq = event["seq"]
        if event.get("event") in TERMINAL_KINDS:
            self.terminal = event
        return event

    # --- control ------------------------------------------------------------------------------

    async def cancel(self) -> None:
        """Ask the server to cancel the stream; its ``cancelled`` event still comes through
        iteration (unless the stream had already ended)."""
        await self._client._request({"type": "stream.cancel", "stream": self.stream_id})

    async def pause(self) -> None:
        await self._client._request({"type": "stream.pause", "stream": self.stream_id})

    async def resume(self) -> None:
        await self._client._request({"type": "stream.resume", "stream": self.stream_id})

    async def detach(self) -> None:
        """Stop following the stream (it keeps running on the server for its detach grace).
        Events already buffered are still returned, then iteration ends."""
        await self._client._detach(self)

    # --- fed by the client's reader -----------------------------------------------------------

    def _offer(self, event: dict[str, Any]) -> bool:
        """Queue ``event`` unless it is a repeat; True when it was the terminal event."""
        seq = event.get("seq")
        if not isinstance(seq, int) or seq <= self._received or self._overflow or self._ended:
            return False
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._overflow = True  # dropped; resynchronised once the consumer catches up
            return False
        self._received = seq
        if event.get("event") in TERMINAL_KINDS:
            self._end()
            return True
        return False

    def _end(self, error: ClientError | None = None) -> None:
        """Nothing more will be queued; iteration ends (or raises ``error``) once drained."""
        if not self._ended:
            self._ended = True
            self._error = error
            self._send.close()


class RaafdClient:
    """A connection to a raafd daemon's ``/v1/ws``; use :func:`open_client` to get one.

    Commands wait while the client is reconnecting. Every waiting is bounded by the caller:
    wrap calls in ``trio.fail_after`` / ``move_on_after``.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        agent: str | None = None,
        reconnect: bool = True,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        max_attempts: int | None = None,
        stream_buffer: int = 256,
        max_pending: int = 64,
        max_streams: int = 32,
        ssl_context: ssl.SSLContext | None = None,
        on_queued: QueuedHandler | None = None,
        on_presence: Callable[[dict[str, Any]], None] | None = None,
        queued_buffer: int = 1000,
        room_buffer: int = 1000,
    ) -> None:
        if stream_buffer < 1 or max_pending < 1 or max_streams < 1 or queued_buffer < 1:
            raise ValueError("stream_buffer, max_pending and max_streams must be 1 or more")
        self.url = url
        self.agent = agent
        self._target = _Target(url, ssl_context)
        self._headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._reconnect = reconnect
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_attempts = max_attempts
        self._stream_buffer = stream_buffer
        self._max_streams = max_streams
        self._slots = trio.Semaphore(max_pending)
        self._refs = itertools.count(1)
        self._conn: _Connection | None = None
        self._handles: dict[str, StreamHandle] = {}
        self._changed = trio.Event()
        self._fatal: ClientError | None = None
        self._closing = False
        self._stopped = trio.Event()
        #: Connections made after the first one.
        self.reconnects = 0
        #: Connection attempts made, successful or not.
        self.attempts = 0
        #: The last ``shutdown`` notice from the server, if any.
        self.shutdown_notice: dict[str, Any] | None = None
        self.user: str | None = None
        self._queued = None if on_queued is None else QueuedInbox(on_queued, queued_buffer)
        self._on_presence = on_presence
        self._room_buffer = max(room_buffer, 1)
        self._rooms: dict[str, RoomHandle] = {}

    # --- state --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def error(self) -> ClientError | None:
        """Why the client stopped (gave up reconnecting, refused, closed); None while usable."""
        return self._fatal

    @property
    def conn_id(self) -> str | None:
        """The server's id for the current connection (from ``welcome``); None while down."""
        return self._conn.id if self._conn is not None else None

    @property
    def streams(self) -> list[StreamHandle]:
        """The handles that are still following their stream."""
        return list(self._handles.values())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- commands -----------------------------------------------------------------------------

    async def start(
        self,
        input: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        agent: str | None = None,
        stream_id: str | None = None,
        session: str | None = None,
    ) -> StreamHandle:
        """Start a stream (``input`` or ``messages``, one of them) and follow it from seq 1.
        ``agent`` defaults to the client's, then to the server's default agent."""
        if (input is None) == (messages is None):
            raise ClientError("bad_request", "give exactly one of input or messages", "input")
        self._check_room()
        message: dict[str, Any] = {"type": "stream.start"}
        if input is not None:
            message["input"] = input
        else:
            message["messages"] = messages
        for key, value in (
            ("agent", agent or self.agent),
            ("stream", stream_id),
            ("session", session),
        ):
            if value is not None:
                message[key] = value
        started: list[StreamHandle] = []

        def on_started(reply: dict[str, Any]) -> None:
            handle = StreamHandle(self, str(reply["stream"]), 0, self._stream_buffer)
            self._handles[handle.stream_id] = handle
            started.append(handle)

        # Not idempotent: after a drop the stream may or may not exist, so no retry here.
        await self._request(message, on_reply=on_started, retry=False)
        return started[0]

    async def attach(
        self, stream_id: str, after: int = 0, *, snapshot: bool = True
    ) -> StreamHandle:
        """Follow an existing stream from the event after seq ``after`` (0: from the start).

        From 0 with ``snapshot`` (the default) the first event is a ``snapshot``
        {``seq``, ``text``, ``tool_calls``, ``agent``} standing for every event up to its
        ``seq`` (a long stream's thousands of deltas in one; possible after the server's log
        dropped them), then every event after it. The server answers without one when the
        stream's text is over its ``max_snapshot_bytes``; ``snapshot=False`` asks for every
        event instead. Resuming (``after`` > 0, and every re-attach after a reconnect that
        has received something) never asks for one."""
        if stream_id in self._handles:
            raise ClientError("conflict", f"stream {stream_id} is already attached", "stream")
        self._check_room()
        handle = StreamHandle(self, stream_id, after, self._stream_buffer, snapshot)

        def on_attached(reply: dict[str, Any]) -> None:
            self._handles[stream_id] = handle

        await self._request(_attach_message(handle), on_reply=on_attached)
        return handle

    async def join(self, room: str, *, after: int | None = None) -> RoomHandle:
        """Join a room: the handle's ``history`` holds the room's recent messages (or exactly
        those after id ``after``), and iterating it gives the room's events from there on,
        every message once and in order across dropped connections (the client joins again
        with the last id it handed out; see :mod:`raafd.client.rooms`)."""
        if room in self._rooms:
            raise ClientError("conflict", f"room {room} is joined already", "room")
        message: dict[str, Any] = {"type": "room.join", "room": room}
        if after is not None:
            message["after"] = after
        handles: list[RoomHandle] = []

        def on_joined(reply: dict[str, Any]) -> None:
            handle = RoomHandle(
                room,
                reply,
                buffer=self._room_buffer,
                fetch=self._room_page,
                leave=self._leave_room,
            )
            self._rooms[room] = handle
            handles.append(handle)

        await self._request(message, on_reply=on_joined, retry=False)
        return handles[0]

    async def send(
        self,
        room: str,
        text: str,
        *,
        client_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Send to a joined room; returns the message's id once the server has stored it. A
        ``client_id`` is made when none is given, so the retry after a dropped connection
        never posts it twice."""
        message: dict[str, Any] = {
            "type": "room.send",
            "room": room,
            "text": text,
            "client_id": client_id or uuid.uuid4().hex,
        }
        if meta is not None:
            message["meta"] = meta
        reply = await self._request(message)  # idempotent by client_id: retried after a drop
        return int(reply["id"])

    async def typing(self, room: str, state: str = "start") -> None:
        """Tell the room's other members you are typing (``start``) or stopped (``stop``);
        send ``start`` again every few seconds while typing (the server stops it after
        ``chat.typing_timeout``). Nothing is answered."""
        conn = await self._connection()
        try:
            await conn.outbox.send(
                orjson.dumps({"type": "typing", "room": room, "state": state}).decode()
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # typing is ephemeral: a dropped one is not sent again

    async def room_history(
        self, room: str, *, after: int | None = None, before: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Kept messages of a room (``room.history``): after ``after``, before ``before``."""
        message: dict[str, Any] = {"type": "room.history", "room": room, "limit": limit}
        if after is not None:
            message["after"] = after
        if before is not None:
            message["before"] = before
        reply = await self._request(message)
        found = reply.get("messages")
        return found if isinstance(found, list) else []

    async def _room_page(self, room: str, after: int, before: int | None) -> list[dict[str, Any]]:
        return await self.room_history(room, after=after, before=before, limit=HISTORY_PAGE)

    async def _leave_room(self, handle: RoomHandle) -> None:
        if self._rooms.get(handle.room) is handle:
            del self._rooms[handle.room]
        await self._request({"type": "room.leave", "room": handle.room})

    async def set_presence(
        self, status: str = "online", meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``presence.set``: ``online`` or ``away`` and a small custom ``meta``; returns your
        presence as the server keeps it (``user``, ``status``, ``last_seen``, ``meta``)."""
        reply = await self._request({"type": "presence.set", "status": status, "meta": meta})
        return {k: v for k, v in reply.items() if k not in ("type", "ref")}

    async def get_presence(self, users: list[str], *, watch: bool = False) -> list[dict[str, Any]]:
        """Each user's presence (``user``, ``status``, ``last_seen``, ``meta``). With ``watch``,
        their later changes go to the client's ``on_presence`` (for this connection: ask again
        after a reconnect)."""
        reply = await self._request({"type": "presence.get", "users": users, "watch": watch})
        users_found = reply.get("users")
        return users_found if isinstance(users_found, list) else []

    async def dm(self, to: str, text: str, *, client_id: str | None = None) -> str:
        """Send a direct message; returns its id once the server has stored it durably. A
        ``client_id`` is made when none is given, so the retry after a dropped connection
        never sends it twice."""
        message = {
            "type": "dm.send",
            "to": to,
            "text": text,
            "client_id": client_id or uuid.uuid4().hex,
        }
        reply = await self._request(message)  # idempotent by client_id: retried after a drop
        return str(reply["id"])

    async def submit_job(
        self, input: str | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> JobHandle:
        """Submit a background job (the fields of ``POST /v1/jobs``: ``agent``, ``priority``,
        ``delay``, ``max_attempts`` …); returns once the server holds it durably. An
        ``idempotency_key`` is made when none is given, so the retry after a dropped connection
        never submits it twice."""
        message = {"type": "job.submit", **fields}
        if input is not None:
            message["input"] = input
        message["idempotency_key"] = idempotency_key or uuid.uuid4().hex
        reply = await self._request(message)
        return JobHandle(self, reply["job"])

    async def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job."""
        reply = await self._request({"type": "job.status", "job": job_id})
        return JobHandle(self, reply["job"])

    async def submit_batch(self, **fields: Any) -> dict[str, Any]:
        """Submit a batch (the fields of ``POST /v1/batches``); returns {``batch``, ``jobs``}.
        Not retried after a drop (a batch has no idempotency key): a lost answer raises
        ``connection_lost``."""
        reply = await self._request({"type": "batch.submit", **fields}, retry=False)
        return {"batch": reply["batch"], "jobs": reply["jobs"]}

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send an idempotent command and return its reply (retried after a drop)."""
        return await self._request(message)

    async def ping(self) -> float:
        """A ``ping`` round trip; returns its duration in seconds."""
        began = trio.current_time()
        await self._request({"type": "ping"})
        return trio.current_time() - began

    async def aclose(self) -> None:
        """Close the connection (the closing handshake, bounded) and fail what still waits."""
        self._closing = True
        conn = self._conn
        if conn is not None and conn.scope is not None:
            conn.scope.cancel()  # the connection task then closes the WebSocket properly
            with trio.move_on_after(CLOSE_TIMEOUT + 1.0, shield=True):
                await self._stopped.wait()
        self._fail(ClientError("closed", "the client is closed"))

    def _check_room(self) -> None:
        if len(self._handles) >= self._max_streams:
            raise ClientError(
                "too_many_streams", f"this client follows {self._max_streams} streams already"
            )

    async def _request(
        self,
        message: dict[str, Any],
        *,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        retry: bool = True,
    ) -> dict[str, Any]:
        """Send a command on the current connection (waiting for one while reconnecting) and
        return its reply. Idempotent commands (``retry``) are sent again after a drop."""
        async with self._slots:
            while True:
                conn = await self._connection()
                try:
                    return await self._call(conn, message, on_reply=on_reply)
                except ClientError as err:
                    if err.code != "connection_lost":
                        raise
                    if self._fatal is not None:  # why the client stopped says more
                        raise self._fatal.copy() from None
                    if not retry:
                        raise

    async def _connection(self) -> _Connection:
        while True:
            if self._fatal is not None:
                raise self._fatal.copy()
            if self._conn is not None:
                return self._conn
            await self._changed.wait()

    async def _call(
        self,
        conn: _Connection,
        message: dict[str, Any],
        *,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Send on ``conn`` only and wait for the reply; ``connection_lost`` if it drops."""
        ref, pending = self._register(conn, on_reply=on_reply)
        try:
            try:
                await conn.outbox.send(_encode(message, ref))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ClientError("connection_lost", "the connection dropped") from None
            await pending.done.wait()
        finally:
            conn.pending.pop(ref, None)  # a reply after a caller's timeout is ignored
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _register(
        self,
        conn: _Connection,
        *,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        on_error: Callable[[ClientError], None] | None = None,
    ) -> tuple[str, _Pending]:
        if conn.closed:
            raise ClientError("connection_lost", "the connection dropped")
        ref = f"r{next(self._refs)}"
        pending = _Pending(on_reply, on_error)
        conn.pending[ref] = pending
        return ref, pending

    async def _detach(self, handle: StreamHandle) -> None:
        if handle._ended:
            return
        handle.detached = True
        self._forget(handle)
        handle._end()
        conn = self._conn
        if conn is None:
            return  # nothing is attached while down, and reconnecting skips this handle now
        try:
            await self._call(conn, {"type": "stream.detach", "stream": handle.stream_id})
        except ClientError as err:
            if err.code not in ("not_found", "connection_lost"):
                raise

    async def _resync(self, handle: StreamHandle) -> None:
        """Called by a handle's consumer once it has drained an overflowed buffer."""
        conn = self._conn
        if conn is None:
            return  # reconnecting attaches it again
        message = {"type": "stream.detach", "stream": handle.stream_id}
        try:
            await self._call(conn, message)
        except ClientError as err:
            if err.code == "connection_lost":
                return
            if err.code != "not_found":  # not_found: its delivery had already ended
                self._give_up(handle, err)
                return
        if self._conn is not conn or handle._ended:
            return  # a new connection attached it again meanwhile
        handle._overflow = False
        try:
            await self._call(conn, _attach_message(handle))
        except ClientError as err:
            if err.code != "connection_lost":
                self._give_up(handle, err)

    def _give_up(self, handle: StreamHandle, error: ClientError) -> None:
        self._forget(handle)
        handle._end(error)

    def _forget(self, handle: StreamHandle) -> None:
        if self._handles.get(handle.stream_id) is handle:
            del self._handles[handle.stream_id]

    def _fail(self, error: ClientError) -> None:
        """The client is done: every waiting call and every handle gets ``error``."""
        if self._fatal is None:
            self._fatal = error
        if self._conn is not None:
            self._conn.end()
        for handle in list(self._handles.values()):
            handle._end(error.copy())
        self._handles.clear()
        for room in list(self._rooms.values()):
            room._end(error.copy())
        self._rooms.clear()
        self._notify()

    # --- the connection task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then keep a connection until closed or given up. ``started`` after the first
        ``welcome``; a first connection that fails raises :class:`ClientError` instead."""
        backoff = _Backoff(self._backoff_base, self._backoff_max, self._max_attempts)
        first = True

        def welcomed(conn: _Connection) -> None:
            nonlocal first
            backoff.succeeded()
            self.user = conn.user
            if first:
                first = False
                task_status.started()
            else:
                self.reconnects += 1

        try:
            while not self._closing:
                if not first and not await self._wait_to_reconnect(backoff):
                    return
                self.attempts += 1
                try:
                    conn = await self._connect(welcomed)
                except ClientError as err:  # refused for good (4401, 4403)
                    if first:
                        raise
                    self._fail(err)
                    return
                except _Dropped as exc:
                    if first:
                        reason = f"cannot connect to {self.url}: {exc}"
                        raise ClientError("unavailable", reason) from None
                    log.info("connection attempt failed: %s", exc)
                    continue
                backoff.floor = max(backoff.floor, conn.reconnect_after)
                log.info("connection %s closed: %s %s", conn.id, conn.close_code, conn.close_reason)
                error = self._after_close(conn)
                if error is not None:
                    self._fail(error)
                    return
        finally:
            self._stopped.set()

    async def _wait_to_reconnect(self, backoff: _Backoff) -> bool:
        delay = backoff.next_delay()
        if delay is None:
            message = f"gave up reconnecting after {backoff.attempt - 1} attempts"
            self._fail(ClientError("unavailable", message))
            return False
        log.info("reconnecting to %s in %.2f s (attempt %d)", self.url, delay, backoff.attempt)
        await trio.sleep(delay)
        return True

    def _after_close(self, conn: _Connection) -> ClientError | None:
        """The error that ends the client after ``conn`` closed, or None to reconnect."""
        fatal = FATAL_CLOSE_CODES.get(conn.close_code or 0)
        if fatal is not None:
            return ClientError(fatal, conn.close_reason or "refused by the server")
        if not self._reconnect and not self._closing:
            return ClientError("connection_lost", "the connection to the server dropped")
        return None

    async def _connect(self, welcomed: Callable[[_Connection], None]) -> _Connection:
        """One connection attempt and, when it succeeds, its whole life. Returns the closed
        connection; raises ``_Dropped`` when none was made, ClientError when refused for good.

        The client owns the TCP stream (and closes it): trio-websocket leaves a stream open
        when the server closes first."""
        stream = await self._target.open_stream()
        conn: _Connection | None = None
        failure: ClientError | _Dropped | None = None
        async with stream:
            try:
                async with trio.open_nursery() as ws_nursery:
                    ws: WebSocketConnection | None = None
                    try:
                        with trio.move_on_after(CONNECT_TIMEOUT):
                            ws = await wrap_client_stream(
                                ws_nursery,
                                stream,
                                self._target.host_header,
                                self._target.resource,
                                subprotocols=[SUBPROTOCOL],
                                extra_headers=self._headers,
                                message_queue_size=64,
                                max_message_size=MAX_MESSAGE,
                            )
                        if ws is None:
                            raise _Dropped(f"no WebSocket handshake within {CONNECT_TIMEOUT} s")
                        if not self._headers:
                            # Without a token, say so at once: a server that wants one closes
                            # 4401 now instead of after its auth timeout. One that does not
                            # answers with a second `welcome`, which the reader ignores.
                            with contextlib.suppress(ConnectionClosed):  # _welcome says why
                                await ws.send_message(_HELLO)
                        welcome = await _welcome(ws, token_given=bool(self._headers))
                        conn = _Connection(ws, welcome)
                        welcomed(conn)
                        await self._serve(conn)
                    except (ClientError, _Dropped) as err:
                        failure = err
                    finally:
                        if ws is not None:
                            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                                await ws.aclose()
                        ws_nursery.cancel_scope.cancel()  # trio-websocket's reader task
            except* ConnectionRejected as group:  # raised by trio-websocket's reader task
                statuses = {
                    e.status_code for e in group.exceptions if isinstance(e, ConnectionRejected)
                }
                failure = _Dropped(f"upgrade refused (HTTP {', '.join(map(str, statuses))})")
        if failure is not None:
            raise failure
        assert conn is not None
        return conn

    async def _serve(self, conn: _Connection) -> None:
        """Run one connection until it closes: writer, reader, heartbeat; re-attach first."""
        try:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                nursery.start_soon(conn.writer)
                nursery.start_soon(self._reader, conn, nursery.cancel_scope)
                if self._queued is not None:
                    nursery.start_soon(self._consume_queued, conn)
                # Re-attach before any caller may send, so a caller's command cannot overtake.
                for handle in list(self._handles.values()):
                    handle._overflow = False  # nothing of an old attachment arrives here
                    ref, _ = self._register(
                        conn, on_error=functools.partial(self._reattach_failed, handle)
                    )
                    await conn.outbox.send(_encode(_attach_message(handle), ref))
                for room in list(self._rooms.values()):
                    ref, _ = self._register(
                        conn,
                        on_reply=room._rejoined,
                        on_error=functools.partial(self._rejoin_failed, room),
                    )
                    rejoin = {"type": "room.join", "room": room.room, "after": room.last_id}
                    await conn.outbox.send(_encode(rejoin, ref))
                self._conn = conn
                self._notify()
                await self._heartbeat(conn)
                nursery.cancel_scope.cancel()
        finally:
            self._conn = None
            conn.end()
            self._notify()

    async def _consume_queued(self, conn: _Connection) -> None:
        """Queued messages to the caller's handler, each acknowledged after it returned (see
        :mod:`raafd.client.queued`); ends with the connection."""
        assert self._queued is not None

        async def ack(ids: list[str]) -> None:
            try:
                await self._call(conn, {"type": "ack", "ids": ids})
            except ClientError as err:
                if err.code == "connection_lost":
                    raise
                log.warning("ack refused: %s", err)

        with contextlib.suppress(ClientError):  # connection_lost: the next one goes on
            await self._queued.consume(ack)

    def _rejoin_failed(self, room: RoomHandle, error: ClientError) -> None:
        if error.code != "connection_lost":
            if self._rooms.get(room.room) is room:
                del self._rooms[room.room]
            room._end(error)

    def _reattach_failed(self, handle: StreamHandle, error: ClientError) -> None:
        if error.code != "connection_lost":  # that one: the next connection tries again
            self._give_up(handle, error)

    async def _reader(self, conn: _Connection, done: trio.CancelScope) -> None:
        try:
            while True:
                raw = await conn.ws.get_message()
                try:
                    message = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("ignoring a frame that is not JSON")
                    continue
                if isinstance(message, dict):
                    self._dispatch(conn, message)
        except ConnectionClosed as closed:
            reason: CloseReason | None = closed.reason
            if reason is not None:
                conn.close_code, conn.close_reason = reason.code, reason.reason or ""
        done.cancel()

    def _dispatch(self, conn: _Connection, message: dict[str, Any]) -> None:
        kind = message.pop("type", None)
        room = message.get("room")
        if isinstance(room, str) and kind in _ROOM_EVENTS and "ref" not in message:
            joined = self._rooms.get(room)
            if joined is not None:
                joined._offer({"type": kind, **message})
            return
        if kind == "stream.event":
            handle = self._handles.get(message.get("stream", ""))
            if handle is not None and handle._offer(message):
                self._forget(handle)  # its terminal event is queued
            return
        if kind == "queued":
            if self._queued is not None:
                self._queued.offer(message.get("messages"))
            return
        if kind == "presence" and "ref" not in message:  # a watched user changed
            if self._on_presence is not None:
                try:
                    self._on_presence(message)
                except Exception:
                    log.exception("the presence handler failed")
            return
        if kind == "shutdown":
            self.shutdown_notice = {"type": kind, **message}
            after = message.get("reconnect_after")
            if isinstance(after, int | float):
                conn.reconnect_after = float(after)
            return
        ref = message.get("ref")
        pending = conn.pending.pop(ref, None) if isinstance(ref, str) else None
        if pending is None:
            if kind == "error":
                log.warning("error from the server: %s", message.get("message"))
            return
        if kind == "error":
            pending.fail(ClientError.from_wire(message))
        else:
            pending.resolve({"type": kind, **message})

    async def _heartbeat(self, conn: _Connection) -> None:
        """Ping at the server's heartbeat interval; a pong that does not come ends the
        connection (a half-open TCP connection otherwise looks alive for ever)."""
        while True:
            await trio.sleep(conn.heartbeat)
            closed = False
            with trio.move_on_after(conn.heartbeat) as waited:
                try:
                    await conn.ws.ping()
                except ConnectionClosed:
                    closed = True
            if closed:
                await trio.sleep_forever()  # the reader drains what came first, then ends
            if waited.cancelled_caught:
                conn.close_reason = "no pong from the server"
                return


# Frames about a joined room (a reply's stream.event frames carry `room` too).
_ROOM_EVENTS: Final = frozenset(
    {"room.message", "room.member", "room.reply", "typing", "stream.event"}
)


def _attach_message(handle: StreamHandle) -> dict[str, Any]:
    message = {"type": "stream.attach", "stream": handle.stream_id, "after": handle._received}
    if handle.snapshot and handle._received == 0:
        message["snapshot"] = True
    return message


def _encode(message: dict[str, Any], ref: str) -> str:
    return orjson.dumps({**message, "ref": ref}).decode()


async def _welcome(ws: WebSocketConnection, *, token_given: bool) -> dict[str, Any]:
    """The server's first message; a close before it is fatal (4401, 4403) or a drop."""
    with trio.move_on_after(WELCOME_TIMEOUT):
        try:
            raw = await ws.get_message()
        except ConnectionClosed as closed:
            code = closed.reason.code if closed.reason is not None else None
            reason = (closed.reason.reason if closed.reason is not None else None) or ""
            if code in FATAL_CLOSE_CODES or code == CloseCode.TIMEOUT:  # here: the auth timeout
                if code != CloseCode.FORBIDDEN and not token_given:
                    reason = "the server requires a token"
                fatal = FATAL_CLOSE_CODES.get(code, ErrorCode.UNAUTHORIZED)
                raise ClientError(fatal, reason) from None
            raise _Dropped(f"closed before welcome ({code} {reason})".strip()) from None
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict) or message.get("type") != "welcome":
            raise _Dropped("the server did not start with welcome")
        return message
    raise _Dropped(f"no welcome within {WELCOME_TIMEOUT} s")


@contextlib.asynccontextmanager
async def open_client(
    url: str = DEFAULT_URL,
    *,
    token: str | None = None,
    agent: str | None = None,
    reconnect: bool = True,
    backoff_base: float = 0.2,
    backoff_max: float = 10.0,
    max_attempts: int | None = None,
    stream_buffer: int = 256,
    max_pending: int = 64,
    max_streams: int = 32,
    ssl_context: ssl.SSLContext | None = None,
    on_queued: QueuedHandler | None = None,
    on_presence: Callable[[dict[str, Any]], None] | None = None,
    queued_buffer: int = 1000,
    room_buffer: int = 1000,
) -> AsyncIterator[RaafdClient]:
    """Connect to a raafd daemon's WebSocket endpoint; yields a :class:`RaafdClient`.

    The first connection is made before the block runs; when it fails, this raises
    :class:`ClientError` (``unauthorized``, ``forbidden``, ``unavailable``). Later drops are
    reconnected with exponential backoff and jitter (at least a ``shutdown``'s
    ``reconnect_after``; ``max_attempts`` in a row at most, unlimited when None) unless
    ``reconnect`` is False; open streams resume where they were.

    ``token`` is sent as ``Authorization: Bearer``. ``agent`` is the default for
    :meth:`RaafdClient.start`. Bounds: ``stream_buffer`` events buffered per stream,
    ``max_pending`` commands in flight, ``max_streams`` streams followed at once.
    ``ssl_context`` is for ``wss://`` URLs (default: the system's trust store).

    ``on_queued``: an async handler for your offline queue's messages (direct messages …);
    each is acknowledged only after the handler returned for it, and one it raises for is
    delivered again later (see :mod:`raafd.client.queued`; at most ``queued_buffer`` wait).
    Without it nothing is acknowledged and the server keeps the queue. ``on_presence``: called
    (in the reader: do not block) with each ``presence`` change of the users you watch.
    ``room_buffer``: events buffered per joined room (past it messages are read back from the
    room's history once the caller catches up; other room events are dropped).

    The block runs inside the client's nursery: an exception escaping it comes out in an
    ``ExceptionGroup``, as with any trio nursery.
    """
    client = RaafdClient(
        url,
        token=token,
        agent=agent,
        reconnect=reconnect,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        max_attempts=max_attempts,
        stream_buffer=stream_buffer,
        max_pending=max_pending,
        max_streams=max_streams,
        ssl_context=ssl_context,
        on_queued=on_queued,
        on_presence=on_presence,
        queued_buffer=queued_buffer,
        room_buffer=room_buffer,
    )
    failed: ClientError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(client.run)
        except ClientError as err:
            failed = err  # the task has ended; raised below, outside the nursery
        else:
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
