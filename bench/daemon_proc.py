"""A raafd of its own for the benchmarks: ``python -m raafd.cli serve`` from this tree with a
generated config, pinned to one core while the calling script (the load generator) moves to
another; stopped (SIGTERM, then SIGKILL) on the way out.

- :func:`running_daemon`: the abuse benchmarks (fuzz.py, slowloris.py, soak.py), sessions in
  memory, with the process figures they print (RSS, open fds);
- :func:`serving`: the throughput benchmarks (dm_bench.py, job_bench.py, room_bench.py), on
  SQLite in a temporary state directory as deployed (every acknowledgement durable), with the
  server's CPU seconds and the store's group-commit figures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent

BASE_CONFIG = """
[server]
port = {port}
max_connections = {max_connections}
header_timeout = {header_timeout}
[providers.demo]
tokens_per_second = {tokens_per_second}
reply_words = {reply_words}
[state]
dir = "{state}"
[store]
backend = "memory"
[logging]
level = "warning"
format = "json"
"""


@attrs.define
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    server_core: str
    load_core: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self) -> tuple[int, int]:
        """(RSS bytes, open fds) of the daemon."""
        rss = 0
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def error_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if '"level": "error"' in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_daemon(
    extra: str = "",
    *,
    max_connections: int = 10_000,
    header_timeout: float = 10.0,
    tokens_per_second: float = 2000.0,
    reply_words: int = 12,
) -> Iterator[Daemon]:
    """A daemon serving ``BASE_CONFIG`` plus ``extra`` (more TOML tables) until the block
    ends; this process is moved to the last core."""
    cores = sorted(os.sched_getaffinity(0))
    server_core, load_core = str(cores[0]), str(cores[-1])
    os.sched_setaffinity(0, {cores[-1]})
    with tempfile.TemporaryDirectory(prefix="raafd-bench-") as tmp:
        port = _free_port()
        config = Path(tmp) / "raafd.toml"
        config.write_text(
            BASE_CONFIG.format(
                port=port,
                max_connections=max_connections,
                header_timeout=header_timeout,
                tokens_per_second=tokens_per_second,
                reply_words=reply_words,
                state=Path(tmp) / "var",
            )
            + extra
        )
        log_path = Path(tmp) / "raafd.log"
        cmd = [sys.executable, "-m", "raafd.cli", "serve", "--config", str(config)]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", server_core, *cmd]
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                _wait_listening(proc, port, log_path)
                yield Daemon(proc, port, log_path, server_core, load_core)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("raafd did not start:\n" + log.read_text()[-3000:]) from None
            time.sleep(0.05)


@attrs.define
class Served:
    """A running ``raafd serve`` of :func:`serving`."""

    proc: subprocess.Popen[bytes]
    port: int
    load_core: int  # the core this process (the load generator) now runs on

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def cpu_seconds(self) -> float:
        """User and system CPU the server has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serving(
    sections: str = "",
    *,
    server: str = "",
    core: int = 0,
    profile: str | None = None,
    token: str = "",
) -> Iterator[Served]:
    """``raafd serve`` on SQLite until the block ends: ``[server]`` (a free port, plus the
    ``server`` lines), ``[state]``, ``[admin]`` and ``[logging] level = "warning"`` are written
    here, ``sections`` (more TOML tables) after them. Pinned to ``core``, this process to
    another; ``profile``: run the server under cProfile into that path. Yields once
    ``/readyz`` answers 200 (with ``token`` as the bearer when auth is on)."""
    cores = sorted(os.sched_getaffinity(0))
    load_core = next((c for c in cores if c != core), core)
    with tempfile.TemporaryDirectory(prefix="raafd-bench-") as tmp:
        port = _free_port()
        config = Path(tmp) / "raafd.toml"
        config.write_text(
            f"[server]\nport = {port}\n{server}\n"
            f'[state]\ndir = "{Path(tmp) / "var"}"\n'
            f'[admin]\nsocket = "{Path(tmp) / "admin.sock"}"\n'
            '[logging]\nlevel = "warning"\n' + sections
        )
        pin = ["taskset", "-c", str(core)] if shutil.which("taskset") else []
        cprofile = ["-m", "cProfile", "-o", profile] if profile else []
        cmd = [*pin, sys.executable, *cprofile, "-m", "raafd.cli", "serve", "--config", str(config)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            os.sched_setaffinity(0, {load_core})
            _wait_ready(proc, port, token)
            yield Served(proc, port, load_core)
        finally:
            proc.terminate()  # SIGTERM: a profiled server writes its profile on the way out
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, token: str) -> None:
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"raafd exited ({proc.returncode}) before it was ready")
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/readyz", headers=headers)
            if answer.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("raafd was not ready within 60 s")


def store_line(stats: dict[str, Any]) -> str:
    """The store's group-commit figures from ``/v1/stats``, as the throughput benches print
    them."""
    store = stats.get("store", {})
    return (
        f"  store: {store.get('commits')} commits, mean batch {store.get('mean_batch')},"
        f" largest {store.get('largest_batch')}, mean commit {store.get('mean_commit_ms')} ms"
    )
