"""The OpenAI Responses API: ``POST /v1/responses``, ``GET /v1/responses/{id}`` (also as a
resumable stream), ``POST /v1/responses/{id}/cancel``.

``model`` names an agent. A response is an ordinary raafd stream whose id is the response id
(``x-raafd-stream`` says so too), translated by :mod:`raafd.http.responses_wire`:

- ``stream: true``: SSE, one ``event: <type>`` frame per Responses event, each with its
  ``sequence_number``, from ``response.created`` to ``response.completed`` /
  ``response.incomplete`` / ``response.failed``;
- not streaming: the whole ``response`` object once the stream ended (a stream that ended in
  ``error`` is an OpenAI-shaped error with the status that fits, as for chat completions);
- ``background: true``: the ``response`` object at once (``in_progress``); the run goes on with
  no detach grace (its ``max_duration`` still bounds it) and is polled with ``GET``.

``previous_response_id`` continues that response's conversation: a response runs in a raafd
session named by its id (see :mod:`raafd.http.responses_wire`), kept by the session store like
any other. ``GET /v1/responses/{id}?stream=true&starting_after=N`` replays the response's events
from raafd's log and follows it: exactly the events numbered after N, while the stream is
retained (``streams.retention`` after its end).

**A client that disconnects detaches**: the stream runs on for ``streams.detach_grace`` so a
resume can find it, then is cancelled (``detached``). A request with ``store: false``, or with
the header ``x-raafd-disconnect: cancel``, asks instead that a disconnect cancel the response at
once (reason ``client``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import orjson

from raafd.errors import BadRequest, NotFound, RaafdError, Unavailable
from raafd.http.asgi import JSONResponse, Request, Response, Router, StreamingResponse
from raafd.http.context import StreamingContext
from raafd.http.follow import deliver, disconnect_cancels, fold
from raafd.http.openai_compat import error_from_raafd, openai_error
from raafd.http.responses_wire import (
    ResponsesFraming,
    ResponsesRequest,
    ResponseTranslator,
    conversation,
    new_response_id,
    parse_request,
    session_of,
)

if TYPE_CHECKING:
    from raafd.store import SessionBackend
    from raafd.streams.stream import Stream

__all__ = ["add_responses_routes"]

_SSE: Final = "text/event-stream"
_STATUS: Final = {"upstream_error": 502, "timeout": 504, "unavailable": 503}


def _snapshot(stream: Stream) -> ResponseTranslator:
    """The response as the stream's whole log makes it (``gone`` once its start is evicted)."""
    translator = ResponseTranslator(stream.id, stream.created_at)
    for event in stream.log.after(0):
        translator.take(event)
    return translator


def _failure_frame(err: RaafdError | None) -> bytes:
    """What ends a streamed response that cannot reach its terminal event: an ``error`` event,
    as OpenAI sends one (it has no ``sequence_number`` of the response's own)."""
    message = "the stream ended" if err is None else err.message
    code = "internal" if err is None else err.code
    body = {"type": "error", "code": code, "message": message, "param": None}
    return b"event: error\ndata: %s\n\n" % orjson.dumps(body)


def add_responses_routes(
    router: Router, ctx: StreamingContext, sessions: Callable[[], SessionBackend | None]
) -> None:
    """``sessions()``: the session store (None until the daemon opened it), to tell a
    ``previous_response_id`` whose conversation raafd keeps from one it does not."""

    def find(response_id: str) -> Stream:
        try:
            return ctx.streams.get(response_id)
        except NotFound:
            raise NotFound(f"no response {response_id!r}", field="response_id") from None

    async def check_previous(req: ResponsesRequest) -> None:
        previous = req.previous_response_id
        if previous is None:
            return
        session = session_of(previous)
        store = sessions()
        if store is None:
            raise Unavailable("the session store is not open yet")
        if session is None or await store.get(session) is None:
            raise NotFound(
                f"previous response {previous!r} not found: raafd keeps no conversation for it",
                field="previous_response_id",
            )

    def streamed(stream: Stream, starting_after: int, cancels: bool) -> StreamingResponse:
        """The response's events after ``starting_after`` as SSE, from the stream's log and
        then live. Subscribed now, before the response starts: a log that lost its start is
        refused (``gone``) with a status, not in the body."""
        subscription = stream.subscribe(0)
        translator = ResponseTranslator(stream.id, stream.created_at)
        framing = ResponsesFraming(translator, starting_after)
        return StreamingResponse(
            lambda sink: deliver(
                ctx,
                sink,
                stream,
                subscription,
                framing,
                failure=_failure_frame,
                cancel_on_disconnect=cancels,
            ),
            _SSE,
            headers={"x-raafd-stream": stream.id},
        )

    async def create(request: Request) -> Response | StreamingResponse:
        try:
            return await _create(request)
        except RaafdError as err:
            ctx.metrics.errors.labels(err.code).inc()
            return error_from_raafd(err)

    async def _create(request: Request) -> Response | StreamingResponse:
        req = parse_request(await request.body())
        messages = conversation(req)
        if req.model not in ctx.config().agents:
            ctx.metrics.errors.labels("not_found").inc()
            return openai_error(
                404,
                f"The model {req.model!r} does not exist: it must name a configured agent.",
                "model_not_found",
                "model",
            )
        if ctx.draining():
            raise Unavailable("the server is draining", retry_after=1)
        ctx.guard.admit_run(request.principal, req.model, "model")
        await check_previous(req)
        response_id, session = new_response_id(req.previous_response_id)
        stream = ctx.streams.start(
            agent=req.model,
            messages=messages,
            stream_id=response_id,
            owner=f"responses:{request.id}",
            principal=request.principal.counted_as,
            session=session,
            detach_grace=math.inf if req.background else None,
        )
        headers = {"x-raafd-stream": stream.id}
        cancels = disconnect_cancels(request.headers, req.store)
        if req.stream:
            return streamed(stream, -1, cancels)
        if req.background:
            return JSONResponse(_snapshot(stream).response(), 200, headers)
        translator = ResponseTranslator(stream.id, stream.created_at)
        await fold(ctx, request, stream, translator.take, cancel_on_disconnect=cancels)
        terminal = stream.terminal
        if terminal is not None and terminal.kind == "error":
            error = terminal.fields.get("error") or {}
            code = str(error.get("code", "internal"))
            ctx.metrics.errors.labels(code).inc()
            return openai_error(
                _STATUS.get(code, 500), str(error.get("message", "internal error")), code
            )
        return JSONResponse(translator.response(), 200, headers)

    async def retrieve(request: Request, response_id: str) -> Response | StreamingResponse:
        try:
            return _retrieve(request, response_id)
        except RaafdError as err:
            ctx.metrics.errors.labels(err.code).inc()
            return error_from_raafd(err)

    def _retrieve(request: Request, response_id: str) -> Response | StreamingResponse:
        stream = find(response_id)
        headers = {"x-raafd-stream": stream.id}
        query = request.query
        if query.get("stream", "false") not in ("true", "false"):
            raise BadRequest("stream must be true or false", field="stream")
        if query.get("stream") != "true":
            return JSONResponse(_snapshot(stream).response(), 200, headers)
        text = query.get("starting_after", "-1")
        if not (text == "-1" or (text.isascii() and text.isdigit())):
            raise BadRequest(
                "starting_after must be a non-negative integer", field="starting_after"
            )
        return streamed(stream, int(text), disconnect_cancels(request.headers))

    async def cancel(request: Request, response_id: str) -> Response:
        try:
            stream = find(response_id)
            stream.cancel("client")
            return JSONResponse(_snapshot(stream).response(), 200, {"x-raafd-stream": stream.id})
        except RaafdError as err:
            ctx.metrics.errors.labels(err.code).inc()
            return error_from_raafd(err)

    router.add("POST", "/v1/responses", create)
    router.add("GET", "/v1/responses/{response_id}", retrieve)
    router.add("POST", "/v1/responses/{response_id}/cancel", cancel)
