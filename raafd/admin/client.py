"""A client for the admin socket: one request, one answer, one connection.

:func:`admin_call` is the async form (bound it with ``trio.fail_after`` at the call site);
:func:`admin_call_sync` runs it in its own ``trio.run`` with a timeout, for the CLI.
Error answers come back as the matching :class:`~raafd.errors.RaafdError` subclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from raafd.admin.protocol import MAX_ANSWER, decode_answer, encode_request
from raafd.errors import Timeout, TooLarge, Unavailable

__all__ = ["AdminPermissionDenied", "DaemonNotRunning", "admin_call", "admin_call_sync"]


class DaemonNotRunning(Unavailable):
    """Nothing listens on the admin socket path."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no raafd daemon is listening on {path}")
        self.path = path


class AdminPermissionDenied(Unavailable):
    """The admin socket exists but this user may not connect to it (it is mode 0600)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"permission denied on {path}; run as the user raafd runs as (or root)")
        self.path = path


async def admin_call(path: Path | str, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
    """Send one command to the daemon at ``path`` and return its ``result``.

    Raises :class:`DaemonNotRunning` when no daemon listens there, :class:`AdminPermissionDenied`
    when the socket is not ours to use, and the daemon's own error (``NotFound``, ``BadRequest``
    …) when it answers one.
    """
    path = Path(path)
    line = encode_request(cmd, args)
    try:
        stream = await trio.open_unix_socket(str(path))
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        raise DaemonNotRunning(path) from None
    except PermissionError:
        raise AdminPermissionDenied(path) from None
    async with stream:
        try:
            await stream.send_all(line)
            answer = await _receive_line(stream)
        except trio.BrokenResourceError:
            raise Unavailable(f"the daemon on {path} closed the connection") from None
    if answer is None:
        raise Unavailable(f"the daemon on {path} closed the connection without answering")
    return decode_answer(answer)


async def _receive_line(stream: trio.SocketStream) -> bytes | None:
    buffer = bytearray()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return None
        newline = data.find(b"\n")
        if newline != -1:
            buffer += data[:newline]
            return bytes(buffer)
        buffer += data
        if len(buffer) > MAX_ANSWER:
            raise TooLarge(f"the daemon's answer is longer than {MAX_ANSWER} bytes")


def admin_call_sync(
    path: Path | str,
    cmd: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 60.0,
) -> Any:
    """:func:`admin_call` from synchronous code; raises :class:`~raafd.errors.Timeout` when the
    daemon has not answered within ``timeout`` seconds."""

    async def call() -> Any:
        try:
            with trio.fail_after(timeout):
                return await admin_call(path, cmd, args)
        except trio.TooSlowError:
            raise Timeout(f"no answer from the daemon on {path} within {timeout:g}s") from None

    return trio.run(call)
