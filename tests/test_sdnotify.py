"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from raafd.sdnotify import SdNotifier


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
async def systemd(tmp_path: Path) -> AsyncIterator[tuple[trio.socket.SocketType, Path]]:
    """A bound datagram socket, as systemd's NOTIFY_SOCKET would be."""
    path = tmp_path / "notify.sock"
    # Bound synchronously: trio binds unix paths in a thread, which autojump_clock reads as idle.
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    plain.bind(str(path))
    with trio.socket.from_stdlib_socket(plain) as sock:
        yield sock, path


async def receive(sock: trio.socket.SocketType, within: float = 5) -> str:
    with trio.fail_after(within):
        return (await sock.recv(4096)).decode()


async def test_state_messages(systemd: tuple[trio.socket.SocketType, Path]) -> None:
    sock, path = systemd
    notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert notifier.enabled
    assert notifier.ready()
    assert await receive(sock) == "READY=1"
    assert notifier.status("serving on 127.0.0.1:8080\nsecond line")
    assert await receive(sock) == "STATUS=serving on 127.0.0.1:8080 second line"
    assert notifier.stopping()
    assert await receive(sock) == "STOPPING=1"


async def test_reloading_carries_monotonic_usec(
    systemd: tuple[trio.socket.SocketType, Path],
) -> None:
    sock, path = systemd
    notifier = SdNotifier(str(path))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = (await receive(sock)).split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


async def test_abstract_socket(tmp_path: Path) -> None:
    name = f"raafd-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        await sock.bind("\0" + name)
        notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert await receive(sock) == "READY=1"


async def test_watchdog_pings_at_half_the_interval(
    systemd: tuple[trio.socket.SocketType, Path], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = systemd
    notifier = SdNotifier.from_environ(
        {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_interval() == 15.0
    async with trio.open_nursery() as nursery:
        assert await nursery.start(notifier.run_watchdog) == 15.0
        times = []
        for _ in range(4):
            assert await receive(sock, within=60) == "WATCHDOG=1"
            times.append(trio.current_time())
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == [15.0, 15.0, 15.0]


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000"}, 1.0),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"}, None),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "0"}, None),
        ({"NOTIFY_SOCKET": "/run/x"}, None),
        ({"WATCHDOG_USEC": "2000000"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    # WATCHDOG_PID 1 is never this test process.
    assert SdNotifier.from_environ(environ).watchdog_interval() == interval


async def test_no_watchdog_returns_at_once() -> None:
    notifier = SdNotifier.from_environ({})
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(notifier.run_watchdog) is None


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SdNotifier.from_environ()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.stopping()
    assert not notifier.reloading()
    assert not notifier.status("x")
    assert notifier.watchdog_interval() is None


def test_reads_os_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert SdNotifier.from_environ().watchdog_interval() == 5.0


def test_unsupported_address_is_ignored() -> None:
    notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert not notifier.ready()


def test_failure_is_logged_once_and_never_raised(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    notifier = SdNotifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.enabled
    for _ in range(3):
        assert not notifier.ready()
        assert not notifier.watchdog()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "cannot notify systemd; carrying on"
