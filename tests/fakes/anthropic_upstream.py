"""A fake Anthropic Messages API: real HTTP/1.1 (h11 over trio sockets), real event streams.

Start it in a nursery and point a provider at ``fake.base_url``::

    fake = FakeAnthropic()
    port = await nursery.start(fake.run)

``POST /v1/messages`` with ``stream: true`` answers the event stream the real API sends, each
event framed as ``event: NAME`` + ``data: JSON`` and written as its own HTTP chunk::

    message_start (usage: input_tokens, output_tokens 1) · ping ·
    [thinking block: thinking_delta …, signature_delta] ·
    [text block: text_delta …] ·
    [tool_use blocks: input_json_delta "" then the input JSON in fragments] ·
    message_delta … (stop_reason, cumulative usage) · message_stop

with extra ``ping`` events among the deltas when a script asks. Each request takes the next
:class:`AnthropicScript` pushed with :meth:`FakeAnthropic.push`, or the default one; a script
can also answer an HTTP error with Anthropic's error body (429 with ``retry-after``, 529
overloaded …), put an ``error`` event mid-stream, cut the connection, or stall. Like the real
API it refuses a request without ``x-api-key`` (401), without ``anthropic-version`` or
``max_tokens``, or with a role other than user/assistant in ``messages`` (400).

Every request is recorded (:class:`RecordedRequest`) with a ``closed`` event set when its
connection ends and ``closed_by_client`` telling who closed it; a watcher task reads the socket
while the answer streams, so a client's close is seen at once.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import attrs
import h11
import orjson
import trio

from .openai_upstream import RecordedRequest

__all__ = ["AnthropicScript", "FakeAnthropic", "ScriptedUpstream", "ToolUse"]

MAX_REQUEST_BODY = 4 << 20
S = TypeVar("S")


@attrs.frozen
class ToolUse:
    """One ``tool_use`` block: ``input`` (a JSON text) is streamed in ``fragments`` pieces."""

    name: str
    input: str
    id: str = "toolu_01"
    fragments: int = 8


@attrs.frozen
class AnthropicScript:
    """What the fake answers to one request. Counts (``close_after`` …) are in deltas: the
    thinking pieces, the text pieces, then the tool-input fragments."""

    deltas: int = 16
    interval: float = 0.0  # seconds between deltas
    pieces: tuple[str, ...] | None = None  # text pieces; default ``deltas`` generated words
    first_delay: float = 0.0
    model: str = "claude-fake"
    thinking: tuple[str, ...] = ()  # pieces of a thinking block before the text
    tool_uses: tuple[ToolUse, ...] = ()
    stop_reason: str | None = None  # default "end_turn", or "tool_use" when there are some
    input_tokens: int = 11
    cache_read_tokens: int = 0
    usage_steps: int = 1  # message_delta events, each with the cumulative output_tokens
    ping_every: int = 0  # a ping after every N deltas too (one after the first block start)
    message_stop: bool = True
    # failures
    status: int = 200
    error_type: str = "invalid_request_error"  # of the HTTP error body or the error event
    error_message: str = "fake upstream error"
    echo_key: bool = False  # put the request's x-api-key into the error message
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers
    close_after: int | None = None  # cut the connection after this many deltas
    error_after: int | None = None  # send an ``error`` event after this many deltas
    hang_after: int | None = None  # stop sending (connection kept open) after this many

    @classmethod
    def rate_limited(cls, retry_after: str = "1", **kw: Any) -> AnthropicScript:
        return cls(
            status=429,
            error_type="rate_limit_error",
            error_message="Number of request tokens has exceeded your per-minute rate limit",
            headers=(("retry-after", retry_after),),
            **kw,
        )

    @classmethod
    def overloaded(cls, **kw: Any) -> AnthropicScript:
        return cls(status=529, error_type="overloaded_error", error_message="Overloaded", **kw)

    @property
    def text_pieces(self) -> tuple[str, ...]:
        if self.pieces is not None:
            return self.pieces
        return tuple(f"tok{i} " for i in range(self.deltas))

    @property
    def final_stop_reason(self) -> str:
        if self.stop_reason is not None:
            return self.stop_reason
        return "tool_use" if self.tool_uses else "end_turn"


def split(text: str, parts: int) -> list[str]:
    """``text`` in ``parts`` nearly equal non-empty pieces (fewer if it is shorter)."""
    parts = max(1, min(parts, len(text) or 1))
    step, extra = divmod(len(text), parts)
    out, at = [], 0
    for i in range(parts):
        size = step + (1 if i < extra else 0)
        out.append(text[at : at + size])
        at += size
    return out


def _event(name: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def encode(script: AnthropicScript, request_id: str) -> list[tuple[bytes, bool]]:
    """The answer's events in order, each with whether it is a delta."""
    frames: list[tuple[bytes, bool]] = []
    deltas = 0
    ping = _event("ping", {"type": "ping"})

    def add(name: str, doc: dict[str, Any], *, delta: bool = False) -> None:
        nonlocal deltas
        frames.append((_event(name, doc), delta))
        if delta:
            deltas += 1
            if script.ping_every and deltas % script.ping_every == 0:
                frames.append((ping, False))

    usage = {
        "input_tokens": script.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": script.cache_read_tokens,
        "output_tokens": 1,
    }
    add(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": f"msg_{request_id}",
                "type": "message",
                "role": "assistant",
                "model": script.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage,
            },
        },
    )
    index = 0

    def start(block: dict[str, Any]) -> None:
        add("content_block_start", {"type": "content_block_start", "index": index, **block})
        if index == 0:
            frames.append((ping, False))  # where the real API sends its first ping

    def stop() -> None:
        nonlocal index
        add("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1

    def block_delta(delta: dict[str, Any], *, counts: bool = True) -> None:
        doc = {"type": "content_block_delta", "index": index, "delta": delta}
        add("content_block_delta", doc, delta=counts)

    if script.thinking:
        start({"content_block": {"type": "thinking", "thinking": "", "signature": ""}})
        for piece in script.thinking:
            block_delta({"type": "thinking_delta", "thinking": piece})
        block_delta({"type": "signature_delta", "signature": "EqQBCgIYAhIM"}, counts=False)
        stop()
    if script.text_pieces:
        start({"content_block": {"type": "text", "text": ""}})
        for piece in script.text_pieces:
            block_delta({"type": "text_delta", "text": piece})
        stop()
    for tool in script.tool_uses:
        block = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
        start({"content_block": block})
        block_delta({"type": "input_json_delta", "partial_json": ""}, counts=False)
        if tool.input:
            for piece in split(tool.input, tool.fragments):
                block_delta({"type": "input_json_delta", "partial_json": piece})
        stop()
    steps = max(1, script.usage_steps)
    for step in range(1, steps + 1):
        final = step == steps
        doc = {
            "type": "message_delta",
            "delta": {
                "stop_reason": script.final_stop_reason if final else None,
                "stop_sequence": None,
            },
            "usage": {"output_tokens": max(1, deltas * step // steps)},
        }
        add("message_delta", doc)
    if script.message_stop:
        add("message_stop", {"type": "message_stop"})
    return frames


def output_tokens(script: AnthropicScript) -> int:
    """The ``output_tokens`` of the script's last ``message_delta``."""
    return sum(1 for _, delta in encode(script, "x") if delta)


class ClientClosed(Exception):
    """The client closed the connection while the answer streamed."""


class ScriptedUpstream(Generic[S]):
    """A scripted HTTP/1.1 upstream on 127.0.0.1: the connection loop, the request record and
    the script queue, shared by the fakes of this package; a subclass answers in
    :meth:`respond`."""

    def __init__(self, default: S, *, max_recorded: int = 1024) -> None:
        self.default = default
        self.port = 0
        self.requests: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self.request_count = 0
        self._scripts: deque[S] = deque()
        self._arrived = trio.Event()  # set and replaced on each request

    def push(self, *scripts: S) -> None:
        """Queue scripts for the next requests, in order; then the default applies again."""
        self._scripts.extend(scripts)

    async def wait_for_requests(self, count: int) -> None:
        """Return once ``count`` requests have arrived in all (put a timeout around it)."""
        while self.request_count < count:
            await self._arrived.wait()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound port."""
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, self._serve_connection, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)

    async def respond(
        self, stream: trio.SocketStream, conn: h11.Connection, rec: RecordedRequest, script: S
    ) -> bool:
        """Answer one request; False when the connection must not be reused."""
        raise NotImplementedError

    async def stream_body(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        rec: RecordedRequest,
        body: Callable[[], Awaitable[bool]],
    ) -> bool:
        """Run ``body`` (which writes a streamed answer) while watching for the client's close;
        raise :class:`ClientClosed` when it closed."""
        keep_alive = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_client, stream, conn, rec, nursery.cancel_scope)
            try:
                keep_alive = await body()
            except trio.BrokenResourceError:  # the client reset the connection
                rec.mark_closed(by_client=True)
            nursery.cancel_scope.cancel()
        if rec.closed_by_client:
            raise ClientClosed
        return keep_alive

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 << 10)
        last: RecordedRequest | None = None
        try:
            while True:
                request, body = await receive_request(stream, conn)
                if request is None:
                    if last is not None:
                        last.mark_closed(by_client=True)
                    return
                last = RecordedRequest(
                    method=request.method.decode(),
                    path=request.target.decode(),
                    headers={k.decode(): v.decode() for k, v in request.headers},
                    body=body,
                    started_at=trio.current_time(),
                )
                self.requests.append(last)
                self.request_count += 1
                self._arrived.set()
                self._arrived = trio.Event()
                script = self._scripts.popleft() if self._scripts else self.default
                keep_alive = await self.respond(stream, conn, last, script)
                if not keep_alive or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ClientClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            if last is not None:
                last.mark_closed(by_client=True)
        except h11.RemoteProtocolError:
            pass
        finally:
            if last is not None:
                last.mark_closed(by_client=False)
            await stream.aclose()


class FakeAnthropic(ScriptedUpstream[AnthropicScript]):
    """See the module docstring."""

    def __init__(self, default: AnthropicScript | None = None, *, max_recorded: int = 1024) -> None:
        super().__init__(
            default if default is not None else AnthropicScript(), max_recorded=max_recorded
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def respond(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        rec: RecordedRequest,
        script: AnthropicScript,
    ) -> bool:
        request_id = f"req_fake{self.request_count:04d}"
        refusal = _refusal(rec)
        if refusal is not None:
            status, kind, message = refusal
            await _send_error(stream, conn, rec, status, kind, message, request_id)
            return True
        if script.status != 200:
            message = script.error_message
            if script.echo_key:
                message += f" (invalid x-api-key: {rec.headers.get('x-api-key', '')})"
            status, kind = script.status, script.error_type
            await _send_error(stream, conn, rec, status, kind, message, request_id, script.headers)
            return True
        body = functools.partial(_stream_events, stream, conn, rec, script, request_id)
        return await self.stream_body(stream, conn, rec, body)


def _refusal(rec: RecordedRequest) -> tuple[int, str, str] | None:
    """What the real API answers to a request it refuses: (status, error type, message)."""
    path = rec.path.split("?", 1)[0]
    if rec.method != "POST" or path != "/v1/messages":
        return 404, "not_found_error", f"Not Found: {rec.method} {path}"
    if not rec.headers.get("x-api-key"):
        return 401, "authentication_error", "x-api-key header is required"
    if not rec.headers.get("anthropic-version"):
        return 400, "invalid_request_error", "anthropic-version: header is required"
    try:
        body = rec.json
    except orjson.JSONDecodeError:
        return 400, "invalid_request_error", "There was an error parsing the body"
    if not isinstance(body, dict):
        return 400, "invalid_request_error", "The body must be an object"
    if not isinstance(body.get("max_tokens"), int):
        return 400, "invalid_request_error", "max_tokens: Field required"
    if body.get("stream") is not True:
        return 400, "invalid_request_error", "this fake only streams: stream must be true"
    for i, message in enumerate(body.get("messages") or ()):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            return (
                400,
                "invalid_request_error",
                f'messages.{i}.role: Input should be "user" or "assistant"',
            )
    return None


async def receive_request(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY:
                raise h11.RemoteProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


async def watch_client(
    stream: trio.SocketStream, conn: h11.Connection, rec: RecordedRequest, scope: trio.CancelScope
) -> None:
    """While the answer streams, see the client close at once (not at the next write)."""
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            conn.receive_data(data)  # a pipelined request: h11 keeps it for the next cycle
    except trio.BrokenResourceError:
        pass
    rec.mark_closed(by_client=True)
    scope.cancel()


async def _stream_events(
    stream: trio.SocketStream,
    conn: h11.Connection,
    rec: RecordedRequest,
    script: AnthropicScript,
    request_id: str,
) -> bool:
    head = h11.Response(
        status_code=200,
        headers=[
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("request-id", request_id),
            ("transfer-encoding", "chunked"),
            *script.headers,
        ],
    )
    # Events are framed as HTTP chunks here, past h11 (which only tracks the state).
    await stream.send_all(conn.send(head) or b"")
    if script.first_delay:
        await trio.sleep(script.first_delay)
    next_at = trio.current_time()
    sent = 0
    for frame, is_delta in encode(script, request_id):
        if is_delta:
            if sent == script.close_after:
                return False  # the connection is closed mid-body
            if sent == script.hang_after:
                await trio.sleep_forever()
            if sent == script.error_after:
                error = {
                    "type": "error",
                    "error": {"type": script.error_type, "message": script.error_message},
                }
                await stream.send_all(http_chunk(_event("error", error)))
                break
            if sent and script.interval:
                next_at += script.interval
                await trio.sleep_until(next_at)
        await stream.send_all(http_chunk(frame))
        if is_delta:
            sent += 1
            rec.deltas_sent = sent
    else:
        if script.close_after is not None and script.close_after >= sent:
            return False
        if script.hang_after is not None and script.hang_after >= sent:
            await trio.sleep_forever()
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    rec.completed = True
    return True


async def _send_error(
    stream: trio.SocketStream,
    conn: h11.Connection,
    rec: RecordedRequest,
    status: int,
    kind: str,
    message: str,
    request_id: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    doc = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    body = orjson.dumps(doc)
    head = h11.Response(
        status_code=status,
        headers=[
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("request-id", request_id),
            *headers,
        ],
    )
    data = conn.send(head) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    rec.completed = True
