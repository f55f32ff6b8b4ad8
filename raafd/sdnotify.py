"""systemd's notification protocol (``sd_notify``), in a few lines over an AF_UNIX datagram.

The rule of this module: telling systemd things must never hurt the daemon. Every send is a
non-blocking datagram; with ``NOTIFY_SOCKET`` unset it is a no-op, and a failure is logged
once (until the next success) and otherwise ignored.

Messages the daemon sends, in order of a life: ``READY=1`` once it serves (with
``Type=notify``, systemd waits for it); ``STATUS=…`` free text for ``systemctl status``;
``WATCHDOG=1`` every half ``WatchdogSec`` (:meth:`SdNotifier.run_watchdog`); around a reload
``RELOADING=1`` + ``MONOTONIC_USEC`` then ``READY=1`` again (what ``Type=notify-reload``,
systemd 253+, waits for; other types ignore it); ``STOPPING=1`` when a drain begins.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import trio

from raafd.logging import get_logger

__all__ = ["SdNotifier"]

log = get_logger("raafd.sdnotify")


class SdNotifier:
    """Sends state changes to systemd's notification socket.

    ``address`` is ``NOTIFY_SOCKET`` as systemd sets it: a path, or ``@name`` for an abstract
    socket. ``watchdog_usec``/``watchdog_pid`` are ``WATCHDOG_USEC``/``WATCHDOG_PID``.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec
        self.watchdog_pid = watchdog_pid
        self._target = _target(self.address) if self.address else None
        self._failing = False
        if self.address and self._target is None:
            log.warning(
                "NOTIFY_SOCKET is not a unix socket address; not notifying systemd",
                notify_socket=self.address,
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (``os.environ`` by
        default). Malformed watchdog values mean no watchdog."""
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_int(env.get("WATCHDOG_PID")),
        )

    @property
    def enabled(self) -> bool:
        """Whether there is a systemd to tell anything."""
        return self._target is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (``KEY=value`` lines); ``True`` if a datagram went out. Never raises."""
        if self._target is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(state.encode(), self._target)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot notify systemd; carrying on",
                    notify_socket=self.address,
                    error=exc.strerror or str(exc),
                )
            return False
        if self._failing:
            self._failing = False
            log.info("notifying systemd works again", notify_socket=self.address)
        return True

    def ready(self) -> bool:
        """``READY=1``: start-up (or a reload) is complete."""
        return self.notify("READY=1")

    def reloading(self) -> bool:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` systemd 253+ checks; send :meth:`ready`
        when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """``STOPPING=1``: a graceful stop has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """``STATUS=…``: one line shown by ``systemctl status``."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """One ``WATCHDOG=1`` keep-alive."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of ``WATCHDOG_USEC``), or ``None`` when systemd
        asked for no watchdog, or asked another process (``WATCHDOG_PID``)."""
        if self._target is None or not self.watchdog_usec or self.watchdog_usec <= 0:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None
        return self.watchdog_usec / 2 / 1_000_000

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[float | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send ``WATCHDOG=1`` now and every :meth:`watchdog_interval` until cancelled;
        ``started`` with the interval. Returns at once when there is no watchdog.

        The pings come from the daemon's own nursery, so a wedged Trio loop stops them and
        systemd restarts the service: that is the point.
        """
        interval = self.watchdog_interval()
        task_status.started(interval)
        if interval is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(interval)


def _target(address: str) -> str | None:
    if address.startswith("@"):
        return "\0" + address[1:]  # Linux abstract namespace
    if address.startswith("/"):
        return address
    return None  # e.g. vsock:… (systemd 254+ for VMs): not supported here


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None
