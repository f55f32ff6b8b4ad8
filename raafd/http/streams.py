"""HTTP streaming: ``/v1/streams`` as SSE, NDJSON or plain JSON.

The transport only frames: each stream event's pre-encoded JSON becomes an SSE frame
(``id: seq``, ``event: kind``, ``data: json``) or an NDJSON line. While nothing else is sent a
heartbeat goes out every ``http.heartbeat_interval`` (an SSE comment, or an NDJSON
``{"event": "heartbeat"}`` line), so proxies do not cut a long wait for the first token. A client
that closes the response detaches from the stream; the stream's detach grace then applies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import trio

from raafd.errors import BadRequest, Unavailable
from raafd.http.asgi import JSONResponse, Request, Response, Router, StreamingResponse
from raafd.protocol.commands import StreamStart
from raafd.protocol.events import StreamEvent

if TYPE_CHECKING:
    from raafd.daemon import Daemon

__all__ = ["add_stream_routes", "event_stream", "framing_for", "sse_frame"]

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
_SSE_HEARTBEAT = b": heartbeat\n\n"
_NDJSON_HEARTBEAT = b'{"event":"heartbeat"}\n'


def sse_frame(event: StreamEvent) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.kind.encode(), event.json)


def ndjson_line(event: StreamEvent) -> bytes:
    return event.json + b"\n"


def framing_for(accept: str, default: str | None) -> str | None:
    """SSE or NDJSON by the ``Accept`` header, else ``default``."""
    if SSE in accept:
        return SSE
    if NDJSON in accept:
        return NDJSON
    return default


def event_stream(daemon: Daemon, stream_id: str, after: int, framing: str) -> StreamingResponse:
    """Replay and follow a stream as SSE or NDJSON from ``after``. A missing stream or an
    ``after`` the log no longer holds is refused here, before any header is sent."""
    daemon.streams.get(stream_id).log.check(after)
    frame = sse_frame if framing == SSE else ndjson_line
    heartbeat = _SSE_HEARTBEAT if framing == SSE else _NDJSON_HEARTBEAT
    sent = daemon.metrics.events_sent.labels("sse" if framing == SSE else "ndjson")

    async def body() -> AsyncIterator[bytes]:
        interval = daemon.config.http.heartbeat_interval
        async with daemon.streams.subscribe(stream_id, after) as subscription:
            iterator = subscription.__aiter__()
            while True:
                batch = None
                with trio.move_on_after(interval):
                    try:
                        batch = await iterator.__anext__()
                    except StopAsyncIteration:
                        return
                if batch is None:
                    yield heartbeat
                    continue
                sent.inc(len(batch))
                yield b"".join([frame(e) for e in batch])

    return StreamingResponse(body, framing, headers={"x-raafd-stream": stream_id})


def add_stream_routes(router: Router, daemon: Daemon) -> None:
    def manager() -> Any:
        return daemon.streams

    async def start(request: Request) -> Response | StreamingResponse:
        if daemon.draining:
            raise Unavailable("the server is draining", retry_after=1)
        cmd = await request.json(StreamStart)
        stream = manager().start(
            agent=cmd.agent,
            messages=cmd.conversation(),
            stream_id=cmd.stream,
            owner=f"http:{request.id}",
            session=cmd.session,
        )
        framing = framing_for(request.headers.get("accept", ""), None)
        if framing is None:
            return JSONResponse(
                {"stream": stream.id}, 201, {"location": f"/v1/streams/{stream.id}"}
            )
        return event_stream(daemon, stream.id, 0, framing)

    async def status(request: Request, stream_id: str) -> Response:
        return JSONResponse(manager().get(stream_id).info())

    async def events(request: Request, stream_id: str) -> StreamingResponse:
        after_text = request.headers.get("last-event-id") or request.query.get("after", "0")
        if not after_text.isdigit():
            raise BadRequest("after must be a non-negative integer", field="after")
        framing = framing_for(request.headers.get("accept", ""), SSE) or SSE
        return event_stream(daemon, stream_id, int(after_text), framing)

    def control(action: str) -> Callable[..., Any]:
        async def handler(request: Request, stream_id: str) -> Response:
            m = manager()
            if action == "cancel":
                m.cancel(stream_id, "client")
            elif action == "pause":
                m.pause(stream_id)
            else:
                m.resume(stream_id)
            return JSONResponse(m.get(stream_id).info())

        return handler

    router.add("POST", "/v1/streams", start)
    router.add("GET", "/v1/streams/{stream_id}", status)
    router.add("GET", "/v1/streams/{stream_id}/events", events)
    for action in ("cancel", "pause", "resume"):
        router.add("POST", f"/v1/streams/{{stream_id}}/{action}", control(action))
