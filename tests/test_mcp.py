"""MCP tools through the official SDK, under Trio: a real server process over stdio (the fake in
``tests/fakes/mcp_server.py``) and a real streamable-HTTP server on hypercorn in the test's
nursery. Real subprocesses and sockets, so these tests run on the real clock."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypothesis import given, settings
from hypothesis import strategies as st

from raafd.agents.base import ToolError
from raafd.agents.mcp import McpServer, exposed_names
from raafd.agents.tools import ToolRegistry
from raafd.config import FUNCTION_NAME, ConfigError, ToolConfig
from tests.fakes.mcp_server import build_server

ROOT = str(Path(__file__).resolve().parent.parent)
FAKE = [sys.executable, "-m", "tests.fakes.mcp_server"]
FAST_BACKOFF = (0.05, 0.2)


def stdio_config(**overrides: Any) -> ToolConfig:
    settings: dict[str, Any] = {"type": "mcp", "command": FAKE, "env": {"PYTHONPATH": ROOT}}
    settings.update(overrides)
    return ToolConfig(**settings)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def start(
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    connect_timeout: float = 15.0,
    **configs: ToolConfig,
) -> ToolRegistry:
    registry = ToolRegistry(
        configs,
        client,
        environ={},
        mcp_connect_timeout=connect_timeout,
        mcp_backoff=FAST_BACKOFF,
    )
    with trio.fail_after(20):
        await nursery.start(registry.run)
    return registry


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- naming -----------------------------------------------------------------------------------


def test_exposed_names_are_valid_function_names() -> None:
    names = exposed_names("files", ["read", "list.dir", "list/dir", "x" * 80, "ünï cødé", ""])
    assert names["files__read"] == "read"
    assert set(names.values()) == {"read", "list.dir", "list/dir", "x" * 80, "ünï cødé", ""}
    for exposed in names:
        assert len(exposed) <= 64
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in exposed), exposed
        assert exposed.startswith("files__")
    # "list.dir" and "list/dir" both sanitise to files__list_dir: both get a hash suffix.
    assert "files__list_dir" not in names
    again = exposed_names("files", ["list/dir", "list.dir", "read", "x" * 80, "ünï cødé", ""])
    assert again == names  # stable whatever the order


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
    st.lists(st.text(max_size=90), max_size=12),
)
def test_exposed_names_property(server: str, tools: list[str]) -> None:
    names = exposed_names(server, tools)
    assert set(names.values()) == set(tools)  # every tool once, duplicates folded
    assert all(FUNCTION_NAME.fullmatch(name) for name in names)


def test_exposed_names_keep_plain_names() -> None:
    assert exposed_names("s", ["get_weather", "a-b"]) == {
        "s__get_weather": "get_weather",
        "s__a-b": "a-b",
    }


# --- stdio ------------------------------------------------------------------------------------
# Each server process imports the SDK (about a second of CPU), so the stdio tests share them.


async def test_stdio_servers(client: httpx.AsyncClient) -> None:
    """One registry with a working server, one that exits at once and one that cannot be
    started: it starts, serves the working server's tools, bounds calls by ``timeout``, keeps
    retrying the broken ones, and stops the server process when cancelled."""
    exits = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('cannot start: boom\\n'); sys.exit(3)",
    ]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            registry = await start(
                nursery,
                client,
                broken=ToolConfig(type="mcp", command=exits),
                missing=ToolConfig(type="mcp", command=["/nonexistent/mcp-server"]),
                fake=stdio_config(timeout=0.5),
            )
            await _check_listing_and_calls(registry)
            await _check_timeouts(registry)
            _check_broken(registry)
            broken = registry.servers["broken"]
            while broken.failures < 3:  # it keeps trying in the background, backing off
                await broken.wait_changed()
            assert broken.connects == 0

            pid = int(await registry.get("fake__pid").call({}))  # type: ignore[union-attr]
            assert alive(pid)
            nursery.cancel_scope.cancel()
    assert not alive(pid)  # stopped (and reaped) on the way out


async def _check_listing_and_calls(registry: ToolRegistry) -> None:
    assert registry.servers["fake"].available
    tools = {tool.spec.name: tool for tool in registry.tools_for(["fake", "calculator"])}
    assert list(tools) == [
        "fake__add",
        "fake__shout",
        "fake__fail",
        "fake__pid",
        "fake__sleep",
        "calculator",
    ]
    spec = tools["fake__add"].spec
    assert spec.description == "Add two integers."
    assert spec.parameters["properties"].keys() == {"a", "b"}
    assert spec.to_openai()["function"]["name"] == "fake__add"

    assert await tools["fake__add"].call({"a": 2, "b": 3}) == "5"
    assert await tools["fake__shout"].call({"text": "hi"}) == "HI"
    with pytest.raises(ToolError, match="it broke badly"):
        await tools["fake__fail"].call({"reason": "it broke badly"})
    with pytest.raises(ToolError) as info:  # key-shaped text in a server's error is hidden
        await tools["fake__fail"].call({"reason": "key sk-live-0123456789abcdef refused"})
    assert str(info.value) == "Error executing tool fail: key [redacted] refused"
    with pytest.raises(ToolError, match=r"validation error|Input should be"):
        await tools["fake__add"].call({"a": "two", "b": 3})
    add = registry.get("fake__add")
    assert add is not None
    assert await add.call({"a": 1, "b": 1}) == "2"
    assert registry.get("fake") is None
    assert registry.get("fake__nope") is None

    snap = registry.snapshot()["fake"]
    assert snap["type"] == "mcp"
    assert snap["transport"] == "stdio"
    assert snap["available"] is True
    assert snap["connects"] == 1
    assert (snap["calls"], snap["errors"]) == (6, 3)
    assert snap["last_error"] is not None
    assert "fake__add" in snap["tools"]


async def _check_timeouts(registry: ToolRegistry) -> None:
    sleep, add = registry.get("fake__sleep"), registry.get("fake__add")
    assert sleep is not None and add is not None
    with pytest.raises(ToolError, match=r"did not answer within 0\.5 s"):
        await sleep.call({"seconds": 30})
    with trio.move_on_after(0.1) as scope:  # the caller's own scope (tool_timeout)
        await sleep.call({"seconds": 30})
    assert scope.cancelled_caught
    assert await add.call({"a": 1, "b": 2}) == "3"
    assert registry.servers["fake"].connects == 1  # the session survived both


def _check_broken(registry: ToolRegistry) -> None:
    snap = registry.snapshot()
    assert snap["broken"]["available"] is False
    assert "cannot start: boom" in snap["broken"]["connect_error"]
    assert snap["missing"]["available"] is False
    assert "No such file" in snap["missing"]["connect_error"]
    assert registry.tools_for(["broken", "missing"]) == []
    names = [tool.spec.name for tool in registry.tools_for(["broken", "fake", "clock"])]
    assert names[0] == "fake__add" and names[-1] == "clock"


async def test_server_process_dies_then_reconnects(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    registry = await start(nursery, client, fake=stdio_config())
    server = registry.servers["fake"]
    add, pid_tool = registry.get("fake__add"), registry.get("fake__pid")
    assert add is not None and pid_tool is not None
    outcome: list[str] = []
    ended = trio.Event()

    async def call_in_flight() -> None:
        try:
            await registry.get("fake__sleep").call({"seconds": 60})  # type: ignore[union-attr]
        except ToolError as exc:
            outcome.append(str(exc))
        finally:
            ended.set()

    with trio.fail_after(20):
        pid = int(await pid_tool.call({}))
        nursery.start_soon(call_in_flight)
        # Once every task waits, the call's request is written and it waits for the answer.
        await trio.testing.wait_all_tasks_blocked()
        os.kill(pid, signal.SIGKILL)
        await server.wait_until(available=False)
        # The tools stay offered, and say why they cannot work.
        assert registry.tools_for(["fake"])[0].spec.name == "fake__add"
        with pytest.raises(ToolError, match=r"^tool server unavailable$"):
            await add.call({"a": 1, "b": 2})
        assert registry.snapshot()["fake"]["available"] is False
        await ended.wait()  # the call that was waiting on the dead server ends too
        assert outcome == ["tool server unavailable"]
        await server.wait_until(available=True)
        assert await add.call({"a": 1, "b": 2}) == "3"
        new_pid = int(await pid_tool.call({}))
    assert new_pid != pid
    assert server.connects == 2
    assert not alive(pid)


async def test_server_that_never_answers_times_out_at_start(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    silent = [sys.executable, "-c", "import sys; sys.stdin.read()"]  # exits when stdin closes
    with trio.fail_after(10):
        registry = await start(nursery, client, 0.5, silent=ToolConfig(type="mcp", command=silent))
        server = registry.servers["silent"]
        assert not server.available
        while server.failures == 0:
            await server.wait_changed()
    error = registry.snapshot()["silent"]["connect_error"]
    assert "no answer within 0.5 s while connecting" in error


# --- streamable HTTP --------------------------------------------------------------------------


class _HeaderRecorder:
    """ASGI middleware keeping the request headers it saw."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await self.app(scope, receive, send)


async def serve_mcp(nursery: trio.Nursery, app: Any, port: int = 0) -> tuple[str, trio.CancelScope]:
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        with scope:
            await serve(app, config, task_status=task_status)

    with trio.fail_after(5):
        binds: list[str] = await nursery.start(run)
    return binds[0], scope


async def test_streamable_http_server(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    app = _HeaderRecorder(build_server().streamable_http_app())
    base, server_scope = await serve_mcp(nursery, app)
    config = ToolConfig(
        type="mcp",
        url=f"{base}/mcp",
        headers={"X-Team": "tools"},
        headers_env={"X-Api-Key": "MCP_KEY"},
        timeout=5.0,
    )
    registry = ToolRegistry(
        {"remote": config}, client, environ={"MCP_KEY": "k-123"}, mcp_backoff=FAST_BACKOFF
    )
    with trio.fail_after(10):
        await nursery.start(registry.run)
        assert registry.snapshot()["remote"]["transport"] == "http"
        add = registry.get("remote__add")
        assert add is not None
        assert await add.call({"a": 40, "b": 2}) == "42"
        with pytest.raises(ToolError) as info:
            await registry.get("remote__fail").call({"reason": "nope k-123"})  # type: ignore[union-attr]
        assert str(info.value) == "Error executing tool fail: nope [redacted]"
    assert app.headers
    assert all(h.get("x-api-key") == "k-123" and h.get("x-team") == "tools" for h in app.headers)

    # The server goes away: calls fail as unavailable, and the registry reconnects once a
    # server answers on that address again.
    port = int(base.rsplit(":", 1)[1])
    server_scope.cancel()
    with trio.fail_after(10):
        with pytest.raises(ToolError, match=r"^tool server unavailable$"):
            await add.call({"a": 1, "b": 1})
        await registry.servers["remote"].wait_until(available=False)
        await serve_mcp(nursery, build_server().streamable_http_app(), port)
        await registry.servers["remote"].wait_until(available=True)
        assert await add.call({"a": 1, "b": 1}) == "2"


async def test_http_server_missing_header_variable(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    config = ToolConfig(
        type="mcp", url="http://127.0.0.1:9/mcp", headers_env={"X-Api-Key": "UNSET_VAR"}
    )
    registry = await start(nursery, client, remote=config)
    error = registry.snapshot()["remote"]["connect_error"]
    assert "not configured" in error and "UNSET_VAR" in error


# --- without the SDK --------------------------------------------------------------------------


def test_registry_refuses_mcp_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("raafd.config.mcp_installed", lambda: False)
    with pytest.raises(ConfigError) as info:
        ToolRegistry({"fs": ToolConfig(type="mcp", command=["x"])}, httpx.AsyncClient())
    assert info.value.problems == [
        "tools.fs: the mcp extra is not installed (pip install 'raafd[mcp]')"
    ]


async def test_core_imports_without_the_sdk() -> None:
    """With ``mcp`` unimportable the tools module loads, built-ins work, and an mcp tool is a
    clear configuration error."""
    script = (
        "import sys; sys.modules['mcp'] = None\n"
        "import httpx, trio\n"
        "from raafd.agents.tools import ToolRegistry\n"
        "from raafd.config import ConfigError, ToolConfig, mcp_installed\n"
        "assert not mcp_installed()\n"
        "r = ToolRegistry({}, httpx.AsyncClient())\n"
        "print(trio.run(r.get('calculator').call, {'expression': '6*7'}))\n"
        "try:\n"
        "    ToolRegistry({'fs': ToolConfig(type='mcp', command=['x'])}, httpx.AsyncClient())\n"
        "except ConfigError as e:\n"
        "    print(e.problems[0])\n"
        "assert 'mcp' not in sys.modules or sys.modules['mcp'] is None\n"
    )
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, "-c", script], cwd=ROOT, capture_stdout=True, capture_stderr=True
        )
    assert result.stdout.decode().splitlines() == [
        "42",
        "tools.fs: the mcp extra is not installed (pip install 'raafd[mcp]')",
    ]


def test_server_repr_and_snapshot_before_start() -> None:
    server = McpServer("fs", stdio_config())
    assert server.snapshot() == {
        "type": "mcp",
        "transport": "stdio",
        "available": False,
        "tools": [],
        "connects": 0,
        "failures": 0,
        "connect_error": None,
    }
    assert "fs" in repr(server)
