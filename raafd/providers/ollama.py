"""The Ollama provider: the native ``/api/chat`` with ``stream: true`` over httpx.

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
``prompt_eval_count`` and ``eval_count`` → :class:`Usage`, ``done_reason`` → ``finish_reason``
(``length`` stays ``length``; ``tool_calls`` when the answer had tool calls; else ``stop``).
``message.thinking`` (a reasoning model's thoughts) is not forwarded.
A line ``{"error": "..."}`` is a :class:`ProviderError`, retryable only while no delta has been
sent. HTTP errors carry ``{"error": "..."}`` too: 429, 408 and 5xx are retryable. A stream that
ends without its ``done`` line is a retryable ``disconnect``. Every message put into an exception
goes through :func:`redact_secrets`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
import trio

from raafd.config import ProviderConfig
from raafd.providers.base import (
    Delta,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ToolCallDelta,
    Usage,
)
from raafd.providers.ndjson import NDJSONError, NDJSONSplitter
from raafd.providers.openai import open_body, parse_retry_after, redact_secrets

__all__ = ["OllamaProvider", "ollama_payload"]

ERROR_BODY_LIMIT = 64 << 10  # bytes of an error body read for its message
DRAIN_AFTER_DONE = 0.25  # seconds to read the body's end after the done line
MAX_LINE = 4 << 20  # bytes of one NDJSON line (a tool call's arguments arrive in one)
_MESSAGE_LIMIT = 500  # characters of an upstream message kept in an error
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
        out: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
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


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _tool_call(call: Any, names: dict[str, str]) -> dict[str, Any]:
    call = call if isinstance(call, dict) else {}
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    name = str(function.get("name") or "")
    if call.get("id"):
        names[str(call["id"])] = name
    arguments = function.get("arguments")
    parsed: Any
    if isinstance(arguments, dict):
        parsed = arguments
    elif not arguments:
        parsed = {}
    else:
        try:
            parsed = orjson.loads(arguments)
        except (orjson.JSONDecodeError, TypeError):
            parsed = None
        if not isinstance(parsed, dict):
            parsed = {"arguments": str(arguments)}
    return {"function": {"name": name, "arguments": parsed}}


# --- the provider -----------------------------------------------------------------------------


class OllamaProvider:
    """An Ollama server's native chat API. ``client`` is the daemon's shared httpx client
    (see :func:`raafd.providers.registry.open_http_client`)."""

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        client: httpx.AsyncClient,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.name = name
        self.config = config
        self._client = client
        self._environ = environ
        self._url = config.base_url.rstrip("/") + "/api/chat"
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.read_timeout,
            pool=config.connect_timeout,
        )

    def __repr__(self) -> str:
        return f"<OllamaProvider {self.name!r} {self._url}>"

    def _secrets(self) -> tuple[str, ...]:
        key = self._environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        return (key, *(v for v in self.config.headers.values() if len(v) >= 4))

    def _error(self, message: str, **kwargs: Any) -> ProviderError:
        text = redact_secrets(f"{self.name}: {message}", self._secrets())
        return ProviderError(text, **kwargs)

    def _headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "application/x-ndjson",
            "accept-encoding": "identity",  # a compressing proxy would hold tokens back
        }
        headers.update(self.config.headers)
        if self.config.api_key_env:
            key = self._environ.get(self.config.api_key_env, "")
            if not key:
                raise self._error(
                    f"the environment variable {self.config.api_key_env} that api_key_env"
                    " names is not set",
                    reason="config",
                )
            headers["authorization"] = f"Bearer {key}"
        return headers

    # --- the stream -------------------------------------------------------------------------

    async def stream(
        self, request: ProviderRequest, send: trio.abc.SendChannel[ProviderEvent]
    ) -> None:
        """Run one chat and send its deltas into ``send``; see the module docstring."""
        headers = self._headers()
        body = orjson.dumps(ollama_payload(request, model=self.config.model))
        try:
            async with self._client.stream(
                "POST", self._url, content=body, headers=headers, timeout=self._timeout
            ) as response:
                if not response.is_success:
                    raise await self._http_error(response)
                await self._read_lines(response, send)
        except (httpx.TransportError, httpx.DecodingError, httpx.InvalidURL) as exc:
            raise self._transport_error(exc) from None

    def _transport_error(self, exc: Exception) -> ProviderError:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectTimeout):
            return self._error(
                "timed out connecting to the upstream", retryable=True, reason="connect"
            )
        if isinstance(exc, httpx.PoolTimeout):
            return self._error(
                f"no free upstream connection within {self.config.connect_timeout:g} s"
                " (the shared connection pool is full)",
                retryable=True,
                reason="pool",
            )
        if isinstance(exc, httpx.ConnectError):
            return self._error(
                f"cannot connect to the upstream: {detail}", retryable=True, reason="connect"
            )
        if isinstance(exc, httpx.TimeoutException):
            return self._error(
                f"the upstream sent nothing for {self.config.read_timeout:g} s",
                retryable=True,
                reason="timeout",
            )
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return self._error(f"bad upstream URL: {detail}", reason="config")
        if isinstance(exc, httpx.DecodingError):
            return self._error(f"cannot decode the upstream's answer: {detail}", reason="protocol")
        return self._error(
            f"the upstream connection failed: {detail}", retryable=True, reason="disconnect"
        )

    async def _http_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        body = bytearray()
        async with open_body(response) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    del body[ERROR_BODY_LIMIT:]
                    break
        message = _error_message(bytes(body)) or response.reason_phrase or "no message"
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT] + "…"
        text = f"the upstream answered HTTP {status}: {message}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429:
            return self._error(
                text, retryable=True, status=status, retry_after=retry_after, reason="rate_limited"
            )
        if status >= 500 or status == 408:  # 503: "server busy" when the queue is full
            return self._error(
                text, retryable=True, status=status, retry_after=retry_after, reason="server_error"
            )
        reason = "auth" if status in (401, 403) else "bad_request"
        return self._error(text, status=status, reason=reason)

    async def _read_lines(
        self, response: httpx.Response, send: trio.abc.SendChannel[ProviderEvent]
    ) -> None:
        splitter = NDJSONSplitter(max_line=MAX_LINE)
        state = _StreamState()
        async with open_body(response) as chunks:
            async for chunk in chunks:
                try:
                    lines = splitter.feed(chunk)
                except NDJSONError as exc:
                    raise self._error(f"bad NDJSON stream: {exc}", reason="protocol") from None
                for line in lines:
                    await self._line(line, state, send)
                    if state.done:
                        break
                if state.done:
                    break
            else:
                # The body ended: a last line without its newline still counts.
                for line in splitter.close():
                    await self._line(line, state, send)
            if state.done:
                left = ERROR_BODY_LIMIT  # read the body's end, so the connection is reused
                with trio.move_on_after(DRAIN_AFTER_DONE):
                    async for chunk in chunks:
                        left -= len(chunk)
                        if left <= 0:
                            break
        if not state.done:
            raise self._error(
                "the upstream closed the stream before it was complete",
                retryable=True,
                reason="disconnect",
            )
        await send.send(Delta(usage=state.usage, finish_reason=state.finish_reason))

    async def _line(
        self, line: bytes, state: _StreamState, send: trio.abc.SendChannel[ProviderEvent]
    ) -> None:
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
                f"the upstream reported an error: {message[:_MESSAGE_LIMIT]}",
                retryable=not state.sent,
                reason="upstream_error",
            )
        delta = state.take(doc)
        if delta is not None:
            await send.send(delta)
            state.sent = True


class _StreamState:
    """What the lines of one answer have said so far."""

    __slots__ = ("done", "finish_reason", "sent", "tool_count", "usage")

    def __init__(self) -> None:
        self.tool_count = 0
        self.sent = False  # a delta went into the channel
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
            self.usage = Usage(_int(doc.get("prompt_eval_count")), _int(doc.get("eval_count")))
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


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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
