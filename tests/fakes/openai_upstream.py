"""A fake OpenAI-compatible Chat Completions server: real HTTP/1.1 (h11 over trio sockets).

Start it in a nursery and point a provider at ``fake.base_url``::

    fake = FakeOpenAI()
    port = await nursery.start(fake.run)

Each request takes the next :class:`Script` pushed with :meth:`FakeOpenAI.push`, or the default
one. A script says what to answer: how many content deltas at what pace (default 64 at 20 ms,
the benchmark's shape), tool calls with arguments split across fragments, where the usage and
finish reason go, and failures (an HTTP error status with an OpenAI-shaped error body and extra
headers, a connection cut mid-stream, a body that ends before the answer does, an ``error``
object in a data line, a stall).

Every request is recorded (:class:`RecordedRequest`: headers, JSON body, deltas sent) with a
``closed`` event set when its connection ends, and ``closed_by_client`` telling whether the
client closed it, so tests can prove that cancelling a stream closed the upstream connection.
A watcher task reads the socket while the response streams, so a client's close is seen at once
rather than at the next write.

It is also the benchmark's upstream, so the wire bytes of a script (SSE lines already framed
as HTTP chunks) are encoded once and cached.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any

import attrs
import h11
import orjson
import trio

__all__ = ["FakeOpenAI", "RecordedRequest", "Script", "ToolCallScript"]

MAX_REQUEST_BODY = 4 << 20
MAX_ENCODED = 64  # scripts whose wire bytes a fake keeps
CREATED = 1_700_000_000


@attrs.frozen(cache_hash=True)
class ToolCallScript:
    """One tool call: ``arguments`` (a JSON text) is sent in ``fragments`` pieces."""

    name: str
    arguments: str
    id: str = "call_0"
    fragments: int = 8


@attrs.frozen(cache_hash=True)
class Script:
    """What the fake answers to one request. Counts (``close_after`` …) are in body deltas: the
    content pieces, then the tool-call fragments (in writes when ``burst`` > 1)."""

    deltas: int = 64
    interval: float = 0.02  # seconds between deltas
    pieces: tuple[str, ...] | None = None  # content pieces; default ``deltas`` generated words
    first_delay: float = 0.0  # seconds before the first delta
    burst: int = 1  # body deltas per write (``interval`` is then between writes)
    model: str = "fake-model"
    tool_calls: tuple[ToolCallScript, ...] = ()
    finish_reason: str | None = None  # default "stop", or "tool_calls" when there are some
    prompt_tokens: int = 7
    usage: bool = True  # send the usage chunk (``choices: []``)
    usage_with_finish: bool = False  # finish_reason on the usage chunk (llama.cpp style)
    done: bool = True  # end with ``data: [DONE]``
    role_content_null: bool = False  # the first (role) chunk has ``content: null``
    stream: bool | None = None  # None: as the request asks; False: a JSON chat.completion
    # failures
    status: int = 200
    error_message: str = "fake upstream error"
    error_type: str = "invalid_request_error"
    echo_authorization: bool = False  # put the request's Authorization value in the message
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (Retry-After …)
    close_after: int | None = None  # cut the connection after this many deltas
    end_after: int | None = None  # end the HTTP body (well framed) after this many deltas
    close_after_finish: bool = False  # cut the connection after the finish_reason chunk
    error_after: int | None = None  # send a data line with an ``error`` object after this many
    hang_after: int | None = None  # stop sending (connection kept open) after this many

    @classmethod
    def rate_limited(cls, retry_after: str = "1", **kw: Any) -> Script:
        return cls(
            status=429,
            error_message="Rate limit reached",
            error_type="rate_limit_error",
            headers=(("retry-after", retry_after),),
            **kw,
        )

    @classmethod
    def server_error(cls, status: int = 500, **kw: Any) -> Script:
        return cls(
            status=status, error_message="The server had an error", error_type="server_error", **kw
        )

    @property
    def content_pieces(self) -> tuple[str, ...]:
        if self.pieces is not None:
            return self.pieces
        return tuple(f"tok{i} " for i in range(self.deltas))

    @property
    def text(self) -> str:
        return "".join(self.content_pieces)

    @property
    def final_finish_reason(self) -> str:
        if self.finish_reason is not None:
            return self.finish_reason
        return "tool_calls" if self.tool_calls else "stop"


@attrs.define(eq=False)
class RecordedRequest:
    """One request as the fake saw it, and what became of its connection."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes
    started_at: float
    deltas_sent: int = 0
    completed: bool = False  # the whole response was sent
    closed_at: float | None = None
    closed_by_client: bool = False
    closed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    def mark_closed(self, *, by_client: bool) -> None:
        if not self.closed.is_set():
            self.closed_at = trio.current_time()
            self.closed_by_client = by_client
            self.closed.set()


@attrs.frozen
class _Frames:
    head: bytes  # the role chunk
    body: tuple[bytes, ...]  # one HTTP chunk per delta
    tail: bytes  # finish, usage, [DONE]
    error: bytes  # an ``error`` data line
    finish: bytes  # the finish_reason chunk alone


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def _chunk_doc(script: Script, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": script.model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if script.usage:
        doc["usage"] = None  # what OpenAI sends on every chunk when include_usage is on
    return doc


def _split(text: str, parts: int) -> list[str]:
    parts = max(1, min(parts, len(text) or 1))
    step, extra = divmod(len(text), parts)
    out, at = [], 0
    for i in range(parts):
        size = step + (1 if i < extra else 0)
        out.append(text[at : at + size])
        at += size
    return out


def _usage(script: Script, frames: _Frames) -> dict[str, int]:
    completion = len(frames.body)
    return {
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": script.prompt_tokens + completion,
    }


def _encode(script: Script) -> _Frames:
    content = None if script.role_content_null else ""
    role: dict[str, Any] = {"role": "assistant", "content": content}
    head = _sse(_chunk_doc(script, role, None))
    body = [_sse(_chunk_doc(script, {"content": piece}, None)) for piece in script.content_pieces]
    for index, call in enumerate(script.tool_calls):
        first = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        body.append(_sse(_chunk_doc(script, {"tool_calls": [first]}, None)))
        for piece in _split(call.arguments, call.fragments):
            fragment = {"index": index, "function": {"arguments": piece}}
            body.append(_sse(_chunk_doc(script, {"tool_calls": [fragment]}, None)))
    finish = script.final_finish_reason
    tail = b""
    if not script.usage_with_finish:
        tail += _sse(_chunk_doc(script, {}, finish))
    if script.usage or script.usage_with_finish:
        usage_doc = _chunk_doc(script, {}, finish)
        if not script.usage_with_finish:
            usage_doc["choices"] = []
        usage_doc["usage"] = {
            "prompt_tokens": script.prompt_tokens,
            "completion_tokens": len(body),
            "total_tokens": script.prompt_tokens + len(body),
        }
        tail += _sse(usage_doc)
    if script.done:
        tail += b"data: [DONE]\n\n"
    error = _sse(
        {"error": {"message": script.error_message, "type": script.error_type, "code": None}}
    )
    return _Frames(
        head=_http_chunk(head),
        body=tuple(_http_chunk(b) for b in body),
        tail=_http_chunk(tail),
        error=_http_chunk(error),
        finish=_http_chunk(_sse(_chunk_doc(script, {}, finish))),
    )


class _ClientClosed(Exception):
    pass


class FakeOpenAI:
    """See the module docstring."""

    def __init__(self, default: Script | None = None, *, max_recorded: int = 4096) -> None:
        self.default = default if default is not None else Script()
        self.port = 0
        self.requests: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self.request_count = 0
        self._scripts: deque[Script] = deque()
        self._arrived = trio.Event()  # set and replaced on each request
        self._encoded: dict[Script, _Frames] = {}  # wire bytes per script, encoded once

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def wait_for_requests(self, count: int) -> None:
        """Return once ``count`` requests have arrived in all (put a timeout around it)."""
        while self.request_count < count:
            await self._arrived.wait()

    def _frames(self, script: Script) -> _Frames:
        frames = self._encoded.get(script)
        if frames is None:
            if len(self._encoded) >= MAX_ENCODED:
                self._encoded.clear()
            frames = self._encoded[script] = _encode(script)
        return frames

    def push(self, *scripts: Script) -> None:
        """Queue scripts for the next requests, in order; then the default applies again."""
        self._scripts.extend(scripts)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound port."""
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, self._serve_connection, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)

    # --- one connection ---------------------------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 << 10)
        last: RecordedRequest | None = None
        try:
            while True:
                request, body = await self._receive_request(stream, conn)
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
                keep_alive = await self._respond(stream, conn, last, script)
                if not keep_alive or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (_ClientClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            if last is not None:
                last.mark_closed(by_client=True)
        except h11.RemoteProtocolError:
            pass
        finally:
            if last is not None:
                last.mark_closed(by_client=False)
            await stream.aclose()

    async def _receive_request(
        self, stream: trio.SocketStream, conn: h11.Connection
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

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, rec: RecordedRequest, script: Script
    ) -> bool:
        """Answer one request; False when the connection must not be reused."""
        path = rec.path.split("?", 1)[0]
        if rec.method == "GET" and path.endswith("/models"):
            doc = {"object": "list", "data": [{"id": script.model, "object": "model"}]}
            await self._send_json(stream, conn, rec, 200, doc, ())
            return True
        if rec.method != "POST" or not path.endswith("/chat/completions"):
            await self._send_error(stream, conn, rec, 404, f"no route for {rec.method} {path}")
            return True
        if script.status != 200:
            message = script.error_message
            if script.echo_authorization:
                message += f" (Incorrect API key provided: {rec.headers.get('authorization', '')})"
            await self._send_error(
                stream, conn, rec, script.status, message, script.error_type, script.headers
            )
            return True
        try:
            wants_stream = bool(rec.json.get("stream"))
        except (orjson.JSONDecodeError, AttributeError):
            await self._send_error(stream, conn, rec, 400, "the body is not a JSON object")
            return True
        if script.stream is False or (script.stream is None and not wants_stream):
            await self._send_completion(stream, conn, rec, script)
            return True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, stream, conn, rec, nursery.cancel_scope)
            try:
                keep_alive = await self._stream_chunks(stream, conn, rec, script)
            except trio.BrokenResourceError:  # the client reset the connection
                rec.mark_closed(by_client=True)
            nursery.cancel_scope.cancel()
        if rec.closed_by_client:
            raise _ClientClosed
        return keep_alive

    async def _watch_client(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        rec: RecordedRequest,
        scope: trio.CancelScope,
    ) -> None:
        """While the response streams, see the client close at once (not at the next write)."""
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

    async def _stream_chunks(
        self, stream: trio.SocketStream, conn: h11.Connection, rec: RecordedRequest, script: Script
    ) -> bool:
        frames = self._frames(script)
        head = h11.Response(
            status_code=200,
            headers=[
                ("content-type", "text/event-stream; charset=utf-8"),
                ("cache-control", "no-cache"),
                ("transfer-encoding", "chunked"),
                *script.headers,
            ],
        )
        # The frames are already HTTP chunks, written past h11 (which only tracks the state).
        await stream.send_all((conn.send(head) or b"") + frames.head)
        if script.first_delay:
            await trio.sleep(script.first_delay)
        next_at = trio.current_time()
        ending = frames.tail
        body = frames.body
        if script.burst > 1:  # several deltas in one write: one read for the client, mostly
            body = [b"".join(body[i : i + script.burst]) for i in range(0, len(body), script.burst)]
        for i, frame in enumerate(body):
            if i == script.close_after:
                return False  # the connection is closed mid-body
            if i == script.end_after:  # the body ends, no finish, usage or [DONE]
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                rec.completed = True
                return True
            if i == script.hang_after:
                await trio.sleep_forever()
            if i == script.error_after:
                ending = frames.error
                break
            if i and script.interval:
                next_at += script.interval
                await trio.sleep_until(next_at)
            await stream.send_all(frame)
            rec.deltas_sent += min(script.burst, len(frames.body) - i * script.burst)
        else:
            if script.close_after is not None and script.close_after >= len(body):
                return False
            if script.hang_after is not None and script.hang_after >= len(body):
                await trio.sleep_forever()
        if script.close_after_finish:
            await stream.send_all(frames.finish)
            return False
        # The ending and the body's terminator in one write, as real servers flush them.
        await stream.send_all(ending + (conn.send(h11.EndOfMessage()) or b""))
        rec.completed = True
        return True

    async def _send_completion(
        self, stream: trio.SocketStream, conn: h11.Connection, rec: RecordedRequest, script: Script
    ) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": script.text or None}
        if script.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in script.tool_calls
            ]
        doc = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": CREATED,
            "model": script.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": script.final_finish_reason}
            ],
        }
        if script.usage:
            doc["usage"] = _usage(script, self._frames(script))
        await self._send_json(stream, conn, rec, 200, doc, script.headers)

    async def _send_error(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        rec: RecordedRequest,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        doc = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        await self._send_json(stream, conn, rec, status, doc, headers)

    async def _send_json(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        rec: RecordedRequest,
        status: int,
        doc: Any,
        headers: tuple[tuple[str, str], ...],
    ) -> None:
        body = orjson.dumps(doc)
        head = h11.Response(
            status_code=status,
            headers=[
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                *headers,
            ],
        )
        data = conn.send(head) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        rec.completed = True
