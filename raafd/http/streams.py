"""HTTP streaming: ``/v1/streams`` as SSE, NDJSON or plain JSON.

The transport only frames: each stream event's pre-encoded JSON becomes an SSE frame
(``id: seq``, ``event: kind``, ``data: json``) or an NDJSON line. While nothing else is sent a
heartbeat goes out every ``http.heartbeat_interval`` (an SSE comment, or an NDJSON
``{"event": "heartbeat"}`` line), so proxies do not cut a long wait for the first token. A client
that closes the response detaches from the stream; the stream's detach grace then applies.

Two servers use this module. The SSE and NDJSON responses of ``POST /v1/streams`` and
``GET /v1/streams/{id}/events`` are normally served by raafd's raw HTTP/1.1 path
(:mod:`raafd.http.raw`), which pushes live events straight to the socket; the handlers here
serve them when a connection is already in hypercorn's hands (it began with another request)
and serve everything else. Both validate and frame through the same functions below
(:func:`start_stream`, :func:`replay_after`, :data:`FRAMINGS`), so the two paths answer alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from raafd.auth import Principal
from raafd.errors import BadRequest, RaafdError, Unavailable
from raafd.http.asgi import (
    JSONResponse,
    Request,
    Response,
    Router,
    StreamingResponse,
    decode_body,
)
from raafd.http.context import StreamingContext
from raafd.logging import get_logger
from raafd.net.delivery import Sink
from raafd.protocol.commands import StreamStart
from raafd.protocol.events import StreamEvent

if TYPE_CHECKING:
    from raafd.core.feed import Subscription
    from raafd.streams import Stream

__all__ = [
    "FRAMINGS",
    "NDJSON",
    "SSE",
    "Framing",
    "add_stream_routes",
    "event_stream",
    "framing_for",
    "ndjson_line",
    "replay_after",
    "snapshot_param",
    "sse_frame",
    "start_stream",
]

log = get_logger("raafd.http")

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


def sse_frame(event: StreamEvent) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.kind.encode(), event.json)


def ndjson_line(event: StreamEvent) -> bytes:
    return event.json + b"\n"


@attrs.frozen
class Framing:
    """How one streaming transport frames events (a :class:`raafd.net.delivery.Framing`);
    shared by the ASGI path (``event_stream``) and the raw streaming server
    (:mod:`raafd.http.raw`)."""

    content_type: str
    transport: str  # the `transport` label of raafd_events_sent_total
    frame: Callable[[StreamEvent], bytes]
    heartbeat: bytes

    def event(self, event: StreamEvent) -> bytes:
        return self.frame(event)

    def batch(self, events: list[StreamEvent]) -> bytes:
        frame = self.frame
        return b"".join([frame(e) for e in events])


FRAMINGS: dict[str, Framing] = {
    SSE: Framing(SSE, "sse", sse_frame, b": heartbeat\n\n"),
    NDJSON: Framing(NDJSON, "ndjson", ndjson_line, b'{"event":"heartbeat"}\n'),
}


def framing_for(accept: str, default: str | None) -> str | None:
    """SSE or NDJSON by the ``Accept`` header, else ``default``."""
    if SSE in accept:
        return SSE
    if NDJSON in accept:
        return NDJSON
    return default


def event_stream(
    ctx: StreamingContext, stream_id: str, after: int, framing: str, *, snapshot: bool = False
) -> StreamingResponse:
    """Replay and follow a stream as SSE or NDJSON from ``after`` (with ``snapshot`` and
    ``after`` 0: a ``snapshot`` event, then what follows it). A missing stream or an ``after``
    the log no longer holds is refused here, before any header is sent."""
    made: Subscription | None = None
    if snapshot and not after:
        # Made now (so `gone` is answered before the head), registered when the body runs.
        made = ctx.streams.subscribe(stream_id, 0, snapshot=True)
    else:
        ctx.streams.get(stream_id).log.check(after)
    framer = FRAMINGS[framing]

    async def body(sink: Sink) -> None:
        opened = made if made is not None else ctx.streams.subscribe(stream_id, after)
        async with opened as subscription:
            delivery = ctx.delivery(subscription, framer, sink)
            try:
                await delivery.run(live=False)
            except RaafdError as err:  # slow_consumer on a shared stream, gone while replaying
                log.info("HTTP stream delivery ended", code=err.code, cursor=subscription.cursor)

    return StreamingResponse(body, framing, headers={"x-raafd-stream": stream_id})


def start_stream(
    ctx: StreamingContext, body: bytes, request_id: str, principal: Principal
) -> Stream:
    """``POST /v1/streams``: validate the body (``stream.start`` without ``type``) and start the
    stream for ``principal``; refused with ``unavailable`` while draining, ``forbidden`` for an
    agent its roles do not grant, ``rate_limited`` past its stream starts."""
    if ctx.draining():
        raise Unavailable("the server is draining", retry_after=1)
    cmd = decode_body(body, StreamStart)
    ctx.guard.admit_run(principal, cmd.agent or ctx.config().default_agent, "agent")
    return ctx.streams.start(
        agent=cmd.agent,
        messages=cmd.conversation(),
        stream_id=cmd.stream,
        owner=f"http:{request_id}",
        principal=principal.counted_as,
        session=cmd.session,
    )


def replay_after(headers: Mapping[str, str], query: Mapping[str, str]) -> int:
    """Where ``GET /v1/streams/{id}/events`` resumes: ``Last-Event-ID`` (SSE's own resume
    header) wins over ``?after=``; 0 without either."""
    text = headers.get("last-event-id") or query.get("after", "0")
    if not (text.isascii() and text.isdigit()):
        raise BadRequest("after must be a non-negative integer", field="after")
    return int(text)


def snapshot_param(query: Mapping[str, str]) -> bool:
    """``?snapshot=1`` (or ``true``) on ``GET /v1/streams/{id}/events``; ``0``, ``false`` or
    absent: no snapshot."""
    text = query.get("snapshot", "0").lower()
    if text not in ("0", "1", "true", "false"):
        raise BadRequest("snapshot must be 1, 0, true or false", field="snapshot")
    return text in ("1", "true")


def _status_reply(stream: Stream) -> dict[str, Any]:
    """The status of ``GET /v1/streams/{id}`` and of the control answers: ``stream`` is the id,
    as everywhere else; ``id``, the same id, is deprecated and goes in a later release."""
    return {"stream": stream.id, **stream.info()}


def add_stream_routes(router: Router, ctx: StreamingContext) -> None:
    def manager() -> Any:
        return ctx.streams

    async def start(request: Request) -> Response | StreamingResponse:
        if ctx.draining():  # before reading a body that would be refused anyway
            raise Unavailable("the server is draining", retry_after=1)
        stream = start_stream(ctx, await request.body(), request.id, request.principal)
        framing = framing_for(request.headers.get("accept", ""), None)
        if framing is None:
            return JSONResponse(
                {"stream": stream.id}, 201, {"location": f"/v1/streams/{stream.id}"}
            )
        return event_stream(ctx, stream.id, 0, framing)

    async def status(request: Request, stream_id: str) -> Response:
        return JSONResponse(_status_reply(manager().get(stream_id)))

    async def events(request: Request, stream_id: str) -> StreamingResponse:
        after = replay_after(request.headers, request.query)
        snapshot = snapshot_param(request.query)
        framing = framing_for(request.headers.get("accept", ""), SSE) or SSE
        return event_stream(ctx, stream_id, after, framing, snapshot=snapshot)

    def control(action: str) -> Callable[..., Any]:
        async def handler(request: Request, stream_id: str) -> Response:
            m = manager()
            if action == "cancel":
                m.cancel(stream_id, "client")
            elif action == "pause":
                m.pause(stream_id)
            else:
                m.resume(stream_id)
            return JSONResponse(_status_reply(m.get(stream_id)))

        return handler

    router.add("POST", "/v1/streams", start)
    router.add("GET", "/v1/streams/{stream_id}", status)
    router.add("GET", "/v1/streams/{stream_id}/events", events)
    for action in ("cancel", "pause", "resume"):
        router.add("POST", f"/v1/streams/{{stream_id}}/{action}", control(action))
