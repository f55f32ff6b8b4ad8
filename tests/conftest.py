"""Shared fixtures: a real daemon on port 0 inside the test's nursery.

A daemon started under ``autojump_clock`` keeps its sessions in memory (``[store] backend =
"memory"``): the SQLite store works in a worker thread, which the autojump clock cannot see, so
on a busy disk the clock would jump past a test's deadline while a commit is still running.
Tests that need durability run on real time.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings

from raafd.config import Config, parse_config
from raafd.providers.registry import open_http_client, open_upstream_client
from raafd.providers.upstream import UpstreamClient
from tests.waiting import let_loopback_land

# Hypothesis times each example (and its data generation) in real time, which a busy machine
# stretches at will: what a property test checks is its property, not the machine's speed.
settings.register_profile("raafd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("raafd")


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


def autojump_clock_in_use() -> trio.testing.MockClock | None:
    """The running test's clock, if it is an autojump clock (None outside trio too)."""
    try:
        clock = trio.lowlevel.current_clock()
    except RuntimeError:
        return None
    if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold != math.inf:
        return clock
    return None


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a validated Config for tests: port 0, state and admin socket under tmp_path.
    Keyword arguments are TOML-shaped sections, e.g. ``streams={"detach_grace": 1}``;
    ``environ`` is where ``auth.tokens_env`` is looked up (default: an empty environment)."""

    def make(*, environ: Mapping[str, str] | None = None, **sections: Any) -> Config:
        data: dict[str, Any] = {
            "server": {"port": 0, "shutdown_grace": 2.0},
            "state": {"dir": str(tmp_path / "var")},
            "admin": {"socket": str(tmp_path / "admin.sock")},
        }
        if autojump_clock_in_use() is not None:
            data["store"] = {"backend": "memory"}
        for name, values in sections.items():
            if isinstance(values, dict) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **values}
            else:
                data[name] = values
        return parse_config(data, {} if environ is None else environ)

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
    """``await start_daemon(**sections)`` starts a daemon in the test's nursery (``environ``:
    the daemon's environment, empty by default)."""

    async def start(
        config: Config | None = None, *, environ: Mapping[str, str] | None = None, **sections: Any
    ) -> RunningDaemon:
        from raafd.daemon import Daemon

        cfg = config or make_config(**sections)
        clock = autojump_clock_in_use()
        if clock is not None:
            if cfg.store.backend != "memory":
                pytest.fail("a daemon under autojump_clock must keep its sessions in memory")
            let_loopback_land(clock)  # the daemon's sockets are real
        daemon = Daemon(cfg, environ={} if environ is None else environ)
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
