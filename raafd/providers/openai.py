"""The OpenAI-compatible provider: Chat Completions with ``stream: true``.

It speaks to OpenAI and to the servers that copy its wire format (vLLM, llama.cpp's server,
Ollama's ``/v1``), so it is lenient in what it reads: ``usage`` may be missing (the answer's
usage is then unknown, ``None``, never 0), ``content`` may be ``null``, ``choices`` may be
empty, unknown fields are ignored, ``finish_reason`` may come with the usage chunk or before
it, and the stream may end (or its connection break) without ``data: [DONE]`` once a
``finish_reason`` was seen. An ``error`` object in a data line is a :class:`ProviderError`; a
stream that ends before its ``finish_reason`` and ``[DONE]`` is a ``disconnect`` that names
what came (see :mod:`raafd.providers.http`).

What it sends into the sink: one :class:`Delta` per upstream chunk that carries text or
tool-call fragments, forwarded the moment its line arrives (the sink's ``send`` is the
backpressure: a slow consumer stops the reads), then one last ``Delta`` with ``usage`` and
``finish_reason`` when the upstream reported either.

The HTTP exchange, its failures and the redaction of secrets are :mod:`raafd.providers.http`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import orjson

from raafd.providers.base import Delta, ProviderRequest, Sink, ToolCallDelta, Usage
from raafd.providers.http import (
    MESSAGE_LIMIT,
    HttpProvider,
    drain,
    open_body,
    parse_retry_after,
    pump_deltas,
    redact_secrets,
)
from raafd.providers.sse import SSEError, SSEParser
from raafd.providers.upstream import UpstreamResponse

__all__ = ["OpenAIProvider", "open_body", "parse_retry_after", "redact_secrets"]

_DONE = ("[DONE]", b"[DONE]")  # the data of the event that ends the stream
JSON_BODY_LIMIT = 8 << 20  # bytes of a non-streamed answer (a server that ignored stream: true)


def _upstream_message(body: bytes) -> str:
    """The human message of an error body, in the shapes the compatible servers use."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()
    return _message_of(doc) or body.decode("utf-8", "replace").strip()


def _message_of(doc: Any) -> str:
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict):
            return _message_of(error) or str(error.get("type") or "")
        if isinstance(error, str):
            return error
        for key in ("message", "detail"):  # vLLM: {"object": "error", "message": ...}
            if isinstance(doc.get(key), str):
                return str(doc[key])
    return ""


def _is_retryable_error_object(error: Any) -> bool:
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    if isinstance(code, int) and (code == 429 or code >= 500):
        return True
    kind = f"{error.get('type')} {code}".lower()
    return any(word in kind for word in ("server_error", "overloaded", "rate_limit", "timeout"))


class OpenAIProvider(HttpProvider):
    """An OpenAI-compatible Chat Completions upstream."""

    def _endpoint(self, root: str) -> str:
        return root + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            # A compressing proxy would hold tokens back to fill its blocks.
            "accept-encoding": "identity",
            **self.config.headers,
        }
        if key := self._api_key():
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _payload(self, request: ProviderRequest) -> bytes:
        messages = list(request.messages)
        if request.instructions:
            messages.insert(0, {"role": "system", "content": request.instructions})
        payload: dict[str, Any] = {
            "model": request.model or self.config.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            payload["temperature"] = request.temperature
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        if request.tools:
            payload["tools"] = request.tools
        return orjson.dumps(payload)

    def _error_body(self, body: bytes) -> tuple[str, str]:
        return "", _upstream_message(body)

    # --- the stream -------------------------------------------------------------------------

    async def stream(self, request: ProviderRequest, send: Sink) -> None:
        """Run one completion and send its deltas into ``send``; see the module docstring."""
        headers = self._headers()
        async with self._post(self._payload(request), headers) as response:
            content_type = response.headers.get("content-type", "")
            if content_type.startswith("application/json"):
                await self._read_whole(response, send)
            else:
                await self._read_events(response, send)

    async def _read_events(self, response: UpstreamResponse, send: Sink) -> None:
        parser = SSEParser()
        state = _ChunkState()
        parse = partial(self._chunk_deltas, parser, state)
        received = await pump_deltas(response, send, parse, lambda: state.done)
        if state.done:
            await drain(response)
        if not state.done and state.finish_reason is None:
            raise self._closed_early(received, state.events)
        if state.finish_reason is not None or state.usage is not None:
            await send.send(Delta(usage=state.usage, finish_reason=state.finish_reason))

    def _chunk_deltas(self, parser: SSEParser, state: _ChunkState, chunk: bytes) -> Iterator[Delta]:
        """The deltas of one read of the event stream (``state.done`` once ``[DONE]`` came)."""
        datas: list[bytes] | list[str] | None = parser.data_only(chunk)
        if datas is None:
            try:
                datas = [event.data for event in parser.feed(chunk)]
            except SSEError as exc:
                raise self._error(f"bad event stream: {exc}", reason="protocol") from None
        state.events += len(datas)
        for data in datas:
            if data.strip() in _DONE:
                state.done = True
                return
            delta = self._chunk_delta(self._decode(data), state)
            if delta is not None:
                yield delta

    def _decode(self, data: str | bytes) -> dict[str, Any]:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            if isinstance(data, bytes):  # not UTF-8? decoded as the event-stream rules say
                return self._decode(data.decode("utf-8", "replace"))
            raise self._error(
                "the upstream sent a data line that is not JSON", reason="protocol"
            ) from None
        if not isinstance(doc, dict):
            raise self._error(
                "the upstream sent a data line that is not an object", reason="protocol"
            )
        error = doc.get("error")
        if error:
            raise self._error(
                f"the upstream reported an error: {_message_of(doc)[:MESSAGE_LIMIT]}",
                retryable=_is_retryable_error_object(error),
                reason="upstream_error",
            )
        return doc

    def _chunk_delta(self, doc: dict[str, Any], state: _ChunkState) -> Delta | None:
        usage = doc.get("usage")
        if isinstance(usage, dict):
            state.usage = _usage(usage)
        choices = doc.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            state.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return None
        text = delta.get("content")
        calls = delta.get("tool_calls")
        tool_calls = _tool_call_deltas(calls) if isinstance(calls, list) else ()
        if not (isinstance(text, str) and text) and not tool_calls:
            return None
        return Delta(text=text if isinstance(text, str) else "", tool_calls=tool_calls)

    async def _read_whole(self, response: UpstreamResponse, send: Sink) -> None:
        """A server that ignored ``stream: true`` answered one ``chat.completion`` object."""
        body = bytearray()
        async for chunk in response:
            body += chunk
            if len(body) > JSON_BODY_LIMIT:
                raise self._error("the upstream's answer is too large", reason="protocol")
        doc = self._decode(body.decode("utf-8", "replace"))
        choices = doc.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            text = message.get("content")
            calls = message.get("tool_calls")
            tool_calls = _tool_call_deltas(calls) if isinstance(calls, list) else ()
            if (isinstance(text, str) and text) or tool_calls:
                await send.send(
                    Delta(text=text if isinstance(text, str) else "", tool_calls=tool_calls)
                )
        usage = doc.get("usage")
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        await send.send(
            Delta(
                usage=_usage(usage) if isinstance(usage, dict) else None,
                finish_reason=finish if isinstance(finish, str) else "stop",
            )
        )


class _ChunkState:
    __slots__ = ("done", "events", "finish_reason", "usage")

    def __init__(self) -> None:
        self.events = 0  # server-sent events read
        self.done = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None


def _count(value: Any) -> int | None:
    """A token count the upstream gave, or ``None`` (missing, null, not a number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(usage: dict[str, Any]) -> Usage:
    return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _tool_call_deltas(calls: list[Any]) -> tuple[ToolCallDelta, ...]:
    out: list[ToolCallDelta] = []
    for position, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):  # some servers send the object itself
            arguments = orjson.dumps(arguments).decode()
        index = call.get("index")
        call_id = call.get("id")
        name = function.get("name")
        out.append(
            ToolCallDelta(
                index=index if isinstance(index, int) else position,
                id=call_id if isinstance(call_id, str) and call_id else None,
                name=name if isinstance(name, str) and name else None,
                arguments=arguments,
            )
        )
    return tuple(out)
