"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``GET /v1/models``.

``model`` names an agent. A completion is an ordinary raafd stream (owner ``openai:<req>``,
visible to ``raafd ctl streams``, cancellable), read from seq 1 by this handler and translated:

- not streaming: the handler waits for the terminal event and answers one ``chat.completion``;
- streaming: SSE ``data:`` lines of ``chat.completion.chunk`` objects (a first chunk with
  ``delta.role``, one per ``content`` event, a last one with ``finish_reason``, a usage chunk
  with ``choices: []`` when ``stream_options.include_usage``), then ``data: [DONE]``. A
  ``: heartbeat`` comment goes out while nothing else does, as on ``/v1/streams``.

Tool calls the agent runs itself (a ``tool_call`` answered by a ``tool_result``) stay inside
raafd; only calls left unanswered when the answer finishes with ``tool_calls`` reach the client
(``message.tool_calls`` / ``delta.tool_calls``), as OpenAI would send them.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the
official SDKs raise their usual exceptions: an unknown model is 404 ``model_not_found``; a stream
that ends in ``error`` is 502 (``upstream_error``), 504 (``timeout``) or 500; when streaming, an
``{"error": …}`` chunk and the end of the response instead.

**A client that disconnects cancels its completion** (reason ``client``), unlike
``/v1/streams``, which only detaches: nobody can re-attach to an OpenAI API call, so every token
generated after the disconnect would be paid for and never read.

Request fields the official SDK can send but raafd has no use for (``top_p``, ``tools``,
``seed``, ``user``, … see :data:`IGNORED_FIELDS`) are accepted and ignored; the agent's own
configuration (instructions, tools, sampling) applies. ``temperature``, ``max_tokens`` and
``max_completion_tokens`` are validated but not applied either (streams take no per-request
sampling overrides yet); ``n`` must be 1. Any other unknown field is a 400.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
import orjson
from attrs import frozen

from raafd.auth import Principal
from raafd.errors import BadRequest, NotFound, RaafdError, TooLarge, Unavailable
from raafd.http.asgi import JSONResponse, Request, Response, Router, StreamingResponse
from raafd.http.context import StreamingContext
from raafd.http.follow import deliver, fold
from raafd.http.strict import json_object, structure, text_parts
from raafd.protocol.events import StreamEvent

if TYPE_CHECKING:
    from raafd.streams.stream import Stream

__all__ = [
    "IGNORED_FIELDS",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChunkFraming",
    "Completion",
    "add_openai_routes",
    "arguments_text",
    "error_from_raafd",
    "openai_error",
    "start_completion",
]

# Parameters of the official SDK's `chat.completions.create` that raafd accepts and ignores.
IGNORED_FIELDS: Final = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "metadata",
        "modalities",
        "moderation",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
_FINISH_REASONS: Final = frozenset({"stop", "length", "tool_calls", "content_filter"})
_SSE_HEARTBEAT: Final = b": heartbeat\n\n"
_DONE: Final = b"data: [DONE]\n\n"


# --- the request ------------------------------------------------------------------------------


@frozen
class FunctionCall:
    name: str
    arguments: str


@frozen
class ToolCallParam:
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


@frozen
class ChatMessage:
    """One message as the SDK sends it. ``content`` is text or a list of text parts (checked
    after structuring, so the error can name the part)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    # Sent back by clients that replay an SDK response message; ignored.
    refusal: Any = None
    audio: Any = None
    function_call: Any = None


@frozen
class StreamOptions:
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored


@frozen
class ChatCompletionRequest:
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The body → a validated request; :class:`BadRequest` naming the field otherwise."""
    data = json_object(raw)
    for name in IGNORED_FIELDS.intersection(data):
        del data[name]
    req = structure(data, ChatCompletionRequest)
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise BadRequest("temperature must be between 0 and 2", field="temperature")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value <= 0:
            raise BadRequest(f"{name} must be greater than 0", field=name)
    if req.n is not None and req.n != 1:
        raise BadRequest("only n = 1 is supported", field="n")
    if not req.messages:
        raise BadRequest("at least one message is required", field="messages")
    return req


def conversation(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the agent loop takes them (OpenAI shape, text content)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        content = text_parts(m.content, f"{where}.content")
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": content}
        if m.role == "tool":
            if not m.tool_call_id:
                raise BadRequest("a tool message needs tool_call_id", field=f"{where}.tool_call_id")
            message["tool_call_id"] = m.tool_call_id
        elif m.tool_call_id is not None:
            raise BadRequest("only a tool message has tool_call_id", field=f"{where}.tool_call_id")
        if m.tool_calls:
            if m.role != "assistant":
                raise BadRequest(
                    "only an assistant message has tool_calls", field=f"{where}.tool_calls"
                )
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
        elif content is None and m.role != "assistant":
            raise BadRequest("content is required", field=f"{where}.content")
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


# --- errors -----------------------------------------------------------------------------------

_TYPES: Final = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def openai_error(status: int, message: str, code: str | None, param: str | None = None) -> Response:
    """An OpenAI-shaped error response."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status)


def error_from_raafd(err: RaafdError) -> Response:
    """A raafd refusal as an OpenAI-shaped error response (its status, code and field)."""
    response = openai_error(err.http_status, err.message, err.code, err.field)
    if err.retry_after is not None:
        response.headers["retry-after"] = str(max(1, round(err.retry_after)))
    if isinstance(err, TooLarge):
        response.headers["connection"] = "close"
    return response


def _model_not_found(model: str) -> Response:
    return openai_error(
        404,
        f"The model {model!r} does not exist: it must name a configured agent.",
        "model_not_found",
        "model",
    )


_STREAM_ERROR_STATUS: Final = {"upstream_error": 502, "timeout": 504, "unavailable": 503}
_CANCEL_STATUS: Final = {"timeout": 504, "drain": 503, "admin": 503}


def _terminal_failure(event: StreamEvent) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the OpenAI error object for an ``error``/``cancelled`` terminal."""
    if event.kind == "error":
        error = event.fields.get("error", {})
        code = str(error.get("code", "internal"))
        message = str(error.get("message", "internal error"))
        status = _STREAM_ERROR_STATUS.get(code, 500)
    else:
        reason = str(event.fields.get("reason", ""))
        code = "cancelled"
        message = f"the completion was cancelled ({reason})"
        status = _CANCEL_STATUS.get(reason, 500)
    kind = "server_error"
    return status, {"message": message, "type": kind, "param": None, "code": code}


# --- reading the stream -----------------------------------------------------------------------


class _Reader:
    """Folds a stream's events into what an OpenAI answer needs."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, Any]] = {}  # tool calls nobody answered (yet)
        self.terminal: StreamEvent | None = None

    def take(self, event: StreamEvent) -> None:
        if event.kind == "tool_call":
            tool_id = str(event.fields.get("tool_id", ""))
            self.pending[tool_id] = {
                "id": tool_id,
                "type": "function",
                "function": {
                    "name": event.fields.get("tool_name", ""),
                    "arguments": arguments_text(event.fields.get("arguments")),
                },
            }
        elif event.kind == "tool_result":
            self.pending.pop(str(event.fields.get("tool_id", "")), None)  # raafd ran it
        elif event.terminal:
            self.terminal = event

    def finish_reason(self) -> str:
        assert self.terminal is not None
        reason = str(self.terminal.fields.get("finish_reason") or "stop")
        if reason == "tool_calls" and not self.pending:
            return "stop"
        return reason if reason in _FINISH_REASONS else "stop"

    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.pending.values()) if self.finish_reason() == "tool_calls" else []

    def usage(self) -> dict[str, int] | None:
        """The answer's ``usage``; None (JSON null) when the upstream did not give both counts:
        unknown is not 0."""
        assert self.terminal is not None
        usage = self.terminal.fields.get("usage") or {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class ChunkFraming:
    """A stream's events as ``chat.completion.chunk`` SSE lines (a
    :class:`~raafd.net.delivery.Framing`, one per completion: it folds the events it frames
    into a :class:`_Reader` for the last chunks)."""

    transport = "openai"
    heartbeat = _SSE_HEARTBEAT

    def __init__(self, req: ChatCompletionRequest, completion_id: str, created: int) -> None:
        self._req = req
        self._reader = _Reader()
        self._head = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
        self._usage: dict[str, Any] = {"usage": None} if req.include_usage else {}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        obj = {
            **self._head,
            "model": self._req.model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
            **self._usage,
        }
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def opening(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def event(self, event: StreamEvent) -> bytes:
        return self.batch([event])

    def batch(self, events: list[StreamEvent]) -> bytes:
        reader = self._reader
        out: list[bytes] = []
        for event in events:
            reader.take(event)
            if event.kind == "content" and event.fields.get("delta"):
                out.append(self._chunk({"content": event.fields["delta"]}))
        if reader.terminal is not None:
            out.append(self._tail(reader.terminal))
        return b"".join(out)

    def _tail(self, terminal: StreamEvent) -> bytes:
        if terminal.kind != "complete":
            _, error = _terminal_failure(terminal)
            return b"data: " + orjson.dumps({"error": error}) + b"\n\n"
        reader = self._reader
        tail: list[bytes] = []
        tool_calls = reader.tool_calls()
        if tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            tail.append(self._chunk({"tool_calls": calls}))
        tail.append(self._chunk({}, reader.finish_reason()))
        if self._req.include_usage:
            usage = {**self._head, "model": self._req.model, "choices": [], "usage": reader.usage()}
            tail.append(b"data: " + orjson.dumps(usage) + b"\n\n")
        tail.append(_DONE)
        return b"".join(tail)

    def failure(self, err: RaafdError | None) -> bytes:
        """The error chunk for a delivery that could not reach the terminal event."""
        message = "the stream ended" if err is None else err.message
        error = {"message": message, "type": "server_error"}
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def arguments_text(arguments: Any) -> str:
    """A tool call's arguments as the JSON text OpenAI's wire formats carry (a model's
    unparsable arguments, kept as ``{"_raw": text}``, as they came)."""
    if isinstance(arguments, dict) and set(arguments) == {"_raw"}:
        return str(arguments["_raw"])
    return orjson.dumps(arguments if arguments is not None else {}).decode()


@attrs.frozen
class Completion:
    """A started completion: its stream and what its answer needs."""

    stream: Stream
    req: ChatCompletionRequest

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.stream.id}"

    @property
    def created(self) -> int:
        return int(self.stream.created_at)

    @property
    def headers(self) -> dict[str, str]:
        return {"x-raafd-stream": self.stream.id}

    def framing(self) -> ChunkFraming:
        return ChunkFraming(self.req, self.id, self.created)


def start_completion(
    ctx: StreamingContext, body: bytes, request_id: str, principal: Principal
) -> Response | Completion:
    """Validate a ``POST /v1/chat/completions`` body and start its stream; refusals come back
    as OpenAI-shaped responses (both HTTP paths answer them as they are)."""
    try:
        req = parse_request(body)
        messages = conversation(req)
        if req.model not in ctx.config().agents:
            ctx.metrics.errors.labels("not_found").inc()
            return _model_not_found(req.model)
        if ctx.draining():
            raise Unavailable("the server is draining", retry_after=1)
        ctx.guard.admit_run(principal, req.model, "model")
        try:
            stream = ctx.streams.start(
                agent=req.model,
                messages=messages,
                owner=f"openai:{request_id}",
                principal=principal.counted_as,
            )
        except NotFound as err:
            if err.field == "agent":  # removed by a reload since the check above
                return _model_not_found(req.model)
            raise
    except RaafdError as err:
        ctx.metrics.errors.labels(err.code).inc()
        return error_from_raafd(err)
    return Completion(stream, req)


# --- routes -----------------------------------------------------------------------------------


def add_openai_routes(router: Router, ctx: StreamingContext) -> None:
    created = int(time.time())  # the models' creation: when the daemon was wired

    def model_object(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "raafd",
        }

    async def models(request: Request) -> Response:
        data = [model_object(name) for name in ctx.config().agents]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request, model: str) -> Response:
        if model not in ctx.config().agents:
            return _model_not_found(model)
        return JSONResponse(model_object(model))

    async def completions(request: Request) -> Response | StreamingResponse:
        try:
            return await _completions(request)
        except RaafdError as err:
            ctx.metrics.errors.labels(err.code).inc()
            return error_from_raafd(err)

    async def _completions(request: Request) -> Response | StreamingResponse:
        started = start_completion(ctx, await request.body(), request.id, request.principal)
        if isinstance(started, Response):
            return started
        if started.req.stream:
            # Subscribed now, before the response starts, as /v1/streams does.
            subscription = started.stream.subscribe(0)
            framing = started.framing()
            return StreamingResponse(
                lambda sink: deliver(
                    ctx,
                    sink,
                    started.stream,
                    subscription,
                    framing,
                    failure=framing.failure,
                    cancel_on_disconnect=True,  # nobody can re-attach to an OpenAI API call
                    prefix=framing.opening(),
                ),
                "text/event-stream",
                headers=started.headers,
            )
        return await _whole(
            request, started.stream, started.req, started.id, started.created, started.headers
        )

    async def _whole(
        request: Request,
        stream: Stream,
        req: ChatCompletionRequest,
        completion_id: str,
        created: int,
        headers: dict[str, str],
    ) -> Response:
        reader = _Reader()
        # A client that leaves cancels: nobody can read the answer any more.
        await fold(ctx, request, stream, reader.take, cancel_on_disconnect=True)
        terminal = reader.terminal
        assert terminal is not None
        if terminal.kind != "complete":
            status, error = _terminal_failure(terminal)
            ctx.metrics.errors.labels(error["code"]).inc()
            return JSONResponse({"error": error}, status, headers)
        tool_calls = reader.tool_calls()
        text = str(terminal.fields.get("final_response", ""))
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not tool_calls else None,
            "refusal": None,
        }
        if tool_calls:
            message["tool_calls"] = tool_calls
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": reader.finish_reason(),
                }
            ],
            "usage": reader.usage(),
        }
        return JSONResponse(body, 200, headers)

    router.add("POST", "/v1/chat/completions", completions)
    router.add("GET", "/v1/models", models)
    router.add("GET", "/v1/models/{model}", model)
