"""A real `raafd serve` process: signals, drain, reload, sd_notify, and `raafd ctl`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

RAAFD = [sys.executable, "-m", "raafd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, proc: trio.Process, port: int, notify: trio.socket.SocketType, tmp: Path):
        self.proc = proc
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.notify = notify
        self.tmp = tmp
        self.config = tmp / "raafd.toml"
        self.admin = tmp / "admin.sock"

    async def next_notification(self) -> str:
        # Generous: on a busy disk the first one waits for Python to import raafd from a
        # page cache that the load keeps evicting.
        with trio.fail_after(30):
            return (await self.notify.recv(4096)).decode()

    async def wait_for(self, state: str) -> list[str]:
        seen = []
        while True:
            message = await self.next_notification()
            seen.append(message)
            if any(line.startswith(state) for line in message.split("\n")):
                return seen


def write_config(path: Path, tmp: Path, port: int, extra: str = "") -> None:
    path.write_text(
        f"""
[server]
port = {port}
shutdown_grace = 5.0
drain_delay = 1.0
gc_thresholds = [12345, 7, 9]
[state]
dir = "{tmp / "var"}"
[admin]
socket = "{tmp / "admin.sock"}"
[logging]
level = "info"
format = "json"
{extra}
"""
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    port = free_port()
    notify_path = tmp_path / "notify.sock"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    write_config(tmp_path / "raafd.toml", tmp_path, port)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "400000",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAAFD_CONFIG", None)
    with (tmp_path / "stderr.log").open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [*RAAFD, "serve", "--config", str(tmp_path / "raafd.toml")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    served = Served(proc, port, notify, tmp_path)
    try:
        yield served
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.fail_after(10):
            await proc.wait()
        notify.close()


async def test_ready_watchdog_reload_and_sigterm_drain(served: Served) -> None:
    await served.wait_for("READY=1")
    status = await served.wait_for("STATUS=")
    assert "serving on 127.0.0.1:" in status[-1]
    # Watchdog at half of WATCHDOG_USEC (0.4 s): several pings arrive quickly.
    await served.wait_for("WATCHDOG=1")
    await served.wait_for("WATCHDOG=1")

    async with httpx.AsyncClient(base_url=served.base_url) as client:
        with trio.fail_after(10):
            assert (await client.get("/readyz")).status_code == 200

            # SIGHUP with a good file: the log level changes, a restart-only key is reported.
            write_config(served.config, served.tmp, served.port, "")
            text = served.config.read_text().replace('level = "info"', 'level = "debug"')
            served.config.write_text(text.replace("port = ", "backlog = 10\nport = "))
            served.proc.send_signal(signal.SIGHUP)
            await served.wait_for("RELOADING=1")
            await served.wait_for("READY=1")
            stats = await _ctl_json(served, "stats")
            assert stats["log_level"] == "debug"
            assert stats["process"]["gc_thresholds"] == [12345, 7, 9]
            assert stats["process"]["gc_frozen"] > 0  # what existed at start is out of sight

            # SIGHUP with a bad file: rejected, the running config stays.
            served.config.write_text(text.replace('level = "debug"', 'level = "loud"'))
            served.proc.send_signal(signal.SIGHUP)
            await served.wait_for("READY=1")
            assert (await _ctl_json(served, "stats"))["log_level"] == "debug"
            log = (served.tmp / "stderr.log").read_text()
            assert "logging.level: must be one of" in log
            assert "needs_restart" in log and "server.backlog" in log

            # SIGTERM: readiness turns 503 during the drain delay, then exit 0.
            started = trio.current_time()
            served.proc.send_signal(signal.SIGTERM)
            await served.wait_for("STOPPING=1")
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "unavailable"
        with trio.fail_after(10):
            assert await served.proc.wait() == 0
        assert trio.current_time() - started < 5.0  # within shutdown_grace
    assert not served.admin.exists()


async def test_second_sigint_exits_at_once(served: Served) -> None:
    await served.wait_for("READY=1")
    # Make the drain long: a stream that runs for a minute keeps the daemon in its grace.
    served.config.write_text(
        served.config.read_text()
        .replace("shutdown_grace = 5.0", "shutdown_grace = 60.0")
        .replace("drain_delay = 1.0", "drain_delay = 30.0")
    )
    served.proc.send_signal(signal.SIGHUP)
    await served.wait_for("READY=1")
    served.proc.send_signal(signal.SIGINT)
    await served.wait_for("STOPPING=1")
    async with httpx.AsyncClient(base_url=served.base_url) as client:
        with trio.fail_after(10):
            response = await client.get("/readyz")
    assert response.status_code == 503  # still there, draining (for 30 s)
    assert served.proc.returncode is None
    served.proc.send_signal(signal.SIGINT)
    with trio.fail_after(5):
        code = await served.proc.wait()
    assert code == 130


async def test_ctl_round_trip_and_no_daemon(served: Served, tmp_path: Path) -> None:
    await served.wait_for("READY=1")
    out = await _ctl(served, "stats")
    assert out.returncode == 0
    assert "version" in out.stdout and "uptime" in out.stdout
    level = await _ctl(served, "log-level", "warning", "--json")
    assert level.returncode == 0 and '"warning"' in level.stdout
    drained = await _ctl(served, "drain")
    assert drained.returncode == 0
    with trio.fail_after(10):
        assert await served.proc.wait() == 0
    missing = await _ctl(served, "stats")
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0
    assert "no daemon" in missing.stderr or "no raafd daemon" in missing.stderr


async def _ctl(served: Served, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        result = await trio.run_process(
            [*RAAFD, "ctl", *args, "--socket", str(served.admin)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    result.stdout = result.stdout.decode()
    result.stderr = result.stderr.decode()
    return result


async def _ctl_json(served: Served, cmd: str) -> dict[str, object]:
    import json

    result = await _ctl(served, cmd, "--json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value
