"""A raafd of its own for the abuse benchmarks (fuzz.py, slowloris.py, soak.py): ``python -m
raafd.cli serve`` from this tree with a generated config, pinned to the first core of this
process's affinity mask while the calling script moves to the last one; stopped (SIGTERM, then
SIGKILL) on the way out. Also the process figures they print (RSS, open fds)."""

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
