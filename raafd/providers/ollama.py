"""The Ollama provider: the native ``/api/chat`` with ``stream: true``.

``base_url`` is the server root (``http://127.0.0.1:11434``); the request goes to
``{base_url}/api/chat``. (Ollama's OpenAI-compatible ``/v1`` is served by the ``openai``
provider type instead.) When ``api_key_env`` is set, its key is sent as
``Authorization: Bearer …`` (ollama.com, or a server behind an authenticating proxy).

The request, from raafd's internal (OpenAI chat shaped) messages: ``instructions`` becomes a
leading ``system`` message; an assistant turn's ``tool_calls`` are sent with ``arguments`` as
JSON objects (``{}`` when empty; ``{"arguments": TEXT}`` when they are not a JSON object), since
Ollama parses them; a ``tool`` message keeps its ``content`` and gets ``tool_name``, the name of
the call it answers when an earlier assistant turn has it. Tools are sent as given (Ollama takes
OpenAI tool specs). ``temperature`` → ``options.temperature``, ``max_tokens`` →
``options.num_predict``.

The answer is NDJSON, one object a line: ``message.content`` → ``Delta(text)``;
``message.tool_calls`` arrive whole, each becoming one :class:`ToolCallDelta` with ``id`` (the
upstream's, or ``call_<n>``), ``name`` and the ``arguments`` object as one JSON text; ``n`` and
the ``index`` count the calls across the whole answer. The line with ``done: true`` ends it:
``prompt_eval_count`` and ``eval_count`` → :class:`Usage` (``None`` for a count the line lacks),
``done_reason`` → ``finish_reason``
(``length`` stays ``length``; ``tool_calls`` when the answer had tool calls; else ``stop``).
``message.thinking`` (a reasoning model's thoughts) is not forwarded.
A line ``{"error": "..."}`` is a :class:`ProviderError`, retryable only while no delta has been
sent. HTTP errors carry ``{"error": "..."}`` too: 429, 408 and 5xx are retryable. A stream that
ends without its ``done`` line is a retryable ``disconnect``. Every message put into an exception
goes through :func:`redact_secrets`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from raafd.providers.base import Delta, ProviderRequest, Sink, ToolCallDelta, Usage
from raafd.providers.http import (
    MESSAGE_LIMIT,
    HttpProvider,
    drain,
    parse_retry_after,
    pump_deltas,
)
from raafd.providers.messages import content_text, read_tool_call
from raafd.providers.ndjson import NDJSONError, NDJSONSplitter
from raafd.providers.upstream import UpstreamResponse

__all__ = ["OllamaProvider", "ollama_payload"]

MAX_LINE = 4 << 20  # bytes of one NDJSON line (a tool call's arguments arrive in one)
_DONE_REASONS = {"stop": "stop", "length": "length"}


# --- the request (pure) -----------------------------------------------------------------------


def ollama_payload(request: ProviderRequest, *, model: str) -> dict[str, Any]:
    """The ``/api/chat`` request body for ``request`` (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    names: dict[str, str] = {}  # tool-call id → name, to name the tool results
    for message in request.messages:
        role = str(message.get("role") or "user")
        out: dict[str, Any] = {"role": role, "content": content_text(message.get("content"))}
        if role == "assistant" and message.get("tool_calls"):
            out["tool_calls"] = [_tool_call(call, names) for call in message["tool_calls"]]
        elif role == "tool":
            name = names.get(str(message.get("tool_call_id") or ""))
            if name:
                out["tool_name"] = name
        messages.append(out)
    payload: dict[str, Any] = {
        "model": request.model or model,
        "messages": messages,
        "stream": True,
    }
    options: dict[str, Any] = {}
    if request.temperature is not None:
        options["temperature"] = request.temperature
    if request.max_tokens is not None:
        options["num_predict"] = request.max_tokens
    if options:
        payload["options"] = options
    if request.tools:
        payload["tools"] = request.tools
    return payload


def _tool_call(call: Any, names: dict[str, str]) -> dict[str, Any]:
    parsed = read_tool_call(call)
    if parsed.id:
        names[parsed.id] = parsed.name  # tool results name their tool in Ollama's format
    return {"function": {"name": parsed.name, "arguments": parsed.arguments}}


# --- the provider -----------------------------------------------------------------------------


class OllamaProvider(HttpProvider):
    """An Ollama server's native chat API."""

    def _endpoint(self, root: str) -> str:
        return root + "/api/chat"

    def _headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "application/x-ndjson",
            "accept-encoding": "identity",  # a compressing proxy would hold tokens back
            **self.config.headers,
        }
        if key := self._api_key():
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _error_body(self, body: bytes) -> tuple[str, str]:
        return "", _error_message(body)

    def _retry_after(self, response: UpstreamResponse) -> float | None:
        # 503 "server busy" when its queue is full; Ollama sends no retry-after-ms.
        return parse_retry_after(response.headers.get("retry-after"))

    # --- the stream -------------------------------------------------------------------------

    async def stream(self, request: ProviderRequest, send: Sink) -> None:
        """Run one chat and send its deltas into ``send``; see the module docstring."""
        headers = self._headers()
        body = orjson.dumps(ollama_payload(request, model=self.config.model))
        async with self._post(body, headers) as response:
            await self._read_lines(response, send)

    async def _read_lines(self, response: UpstreamResponse, send: Sink) -> None:
        splitter = NDJSONSplitter(max_line=MAX_LINE)
        state = _StreamState()

        def parse(chunk: bytes) -> Iterator[Delta]:
            try:
                lines = splitter.feed(chunk)
            except NDJSONError as exc:
                raise self._error(f"bad NDJSON stream: {exc}", reason="protocol") from None
            state.events += len(lines)
            for line in lines:
                delta = self._line(line, state)
                if delta is not None:
                    yield delta
                if state.done:
                    return

        received = await pump_deltas(response, send, parse, lambda: state.done)
        if not state.done and received.broken is None:
            # The body ended: a last line without its newline still counts.
            for line in splitter.close():
                state.events += 1
                delta = self._line(line, state)
                if delta is not None:
                    await send.send(delta)
        if state.done:
            await drain(response)
        if not state.done:
            raise self._closed_early(received, state.events)
        await send.send(Delta(usage=state.usage, finish_reason=state.finish_reason))

    def _line(self, line: bytes, state: _StreamState) -> Delta | None:
        """Fold one line into ``state``; the delta it carries, if any (counted as sent: it goes
        out before anything raised after it)."""
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise self._error(
                "the upstream sent a line that is not JSON", reason="protocol"
            ) from None
        if not isinstance(doc, dict):
            raise self._error("the upstream sent a line that is not an object", reason="protocol")
        error = doc.get("error")
        if error:
            message = error if isinstance(error, str) else orjson.dumps(error).decode()
            raise self._error(
                f"the upstream reported an error: {message[:MESSAGE_LIMIT]}",
                retryable=not state.sent,
                reason="upstream_error",
            )
        delta = state.take(doc)
        if delta is not None:
            state.sent = True
        return delta


class _StreamState:
    """What the lines of one answer have said so far."""

    __slots__ = ("done", "events", "finish_reason", "sent", "tool_count", "usage")

    def __init__(self) -> None:
        self.events = 0  # lines read
        self.tool_count = 0
        self.sent = False  # a delta went into the sink
        self.done = False
        self.finish_reason = "stop"
        self.usage: Usage | None = None

    def take(self, doc: dict[str, Any]) -> Delta | None:
        """Fold one line into the state; the delta it carries, if any."""
        message = doc.get("message")
        message = message if isinstance(message, dict) else {}
        text = message.get("content")
        text = text if isinstance(text, str) else ""
        calls = message.get("tool_calls")
        tool_calls = self._tool_calls(calls) if isinstance(calls, list) else ()
        if doc.get("done") is True:
            self.done = True
            reason = doc.get("done_reason")
            if self.tool_count and reason in (None, "", "stop"):
                self.finish_reason = "tool_calls"
            else:
                self.finish_reason = _DONE_REASONS.get(str(reason), "stop")
            self.usage = Usage(_count(doc.get("prompt_eval_count")), _count(doc.get("eval_count")))
        if text or tool_calls:
            return Delta(text=text, tool_calls=tool_calls)
        return None

    def _tool_calls(self, calls: list[Any]) -> tuple[ToolCallDelta, ...]:
        out: list[ToolCallDelta] = []
        for call in calls:
            if not isinstance(call, dict):
                continue
            function = call.get("function")
            function = function if isinstance(function, dict) else {}
            arguments = function.get("arguments")
            if isinstance(arguments, str):  # a server that sends the JSON text itself
                text = arguments or "{}"
            else:
                text = orjson.dumps(arguments if arguments is not None else {}).decode()
            index = self.tool_count
            self.tool_count += 1
            call_id = call.get("id")
            name = function.get("name")
            out.append(
                ToolCallDelta(
                    index=index,
                    id=call_id if isinstance(call_id, str) and call_id else f"call_{index}",
                    name=name if isinstance(name, str) and name else None,
                    arguments=text,
                )
            )
        return tuple(out)


def _count(value: Any) -> int | None:
    """A token count the upstream gave, or ``None`` (missing, null, not a number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_message(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, str):
        return error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return body.decode("utf-8", "replace").strip()
