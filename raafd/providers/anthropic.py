"""The Anthropic provider: the Messages API with ``stream: true``.

``base_url`` is the API root without a version, as in Anthropic's own SDKs
(``https://api.anthropic.com``); the request goes to ``{base_url}/v1/messages``. A ``base_url``
that already ends in ``/v1`` is accepted too (the ``/v1`` is not doubled). Headers: ``x-api-key``
(from the environment variable that ``api_key_env`` names; no key header when it is empty, for a
gateway that adds its own), ``anthropic-version: 2023-06-01``, and the configured ``headers``
(``anthropic-beta`` …).

The request, from raafd's internal (OpenAI chat shaped) messages:

- ``instructions`` and every ``system`` message become the top-level ``system`` text, joined by
  blank lines (Anthropic has no system role in ``messages``);
- an assistant turn's ``tool_calls`` become ``tool_use`` blocks whose ``input`` is the parsed
  ``arguments`` object (``{}`` when empty; ``{"arguments": TEXT}`` when they are not a JSON
  object, so a model's malformed call can still be answered);
- ``tool`` messages become ``tool_result`` blocks of a user turn, and consecutive turns of one
  role are merged into one turn (so a batch of tool results is one user turn, results first);
- tools become ``{name, description, input_schema}``;
- ``max_tokens`` is required by Anthropic: ``request.max_tokens``, else
  :data:`DEFAULT_MAX_TOKENS`. ``temperature`` is passed as is (Anthropic's range is 0 to 1).

The answer, an event stream with ``event:`` names: ``text_delta`` → ``Delta(text)``;
a ``tool_use`` block start → the first :class:`ToolCallDelta` of the call (``id`` and ``name``,
empty ``arguments``), each ``input_json_delta`` → a fragment with its ``partial_json``; the
fragment ``index`` is the block's position among the answer's ``tool_use`` blocks (text and
thinking blocks do not count). A ``tool_use`` block that closes without any argument text gets
one fragment ``{}`` (a call without parameters). Thinking, citations and server-tool blocks are
not forwarded; ``ping`` and unknown events are ignored. Usage: ``input_tokens`` (plus the cache
read and cache creation tokens, which Anthropic counts apart) from ``message_start``;
``output_tokens`` of ``message_delta`` is cumulative, so the last value is kept, not a sum; a
count the stream never gave is ``None`` (unknown).
Stop reasons: ``end_turn`` and ``stop_sequence`` → ``stop``, ``max_tokens`` → ``length``,
``tool_use`` → ``tool_calls``, ``refusal`` → ``content_filter``, anything else → ``stop``.
The last thing sent is ``Delta(usage=…, finish_reason=…)``.

Failures: HTTP 429 (with ``retry-after``), 408, 5xx and 529 (overloaded) are retryable; 400,
401, 403, 404, 413 are not; an ``x-should-retry`` header, which Anthropic sends on some answers,
overrides that as it does in the official SDKs. An ``error`` event in the stream is a
:class:`ProviderError`, retryable (``overloaded_error``, ``api_error``, ``rate_limit_error``)
only while no delta has been sent. A stream that ends before ``message_stop`` is a retryable
``disconnect``. Every message put into an exception goes through :func:`redact_secrets`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeGuard

import orjson

from raafd.providers.base import (
    Delta,
    ProviderError,
    ProviderRequest,
    Sink,
    ToolCallDelta,
    Usage,
)
from raafd.providers.http import MESSAGE_LIMIT, HttpProvider, drain, pump_deltas
from raafd.providers.messages import content_text, read_tool_call
from raafd.providers.sse import SSEError, SSEParser
from raafd.providers.upstream import UpstreamResponse

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_MAX_TOKENS", "AnthropicProvider", "anthropic_payload"]

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # sent when the request sets none: Anthropic requires max_tokens
MAX_OPEN_BLOCKS = 256  # content blocks open at once; more is a protocol error

_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Error types of an ``error`` event worth a retry (before the first delta), and their reason.
_RETRYABLE_ERRORS = {
    "overloaded_error": "server_error",
    "api_error": "server_error",
    "timeout_error": "server_error",
    "rate_limit_error": "rate_limited",
}


# --- the request (pure) -----------------------------------------------------------------------


def anthropic_payload(
    request: ProviderRequest, *, model: str, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """The Messages API request body for ``request`` (see the module docstring)."""
    system, messages = _messages(request)
    payload: dict[str, Any] = {
        "model": request.model or model,
        "max_tokens": request.max_tokens if request.max_tokens is not None else default_max_tokens,
        "messages": messages,
        "stream": True,
    }
    if system:
        payload["system"] = system
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.tools:
        payload["tools"] = [_tool(spec) for spec in request.tools]
    return payload


def _messages(request: ProviderRequest) -> tuple[str, list[dict[str, Any]]]:
    system = [request.instructions] if request.instructions else []
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        role = message.get("role")
        if role == "system":
            text = content_text(message.get("content"))
            if text:
                system.append(text)
            continue
        if role == "tool":
            blocks: list[dict[str, Any]] = [
                {
                    "type": "tool_result",
                    "tool_use_id": str(message.get("tool_call_id") or ""),
                    "content": content_text(message.get("content")),
                }
            ]
            role = "user"
        elif role == "assistant":
            blocks = _text_blocks(message.get("content"))
            for call in message.get("tool_calls") or ():
                blocks.append(_tool_use(call))
        else:
            role = "user"
            blocks = _text_blocks(message.get("content"))
        if not blocks:
            continue  # an empty turn (Anthropic refuses empty content)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        content = turn["content"]
        if len(content) == 1 and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]  # the plain form, as most clients send it
    return "\n\n".join(system), turns


def _text_blocks(content: Any) -> list[dict[str, Any]]:
    text = content_text(content)
    # Anthropic refuses empty text blocks.
    return [{"type": "text", "text": text}] if text else []


def _tool_use(call: Any) -> dict[str, Any]:
    parsed = read_tool_call(call)
    return {"type": "tool_use", "id": parsed.id, "name": parsed.name, "input": parsed.arguments}


def _tool(spec: dict[str, Any]) -> dict[str, Any]:
    function = spec.get("function")
    function = function if isinstance(function, dict) else spec
    tool: dict[str, Any] = {
        "name": function.get("name", ""),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        tool["description"] = function["description"]
    return tool


# --- the provider -----------------------------------------------------------------------------


class AnthropicProvider(HttpProvider):
    """An Anthropic Messages API upstream."""

    def _endpoint(self, root: str) -> str:
        return root + ("/messages" if root.endswith("/v1") else "/v1/messages")

    def _headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            "accept-encoding": "identity",  # a compressing proxy would hold tokens back
            "anthropic-version": ANTHROPIC_VERSION,
            **self.config.headers,
        }
        if key := self._api_key():
            headers["x-api-key"] = key
        return headers

    def _error_body(self, body: bytes) -> tuple[str, str]:
        return _error_of(body)

    def _error_text(self, response: UpstreamResponse, body: bytes) -> str:
        text = super()._error_text(response, body)
        request_id = response.headers.get("request-id")
        return f"{text} (request-id {request_id[:100]})" if request_id else text

    def _classify(self, response: UpstreamResponse) -> tuple[str, bool, float | None]:
        # 529 (overloaded) is a 5xx; x-should-retry overrides the status, as in Anthropic's
        # SDKs; and the retry hint is kept whatever the verdict.
        reason, retryable, _ = super()._classify(response)
        should_retry = response.headers.get("x-should-retry", "").strip().lower()
        if should_retry in ("true", "false"):
            retryable = should_retry == "true"
        return reason, retryable, self._retry_after(response)

    # --- the stream -------------------------------------------------------------------------

    async def stream(self, request: ProviderRequest, send: Sink) -> None:
        """Run one message and send its deltas into ``send``; see the module docstring."""
        headers = self._headers()
        body = orjson.dumps(anthropic_payload(request, model=self.config.model))
        async with self._post(body, headers) as response:
            await self._read_events(response, send)

    async def _read_events(self, response: UpstreamResponse, send: Sink) -> None:
        parser = SSEParser()
        state = _StreamState()

        def parse(chunk: bytes) -> Iterator[Delta]:
            try:
                events = parser.feed(chunk)
            except SSEError as exc:
                raise self._error(f"bad event stream: {exc}", reason="protocol") from None
            state.events += len(events)
            for event in events:
                delta = self._event_delta(event.event, event.data, state)
                if delta is not None:
                    state.sent = True  # it goes out before anything parse raises after it
                    yield delta
                if state.stopped:
                    return

        received = await pump_deltas(response, send, parse, lambda: state.stopped)
        if state.stopped:
            await drain(response)
        if not state.stopped:
            raise self._closed_early(received, state.events)
        await send.send(
            Delta(
                usage=Usage(state.prompt_tokens, state.completion_tokens),
                finish_reason=_STOP_REASONS.get(state.stop_reason or "", "stop"),
            )
        )

    def _event_delta(self, name: str, data: str, state: _StreamState) -> Delta | None:
        """Fold one event into ``state``; the delta it carries, if any."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._error(
                f"the upstream sent a {name} event that is not JSON", reason="protocol"
            ) from None
        if not isinstance(doc, dict):
            raise self._error(
                f"the upstream sent a {name} event that is not an object", reason="protocol"
            )
        kind = doc.get("type") if isinstance(doc.get("type"), str) else name
        if kind == "content_block_delta":
            return state.block_delta(doc)
        if kind == "content_block_start":
            if len(state.blocks) >= MAX_OPEN_BLOCKS:
                raise self._error("the upstream opened too many content blocks", reason="protocol")
            return state.block_start(doc)
        if kind == "content_block_stop":
            return state.block_stop(doc)
        if kind == "message_start":
            message = doc.get("message")
            if isinstance(message, dict) and isinstance(message.get("usage"), dict):
                state.take_usage(message["usage"])
        elif kind == "message_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                state.stop_reason = delta["stop_reason"]
            if isinstance(doc.get("usage"), dict):
                state.take_usage(doc["usage"])
        elif kind == "message_stop":
            state.stopped = True
        elif kind == "error":
            raise self._stream_error(doc, state)
        return None  # ping, and event types added after this was written

    def _stream_error(self, doc: dict[str, Any], state: _StreamState) -> ProviderError:
        error = doc.get("error")
        error = error if isinstance(error, dict) else {}
        kind = str(error.get("type") or "error")
        message = str(error.get("message") or "no message")[:MESSAGE_LIMIT]
        reason = _RETRYABLE_ERRORS.get(kind)
        return self._error(
            f"the upstream reported an error ({kind}): {message}",
            retryable=reason is not None and not state.sent,
            reason=reason or "upstream_error",
        )


class _StreamState:
    """What the events of one answer have said so far."""

    __slots__ = (
        "blocks",
        "cache_tokens",
        "completion_tokens",
        "events",
        "input_tokens",
        "sent",
        "stop_reason",
        "stopped",
        "tool_count",
    )

    def __init__(self) -> None:
        # Open content blocks by Anthropic index; closed ones are removed, so it stays small.
        self.blocks: dict[int, _Block] = {}
        self.tool_count = 0
        self.events = 0  # server-sent events read
        self.input_tokens: int | None = None  # None until the upstream says
        self.cache_tokens = 0
        self.completion_tokens: int | None = None
        self.stop_reason: str | None = None
        self.stopped = False
        self.sent = False  # a delta went into the sink

    @property
    def prompt_tokens(self) -> int | None:
        return None if self.input_tokens is None else self.input_tokens + self.cache_tokens

    def take_usage(self, usage: dict[str, Any]) -> None:
        # Every count Anthropic reports is the total so far: the last one wins.
        if _is_int(usage.get("input_tokens")):
            self.input_tokens = usage["input_tokens"]
            cache = usage.get("cache_creation_input_tokens"), usage.get("cache_read_input_tokens")
            self.cache_tokens = sum(n for n in cache if _is_int(n))
        if _is_int(usage.get("output_tokens")):
            self.completion_tokens = usage["output_tokens"]

    def block_start(self, doc: dict[str, Any]) -> Delta | None:
        block = doc.get("content_block")
        index = doc.get("index")
        if not isinstance(block, dict) or not _is_int(index):
            return None
        kind = block.get("type")
        if kind == "tool_use":
            call = _Block("tool_use", self.tool_count, block.get("input"))
            self.tool_count += 1
            self.blocks[index] = call
            first = ToolCallDelta(
                index=call.tool_index,
                id=str(block.get("id") or "") or None,
                name=str(block.get("name") or "") or None,
            )
            return Delta(tool_calls=(first,))
        self.blocks[index] = _Block(str(kind), -1, None)
        text = block.get("text")
        if kind == "text" and isinstance(text, str) and text:
            return Delta(text=text)
        return None

    def block_delta(self, doc: dict[str, Any]) -> Delta | None:
        delta = doc.get("delta")
        if not isinstance(delta, dict):
            return None
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return Delta(text=text) if isinstance(text, str) and text else None
        if kind == "input_json_delta":
            block = self._block(doc)
            piece = delta.get("partial_json")
            if block is None or block.kind != "tool_use" or not isinstance(piece, str) or not piece:
                return None
            block.arguments_sent = True
            return Delta(tool_calls=(ToolCallDelta(index=block.tool_index, arguments=piece),))
        return None  # thinking, signature, citations

    def _block(self, doc: dict[str, Any]) -> _Block | None:
        index = doc.get("index")
        return self.blocks.get(index) if _is_int(index) else None

    def block_stop(self, doc: dict[str, Any]) -> Delta | None:
        block = self._block(doc)
        if block is not None:
            del self.blocks[doc["index"]]
        if block is None or block.kind != "tool_use" or block.arguments_sent:
            return None
        # A call without parameters streams no argument text; its arguments are still JSON.
        given = block.start_input if isinstance(block.start_input, dict) else {}
        arguments = orjson.dumps(given).decode()
        return Delta(tool_calls=(ToolCallDelta(index=block.tool_index, arguments=arguments),))


class _Block:
    __slots__ = ("arguments_sent", "kind", "start_input", "tool_index")

    def __init__(self, kind: str, tool_index: int, start_input: Any) -> None:
        self.kind = kind
        self.tool_index = tool_index
        self.start_input = start_input
        self.arguments_sent = False


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _error_of(body: bytes) -> tuple[str, str]:
    """The ``(type, message)`` of an Anthropic error body, or ``("", text)`` of another one."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", body.decode("utf-8", "replace").strip()
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        return str(error.get("type") or ""), str(error.get("message") or "")
    if isinstance(error, str):
        return "", error
    return "", body.decode("utf-8", "replace").strip()
