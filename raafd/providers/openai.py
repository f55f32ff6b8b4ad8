"""The OpenAI-compatible provider: Chat Completions with ``stream: true`` over httpx.

It speaks to OpenAI and to the servers that copy its wire format (vLLM, llama.cpp's server,
Ollama's ``/v1``), so it is lenient in what it reads: ``usage`` may be missing, ``content`` may be
``null``, ``choices`` may be empty, unknown fields are ignored, ``finish_reason`` may come with
the usage chunk or before it, and the stream may end without ``data: [DONE]`` once a
``finish_reason`` was seen. An ``error`` object in a data line is a :class:`ProviderError`.

What it sends into the channel: one :class:`Delta` per upstream chunk that carries text or
tool-call fragments, forwarded the moment its line arrives (the channel's bound is the
backpressure: a slow consumer stops the reads), then one last ``Delta`` with ``usage`` and
``finish_reason`` when the upstream reported either.

Secrets: the API key (and every configured header value) is sent upstream and nowhere else.
Every message this module puts into an exception goes through :func:`redact_secrets`, because
some upstreams echo the key they were given in their error bodies.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
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
from raafd.providers.sse import SSEError, SSEParser

__all__ = ["OpenAIProvider", "open_body", "parse_retry_after", "redact_secrets"]

ERROR_BODY_LIMIT = 64 << 10  # bytes of an error body read for its message
JSON_BODY_LIMIT = 8 << 20  # bytes of a non-streamed answer (a server that ignored stream: true)
DRAIN_AFTER_DONE = 0.25  # seconds to read the body's end after [DONE], so the connection is reused
_CLEANUP_TIMEOUT = 1.0  # seconds, shielded, to close a response and unwind its readers
_MESSAGE_LIMIT = 500  # characters of an upstream message kept in an error
_REDACTED = "[redacted]"
# Key shapes worth hiding even when they are not ours (or are masked echoes of ours).
_KEY_PATTERN = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_*.\-]{4,}|(?i:bearer)\s+[A-Za-z0-9._~+/=*\-]{8,}"
)


def redact_secrets(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with every secret in ``secrets`` and every key-shaped token replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    return _KEY_PATTERN.sub(_REDACTED, text)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; ``None`` if absent
    or unreadable; never negative."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _retry_after_of(response: httpx.Response) -> float | None:
    ms = response.headers.get("retry-after-ms")  # Azure OpenAI
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    return parse_retry_after(response.headers.get("retry-after"))


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


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


class OpenAIProvider:
    """An OpenAI-compatible Chat Completions upstream. ``client`` is the daemon's shared httpx
    client (see :func:`raafd.providers.registry.open_http_client`)."""

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
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.read_timeout,
            pool=config.connect_timeout,
        )

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.name!r} {self._url}>"

    # --- the request ------------------------------------------------------------------------

    def _secrets(self) -> tuple[str, ...]:
        key = self._environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        return (key, *(v for v in self.config.headers.values() if len(v) >= 4))

    def _headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            # A compressing proxy would hold tokens back to fill its blocks.
            "accept-encoding": "identity",
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

    def _error(self, message: str, **kwargs: Any) -> ProviderError:
        text = redact_secrets(f"{self.name}: {message}", self._secrets())
        return ProviderError(text, **kwargs)

    # --- the stream -------------------------------------------------------------------------

    async def stream(
        self, request: ProviderRequest, send: trio.abc.SendChannel[ProviderEvent]
    ) -> None:
        """Run one completion and send its deltas into ``send``; see the module docstring."""
        headers = self._headers()
        body = self._payload(request)
        try:
            async with self._client.stream(
                "POST", self._url, content=body, headers=headers, timeout=self._timeout
            ) as response:
                if not response.is_success:
                    raise await self._http_error(response)
                content_type = response.headers.get("content-type", "")
                if content_type.startswith("application/json"):
                    await self._read_whole(response, send)
                else:
                    await self._read_events(response, send)
        except httpx.ConnectTimeout:
            raise self._error(
                "timed out connecting to the upstream", retryable=True, reason="connect"
            ) from None
        except httpx.PoolTimeout:
            raise self._error(
                f"no free upstream connection within {self.config.connect_timeout:g} s"
                " (the shared connection pool is full)",
                retryable=True,
                reason="pool",
            ) from None
        except httpx.ConnectError as exc:
            raise self._error(
                f"cannot connect to the upstream: {_describe(exc)}",
                retryable=True,
                reason="connect",
            ) from None
        except httpx.TimeoutException:
            raise self._error(
                f"the upstream sent nothing for {self.config.read_timeout:g} s",
                retryable=True,
                reason="timeout",
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise self._error(f"bad upstream URL: {_describe(exc)}", reason="config") from None
        except httpx.DecodingError as exc:
            raise self._error(
                f"cannot decode the upstream's answer: {_describe(exc)}", reason="protocol"
            ) from None
        except httpx.TransportError as exc:
            raise self._error(
                f"the upstream connection failed: {_describe(exc)}",
                retryable=True,
                reason="disconnect",
            ) from None

    async def _http_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        body = bytearray()
        async with open_body(response) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    del body[ERROR_BODY_LIMIT:]
                    break
        message = _upstream_message(bytes(body)) or response.reason_phrase or "no message"
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT] + "…"
        text = f"the upstream answered HTTP {status}: {message}"
        if status == 429:
            return self._error(
                text,
                retryable=True,
                status=status,
                retry_after=_retry_after_of(response),
                reason="rate_limited",
            )
        if status >= 500 or status == 408:
            return self._error(
                text,
                retryable=True,
                status=status,
                retry_after=_retry_after_of(response),
                reason="server_error",
            )
        reason = "auth" if status in (401, 403) else "bad_request"
        return self._error(text, status=status, reason=reason)

    async def _read_events(
        self, response: httpx.Response, send: trio.abc.SendChannel[ProviderEvent]
    ) -> None:
        parser = SSEParser()
        state = _ChunkState()
        async with open_body(response) as chunks:
            async for chunk in chunks:
                try:
                    events = parser.feed(chunk)
                except SSEError as exc:
                    raise self._error(f"bad event stream: {exc}", reason="protocol") from None
                for event in events:
                    if event.data.strip() == "[DONE]":
                        state.done = True
                        break
                    delta = self._chunk_delta(self._decode(event.data), state)
                    if delta is not None:
                        await send.send(delta)
                if state.done:
                    break
            if state.done:
                # Reading the body's end (normally here already) lets httpx reuse the
                # connection; a server that holds the body open after [DONE] gets it closed.
                left = ERROR_BODY_LIMIT
                with trio.move_on_after(DRAIN_AFTER_DONE):
                    async for chunk in chunks:
                        left -= len(chunk)
                        if left <= 0:
                            break
        if not state.done and state.finish_reason is None:
            raise self._error(
                "the upstream closed the stream before it was complete",
                retryable=True,
                reason="disconnect",
            )
        if state.finish_reason is not None or state.usage is not None:
            await send.send(Delta(usage=state.usage, finish_reason=state.finish_reason))

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
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
                f"the upstream reported an error: {_message_of(doc)[:_MESSAGE_LIMIT]}",
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

    async def _read_whole(
        self, response: httpx.Response, send: trio.abc.SendChannel[ProviderEvent]
    ) -> None:
        """A server that ignored ``stream: true`` answered one ``chat.completion`` object."""
        body = bytearray()
        async with open_body(response) as chunks:
            async for chunk in chunks:
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


@asynccontextmanager
async def open_body(response: httpx.Response) -> AsyncIterator[AsyncIterator[bytes]]:
    """The response body's chunks, with every layer of httpx's iteration finished on exit.

    httpx and httpcore stack several async generators to read a body, and closing the outer one
    leaves the inner ones to the garbage collector (encode/httpx#3686), which Trio reports with
    a ResourceWarning. So whatever ends the loop early (a break, an error, a cancellation), the
    response is closed first, and then the chain is run to its end: the first read of the closed
    connection raises inside the innermost layer and unwinds them all, in this task, now."""
    chunks = response.aiter_bytes()
    try:
        yield chunks
    finally:
        with trio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
            await response.aclose()
            with suppress(httpx.HTTPError, httpx.StreamError):
                async for _ in chunks:
                    pass


class _ChunkState:
    __slots__ = ("done", "finish_reason", "usage")

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(usage: dict[str, Any]) -> Usage:
    return Usage(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))


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
