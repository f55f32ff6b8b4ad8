"""A small ASGI layer: requests with bounded bodies, JSON responses, a route table.

Every error leaves as ``{"error": {"code", "message", "field"}}`` with the status that fits; an
unexpected exception is logged with its traceback and answered with ``internal`` and nothing
more. Handlers raise :class:`raafd.errors.RaafdError`; they never build error bodies themselves.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import attrs
import orjson
import structlog
import trio

from raafd.auth import ANONYMOUS, Principal
from raafd.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    RaafdError,
    RequestTimeout,
    TooLarge,
    Unauthorized,
)
from raafd.http.cors import NOTHING as NO_CORS
from raafd.http.cors import cors
from raafd.http.strict import json_object
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.net.delivery import Sink
from raafd.protocol.commands import describe_structure_error
from raafd.protocol.commands import structure as structure_strict

__all__ = [
    "JSONResponse",
    "Request",
    "Response",
    "Router",
    "StreamingResponse",
    "decode_body",
    "error_response",
    "next_request_id",
]

log = get_logger("raafd.http")
T = TypeVar("T")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_req_ids = itertools.count(1)


def next_request_id() -> str:
    """A fresh request id (``req_N``), for logs and stream owners; unique in the process
    across both HTTP paths."""
    return f"req_{next(_req_ids)}"


class Request:
    def __init__(
        self, scope: Scope, receive: Receive, max_body: int, body_timeout: float = math.inf
    ) -> None:
        self.scope = scope
        self._receive = receive
        self.max_body = max_body
        self.body_timeout = body_timeout  # from the request's start: server.header_timeout
        self.deadline = trio.current_time() + body_timeout
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: dict[str, str] = dict(parse_qsl(scope.get("query_string", b"").decode()))
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        self.id = next_request_id()
        self.principal = ANONYMOUS  # set by the router's authorize, before routing

    async def body(self) -> bytes:
        """The whole body, refusing (413) past ``max_body`` without reading the rest."""
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise TooLarge(f"request body is over the limit of {self.max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            with trio.move_on_at(self.deadline) as waiting:
                message = await self._receive()
            if waiting.cancelled_caught:
                # A body that never comes would hold a connection slot forever (slowloris).
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout:g} s"
                )
            if message["type"] == "http.disconnect":
                raise trio.BrokenResourceError("client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise TooLarge(f"request body is over the limit of {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def json(self, cls: type[T]) -> T:
        """Parse and validate the body into an attrs class (400 naming the field on failure)."""
        raw = await self.body()
        return decode_body(raw, cls)

    async def wait_disconnect(self) -> None:
        """Return when the client disconnects (only valid once the body has been read)."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return


def decode_body(raw: bytes, cls: type[T]) -> T:
    return structure(json_object(raw), cls)


def structure(data: Mapping[str, Any], cls: type[T]) -> T:
    """cattrs structuring with errors turned into ``bad_request`` naming the field path."""
    try:
        return structure_strict(data, cls)
    except Exception as exc:
        field, reason = describe_structure_error(exc)
        message = f"{field}: {reason}" if field else reason
        raise BadRequest(message, field=field) from None


@attrs.define
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = attrs.field(factory=dict)


def JSONResponse(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps(data), "application/json", headers or {})


@attrs.define
class StreamingResponse:
    """A response whose body is written while the client reads it: ``body`` is called with the
    response's :class:`~raafd.net.delivery.Sink` in a task that is cancelled when the client
    disconnects (hypercorn takes bytes only by awaiting, so ``write_nowait`` always refuses)."""

    body: Callable[[Sink], Awaitable[None]]
    content_type: str
    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)


Handler = Callable[..., Awaitable[Response | StreamingResponse]]


def error_response(err: RaafdError) -> Response:
    headers = {}
    if err.retry_after is not None:
        headers["retry-after"] = str(max(1, round(err.retry_after)))
    if isinstance(err, TooLarge | RequestTimeout):
        headers["connection"] = "close"  # the unread rest of the body makes it unusable
    if isinstance(err, Unauthorized):
        headers["www-authenticate"] = "Bearer"
    if isinstance(err, MethodNotAllowed) and err.allow:
        headers["allow"] = ", ".join(err.allow)
    return JSONResponse({"error": err.to_dict()}, err.http_status, headers)


class Router:
    """Method + path-pattern routing; ``{name}`` segments become keyword arguments.

    ``authorize``, when given, sees every request before routing and returns who it acts as
    (``request.principal``), or raises (a
    :class:`~raafd.errors.RaafdError`, e.g. ``unauthorized``) to refuse it. ``cors_origins``,
    when given, is ``http.cors_origins`` now: every answer gets the headers
    :func:`raafd.http.cors.cors` decides, and a preflight is answered before ``authorize``."""

    def __init__(
        self,
        metrics: Metrics,
        max_body: Callable[[], int],
        authorize: Callable[[Request], Principal] | None = None,
        cors_origins: Callable[[], Sequence[str]] | None = None,
        body_timeout: Callable[[], float] | None = None,
    ) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        self.metrics = metrics
        self._max_body = max_body
        self._body_timeout = body_timeout
        self._authorize = authorize
        self._cors_origins = cors_origins

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        for existing, methods in self._routes:
            if existing.pattern == regex.pattern:
                methods[method] = handler
                return
        self._routes.append((regex, {method: handler}))

    def route(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for regex, methods in self._routes:
            match = regex.match(path)
            if match:
                if method in methods:
                    return methods[method], match.groupdict()
                if method == "HEAD" and "GET" in methods:
                    return methods["GET"], match.groupdict()
                allow = sorted({*methods, "HEAD"} if "GET" in methods else methods)
                raise MethodNotAllowed(
                    f"{method} is not allowed on {path}; use {', '.join(allow)}", allow=allow
                )
        raise NotFound(f"no such endpoint: {path}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # pragma: no cover - raafd runs no lifespan
            return
        if scope["type"] != "http":
            # WebSocket upgrades reach the gateway before hypercorn; one arriving here came on
            # a reused keep-alive connection or to another path.
            await send({"type": "websocket.close", "code": 1008})
            return
        timeout = math.inf if self._body_timeout is None else self._body_timeout()
        request = Request(scope, receive, self._max_body(), timeout)
        structlog.contextvars.bind_contextvars(req=request.id)
        access = NO_CORS
        origin = request.headers.get("origin")
        if origin is not None and self._cors_origins is not None:
            access = cors(origin, request.method, request.headers, self._cors_origins())
        try:
            if access.preflight == 204:
                result: Response | StreamingResponse = Response(204)
            elif access.preflight is not None:  # a preflight from an origin not allowed
                raise Forbidden("this origin may not use the API from a browser")
            else:
                result = await self._dispatch(request)
        except RaafdError as err:
            self.metrics.errors.labels(err.code).inc()
            result = error_response(err)
        except trio.BrokenResourceError:
            return
        except Exception:
            log.exception("unhandled error in HTTP handler", path=request.path)
            result = error_response(RaafdError("internal error"))
        if access.headers:  # a copy: a handler may answer with a shared Response
            result.headers = {**result.headers, **dict(access.headers)}
        if isinstance(result, StreamingResponse):
            await _send_streaming(request, result, send)
        else:
            await _send_response(request, result, send)
        self.metrics.http_requests.labels(request.method, str(result.status)).inc()

    async def _dispatch(self, request: Request) -> Response | StreamingResponse:
        if self._authorize is not None:
            request.principal = self._authorize(request)  # before routing: reveals nothing
        handler, params = self.route(request.method, request.path)
        return await handler(request, **params)


def _headers(content_type: str, extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    pairs = [(b"content-type", content_type.encode())]
    pairs += [(k.encode(), v.encode()) for k, v in extra.items()]
    return pairs


async def _send_response(request: Request, response: Response, send: Send) -> None:
    if response.status == 204:  # no content: neither a type nor a length (RFC 9110 8.6)
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items()]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = _headers(response.content_type, response.headers)
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    body = b"" if request.method == "HEAD" else response.body
    await send({"type": "http.response.body", "body": body})


class _AsgiSink:
    """A streaming response's body as a :class:`~raafd.net.delivery.Sink`."""

    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    def write_nowait(self, data: bytes) -> bool:
        return False

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


async def _send_streaming(request: Request, response: StreamingResponse, send: Send) -> None:
    headers = _headers(response.content_type, response.headers)
    headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})

    async def pump(cancel_scope: trio.CancelScope) -> None:
        await response.body(_AsgiSink(send))
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, nursery.cancel_scope)
        await request.wait_disconnect()
        nursery.cancel_scope.cancel()  # the client left: stop producing (detaches the stream)
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # the connection is already gone
            pass
