"""The Vercel AI SDK's chat endpoint: ``POST /v1/ui/chat`` and its resumable stream.

The chat ``id`` of the SDK's request is the raafd session, so the conversation goes on from
raafd's own session store: the run's input is the request's last message (a user message, its
text parts joined); the earlier messages the SDK sends again are validated but not re-sent to
the agent (the session has them). The agent is the body's ``agent``, else the
``x-raafd-agent`` header, else the ``?agent=`` query parameter, else the default agent.

Each answer is an ordinary raafd stream (owner ``ui:<req>``, session = the chat id),
delivered through the one :class:`~raafd.net.delivery.Delivery` with a
:class:`~raafd.protocol.ui_stream.UIStreamFraming` (the translation is pure and lives there).

- ``GET /v1/ui/chat/{chat}/stream`` is the SDK's resume (``resumeStream``): the chat's running
  stream replayed from its start (what the SDK's default ``resumeStreamIsReplay`` expects), or
  204 when none runs. With ``Last-Event-ID`` (or ``?after=``) ``<stream>:<seq>``, the last SSE
  id the client saw, it answers exactly the rest of that stream, running or finished (while
  retained), with no ``start`` chunk again (``resumeStreamIsReplay: false``).
- ``DELETE /v1/ui/chat/{chat}/stream`` is the stop: it cancels the chat's running stream
  (reason ``client``), which closes the upstream request. The SDK's ``stop()`` only aborts its
  fetch, which raafd cannot tell from a dropped connection; a client sends this beside it.
- A client that disconnects detaches (the stream keeps its detach grace, so a resume finds
  it), unless the request asked otherwise: ``"on_disconnect": "cancel"`` in the body, or the
  header ``x-raafd-disconnect: cancel`` (as on the other protocol adapters).

Errors before the stream are raafd's usual ``{"error": {"code", "message", "field"}}`` with
their status (the SDK throws an ``Error`` carrying that body); during the stream they are the
protocol's ``error`` chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import orjson
from attrs import frozen

from raafd.errors import BadRequest, NotFound, RaafdError, Unavailable
from raafd.http.asgi import Request, Response, Router, StreamingResponse
from raafd.http.context import StreamingContext
from raafd.http.follow import deliver
from raafd.http.strict import json_object, structure
from raafd.net.delivery import Sink
from raafd.protocol.ui_stream import DONE, HEADERS, UIStreamFraming

if TYPE_CHECKING:
    from raafd.auth import Principal
    from raafd.streams import Stream

__all__ = [
    "UI_HEADERS",
    "UIChatRequest",
    "UIMessage",
    "add_ui_chat_routes",
    "failure_chunk",
    "parse_cursor",
    "run_input",
    "start_ui_chat",
]

_MAX_ID = 128
SSE = "text/event-stream"


@frozen
class UIMessage:
    """A UI message as the SDK sends it; ``parts`` are checked where they are used."""

    id: str
    role: Literal["system", "user", "assistant"]
    parts: list[dict[str, Any]]
    metadata: Any = None


@frozen
class UIChatRequest:
    """The body of ``POST /v1/ui/chat`` (the SDK's ``DefaultChatTransport`` body, plus raafd's
    ``agent`` and ``on_disconnect``)."""

    id: str
    messages: list[UIMessage]
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = None  # the SDK's name
    agent: str | None = None
    on_disconnect: Literal["detach", "cancel"] = "detach"


def run_input(req: UIChatRequest) -> str:
    """The run's input: the last message, which must be the user's, its text parts joined.
    Checks what the types alone do not (the ids' lengths, the parts)."""
    for name in ("id", "agent"):
        value = getattr(req, name)
        if value is not None and not 0 < len(value) <= _MAX_ID:
            raise BadRequest(f"{name} must be 1 to {_MAX_ID} characters", field=name)
    if not req.messages:
        raise BadRequest("at least one message is required", field="messages")
    last = len(req.messages) - 1
    message = req.messages[last]
    where = f"messages.{last}"
    if message.role != "user":
        raise BadRequest("the last message must be the user's", field=f"{where}.role")
    texts: list[str] = []
    for i, part in enumerate(message.parts):
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest("a text part needs text", field=f"{where}.parts.{i}.text")
            texts.append(text)
        elif not (isinstance(kind, str) and (kind == "step-start" or kind.startswith("data-"))):
            raise BadRequest(
                f"only text parts are supported in the user's message, not {kind!r}",
                field=f"{where}.parts.{i}.type",
            )
    if not texts:
        raise BadRequest("the user's message has no text part", field=f"{where}.parts")
    return "".join(texts)


def parse_cursor(text: str) -> tuple[str, int]:
    """``<stream>:<seq>`` (an SSE id of the UI stream) → (stream, seq)."""
    stream_id, _, seq = text.rpartition(":")
    if not stream_id or not (seq.isascii() and seq.isdigit()):
        raise BadRequest(
            "Last-Event-ID (or after) must be <stream>:<seq>, an id of the UI stream",
            field="after",
        )
    return stream_id, int(seq)


def _response(ctx: StreamingContext, stream: Stream, after: int, cancel: bool) -> StreamingResponse:
    """``stream`` as the UI message stream, its events after ``after`` framed (those before
    only move the translation's state)."""
    framing = UIStreamFraming(skip_through=after)
    # Subscribed now, before the response starts: from 0, since the state needs every event.
    subscription = stream.subscribe(0)

    async def body(sink: Sink) -> None:
        await deliver(
            ctx,
            sink,
            stream,
            subscription,
            framing,
            failure=failure_chunk,
            cancel_on_disconnect=cancel,
        )

    return StreamingResponse(body, SSE, headers={**UI_HEADERS, "x-raafd-stream": stream.id})


# Both HTTP paths add cache-control and x-accel-buffering to every streamed response.
UI_HEADERS = {k: v for k, v in HEADERS.items() if k not in ("cache-control", "x-accel-buffering")}


def failure_chunk(err: RaafdError | None) -> bytes:
    """The end of a response whose delivery could not reach the terminal event (``gone``,
    ``slow_consumer``): the protocol's ``error`` chunk, then ``[DONE]``."""
    message = "the stream ended before its end was delivered" if err is None else err.message
    return b"data: " + orjson.dumps({"type": "error", "errorText": message}) + b"\n\n" + DONE


def start_ui_chat(
    ctx: StreamingContext,
    body: bytes,
    request_id: str,
    principal: Principal,
    headers: Mapping[str, str],
    query: Mapping[str, str],
) -> tuple[Stream, bool]:
    """Validate a ``POST /v1/ui/chat`` body and start its stream for ``principal`` (both HTTP
    paths): the stream, and whether a disconnect cancels it. Refused with ``unavailable``
    while draining, ``forbidden`` for an agent the principal's roles do not grant,
    ``rate_limited`` past its stream starts, ``bad_request`` naming the field."""
    if ctx.draining():
        raise Unavailable("the server is draining", retry_after=1)
    req = structure(json_object(body), UIChatRequest)
    text = run_input(req)
    agent = req.agent or headers.get("x-raafd-agent") or query.get("agent")
    ctx.guard.admit_run(principal, agent or ctx.config().default_agent, "agent")
    stream = ctx.streams.start(
        agent=agent,
        messages=[{"role": "user", "content": text}],
        owner=f"ui:{request_id}",
        principal=principal.counted_as,
        session=req.id,
    )
    # "cancel" in the body, or the header the other protocol adapters take.
    cancel = req.on_disconnect == "cancel" or headers.get("x-raafd-disconnect") == "cancel"
    return stream, cancel


def add_ui_chat_routes(router: Router, ctx: StreamingContext) -> None:
    async def chat(request: Request) -> StreamingResponse:
        if ctx.draining():  # before reading a body that would be refused anyway
            raise Unavailable("the server is draining", retry_after=1)
        stream, cancel = start_ui_chat(
            ctx, await request.body(), request.id, request.principal, request.headers, request.query
        )
        return _response(ctx, stream, 0, cancel)

    async def resume(request: Request, chat: str) -> Response | StreamingResponse:
        cursor = request.headers.get("last-event-id") or request.query.get("after")
        if cursor:
            stream_id, after = parse_cursor(cursor)
            try:
                stream = ctx.streams.get(stream_id)
            except NotFound:
                raise NotFound(
                    f"no stream {stream_id!r} (it may have expired)", field="after"
                ) from None
            if stream.session != chat:
                raise NotFound(f"stream {stream_id!r} is not chat {chat!r}'s", field="after")
            stream.log.check(after)
            return _response(ctx, stream, after, False)
        running = ctx.streams.session_stream(chat)
        if running is None:
            return Response(204)  # the SDK's "no active stream"
        return _response(ctx, running, 0, False)

    async def stop(request: Request, chat: str) -> Response:
        running = ctx.streams.session_stream(chat)
        if running is not None:
            running.cancel("client")
        return Response(204)

    router.add("POST", "/v1/ui/chat", chat)
    router.add("GET", "/v1/ui/chat/{chat}/stream", resume)
    router.add("DELETE", "/v1/ui/chat/{chat}/stream", stop)
