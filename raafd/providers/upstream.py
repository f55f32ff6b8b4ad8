"""The network providers' HTTP/1.1 client: one streamed ``POST`` at a time per pooled connection.

The rule of this module: a connection goes back to the pool only when its response body was
read to the end, the exchange allows keep-alive (HTTP/1.1, no ``connection: close``), and no
byte followed the body. Every other way out of :meth:`UpstreamClient.post` (an error, a
cancellation, a consumer that stopped reading) closes the socket at once, synchronously, so an
upstream sees a cancelled stream end within a loop iteration and stops generating tokens.

Every read runs in the task that entered the exchange (a stream's own task): a plain ``await
stream.receive_some()`` on a :class:`trio.SocketStream` for ``http://``, on a
:class:`trio.SSLStream` over one for ``https://``. The client has no task of its own. Connecting
is :func:`trio.open_tcp_stream` with happy eyeballs (RFC 8305: the next address of a host is
tried when the last one has not answered within :data:`HAPPY_EYEBALLS_DELAY`, so an IPv6 route
that drops packets costs a quarter of a second, not the connect timeout).

Timeouts are cancel scopes:

- ``connect_timeout``: one ``move_on_after`` around connecting (DNS, TCP, a proxy's tunnel, the
  TLS handshake), a ``connect_timeout`` error; the same bound on waiting for a free connection
  when the pool is full, a ``pool`` error.
- ``read_timeout``: one :class:`trio.CancelScope` per exchange, entered with ``async with
  client.post(...)``. Its deadline is set to now + ``read_timeout`` before each read or write of
  the connection and back to infinity after it, so it bounds every wait for the upstream (the
  request sent, the response head, each body read) and none of the caller's own waits between
  reads (a stream its client paused). Moving one scope's deadline costs less than entering a
  new scope per read, which matters at one read per token. Its expiry is a ``timeout`` error,
  raised when the exchange is left; the connection is closed. So a response is read in the
  task that entered its exchange, and nowhere else.

Why not httpx on this path: per streamed token, httpcore scans its pool on each request and
runs every body chunk through about six nested async iterators, and h11 spends about ten times
:mod:`raafd.providers.wire`'s time on each chunk of a chunked body. Here the HTTP/1.1 itself
(the request head written once per URL and header set, the response head and the body read)
is :mod:`raafd.providers.wire`, pure functions and classes of bytes checked against h11; this
module does the I/O and the pool.

The pool keeps idle connections per origin (scheme, host, port, proxy), checks them cheaply
before reuse (a non-blocking ``poll``: data or EOF waiting means the server is done with it),
and drops those idle longer than ``idle_expiry`` lazily, at checkout and checkin (no background
task). A request whose *reused* connection fails before any byte of the response head arrives
is sent once more on a fresh connection: the server closed the idle connection as the request
left. Connections in use or idle are bounded by ``max_connections``; waiting for one longer than
``connect_timeout`` is the ``pool`` error.

Proxies come from the environment when ``trust_env`` (``HTTP_PROXY``, ``HTTPS_PROXY``,
``ALL_PROXY``, ``NO_PROXY``): a plain ``http://`` URL goes to the proxy in absolute form, an
``https://`` one through a ``CONNECT`` tunnel. The proxy URL's credentials are sent as
``Proxy-Authorization`` and appear in no message.

Every failure is an :class:`~raafd.providers.wire.UpstreamTransportError` with a ``kind`` from
:data:`~raafd.providers.wire.KINDS` (both re-exported here).
"""

from __future__ import annotations

import base64
import math
import os
import select
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType

import certifi
import trio

from raafd import __version__
from raafd.providers.wire import (
    KINDS,
    BodyDecoder,
    CloseDelimitedBody,
    Headers,
    ResponseHead,
    UpstreamTransportError,
    decoder_for,
    keep_alive,
    parse_response_head,
    protocol_error,
    request_head,
)

__all__ = [
    "HAPPY_EYEBALLS_DELAY",
    "KINDS",
    "Exchange",
    "UpstreamClient",
    "UpstreamResponse",
    "UpstreamTransportError",
    "open_upstream_client",
]

RECEIVE_SIZE = 65536  # bytes asked of one read
_YIELD_EVERY = 16  # plain reads that found bytes waiting, between two yields
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address of a host is tried (RFC 8305)
_TARGET_CACHE = 256  # parsed URLs kept per client


# --- reads and writes under the exchange's deadline -------------------------------------------


class _Link:
    """A connection's stream under its exchange's deadline scope: each read or write waits at
    most ``read_timeout`` seconds (see the module docstring; ``math.inf`` for none).

    A plain TCP connection (``raw``, the socket under its :class:`trio.SocketStream`) is read
    the syscall first: bytes already in the socket are taken with no wait, no yield and no
    deadline moved (under load most reads find the next token waiting), and only a read that
    would block arms the deadline and waits for readability, in this task. A read that did
    not wait yields every :data:`_YIELD_EVERY` reads, so a flooding upstream cannot hold the
    loop. TLS goes through its :class:`trio.SSLStream`."""

    __slots__ = ("_unyielded", "raw", "read_timeout", "scope", "stream")

    def __init__(
        self,
        stream: trio.abc.Stream,
        scope: trio.CancelScope,
        read_timeout: float,
        raw: socket.socket | None = None,
    ) -> None:
        self.stream = stream
        self.scope = scope
        self.read_timeout = read_timeout
        self.raw = raw
        self._unyielded = 0

    async def receive(self) -> bytes:
        """One read (``b""`` at the stream's end)."""
        raw = self.raw
        if raw is not None:
            try:
                data = raw.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return await self._wait_and_receive(raw)
            except OSError as exc:
                raise UpstreamTransportError("disconnect", exc.strerror or str(exc)) from None
            self._unyielded += 1
            if self._unyielded >= _YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            return data
        scope = self.scope
        scope.deadline = trio.current_time() + self.read_timeout
        try:
            received = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _stream_broken(exc) from None
        finally:
            scope.deadline = math.inf
        return received if type(received) is bytes else bytes(received)

    async def _wait_and_receive(self, raw: socket.socket) -> bytes:
        self._unyielded = 0
        scope = self.scope
        scope.deadline = trio.current_time() + self.read_timeout
        try:
            while True:
                try:
                    await trio.lowlevel.wait_readable(raw)
                except trio.ClosedResourceError as exc:
                    raise _stream_broken(exc) from None
                try:
                    return raw.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise UpstreamTransportError("disconnect", exc.strerror or str(exc)) from None
        finally:
            scope.deadline = math.inf

    async def send_all(self, data: bytes) -> None:
        scope = self.scope
        scope.deadline = trio.current_time() + self.read_timeout
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _stream_broken(exc) from None
        finally:
            scope.deadline = math.inf


def _stream_broken(exc: Exception) -> UpstreamTransportError:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return UpstreamTransportError("disconnect", cause.strerror)
    return UpstreamTransportError("disconnect", str(cause or exc) or type(exc).__name__)


def _timed_out(timeout: float) -> UpstreamTransportError:
    return UpstreamTransportError("timeout", f"the connection was idle for {timeout:g} s")


# --- connecting -------------------------------------------------------------------------------


class _Proxy:
    """An HTTP proxy from the environment. ``authorization`` (from the URL's userinfo) is the
    ``Proxy-Authorization`` value; it is kept out of ``repr`` and every message."""

    __slots__ = ("authorization", "host", "port", "tls")

    def __init__(self, tls: bool, host: str, port: int, authorization: str | None) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        self.authorization = authorization

    def __repr__(self) -> str:
        return f"<proxy {self}>"

    def __str__(self) -> str:
        return _authority(self.host, self.port)

    @property
    def key(self) -> tuple[bool, str, int, str | None]:
        return (self.tls, self.host, self.port, self.authorization)


class _Target:
    """A parsed request URL and its route: where to connect, and what to send."""

    __slots__ = ("authorization", "host", "host_header", "origin", "port", "proxy", "target", "tls")

    def __init__(
        self,
        tls: bool,
        host: str,
        port: int,
        target: str,
        authorization: str | None,
        proxy: _Proxy | None,
    ) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        default = 443 if tls else 80
        self.host_header = _authority(host, port) if port != default else _bracketed(host)
        self.authorization = authorization  # Basic, from the URL's userinfo
        self.proxy = proxy
        if proxy is not None and not tls:  # absolute form, to the proxy
            target = f"http://{self.host_header}{target}"
        self.target = target
        self.origin = (tls, host, port, proxy.key if proxy is not None else None)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _authority(host: str, port: int) -> str:
    return f"{_bracketed(host)}:{port}"


def _basic(username: str | None, password: str | None) -> str | None:
    if username is None:
        return None
    user = urllib.parse.unquote(username)
    secret = urllib.parse.unquote(password or "")
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")


def _ascii_host(host: str) -> str:
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            return host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UpstreamTransportError("config", f"bad host name {host!r}") from None
    return host


_TARGET_SAFE = "/%:@!$&'()*+,;=-._~"


def _parse_target(url: str, proxies: Mapping[str, str]) -> _Target:
    """The :class:`_Target` of ``url``; messages name no credentials (the URL may hold some)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UpstreamTransportError("config", f"cannot parse the URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UpstreamTransportError("config", f"unsupported URL scheme {scheme!r} (http or https)")
    if not parts.hostname:
        raise UpstreamTransportError("config", "the URL has no host")
    tls = scheme == "https"
    host = _ascii_host(parts.hostname)
    target = urllib.parse.quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe=_TARGET_SAFE + "?")
    proxy = _proxy_for(scheme, host, proxies)
    port = port if port is not None else (443 if tls else 80)
    return _Target(tls, host, port, target, _basic(parts.username, parts.password), proxy)


def _proxy_for(scheme: str, host: str, proxies: Mapping[str, str]) -> _Proxy | None:
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass(host):
        return None
    if "://" not in url:
        url = "http://" + url  # HTTP_PROXY=host:port, as curl reads it
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise UpstreamTransportError("config", f"cannot parse the {scheme} proxy URL") from None
    proxy_scheme = parts.scheme.lower()
    if proxy_scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamTransportError(
            "config", f"unsupported {scheme} proxy (an http:// or https:// proxy URL is needed)"
        )
    tls = proxy_scheme == "https"
    return _Proxy(
        tls,
        _ascii_host(parts.hostname),
        port if port is not None else (443 if tls else 80),
        _basic(parts.username, parts.password),
    )


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host`` (TCP_NODELAY on, as trio sets it), its addresses tried the
    happy-eyeballs way. Put a timeout around it."""
    try:
        return await trio.open_tcp_stream(host, port, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
    except socket.gaierror as exc:
        raise UpstreamTransportError(
            "connect", f"cannot resolve {host}: {exc.strerror or exc}"
        ) from None
    except OSError as exc:
        raise UpstreamTransportError(
            "connect", f"{_authority(host, port)}: {_connect_failure(exc)}"
        ) from None


def _connect_failure(exc: OSError) -> str:
    """What went wrong, from trio's "all attempts failed" error and the attempts' errors."""
    cause = exc.__cause__
    if isinstance(cause, ExceptionGroup):
        reasons: list[str] = []
        for error in cause.exceptions:
            reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
            if reason and reason not in reasons:
                reasons.append(reason)
        if reasons:
            return "; ".join(reasons)
    return exc.strerror or str(exc) or "no address"


async def _start_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext, host: str
) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        raise UpstreamTransportError(
            "connect", f"TLS with {host} failed: {exc.__cause__ or exc}"
        ) from None
    return tls


async def _open_tunnel(link: _Link, target: _Target, proxy: _Proxy) -> None:
    """Ask ``proxy`` (at the other end of ``link``) for a tunnel to ``target``."""
    authority = _authority(target.host, target.port)
    headers = [("host", authority)]
    if proxy.authorization:
        headers.append(("proxy-authorization", proxy.authorization))
    request = request_head("CONNECT", authority, headers) + b"\r\n"
    try:
        await link.send_all(request)
        head, after = await _receive_head(link)
    except UpstreamTransportError as exc:
        if exc.kind != "disconnect":
            raise
        raise UpstreamTransportError(
            "connect", f"the proxy {proxy} connection failed: {exc.message}"
        ) from None
    except _ClosedEarly:
        raise UpstreamTransportError(
            "connect", f"the proxy {proxy} closed the connection before answering CONNECT"
        ) from None
    if not 200 <= head.status_code < 300:
        reason = head.reason.decode("latin-1")
        raise UpstreamTransportError(
            "connect",
            f"the proxy {proxy} refused the tunnel to {authority}: HTTP {head.status_code}"
            + (f" {reason}" if reason else ""),
        )
    if after:
        raise protocol_error(f"the proxy {proxy} sent bytes before the tunnel was used")


class _ClosedEarly(Exception):
    """The connection ended (EOF, or broken) before a whole response head arrived."""

    def __init__(self, received: bool, detail: str) -> None:
        super().__init__(detail)
        self.received = received  # whether any byte of the head had arrived
        self.detail = detail


async def _receive_head(link: _Link) -> tuple[ResponseHead, bytes]:
    """Read until the final response head is in (1xx heads are skipped); the head and the
    bytes read past it."""
    buffer = b""
    while True:
        try:
            data = await link.receive()
        except UpstreamTransportError as exc:
            raise _ClosedEarly(bool(buffer), exc.message) from None
        if not data:
            raise _ClosedEarly(bool(buffer), "")
        buffer = buffer + data if buffer else data  # one read holds the whole head, mostly
        parsed = parse_response_head(buffer)
        if parsed is not None:
            head, end = parsed
            return head, buffer[end:]


# --- the pool and the exchange ----------------------------------------------------------------


class _Connection:
    __slots__ = ("closed", "idle_since", "origin", "raw", "reused", "stream", "tcp")

    def __init__(self, origin: tuple[object, ...]) -> None:
        self.origin = origin
        self.tcp: trio.SocketStream | None = None  # the TCP connection
        self.raw: socket.socket | None = None  # its socket, read directly when no TLS is on it
        self.stream: trio.abc.Stream | None = None  # what is read and written: tcp, or TLS on it
        self.reused = False  # it served a request before this one
        self.idle_since = 0.0
        self.closed = False

    def looks_usable(self) -> bool:
        """An idle connection the server has not closed or written to (one ``poll``, no wait)."""
        assert self.tcp is not None
        poller = select.poll()
        poller.register(self.tcp.socket.fileno(), select.POLLIN)
        return not poller.poll(0)  # readable: EOF, or bytes nobody asked for

    def close(self) -> None:
        """Close the socket now. No TLS close_notify: it would need an await, and the upstream
        only has to see the connection end."""
        if self.tcp is not None:
            self.tcp.socket.close()


class _StaleConnection(Exception):
    """A reused connection failed before any byte of the response head arrived."""


class UpstreamResponse:
    """A response whose head has been read; the body streams through :meth:`receive_some` or
    ``async for`` (non-empty chunks, each as soon as it arrives), in the task that entered the
    exchange."""

    __slots__ = (
        "_conn",
        "_decoder",
        "_keep_alive",
        "_link",
        "_pending",
        "_task",
        "headers",
        "http_version",
        "reason_phrase",
        "status_code",
    )

    def __init__(
        self,
        conn: _Connection,
        link: _Link,
        head: ResponseHead,
        decoder: BodyDecoder,
        keep_alive: bool,
        initial: bytes,
    ) -> None:
        self.status_code: int = head.status_code
        self.reason_phrase = head.reason.decode("latin-1")
        self.http_version = head.http_version.decode("ascii")
        self.headers = Headers(head.headers)
        self._conn = conn
        self._link = link
        self._task = trio.lowlevel.current_task()
        self._decoder = decoder
        self._keep_alive = keep_alive
        self._pending = decoder.feed(initial) if initial else b""  # bytes read with the head

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status_code} {self.reason_phrase}>"

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def ended(self) -> bool:
        """Whether the whole body has been read (nothing left to receive)."""
        return self._decoder.done and not self._pending

    @property
    def reusable(self) -> bool:
        """Whether the connection may serve another request: see the module's rule."""
        decoder = self._decoder
        return self._keep_alive and decoder.done and not decoder.extra

    async def receive_some(self) -> bytes:
        """The next bytes of the body, ``b""`` at its end. Each read waits at most the
        request's ``read_timeout``."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        decoder = self._decoder
        while not decoder.done:
            if self._conn.closed:
                raise UpstreamTransportError("disconnect", "the response was closed")
            if trio.lowlevel.current_task() is not self._task:
                raise RuntimeError("a response is read in the task that entered its exchange")
            data = await self._link.receive()
            if not data:
                decoder.eof()
                break
            payload = decoder.feed(data)
            if payload:
                return payload
        return b""

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive_some()
        if not data:
            raise StopAsyncIteration
        return data


class Exchange:
    """One ``POST`` as an async context manager (see :meth:`UpstreamClient.post`): a class,
    because a generator-based one costs a generator and its bookkeeping on every request.

    Entering it enters the exchange's deadline scope (the read timeout, see the module
    docstring); leaving it leaves the scope, and turns the scope's own expiry into a
    ``timeout`` error."""

    __slots__ = ("_args", "_client", "_conn", "_response", "_scope")

    def __init__(
        self,
        client: UpstreamClient,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._client = client
        self._args = (url, headers, body, connect_timeout, read_timeout)
        self._scope: trio.CancelScope | None = None
        self._conn: _Connection | None = None
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        if self._scope is not None:
            raise RuntimeError("an exchange is entered once")
        scope = self._scope = trio.CancelScope()
        scope.__enter__()
        try:
            self._conn, self._response = await self._client._open(*self._args, scope)
        except BaseException as exc:
            self._leave(exc)
            raise
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None and self._response is not None:
            self._client._release(self._conn, self._response)
        self._leave(exc)

    def _leave(self, exc: BaseException | None) -> None:
        scope = self._scope
        assert scope is not None
        if exc is None:
            scope.__exit__(None, None, None)
        else:
            scope.__exit__(type(exc), exc, exc.__traceback__)
        if scope.cancelled_caught:  # its deadline: a read or a write waited read_timeout
            raise _timed_out(self._args[4]) from None


class UpstreamClient:
    """A pool of HTTP/1.1 connections to upstreams; see the module docstring. Made by
    :func:`open_upstream_client`."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_idle: int,
        idle_expiry: float,
        trust_env: bool,
    ) -> None:
        self._limiter = trio.CapacityLimiter(max_connections)
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._idle: dict[tuple[object, ...], list[_Connection]] = {}
        self._idle_count = 0
        self._next_sweep = 0.0
        self._closed = False
        self._proxies = urllib.request.getproxies() if trust_env else {}
        self._tls_context = _tls_context(trust_env)
        self._targets: dict[str, _Target] = {}
        self._heads: dict[tuple[object, ...], bytes] = {}
        self._user_agent = f"raafd/{__version__}"

    @property
    def is_closed(self) -> bool:
        return self._closed

    # --- the exchange -------------------------------------------------------------------------

    def post(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        connect_timeout: float,
        read_timeout: float,
    ) -> Exchange:
        """``POST body`` to ``url``: ``async with client.post(...) as response`` gives the
        response with its head read, its body streaming.

        Leaving the block before the body's end closes the connection at once; a complete
        body's connection goes back to the pool. Failures are :class:`UpstreamTransportError`."""
        return Exchange(self, url, headers, body, connect_timeout, read_timeout)

    async def _open(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        connect_timeout: float,
        read_timeout: float,
        scope: trio.CancelScope,
    ) -> tuple[_Connection, UpstreamResponse]:
        target = self._target(url)
        request = self._head(url, target, headers) + b"content-length: %d\r\n\r\n" % len(body)
        request += body
        fresh = False
        while True:
            conn = await self._checkout(target, connect_timeout, scope, fresh=fresh)
            response = None
            try:
                response = await self._exchange(conn, request, read_timeout, scope)
            except _StaleConnection:
                fresh = True  # once: on a fresh connection, _exchange raises instead
            finally:
                if response is None:
                    self._close(conn)
            if response is not None:
                return conn, response

    def _release(self, conn: _Connection, response: UpstreamResponse) -> None:
        if response.reusable:
            self._checkin(conn)
        else:
            self._close(conn)

    async def _exchange(
        self, conn: _Connection, request: bytes, read_timeout: float, scope: trio.CancelScope
    ) -> UpstreamResponse:
        assert conn.stream is not None
        link = _Link(conn.stream, scope, read_timeout, conn.raw)
        try:
            await link.send_all(request)
        except UpstreamTransportError as exc:
            if conn.reused and exc.kind == "disconnect":
                raise _StaleConnection from None
            raise
        try:
            head, initial = await _receive_head(link)
        except _ClosedEarly as exc:
            if conn.reused and not exc.received:
                raise _StaleConnection from None
            where = "inside" if exc.received else "before"
            message = f"the upstream closed the connection {where} its answer's head"
            raise UpstreamTransportError(
                "disconnect", f"{message}: {exc.detail}" if exc.detail else message
            ) from None
        decoder = decoder_for(head)
        reusable = keep_alive(head) and not isinstance(decoder, CloseDelimitedBody)
        return UpstreamResponse(conn, link, head, decoder, reusable, initial)

    def _head(self, url: str, target: _Target, headers: Mapping[str, str]) -> bytes:
        """The request line and headers of a ``POST`` to ``url``, all but ``content-length``
        and the blank line; written once per URL and header set (a provider sends the same
        ones on every request)."""
        key = (url, *headers.items())
        head = self._heads.get(key)
        if head is None:
            merged: dict[str, tuple[str, str]] = {
                "host": ("host", target.host_header),
                "user-agent": ("user-agent", self._user_agent),
            }
            if target.authorization:
                merged["authorization"] = ("authorization", target.authorization)
            for name, value in headers.items():
                merged[name.lower()] = (name, value)
            merged.pop("transfer-encoding", None)
            merged.pop("content-length", None)
            proxy = target.proxy
            if proxy is not None and not target.tls and proxy.authorization:
                merged["proxy-authorization"] = ("proxy-authorization", proxy.authorization)
            head = request_head("POST", target.target, merged.values())
            if len(self._heads) >= _TARGET_CACHE:
                self._heads.clear()
            self._heads[key] = head
        return head

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = _parse_target(url, self._proxies)
            if len(self._targets) >= _TARGET_CACHE:
                self._targets.clear()
            self._targets[url] = target
        return target

    # --- the pool -----------------------------------------------------------------------------

    async def _checkout(
        self, target: _Target, connect_timeout: float, scope: trio.CancelScope, *, fresh: bool
    ) -> _Connection:
        if self._closed:
            raise UpstreamTransportError("config", "the upstream client is closed")
        if not fresh:
            idle = self._idle.get(target.origin)
            if idle:
                conn = self._take_idle(target.origin, idle)
                if conn is not None:
                    return conn
        conn = _Connection(target.origin)
        await self._acquire(conn, connect_timeout)
        connected = False
        try:
            with trio.move_on_after(connect_timeout):
                await self._connect(target, conn, scope)
                connected = True
        finally:
            if not connected:
                self._close(conn)
        if not connected:
            raise UpstreamTransportError(
                "connect_timeout", f"no connection within {connect_timeout:g} s"
            )
        return conn

    def _take_idle(self, origin: tuple[object, ...], idle: list[_Connection]) -> _Connection | None:
        now = trio.current_time()
        found = None
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            self._idle_count -= 1
            if now - conn.idle_since <= self._idle_expiry and conn.looks_usable():
                found = conn
                break
            self._close(conn)
        if not idle:
            del self._idle[origin]
        return found

    async def _acquire(self, conn: _Connection, connect_timeout: float) -> None:
        limiter = self._limiter
        try:
            limiter.acquire_on_behalf_of_nowait(conn)
            return
        except trio.WouldBlock:
            pass
        if self._idle_count:  # an idle connection to another origin gives its place
            self._evict_oldest()
            try:
                limiter.acquire_on_behalf_of_nowait(conn)
                return
            except trio.WouldBlock:
                pass
        with trio.move_on_after(connect_timeout):
            await limiter.acquire_on_behalf_of(conn)
            return
        raise UpstreamTransportError(
            "pool", f"no free connection within {connect_timeout:g} s (the pool is full)"
        )

    async def _connect(self, target: _Target, conn: _Connection, scope: trio.CancelScope) -> None:
        """Connect ``conn`` to ``target``: TCP to the upstream or its proxy, a tunnel through
        the proxy for ``https://``, TLS with the proxy and with the upstream as needed. The
        caller closes ``conn`` if this fails."""
        proxy = target.proxy
        host, port = (proxy.host, proxy.port) if proxy is not None else (target.host, target.port)
        tcp = await _open_tcp(host, port)
        # The standard socket under trio's, kept to read it the syscall first (see _Link): the
        # trio socket made from it is the same socket, and closing either closes it.
        raw = socket.socket(fileno=tcp.socket.detach())
        raw.setblocking(False)
        tcp = conn.tcp = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        stream: trio.abc.Stream = tcp
        if proxy is not None and proxy.tls:
            stream = await _start_tls(stream, self._tls_context, proxy.host)
        if target.tls:
            if proxy is not None:
                # Bounded by the connect timeout around this only: no read deadline.
                await _open_tunnel(_Link(stream, scope, math.inf), target, proxy)
            stream = await _start_tls(stream, self._tls_context, target.host)
        conn.stream = stream
        conn.raw = raw if stream is tcp else None

    def _checkin(self, conn: _Connection) -> None:
        if self._closed:
            self._close(conn)
            return
        now = trio.current_time()
        conn.idle_since = now
        conn.reused = True
        self._idle.setdefault(conn.origin, []).append(conn)
        self._idle_count += 1
        if now >= self._next_sweep:
            self._sweep(now)
        while self._idle_count > self._max_idle:
            self._evict_oldest()

    def _sweep(self, now: float) -> None:
        """Close every connection idle longer than ``idle_expiry`` (at most twice per expiry
        period, so a checkin costs O(1) on average)."""
        self._next_sweep = now + self._idle_expiry / 2
        for origin in list(self._idle):
            idle = self._idle[origin]
            while idle and now - idle[0].idle_since > self._idle_expiry:
                self._idle_count -= 1
                self._close(idle.pop(0))
            if not idle:
                del self._idle[origin]

    def _evict_oldest(self) -> None:
        origin = min(self._idle, key=lambda o: self._idle[o][0].idle_since)
        idle = self._idle[origin]
        self._idle_count -= 1
        self._close(idle.pop(0))
        if not idle:
            del self._idle[origin]

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.close()
        self._limiter.release_on_behalf_of(conn)

    def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                self._close(conn)
        self._idle.clear()
        self._idle_count = 0


def _tls_context(trust_env: bool) -> ssl.SSLContext:
    if trust_env and os.environ.get("SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    elif trust_env and os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    else:
        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


@asynccontextmanager
async def open_upstream_client(
    *,
    max_connections: int = 1024,
    max_idle: int = 128,
    idle_expiry: float = 30.0,
    trust_env: bool = True,
) -> AsyncIterator[UpstreamClient]:
    """The providers' shared upstream client, its idle connections closed on exit (it has no
    task: every read runs in its caller's task).

    ``max_connections`` bounds the connections in use or idle; ``max_idle`` the idle ones kept;
    ``idle_expiry`` (seconds) how long one may stay idle. ``trust_env`` honours the proxy
    variables and ``SSL_CERT_FILE``/``SSL_CERT_DIR`` (else certifi's CA bundle)."""
    client = UpstreamClient(
        max_connections=max_connections,
        max_idle=max_idle,
        idle_expiry=idle_expiry,
        trust_env=trust_env,
    )
    try:
        yield client
    finally:
        client.close()
