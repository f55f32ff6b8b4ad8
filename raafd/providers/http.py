"""What the network providers share: one streamed JSON ``POST`` and its failures.

:class:`HttpProvider` holds the plumbing; a provider subclass adds only its wire format (the
endpoint, the headers, the payload, the answer's parser, the shape of its error bodies). The
``POST`` goes through the daemon's :class:`~raafd.providers.upstream.UpstreamClient` (a lean
HTTP/1.1 client of the providers' own, see :mod:`raafd.providers.upstream`). Every failure of
the exchange becomes a :class:`ProviderError` with a stable ``reason``:

- transport: ``connect`` (refused, unreachable, or timed out connecting), ``pool`` (no free
  connection in the shared pool), ``timeout`` (nothing read for ``read_timeout``), ``config``
  (a bad URL), ``protocol`` (a malformed response head or body framing), ``disconnect`` (a
  broken connection, or one closed before the body's end);
- a streamed answer whose body ends, or whose connection breaks, before the answer does (an
  upstream that answered 200 and then gave up, as llama.cpp's server does past its context
  window): ``disconnect``, retryable (so retried only before the first delta), its message
  naming what came: "the upstream closed the stream after 1834 bytes (12 events) before the
  answer was complete; last line: data: {...}" (:meth:`HttpProvider._closed_early`, the last
  line cut to :data:`LAST_LINE_LIMIT` characters and redacted like every message);
- HTTP: 429 is ``rate_limited``, 408 and 5xx are ``server_error``, all three retryable with the
  upstream's ``Retry-After``; 401 and 403 are ``auth``, anything else ``bad_request``.

Secrets: the API key (and every configured header value) is sent upstream and nowhere else.
Every message put into an exception goes through :func:`redact_secrets`, because some upstreams
echo the key they were given in their error bodies.

:func:`open_body` is for httpx responses (the http tools and tests still use httpx); :func:`drain`
reads the end of either kind of body.
"""

from __future__ import annotations

import abc
import email.utils
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, suppress
from types import TracebackType
from typing import Any

import httpx
import trio

from raafd.config import ProviderConfig
from raafd.providers.base import Delta, ProviderError, Sink
from raafd.providers.upstream import (
    Exchange,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTransportError,
)

__all__ = [
    "ERROR_BODY_LIMIT",
    "LAST_LINE_LIMIT",
    "MESSAGE_LIMIT",
    "HttpProvider",
    "Received",
    "drain",
    "open_body",
    "parse_retry_after",
    "pump_deltas",
    "redact_secrets",
]

ERROR_BODY_LIMIT = 64 << 10  # bytes of an error body read for its message
MESSAGE_LIMIT = 500  # characters of an upstream message kept in an error
LAST_LINE_LIMIT = 200  # characters of a body's last line kept in a "closed early" error
DRAIN_TIMEOUT = 0.25  # seconds to read a body's end once the answer is complete
_CLEANUP_TIMEOUT = 1.0  # seconds, shielded, to close a response and unwind its readers
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


async def drain(response: UpstreamResponse) -> None:
    """Read the end of a complete answer's body (normally here already), so that its connection
    can be reused; a server that holds the body open longer, or sends more than
    :data:`ERROR_BODY_LIMIT` bytes of it, gets the connection closed instead."""
    if response.ended:
        return  # the usual case, without the cost of a deadline
    left = ERROR_BODY_LIMIT
    with trio.move_on_after(DRAIN_TIMEOUT):
        async for chunk in response:
            left -= len(chunk)
            if left <= 0:
                break


class Received:
    """What a streamed body brought before it ended, for the error that says it ended too
    soon: its size, its last bytes (the last two reads) and, when the connection broke rather
    than the body ending, why."""

    __slots__ = ("broken", "size", "tail")

    def __init__(self, size: int, tail: bytes, broken: str | None) -> None:
        self.size = size
        self.tail = tail
        self.broken = broken

    def last_line(self) -> str:
        """The body's last non-blank line, cut to :data:`LAST_LINE_LIMIT` characters."""
        lines = [line for line in self.tail.splitlines() if line.strip()]
        if not lines:
            return "(none)"
        text = lines[-1].decode("utf-8", "replace")
        if len(lines) == 1 and len(self.tail) < self.size:
            text = "…" + text  # it may have begun before the bytes kept
        return text[:LAST_LINE_LIMIT] + "…" if len(text) > LAST_LINE_LIMIT else text


async def pump_deltas(
    response: UpstreamResponse,
    send: Sink,
    parse: Callable[[bytes], Iterator[Delta]],
    finished: Callable[[], bool],
) -> Received:
    """Read a streamed body until ``finished()`` or the body's end, turning each read into
    deltas with ``parse`` and sending them into ``send`` in order, all in this task; what the
    body brought.

    Adjacent text-only deltas of one read go on as one delta (their texts joined): they arrived
    together, so joining them delays nothing, and the stream makes one ``content`` event of them
    instead of several. While raafd keeps pace with the upstream it reads one delta at a time;
    when it reads late, several are waiting, and what a token costs then falls instead of rising.

    ``send`` waits while the stream cannot take more (paused, its subscriber behind), and the
    next read waits for it: backpressure reaches the upstream's TCP window. What ``parse``
    raises is raised once the deltas it yielded before went out. A connection that breaks (or
    closes inside the HTTP framing) ends the body like its end does, with
    :attr:`Received.broken` saying so: the provider's state tells whether the answer was
    complete all the same."""
    size = 0
    last = previous = b""
    while not finished():
        try:
            chunk = await response.receive_some()
        except UpstreamTransportError as exc:
            if exc.kind != "disconnect":
                raise
            return Received(size, previous + last, exc.message)
        if not chunk:
            break
        size += len(chunk)
        previous, last = last, chunk
        deltas: list[Delta] = []
        texts: list[Delta] = []  # adjacent text-only deltas, not yet in deltas
        failure: Exception | None = None
        try:
            for delta in parse(chunk):
                if delta.text and _text_only(delta):
                    texts.append(delta)
                    continue
                if texts:
                    deltas.append(_joined(texts))
                    texts = []
                deltas.append(delta)
        except Exception as exc:
            failure = exc
        if texts:
            deltas.append(_joined(texts))
        for delta in deltas:
            await send.send(delta)
        if failure is not None:
            raise failure
    return Received(size, previous + last, None)


def _text_only(delta: Delta) -> bool:
    return not delta.tool_calls and delta.usage is None and delta.finish_reason is None


def _joined(deltas: list[Delta]) -> Delta:
    return deltas[0] if len(deltas) == 1 else Delta(text="".join([d.text for d in deltas]))


class _Post:
    """:meth:`HttpProvider._post`'s context manager (a class: see
    :class:`~raafd.providers.upstream.Exchange`). It turns every transport failure of the
    exchange, raised inside the block or when the exchange is left (a read timeout), into a
    :class:`ProviderError`."""

    __slots__ = ("_exchange", "_provider")

    def __init__(self, provider: HttpProvider, exchange: Exchange) -> None:
        self._provider = provider
        self._exchange = exchange

    async def __aenter__(self) -> UpstreamResponse:
        exchange = self._exchange
        try:
            response = await exchange.__aenter__()
        except UpstreamTransportError as exc:
            raise self._provider._transport_error(exc) from None
        if response.is_success:
            return response
        try:
            error = await self._provider._http_error(response)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await self.__aexit__(None, None, None)
        raise error

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._exchange.__aexit__(exc_type, exc, tb)
        except UpstreamTransportError as left:
            raise self._provider._transport_error(left) from None
        if isinstance(exc, UpstreamTransportError):
            raise self._provider._transport_error(exc) from None


class HttpProvider(abc.ABC):
    """An upstream reached by one streamed ``POST`` of JSON. ``client`` is the daemon's shared
    upstream client (see :func:`raafd.providers.upstream.open_upstream_client`)."""

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        client: UpstreamClient,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.name = name
        self.config = config
        self._client = client
        self._environ = environ
        self._url = self._endpoint(config.base_url.rstrip("/"))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._url}>"

    # --- what a provider says -----------------------------------------------------------------

    @abc.abstractmethod
    def _endpoint(self, root: str) -> str:
        """The URL to post to, from ``base_url`` without its trailing slash."""

    @abc.abstractmethod
    def _error_body(self, body: bytes) -> tuple[str, str]:
        """The ``(kind, message)`` of an HTTP error body (its first bytes); either may be
        empty."""

    # --- secrets ------------------------------------------------------------------------------

    def _secrets(self) -> tuple[str, ...]:
        key = self._environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        return (key, *(v for v in self.config.headers.values() if len(v) >= 4))

    def _error(self, message: str, **kwargs: Any) -> ProviderError:
        text = redact_secrets(f"{self.name}: {message}", self._secrets())
        return ProviderError(text, **kwargs)

    def _api_key(self) -> str:
        """The key from the environment variable that ``api_key_env`` names, or ``""`` when it
        names none; a named variable that is unset or empty is a ``config`` error."""
        if not self.config.api_key_env:
            return ""
        key = self._environ.get(self.config.api_key_env, "")
        if not key:
            raise self._error(
                f"the environment variable {self.config.api_key_env} that api_key_env"
                " names is not set",
                reason="config",
            )
        return key

    # --- the exchange -------------------------------------------------------------------------

    def _post(self, body: bytes, headers: Mapping[str, str]) -> _Post:
        """``async with self._post(body, headers) as response``: the upstream's successful
        response to ``body``, still streaming. Any other answer, and every transport failure
        while the block reads, is raised as a :class:`ProviderError`."""
        exchange = self._client.post(
            self._url,
            headers=headers,
            body=body,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
        )
        return _Post(self, exchange)

    def _closed_early(self, received: Received, events: int) -> ProviderError:
        """The error of an answer whose body ended (or whose connection broke) before the
        answer did, saying what came: a retryable ``disconnect`` (retried only while no delta
        went out, see :mod:`raafd.providers.retry`)."""
        how = f" ({received.broken})" if received.broken else ""
        plural = "" if events == 1 else "s"
        return self._error(
            f"the upstream closed the stream after {received.size} bytes ({events} event{plural})"
            f" before the answer was complete{how}; last line: {received.last_line()}",
            retryable=True,
            reason="disconnect",
        )

    def _transport_error(self, exc: UpstreamTransportError) -> ProviderError:
        detail = exc.message or exc.kind
        if exc.kind == "connect_timeout":
            return self._error(
                "timed out connecting to the upstream", retryable=True, reason="connect"
            )
        if exc.kind == "pool":
            return self._error(
                f"no free upstream connection within {self.config.connect_timeout:g} s"
                " (the shared connection pool is full)",
                retryable=True,
                reason="pool",
            )
        if exc.kind == "connect":
            return self._error(
                f"cannot connect to the upstream: {detail}", retryable=True, reason="connect"
            )
        if exc.kind == "timeout":
            return self._error(
                f"the upstream sent nothing for {self.config.read_timeout:g} s",
                retryable=True,
                reason="timeout",
            )
        if exc.kind == "config":
            return self._error(f"bad upstream request (URL or header): {detail}", reason="config")
        if exc.kind == "protocol":
            return self._error(f"cannot decode the upstream's answer: {detail}", reason="protocol")
        return self._error(
            f"the upstream connection failed: {detail}", retryable=True, reason="disconnect"
        )

    async def _http_error(self, response: UpstreamResponse) -> ProviderError:
        body = bytearray()
        async for chunk in response:
            body += chunk
            if len(body) >= ERROR_BODY_LIMIT:
                del body[ERROR_BODY_LIMIT:]
                break
        reason, retryable, retry_after = self._classify(response)
        return self._error(
            self._error_text(response, bytes(body)),
            retryable=retryable,
            status=response.status_code,
            retry_after=retry_after,
            reason=reason,
        )

    def _error_text(self, response: UpstreamResponse, body: bytes) -> str:
        kind, message = self._error_body(body)
        message = message or response.reason_phrase or "no message"
        if len(message) > MESSAGE_LIMIT:
            message = message[:MESSAGE_LIMIT] + "…"
        kind = f" ({kind})" if kind else ""
        return f"the upstream answered HTTP {response.status_code}{kind}: {message}"

    def _classify(self, response: UpstreamResponse) -> tuple[str, bool, float | None]:
        """The ``(reason, retryable, retry_after)`` of an HTTP error answer."""
        status = response.status_code
        if status == 429:
            return "rate_limited", True, self._retry_after(response)
        if status >= 500 or status == 408:
            return "server_error", True, self._retry_after(response)
        return ("auth" if status in (401, 403) else "bad_request"), False, None

    def _retry_after(self, response: UpstreamResponse) -> float | None:
        ms = response.headers.get("retry-after-ms")  # Azure OpenAI, Anthropic
        if ms is not None:
            try:
                return max(0.0, float(ms) / 1000.0)
            except ValueError:
                pass
        return parse_retry_after(response.headers.get("retry-after"))
