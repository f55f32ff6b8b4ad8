"""``GET /v1/events``: the event bus as Server-Sent Events.

``?pattern=`` (required), ``?since=N`` (replay the history after seq N; SSE's own
``Last-Event-ID`` header wins over it, so a browser's ``EventSource`` resumes where it was),
``?where=`` (a JSON object, the same filter as ``events.subscribe``), ``?once=1`` (the response
ends after the first event). Frames: ``id: seq``, ``event: event`` (or ``events.lagged``),
``data:`` the event's JSON; a comment line as heartbeat while nothing else is sent. Served
through the one :class:`~raafd.net.delivery.Delivery`, like a stream's SSE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from raafd.bus import EVENT, Bus, check_where, hidden_from
from raafd.errors import BadRequest, RaafdError
from raafd.http.asgi import Request, Router, StreamingResponse
from raafd.http.context import HttpContext
from raafd.logging import get_logger
from raafd.net.delivery import Delivery, Sink
from raafd.protocol.events import StreamEvent
from raafd.protocol.subjects import compile_pattern

__all__ = ["BUS_SSE", "add_event_routes", "bus_sse_frame"]

log = get_logger("raafd.http")


def bus_sse_frame(event: StreamEvent) -> bytes:
    kind = b"event" if event.kind == EVENT else event.kind.encode()
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, kind, event.json)


class _BusSse:
    __slots__ = ()
    transport = "sse"
    heartbeat = b": heartbeat\n\n"

    def event(self, event: StreamEvent) -> bytes:
        return bus_sse_frame(event)

    def batch(self, events: list[StreamEvent]) -> bytes:
        return b"".join([bus_sse_frame(e) for e in events])


BUS_SSE = _BusSse()


def _since(request: Request) -> int | None:
    text = request.headers.get("last-event-id") or request.query.get("since")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise BadRequest("since must be a non-negative integer", field="since")
    return int(text)


def _where(request: Request) -> dict[str, Any] | None:
    text = request.query.get("where")
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadRequest("where must be a JSON object", field="where") from None
    return check_where(value)


def add_event_routes(
    router: Router,
    ctx: HttpContext,
    bus: Bus,
    restricted: Callable[[], Mapping[str, Sequence[str]]],
) -> None:
    """``ctx.guard`` checks the pattern against the principal's roles (``events.subscribe``);
    ``restricted()`` is ``events.restricted`` now, applied to the same roles."""

    async def events(request: Request) -> StreamingResponse:
        text = request.query.get("pattern")
        if text is None:
            raise BadRequest("give the pattern to follow: ?pattern=", field="pattern")
        pattern = compile_pattern(text)
        where = _where(request)
        once = request.query.get("once", "0") in ("1", "true")
        ctx.guard.require(request.principal, "events.subscribe", text, "pattern")
        hidden = hidden_from(restricted(), ctx.guard.roles_of(request.principal), pattern)
        since = _since(request)
        if since is not None:
            bus.check_since(since)
        subscription = bus.subscribe(
            pattern,
            since=since,
            where=where,
            deny=hidden,
            once=once,
            context={"req": request.id},
        )

        async def body(sink: Sink) -> None:
            async with subscription:
                delivery = Delivery(
                    subscription,
                    BUS_SSE,
                    sink,
                    ctx.metrics.events_sent.labels(BUS_SSE.transport),
                    heartbeat=ctx.config().http.heartbeat_interval,
                )
                try:
                    await delivery.run(live=False)
                except RaafdError as err:
                    log.info("bus SSE delivery ended", code=err.code)

        return StreamingResponse(body, "text/event-stream", headers={"cache-control": "no-cache"})

    router.add("GET", "/v1/events", events)
