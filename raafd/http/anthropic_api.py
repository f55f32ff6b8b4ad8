"""The Anthropic Messages API: ``POST /v1/messages``, streamed or whole.

``model`` names an agent. A message is an ordinary raafd stream (``x-raafd-stream`` names it;
the message id is ``msg_<stream id>``) translated by :mod:`raafd.http.anthropic_wire`:

- ``stream: true``: SSE, ``message_start``, then per content block ``content_block_start``,
  ``content_block_delta`` (``text_delta`` or ``input_json_delta``), ``content_block_stop``, and
  ``message_delta`` (stop reason, cumulative usage) and ``message_stop``; an ``error`` event
  instead when the run fails; ``ping`` while nothing else is sent;
- not streaming: the whole ``message`` once the run ended, or Anthropic's error shape with the
  status that fits when it failed.

Errors have Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``, the field at
fault leading the message. The key may come as ``x-api-key`` (what the official SDKs send) or as
``Authorization: Bearer`` (:mod:`raafd.auth`).

**A client that disconnects detaches**: the run goes on for ``streams.detach_grace`` (its events
can still be read from ``/v1/streams/{id}/events``), then is cancelled. The header
``x-raafd-disconnect: cancel`` asks that a disconnect cancel it at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from raafd.errors import NotFound, RaafdError, TooLarge, Unavailable
from raafd.http.anthropic_wire import (
    MessagesFraming,
    MessageTranslator,
    conversation,
    error_body,
    parse_request,
    sse,
)
from raafd.http.asgi import JSONResponse, Request, Response, Router, StreamingResponse
from raafd.http.context import StreamingContext
from raafd.http.follow import deliver, disconnect_cancels, fold

if TYPE_CHECKING:
    from raafd.streams.stream import Stream

__all__ = ["add_anthropic_routes"]

_STATUS: Final = {"upstream_error": 502, "timeout": 504, "unavailable": 503, "rate_limited": 429}
_CANCEL_STATUS: Final = {"timeout": 504, "drain": 503, "admin": 503}


def _error(status: int, message: str, field: str | None = None) -> Response:
    return JSONResponse(error_body(status, message, field), status)


def _from_raafd(err: RaafdError) -> Response:
    response = _error(err.http_status, err.message, err.field)
    if err.retry_after is not None:
        response.headers["retry-after"] = str(max(1, round(err.retry_after)))
    if isinstance(err, TooLarge):
        response.headers["connection"] = "close"
    return response


def _failure_frame(err: RaafdError | None) -> bytes:
    """What ends a streamed message that cannot reach its terminal event."""
    message = "the stream ended" if err is None else f"{err.code}: {err.message}"
    return sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})


def add_anthropic_routes(router: Router, ctx: StreamingContext) -> None:
    async def create(request: Request) -> Response | StreamingResponse:
        try:
            return await _create(request)
        except RaafdError as err:
            ctx.metrics.errors.labels(err.code).inc()
            return _from_raafd(err)

    async def _create(request: Request) -> Response | StreamingResponse:
        req = parse_request(await request.body())
        messages = conversation(req)
        if req.model not in ctx.config().agents:
            raise NotFound(
                f"model {req.model!r} does not exist: it must name a configured agent",
                field="model",
            )
        if ctx.draining():
            raise Unavailable("the server is draining", retry_after=1)
        ctx.guard.admit_run(request.principal, req.model, "model")
        stream = ctx.streams.start(
            agent=req.model,
            messages=messages,
            owner=f"anthropic:{request.id}",
            principal=request.principal.counted_as,
        )
        headers = {"x-raafd-stream": stream.id}
        translator = MessageTranslator(f"msg_{stream.id}")
        cancels = disconnect_cancels(request.headers)
        if req.stream:
            subscription = stream.subscribe(0)  # before the response starts
            return StreamingResponse(
                lambda sink: deliver(
                    ctx,
                    sink,
                    stream,
                    subscription,
                    MessagesFraming(translator),
                    failure=_failure_frame,
                    cancel_on_disconnect=cancels,
                ),
                "text/event-stream",
                headers=headers,
            )
        await fold(ctx, request, stream, translator.take, cancel_on_disconnect=cancels)
        return _whole(stream, translator, headers)

    def _whole(stream: Stream, translator: MessageTranslator, headers: dict[str, str]) -> Response:
        terminal = stream.terminal
        if translator.error is None or terminal is None:
            return JSONResponse(translator.message(), 200, headers)
        if terminal.kind == "error":
            code = str((terminal.fields.get("error") or {}).get("code", "internal"))
            status = _STATUS.get(code, 500)
        else:
            code = "cancelled"
            status = _CANCEL_STATUS.get(str(terminal.fields.get("reason", "")), 500)
        ctx.metrics.errors.labels(code).inc()
        return JSONResponse(translator.error, status, headers)

    router.add("POST", "/v1/messages", create)
