"""The admin server: a unix stream socket that answers :mod:`raafd.admin.protocol` lines.

Owning the socket path, in order:

1. an exclusive ``flock`` on ``<path>.lock`` (released by the kernel when the process dies), so
   two daemons starting at once cannot both decide an old socket file is theirs to replace;
2. a probe of an existing socket file: a connection refused means a crashed daemon left it
   (it is removed); an answer means a live daemon owns it (:class:`AdminSocketInUse`, raised
   before ``task_status.started`` so the daemon refuses to start);
3. bind, ``chmod 0600``, then listen. Until ``listen`` every connect is refused, so the socket
   is never reachable with looser permissions; no process-wide ``umask`` change is needed.

The socket file is removed when :meth:`AdminServer.run` ends (if it is still ours).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from raafd.admin.protocol import (
    LineSplitter,
    LineTooLong,
    encode_error,
    encode_result,
    parse_request,
)
from raafd.errors import BadRequest, Conflict, Internal, RaafdError, TooLarge
from raafd.logging import get_logger
from raafd.metrics import Metrics

__all__ = ["AdminServer", "AdminSocketInUse", "Handler"]

log = get_logger("raafd.admin")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
"""An admin command: gets the request's ``args`` object, returns a JSON-able result or raises
a :class:`~raafd.errors.RaafdError` for the client to see."""

# sun_path is 108 bytes on Linux, NUL included.
_MAX_SOCKET_PATH: Final = 107
_RECEIVE_SIZE: Final = 16384
_PROBE_TIMEOUT: Final = 2.0
# Commands that only read; logged at debug so a monitoring loop does not flood the log.
_READ_ONLY: Final = frozenset({"stats", "connections", "streams", "rooms", "room", "jobs"})
# accept() failures that mean "out of resources for now" (trio.serve_listeners' list).
_ACCEPT_RETRY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class AdminSocketInUse(Conflict):
    """A live daemon already answers on the admin socket path."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"another raafd daemon is already listening on the admin socket {path}; stop it"
            " first, or give this one another admin.socket"
        )
        self.path = path


class AdminServer:
    """Serves admin commands on a unix socket at ``path``.

    ``handlers`` maps command names to :data:`Handler` coroutines. Connections are tasks of
    the server's own nursery, at most ``max_connections`` at once. When all are taken and a
    client waits to connect, the connection idle the longest (waiting for its next request) is
    closed to make room, so idle connections never lock the socket; only when every one is
    running a command do further clients wait in the listen backlog. A connection with no
    complete request for ``idle_timeout`` seconds, or that does not read an answer within
    ``send_timeout``, is closed.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        metrics: Metrics | None = None,
        *,
        idle_timeout: float = 60.0,
        send_timeout: float = 10.0,
        max_connections: int = 16,
    ) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self._slots = trio.Semaphore(max_connections)
        self._ids = itertools.count(1)
        # The waits of connections idle between requests, oldest first (bounded by the slots).
        self._idle: dict[int, trio.CancelScope] = {}

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the socket path and serve until cancelled; ``started`` with the path.

        Raises :class:`AdminSocketInUse` when a live daemon owns the path, and ``OSError``
        when the path cannot be used (too long, a non-socket file in the way, no permission).
        """
        _check_path_length(self.path)
        _make_parent(self.path)
        lock_fd = _lock(self.path)
        try:
            await _clear_stale(self.path)
            sock, inode = _bind_private(self.path)
            with sock:
                try:
                    sock.listen(64)
                    listener = trio.SocketListener(sock)
                    async with trio.open_nursery() as nursery:
                        log.info("admin socket listening", path=str(self.path))
                        task_status.started(self.path)
                        await self._accept_loop(listener, nursery)
                finally:
                    _unlink_if_ours(self.path, inode)
        finally:
            os.close(lock_fd)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            if self._slots.value == 0 and self._idle:
                # Full, with someone idle: when a client waits to connect, make room.
                await trio.lowlevel.wait_readable(listener.socket)
                if self._idle:
                    oldest = next(iter(self._idle))
                    self._idle.pop(oldest).cancel()
            # Take a slot before accepting, so a flood waits in the backlog, not in tasks.
            await self._slots.acquire()
            handed_over = False
            try:
                stream = await self._accept(listener)
                nursery.start_soon(self._connection, stream)
                handed_over = True
            finally:
                if not handed_over:
                    self._slots.release()

    async def _accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        while True:
            try:
                return await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                log.error("admin accept failed; retrying", error=os.strerror(exc.errno or 0))
                await trio.sleep(0.1)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn_id = next(self._ids)
        try:
            structlog.contextvars.bind_contextvars(admin_conn=conn_id, **_peer(stream))
            async with stream:
                await self._serve_lines(stream, conn_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("admin client went away")
        except trio.TooSlowError:
            log.info("admin client did not read its answer; closing", timeout=self.send_timeout)
        except Exception:
            # A bug in this file must not take the daemon down with one admin connection.
            log.exception("admin connection failed")
        finally:
            self._idle.pop(conn_id, None)
            self._slots.release()

    async def _serve_lines(self, stream: trio.SocketStream, conn_id: int) -> None:
        splitter = LineSplitter()
        # The idle clock restarts only when a request is complete, so trickling bytes does not
        # keep a connection (and one of the few slots) forever.
        deadline = trio.current_time() + self.idle_timeout
        while True:
            data: bytes | None = None
            with trio.CancelScope(deadline=deadline) as waiting:
                self._idle[conn_id] = waiting  # evictable while it waits
                data = await stream.receive_some(_RECEIVE_SIZE)
            self._idle.pop(conn_id, None)
            if data is None:
                why = "idle" if trio.current_time() >= deadline else "room for another client"
                log.debug("admin connection idle; closing", timeout=self.idle_timeout, why=why)
                return
            if not data:
                last = splitter.end()
                if last is not None:
                    await self._send(stream, await self.answer(last))
                return
            for item in splitter.feed(data):
                await self._send(stream, await self.answer(item))
                deadline = trio.current_time() + self.idle_timeout

    async def _send(self, stream: trio.SocketStream, line: bytes) -> None:
        with trio.fail_after(self.send_timeout):
            await stream.send_all(line)

    async def answer(self, line: bytes | LineTooLong) -> bytes:
        """The answer line for one request line. Never raises (except Cancelled)."""
        if isinstance(line, LineTooLong):
            return self._error("-", TooLarge(f"request line longer than {line.limit} bytes"))
        try:
            request = parse_request(line, self.handlers.keys())
        except BadRequest as exc:
            return self._error("-", exc)
        cmd = request.cmd
        try:
            result = await self.handlers[cmd](dict(request.args))
            encoded = encode_result(result)
        except Exception as exc:
            client_error = _client_error(exc)
            if client_error is None:
                log.exception("admin command failed", cmd=cmd)
                client_error = Internal("internal error; the daemon log has the details")
            return self._error(cmd, client_error)
        self._count(cmd, ok=True)
        if cmd in _READ_ONLY:
            log.debug("admin command", cmd=cmd, ok=True)
        else:  # an admin action: an audit line, whatever the log level
            log.audit("admin command", cmd=cmd, args=dict(request.args), ok=True)
        return encoded

    def _error(self, cmd: str, error: RaafdError) -> bytes:
        # "-" labels requests that named no known command: client text never becomes a label.
        self._count(cmd, ok=False)
        if cmd in _READ_ONLY:
            log.info("admin command refused", cmd=cmd, code=error.code, message=error.message)
        else:
            log.audit("admin command refused", cmd=cmd, code=error.code, message=error.message)
        return encode_error(error)

    def _count(self, cmd: str, *, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.admin_requests.labels(cmd, "true" if ok else "false").inc()


def _client_error(exc: Exception) -> RaafdError | None:
    """The RaafdError to show for a handler failure: the error itself, or the only error of a
    group holding exactly one (a handler's nursery wraps what its tasks raise)."""
    if isinstance(exc, RaafdError):
        return exc
    if isinstance(exc, ExceptionGroup):
        leaves: list[BaseException] = []
        pending: list[BaseException] = [exc]
        while pending:
            e = pending.pop()
            if isinstance(e, BaseExceptionGroup):
                pending.extend(e.exceptions)
            else:
                leaves.append(e)
        if len(leaves) == 1 and isinstance(leaves[0], RaafdError):
            return leaves[0]
    return None


def _peer(stream: trio.SocketStream) -> dict[str, int]:
    """The client's pid and uid (SO_PEERCRED), for the log: who kicked whom."""
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return {}
    pid, uid, _gid = struct.unpack("3i", creds)
    return {"peer_pid": pid, "peer_uid": uid}


# --- owning the path (small synchronous file-system steps) ------------------------------------


def _check_path_length(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise OSError(
            errno.ENAMETOOLONG,
            f"the admin socket path {path} is longer than the {_MAX_SOCKET_PATH} bytes a unix"
            " socket path may have; choose a shorter admin.socket",
        )


def _make_parent(path: Path) -> None:
    # A directory we create is private; an existing one is left as its owner set it.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AdminSocketInUse(path) from None
    except OSError:
        os.close(fd)
        raise
    return fd


async def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody answers on; refuse when somebody does."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(
            errno.EEXIST,
            f"{path} exists and is not a socket; refusing to replace it with the admin socket",
        )
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            with trio.move_on_after(_PROBE_TIMEOUT):
                await probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            _remove_stale(path)
            return
        except BlockingIOError:
            pass  # backlog full: very much alive
        except PermissionError:
            raise OSError(
                errno.EACCES,
                f"no permission to check whether a daemon owns the admin socket {path}",
            ) from None
    # Connected, or still waiting when the probe timed out: somebody is there.
    raise AdminSocketInUse(path)


def _remove_stale(path: Path) -> None:
    log.warning("removing a stale admin socket left by an earlier daemon", path=str(path))
    path.unlink(missing_ok=True)


def _bind_private(path: Path) -> tuple[trio.socket.SocketType, int]:
    """Bind (not yet listen) a unix stream socket at ``path`` with mode 0600; return it and
    the socket file's inode.

    Bound synchronously: trio would bind a path in a worker thread, which costs more than this
    local file-system step and makes a test's autojump clock see an idle daemon.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    try:
        os.chmod(path, 0o600)  # before listen(): until then every connect is refused
        inode = os.lstat(path).st_ino
    except OSError:
        sock.close()
        path.unlink(missing_ok=True)  # ours: we just bound it
        raise
    return trio.socket.from_stdlib_socket(sock), inode


def _unlink_if_ours(path: Path, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
