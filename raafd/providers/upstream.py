"""The network providers' HTTP/1.1 client: one streamed ``POST`` at a time per pooled connection.

The rule of this module: a connection goes back to the pool only when its response body was
read to the end, the exchange allows keep-alive (HTTP/1.1, no ``connection: close``), and no
byte followed the body. Every other way out of :meth:`UpstreamClient.post` (an error, a
cancellation, a consumer that stopped reading) closes the socket at once, synchronously, so an
upstream sees a cancelled stream end within a loop iteration and stops generating tokens.

Why not httpx on this path: per streamed token, httpcore scans its pool on each request and
runs every body chunk through about six nested async iterators, and h11 alone costs about 10 µs
per chunked-body chunk; that was half of raafd's CPU per token. Here the HTTP/1.1 itself (the
request head written once per URL and header set, the response head and the body read) is
:mod:`raafd.providers.wire`, pure functions and classes of bytes; this module does the I/O:
plain ``http://`` through a raw non-blocking socket (a syscall first, a wait only when it would
block), ``https://`` through :class:`trio.SSLStream`, both behind one tiny transport interface
(``receive_some`` / ``send_all`` / ``close``), and the pool.

A streamed body is best read with :meth:`UpstreamResponse.pump`: a synchronous callback gets the
body's bytes as they arrive. On plain TCP the calls come from the client's one reactor task
(:class:`_Reactor`, a private edge-triggered epoll holding every pumping socket), so the
stream's own task sleeps through the body instead of waking once per token; the pump returns
when the callback asks for a wait (it returns False), at the body's end, or with what the
callback raised.

The pool keeps idle connections per origin (scheme, host, port, proxy), checks them cheaply
before reuse (a non-blocking ``MSG_PEEK``: data or EOF means the server is done with it), and
drops those idle longer than ``idle_expiry`` lazily, at checkout and checkin (no background
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
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Protocol

import certifi
import outcome
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
from raafd.timers import Timers

__all__ = [
    "KINDS",
    "Exchange",
    "UpstreamClient",
    "UpstreamResponse",
    "UpstreamTransportError",
    "open_upstream_client",
]

RECEIVE_SIZE = 65536  # bytes asked of one recv
# Successive reads that found data waiting without yielding to the scheduler: after this many,
# the next read waits (a checkpoint), so a flood of bytes cannot starve other tasks.
_READY_STREAK = 16
# One turn of the upstream reactor reads ready sockets for at most this long (seconds), taking
# _POLL_EVENTS readiness events at a time; what is still ready then waits for its next turn,
# after every other runnable task has had its step. Unbounded, a turn under load grows with
# the backlog (a turn serves everything ready, which took long enough for everything to be
# ready again), and every other task waits a whole turn per step: a new stream's start needs
# three or four steps before its first token (the command, the stream's task, the upstream's
# answer), so its first token waited three or four long turns.
_TURN_BUDGET = 0.005
_POLL_EVENTS = 64
_TARGET_CACHE = 256  # parsed URLs kept per client


# --- transports -------------------------------------------------------------------------------


class _Transport(Protocol):
    """A connected byte stream. Every wait is bounded by ``timeout`` seconds (a ``timeout``
    error); a broken connection is a ``disconnect`` error; ``close`` is synchronous."""

    sock: socket.socket  # the TCP socket underneath, for the pool's liveness check
    timeout: float

    async def receive_some(self) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def _close_socket(sock: socket.socket) -> None:
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def _broken(exc: OSError) -> UpstreamTransportError:
    return UpstreamTransportError("disconnect", exc.strerror or str(exc) or type(exc).__name__)


def _timed_out(timeout: float) -> UpstreamTransportError:
    return UpstreamTransportError("timeout", f"the connection was idle for {timeout:g} s")


Feed = Callable[[bytes], bool]
"""What a pump calls with each read (``b""`` at the end of the stream): True to read on."""


async def _pump_by_reads(transport: _Transport, feed: Feed) -> None:
    """A pump without the reactor (TLS, or a client whose reactor is not running): each read
    in the calling task."""
    while feed(await transport.receive_some()):
        pass


class _Reactor:
    """The reads of pumping connections (:meth:`_SocketTransport.pump`), for all of them in one
    task: a private edge-triggered epoll holds each plain-TCP upstream socket from its first
    pump to its close, and trio waits on that epoll's own descriptor.

    Why: a streamed token is one small read. Through ``trio.lowlevel.wait_readable`` each read
    costs a wake-up of the stream's task (its whole coroutine chain resumed, an outcome, a
    reschedule) and an ``epoll_ctl`` to re-arm the one-shot registration; here a readiness
    event is a dict lookup and a call, the stream's task sleeps through the whole body, and the
    registration is made once per connection.

    A turn is bounded in time (``_TURN_BUDGET``), so the other tasks get a step every few
    milliseconds however many sockets are ready; ready sockets are served in the order epoll
    reports them, which is the order they became ready."""

    __slots__ = ("_again", "_epoll", "_pumps", "running")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._pumps: dict[int, _SocketTransport] = {}  # registered sockets, by descriptor
        self._again: list[_SocketTransport] = []  # stopped on the streak limit, data left
        self.running = False

    def register(self, transport: _SocketTransport) -> None:
        assert self._epoll is not None
        fd = transport.sock.fileno()
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._pumps[fd] = transport

    def unregister(self, transport: _SocketTransport) -> None:
        fd = transport.sock.fileno()
        if self._pumps.pop(fd, None) is not None and self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def again(self, transport: _SocketTransport) -> None:
        self._again.append(transport)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve readiness events until cancelled."""
        self._epoll = epoll = select.epoll()
        self.running = True
        task_status.started()
        pumps = self._pumps
        try:
            while True:
                if self._again:
                    await trio.lowlevel.checkpoint()
                    now = trio.current_time()
                    again, self._again = self._again, []
                    for waiting in again:
                        waiting._on_readable(now)
                else:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                    now = trio.current_time()
                # A bounded turn: sockets still ready after it wait for the next one, which
                # comes after every other runnable task has had its step (see _TURN_BUDGET).
                deadline = time.perf_counter() + _TURN_BUDGET
                while True:
                    events = epoll.poll(0, _POLL_EVENTS)
                    for fd, _ in events:
                        transport = pumps.get(fd)
                        if transport is not None:
                            transport._on_readable(now)
                    if len(events) < _POLL_EVENTS or time.perf_counter() >= deadline:
                        break
        finally:
            self.running = False
            closed = UpstreamTransportError("disconnect", "the upstream client was closed")
            for transport in list(pumps.values()):
                transport._end_pump(outcome.Error(closed))
            pumps.clear()
            self._epoll = None
            epoll.close()


class _SocketTransport:
    """Plain TCP straight on the socket: the syscall first, a wait only when it would block
    (trio's SocketStream adds a checkpoint to every successful operation).

    A read's wait is bounded by the client's shared :class:`~raafd.timers.Timers`, not by a
    cancel scope per wait (one per token, about 6 µs): the wait records when it began, and the
    timer, armed at most once per ``timeout`` while reads keep coming, wakes a wait that has
    lasted ``timeout`` with ``notify_closing`` (the connection is then closed, never reused);
    a pump's wait is ended with the ``timeout`` error the same way."""

    __slots__ = (
        "_feed",
        "_pumper",
        "_reactor",
        "_registered",
        "_streak",
        "_timed_out",
        "_timer_at",
        "_timers",
        "_waiting_since",
        "sock",
        "timeout",
    )

    def __init__(self, sock: socket.socket, timers: Timers, reactor: _Reactor | None) -> None:
        self.sock = sock
        self.timeout = 0.0
        self._streak = _READY_STREAK  # the first read is a response head: it has to wait
        self._timers = timers
        self._timer_at = math.inf
        self._waiting_since: float | None = None
        self._timed_out = False
        self._reactor = reactor
        self._registered = False
        self._feed: Feed | None = None  # while a pump runs
        self._pumper: trio.lowlevel.Task | None = None  # the task waiting in pump()

    def _on_timer(self, now: float) -> None:
        since = self._waiting_since
        if since is None:
            return  # not waiting now: the next wait arms again
        if now >= since + self.timeout:
            self._timed_out = True
            if self._pumper is not None:
                self._end_pump(outcome.Error(_timed_out(self.timeout)))
            else:
                trio.lowlevel.notify_closing(self.sock)  # the wait raises ClosedResourceError
        else:
            self._timers.arm(self, since + self.timeout)

    # --- the pump ---------------------------------------------------------------------------

    async def pump(self, feed: Feed) -> None:
        """Call ``feed`` with each read until it returns False (it is given ``b""`` at the end
        of the stream) or raises; its exception is raised here. While the socket is empty this
        task sleeps and the client's :class:`_Reactor` calls ``feed`` from its own task, so
        ``feed`` must not block. Each wait is bounded by ``timeout`` like a read's."""
        reactor = self._reactor
        if reactor is None or not reactor.running:
            await _pump_by_reads(self, feed)
            return
        if self._timed_out:
            raise _timed_out(self.timeout)
        if self._drain(feed):  # what is there now (an edge-triggered epoll tells only of news)
            return
        if not self._registered:
            reactor.register(self)
            self._registered = True
        self._feed = feed
        self._pumper = trio.lowlevel.current_task()
        self._waiting_since = now = trio.current_time()
        self._timers.arm(self, now + self.timeout)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._feed = self._pumper = self._waiting_since = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _drain(self, feed: Feed) -> bool:
        """Read and feed until the socket is empty (False) or the pump is done (True)."""
        sock = self.sock
        for _ in range(_READY_STREAK):
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise _broken(exc) from None
            if not feed(data) or not data:
                return True
            if len(data) < RECEIVE_SIZE:
                return False  # a short read emptied the socket; news comes as a new edge
        if self._reactor is not None:
            self._reactor.again(self)  # more is waiting: after the others have had a turn
        return False

    def _on_readable(self, now: float) -> None:
        """The reactor saw the socket readable at ``now`` (its turn's time)."""
        feed = self._feed
        if feed is None:
            return  # not pumping: the next pump reads first
        try:
            done = self._drain(feed)
        except Exception as exc:
            self._end_pump(outcome.Error(exc))
            return
        if self._feed is not feed:
            return  # ended from inside feed (the stream was cancelled, the socket closed)
        if done:
            self._end_pump(outcome.Value(None))
        else:
            self._waiting_since = now

    def _end_pump(self, result: outcome.Outcome[None]) -> None:
        task = self._pumper
        if task is not None:
            self._feed = self._pumper = self._waiting_since = None
            trio.lowlevel.reschedule(task, result)

    async def receive_some(self) -> bytes:
        # Read at once only while the last read filled its buffer (more is likely waiting), at
        # most _READY_STREAK times in a row; after a short read the socket was empty, and a
        # read now would mostly fail (a syscall and an exception per token, for nothing).
        sock = self.sock
        if self._streak < _READY_STREAK:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _broken(exc) from None
            else:
                self._streak = self._streak + 1 if len(data) == RECEIVE_SIZE else _READY_STREAK
                return data
        if self._timed_out:
            raise _timed_out(self.timeout)
        self._waiting_since = now = trio.current_time()
        self._timers.arm(self, now + self.timeout)  # a no-op unless nothing earlier is armed
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _broken(exc) from None
                self._streak = 0 if len(data) == RECEIVE_SIZE else _READY_STREAK
                return data
        except trio.ClosedResourceError:
            if self._timed_out:
                raise _timed_out(self.timeout) from None
            raise UpstreamTransportError("disconnect", "the connection was closed") from None
        finally:
            self._waiting_since = None

    async def send_all(self, data: bytes) -> None:
        sock = self.sock
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    with trio.move_on_after(self.timeout) as scope:
                        await trio.lowlevel.wait_writable(sock)
                    if scope.cancelled_caught:
                        raise _timed_out(self.timeout) from None
                except OSError as exc:
                    raise _broken(exc) from None

    def close(self) -> None:
        self._timers.disarm(self)
        if self._registered and self._reactor is not None:
            self._reactor.unregister(self)
            self._registered = False
        self._end_pump(
            outcome.Error(UpstreamTransportError("disconnect", "the connection was closed"))
        )
        _close_socket(self.sock)


class _StreamTransport:
    """A trio stream (TLS) over the TCP socket ``sock``."""

    __slots__ = ("_stream", "sock", "timeout")

    def __init__(self, stream: trio.abc.Stream, sock: socket.socket) -> None:
        self._stream = stream
        self.sock = sock
        self.timeout = 0.0

    async def receive_some(self) -> bytes:
        with trio.move_on_after(self.timeout):
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _stream_broken(exc) from None
            return data if isinstance(data, bytes) else bytes(data)
        raise _timed_out(self.timeout)

    async def send_all(self, data: bytes) -> None:
        with trio.move_on_after(self.timeout):
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _stream_broken(exc) from None
            return
        raise _timed_out(self.timeout)

    def close(self) -> None:
        # No TLS close_notify: it would need an await, and the upstream only has to see the
        # connection end. Closing the socket under the stream is enough, and immediate.
        _close_socket(self.sock)


def _stream_broken(exc: Exception) -> UpstreamTransportError:
    cause = exc.__cause__
    return UpstreamTransportError("disconnect", str(cause or exc) or type(exc).__name__)


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


async def _open_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY; the addresses of ``host`` are
    tried in order. Put a timeout around it."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror, mostly
        raise UpstreamTransportError(
            "connect", f"cannot resolve {host}: {exc.strerror or exc}"
        ) from None
    failure: OSError | None = None
    for family, kind, proto, _, address in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # out of file descriptors, an unsupported family
            failure = exc
            continue
        connected = False
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect(address)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code)) from None
            connected = True
            return sock
        except OSError as exc:
            failure = exc
        finally:
            if not connected:
                _close_socket(sock)
    detail = failure.strerror if failure is not None and failure.strerror else "no address"
    raise UpstreamTransportError("connect", f"{_authority(host, port)}: {detail}")


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


async def _open_tunnel(transport: _Transport, target: _Target, proxy: _Proxy) -> None:
    """Ask ``proxy`` (at the other end of ``transport``) for a tunnel to ``target``."""
    authority = _authority(target.host, target.port)
    headers = [("host", authority)]
    if proxy.authorization:
        headers.append(("proxy-authorization", proxy.authorization))
    request = request_head("CONNECT", authority, headers) + b"\r\n"
    try:
        await transport.send_all(request)
        head, after = await _receive_head(transport)
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


async def _receive_head(transport: _Transport) -> tuple[ResponseHead, bytes]:
    """Read until the final response head is in (1xx heads are skipped); the head and the
    bytes read past it."""
    buffer = b""
    while True:
        try:
            data = await transport.receive_some()
        except UpstreamTransportError as exc:
            if exc.kind != "disconnect":
                raise
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
    __slots__ = ("closed", "idle_since", "origin", "reused", "transport")

    def __init__(self, origin: tuple[object, ...]) -> None:
        self.origin = origin
        self.transport: _Transport | None = None
        self.reused = False  # it served a request before this one
        self.idle_since = 0.0
        self.closed = False

    def looks_usable(self) -> bool:
        """An idle connection the server has not closed or written to (one non-blocking peek)."""
        assert self.transport is not None
        try:
            self.transport.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF, or bytes nobody asked for


class _StaleConnection(Exception):
    """A reused connection failed before any byte of the response head arrived."""


class UpstreamResponse:
    """A response whose head has been read; the body streams through :meth:`receive_some` or
    ``async for`` (non-empty chunks, each as soon as it arrives)."""

    __slots__ = (
        "_conn",
        "_decoder",
        "_keep_alive",
        "_pending",
        "_transport",
        "headers",
        "http_version",
        "reason_phrase",
        "status_code",
    )

    def __init__(
        self,
        conn: _Connection,
        transport: _Transport,
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
        self._transport = transport
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
            data = await self._transport.receive_some()
            if not data:
                decoder.eof()
                break
            payload = decoder.feed(data)
            if payload:
                return payload
        return b""

    async def pump(self, take: Feed) -> None:
        """Call ``take`` with the body's bytes (non-empty, as they arrive) until it returns
        False or the body ends. On a plain-TCP connection the calls come from the client's
        reactor task, not this one (see :class:`_Reactor`), so ``take`` must not block; what it
        raises is raised here."""
        if self._pending:
            data, self._pending = self._pending, b""
            if not take(data):
                return
        decoder = self._decoder
        if decoder.done:
            return
        if self._conn.closed:
            raise UpstreamTransportError("disconnect", "the response was closed")

        def feed(data: bytes) -> bool:
            if not data:
                decoder.eof()
                return False
            payload = decoder.feed(data)
            if payload and not take(payload):
                return False
            return not decoder.done

        transport = self._transport
        if isinstance(transport, _SocketTransport):
            await transport.pump(feed)
        else:
            await _pump_by_reads(transport, feed)

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive_some()
        if not data:
            raise StopAsyncIteration
        return data


class Exchange:
    """One ``POST`` as an async context manager (see :meth:`UpstreamClient.post`): a class,
    because a generator-based one costs a generator and its bookkeeping on every request."""

    __slots__ = ("_args", "_client", "_conn", "_response")

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
        self._conn: _Connection | None = None
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        if self._conn is not None:
            raise RuntimeError("an exchange is entered once")
        self._conn, self._response = await self._client._open(*self._args)
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None and self._response is not None:
            self._client._release(self._conn, self._response)


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
        self._timers = Timers()  # run by open_upstream_client
        self._reactor = _Reactor()  # run by open_upstream_client

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
    ) -> tuple[_Connection, UpstreamResponse]:
        target = self._target(url)
        request = self._head(url, target, headers) + b"content-length: %d\r\n\r\n" % len(body)
        fresh = False
        while True:
            conn = await self._checkout(target, connect_timeout, fresh=fresh)
            response = None
            try:
                response = await self._exchange(conn, request, body, read_timeout)
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
        self, conn: _Connection, request: bytes, body: bytes, read_timeout: float
    ) -> UpstreamResponse:
        transport = conn.transport
        assert transport is not None
        transport.timeout = read_timeout
        try:
            await transport.send_all(request + body)
        except UpstreamTransportError as exc:
            if conn.reused and exc.kind == "disconnect":
                raise _StaleConnection from None
            raise
        try:
            head, initial = await _receive_head(transport)
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
        return UpstreamResponse(conn, transport, head, decoder, reusable, initial)

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
        self, target: _Target, connect_timeout: float, *, fresh: bool
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
        transport = None
        try:
            with trio.move_on_after(connect_timeout):
                transport = await self._connect(target)
        finally:
            if transport is None:
                conn.closed = True
                self._limiter.release_on_behalf_of(conn)
        if transport is None:
            raise UpstreamTransportError(
                "connect_timeout", f"no connection within {connect_timeout:g} s"
            )
        conn.transport = transport
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

    async def _connect(self, target: _Target) -> _Transport:
        proxy = target.proxy
        host, port = (proxy.host, proxy.port) if proxy is not None else (target.host, target.port)
        sock = await _open_socket(host, port)
        transport: _Transport | None = None
        try:
            if not target.tls and (proxy is None or not proxy.tls):
                # To the upstream, or to a plain proxy.
                transport = _SocketTransport(sock, self._timers, self._reactor)
                return transport
            stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            if proxy is not None and proxy.tls:
                stream = await _start_tls(stream, self._tls_context, proxy.host)
            if target.tls:
                if proxy is not None:
                    tunnel = _StreamTransport(stream, sock)
                    tunnel.timeout = math.inf  # the caller bounds the whole connect
                    await _open_tunnel(tunnel, target, proxy)
                stream = await _start_tls(stream, self._tls_context, target.host)
            transport = _StreamTransport(stream, sock)
            return transport
        finally:
            if transport is None:
                _close_socket(sock)

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
        if conn.transport is not None:
            conn.transport.close()
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
    """The providers' shared upstream client, its pooled connections closed on exit.

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
        async with trio.open_nursery() as nursery:
            await nursery.start(client._timers.run)  # the connections' read timeouts
            await nursery.start(client._reactor.run)  # the pumps' reads
            yield client
            nursery.cancel_scope.cancel()
    finally:
        client.close()
