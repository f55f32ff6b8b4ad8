"""Shared fixtures: a real daemon on port 0 inside the test's nursery."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from raafd.config import Config, parse_config
from raafd.providers.registry import open_http_client, open_upstream_client
from raafd.providers.upstream import UpstreamClient


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's own shared httpx client, as the tools use it (proxies from the environment
    ignored)."""
    async with open_http_client(trust_env=False) as http_client:
        yield http_client


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamClient]:
    """The daemon's own shared upstream client, as the providers use it (proxies from the
    environment ignored)."""
    async with open_upstream_client(trust_env=False) as upstream_client:
        yield upstream_client


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a validated Config for tests: port 0, state and admin socket under tmp_path.
    Keyword arguments are TOML-shaped sections, e.g. ``streams={"detach_grace": 1}``."""

    def make(**sections: Any) -> Config:
        data: dict[str, Any] = {
            "server": {"port": 0, "shutdown_grace": 2.0},
            "state": {"dir": str(tmp_path / "var")},
            "admin": {"socket": str(tmp_path / "admin.sock")},
        }
        for name, values in sections.items():
            if isinstance(values, dict) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **values}
            else:
                data[name] = values
        return parse_config(data)

    return make


class RunningDaemon:
    def __init__(self, daemon: Any, address: str, cancel_scope: trio.CancelScope) -> None:
        self.daemon = daemon
        self.address = address
        self.base_url = f"http://{address}"
        self.ws_url = f"ws://{address}/v1/ws"
        self.cancel_scope = cancel_scope


@pytest.fixture
def start_daemon(nursery: trio.Nursery, make_config: Callable[..., Config]) -> Callable[..., Any]:
    """``await start_daemon(**sections)`` starts a daemon in the test's nursery."""

    async def start(config: Config | None = None, **sections: Any) -> RunningDaemon:
        from raafd.daemon import Daemon

        clock = trio.lowlevel.current_clock()
        if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold < 0.02:
            # A real daemon does work outside trio's view (SQLite in worker threads, bytes in
            # flight on loopback); an autojump clock must let it land before jumping past a
            # deadline. Time still jumps: minutes of timeouts take milliseconds.
            clock.autojump_threshold = 0.02

        cfg = config or make_config(**sections)
        daemon = Daemon(cfg, environ={})
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await daemon.run(task_status=task_status)

        with trio.fail_after(10):
            address = await nursery.start(run)
        return RunningDaemon(daemon, address, scope)

    return start


@pytest.fixture
async def running(start_daemon: Callable[..., Any]) -> AsyncIterator[RunningDaemon]:
    """A daemon on built-in defaults (port 0, state in tmp)."""
    rd = await start_daemon()
    yield rd
    rd.cancel_scope.cancel()
