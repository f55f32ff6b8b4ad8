"""Built-in tools, http tools against a real HTTP server (hypercorn in the test's nursery), and
the registry."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from trio.testing import MockClock

from raafd.agents.base import ToolError
from raafd.agents.tools import (
    CalculatorTool,
    ClockTool,
    HttpTool,
    ToolRegistry,
)
from raafd.config import ConfigError, ToolConfig, check_tool_configs, parse_config
from raafd.metrics import Metrics
from tests.waiting import let_loopback_land

SECRET = "s3cr3t-Weather-Token-0042"  # not key-shaped: only the env redaction can hide it
FIXED = datetime(2026, 3, 29, 0, 30, 15, 123456, tzinfo=UTC)


# --- built-ins --------------------------------------------------------------------------------


async def test_clock() -> None:
    clock = ClockTool(now=lambda: FIXED)
    assert clock.spec.name == "clock"
    assert clock.spec.to_openai()["function"]["parameters"]["properties"]["timezone"]
    assert await clock.call({}) == "2026-03-29T00:30:15+00:00"
    assert await clock.call({"timezone": "UTC"}) == "2026-03-29T00:30:15+00:00"
    # The night Amsterdam moves to summer time: 00:30 UTC is 01:30 CET, 01:30 UTC 03:30 CEST.
    assert await clock.call({"timezone": "Europe/Amsterdam"}) == "2026-03-29T01:30:15+01:00"
    later = ClockTool(now=lambda: FIXED.replace(hour=1))
    assert await later.call({"timezone": "Europe/Amsterdam"}) == "2026-03-29T03:30:15+02:00"
    assert await clock.call({"timezone": "America/New_York"}) == "2026-03-28T20:30:15-04:00"


async def test_clock_now_is_now() -> None:
    text = await ClockTool().call({})
    then = datetime.fromisoformat(text)
    assert abs((datetime.now(UTC) - then).total_seconds()) < 5


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"timezone": "/etc/passwd"}, "unknown time zone"),
        ({"timezone": "Europe"}, "unknown time zone"),
        ({"timezone": "zone.tab"}, "unknown time zone"),
        ({"timezone": 5}, "invalid arguments: arguments.timezone: 5 is not of type 'string'"),
        ({"timezone": "x" * 65}, "invalid arguments: arguments.timezone: "),
        ({"tz": "UTC"}, "invalid arguments: arguments: Additional properties are not allowed"),
    ],
)
async def test_clock_refuses(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ToolError) as info:
        await ClockTool(now=lambda: FIXED).call(arguments)
    assert str(info.value).startswith(message)


async def test_calculator_tool() -> None:
    calculator = CalculatorTool()
    assert calculator.spec.name == "calculator"
    assert calculator.spec.parameters["required"] == ["expression"]
    assert await calculator.call({"expression": "(2 + 3) * 4 / 8"}) == "2.5"
    assert await calculator.call({"expression": "2 ** 64"}) == "18446744073709551616"
    with pytest.raises(ToolError, match=r"^division by zero$"):
        await calculator.call({"expression": "1 / (2 - 2)"})
    with pytest.raises(ToolError, match="arguments: 'expression' is a required property"):
        await calculator.call({})
    with pytest.raises(ToolError, match="is too long"):
        await calculator.call({"expression": "1" * 1001})
    with pytest.raises(ToolError, match="must be a JSON object"):
        await calculator.call(["1 + 1"])  # type: ignore[arg-type]


# --- a real HTTP server -----------------------------------------------------------------------


class Upstream:
    """A tiny ASGI app: the path picks the behaviour; every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(
            {"path": scope["path"], "method": scope["method"], "headers": headers, "body": body}
        )
        path = scope["path"]
        if path == "/json":
            args = orjson.loads(body)
            await self._send(send, 200, b'{ "got" :  %s,\n "ok": true }' % orjson.dumps(args))
        elif path == "/text":
            await self._send(send, 200, "héllo wörld".encode(), "text/plain; charset=utf-8")
        elif path == "/bad-json":
            await self._send(send, 200, b"{not json", "application/json")
        elif path == "/error":
            key = headers.get("x-api-key", "")
            text = f"upstream exploded; your key {key} is wrong;   see   logs " + "x" * 2000
            await self._send(send, 500, text.encode(), "text/plain")
        elif path == "/empty-error":
            await self._send(send, 404, b"", "text/plain")
        elif path == "/empty":
            await self._send(send, 204, b"", "text/plain")
        elif path == "/big":
            await self._send(send, 200, b"a" * 5000, "text/plain")
        elif path == "/big-chunked":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(10):
                await send({"type": "http.response.body", "body": b"b" * 1000, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/slow":
            await trio.sleep_forever()  # an upstream that never answers
        elif path == "/redirect":
            await send(
                {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [(b"location", b"/json")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        else:
            await self._send(send, 404, b"no such path", "text/plain")

    @staticmethod
    async def _send(
        send: Any, status: int, body: bytes, content_type: str = "application/json"
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> tuple[Upstream, str]:
    app = Upstream()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    with trio.fail_after(5):
        binds: list[str] = await nursery.start(serve, app, config)
    return app, binds[0]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(follow_redirects=False) as client:
        yield client


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"enum": ["metric", "imperial"]},
        "stops": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    },
    "required": ["city"],
    "additionalProperties": False,
}


def http_tool(
    client: httpx.AsyncClient,
    url: str,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> HttpTool:
    settings: dict[str, Any] = {
        "type": "http",
        "description": "Weather for a city",
        "url": url,
        "headers": {"X-Client": "raafd-tests"},
        "headers_env": {"X-Api-Key": "WEATHER_KEY"},
        "parameters": WEATHER_SCHEMA,
        "max_response_bytes": 4096,
    }
    settings.update(overrides)
    env = {"WEATHER_KEY": SECRET} if environ is None else environ
    return HttpTool("weather", ToolConfig(**settings), client, env)


async def test_http_tool_posts_json_and_returns_compact_json(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    app, base = upstream
    tool = http_tool(client, f"{base}/json")
    assert tool.spec.to_openai() == {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather for a city",
            "parameters": WEATHER_SCHEMA,
        },
    }
    with trio.fail_after(5):
        result = await tool.call({"city": "Zürich", "days": 2})
    assert result == '{"got":{"city":"Zürich","days":2},"ok":true}'
    request = app.requests[-1]
    assert request["method"] == "POST"
    assert orjson.loads(request["body"]) == {"city": "Zürich", "days": 2}
    assert request["headers"]["content-type"] == "application/json"
    assert request["headers"]["x-api-key"] == SECRET
    assert request["headers"]["x-client"] == "raafd-tests"


async def test_http_tool_text_answers(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    _, base = upstream
    with trio.fail_after(5):
        assert await http_tool(client, f"{base}/text").call({"city": "x"}) == "héllo wörld"
        # Labelled JSON but not JSON: passed on as text.
        assert await http_tool(client, f"{base}/bad-json").call({"city": "x"}) == "{not json"
        assert await http_tool(client, f"{base}/empty").call({"city": "x"}) == "(empty result)"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "invalid arguments: arguments: 'city' is a required property"),
        ({"city": 5}, "invalid arguments: arguments.city: 5 is not of type 'string'"),
        ({"city": "x", "days": 9}, "invalid arguments: arguments.days: 9 is greater than"),
        ({"city": "x", "units": "kelvin"}, "invalid arguments: arguments.units: 'kelvin' is not"),
        (
            {"city": "x", "stops": [{"name": "a"}, {}]},
            "invalid arguments: arguments.stops[1]: 'name' is a required property",
        ),
        ({"city": "x", "extra": 1}, "invalid arguments: arguments: Additional properties"),
        ({"city": "x" * 5000, "n": 1}, "invalid arguments: arguments: Additional properties"),
    ],
)
async def test_http_tool_validates_arguments(
    arguments: dict[str, Any],
    message: str,
    upstream: tuple[Upstream, str],
    client: httpx.AsyncClient,
) -> None:
    app, base = upstream
    with pytest.raises(ToolError) as info:
        await http_tool(client, f"{base}/json").call(arguments)
    assert str(info.value).startswith(message)
    assert len(str(info.value)) < 300  # short, even for a huge argument
    assert app.requests == []  # refused before any request


async def test_http_tool_without_parameters_takes_any_object(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    tool = http_tool(client, f"{upstream[1]}/json", parameters={})
    assert tool.spec.to_openai()["function"]["parameters"] == {"type": "object", "properties": {}}
    with trio.fail_after(5):
        assert await tool.call({"anything": [1, 2]}) == '{"got":{"anything":[1,2]},"ok":true}'
    with pytest.raises(ToolError, match="must be a JSON object"):
        await tool.call("text")  # type: ignore[arg-type]


def test_http_tool_schema_is_checked_when_built() -> None:
    client = httpx.AsyncClient()
    with pytest.raises(ConfigError) as info:
        http_tool(client, "http://x", parameters={"type": "object", "properties": {"a": 5}})
    assert info.value.problems[0].startswith("tools.weather.parameters.properties.a: ")
    with pytest.raises(ConfigError) as info:
        http_tool(client, "http://x", parameters={"type": "nonsense"})
    assert info.value.problems[0].startswith("tools.weather.parameters.type: not a valid")


async def test_http_tool_missing_header_variable(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    app, base = upstream
    tool = http_tool(client, f"{base}/json", environ={"OTHER": SECRET})
    with pytest.raises(ToolError) as info:
        await tool.call({"city": "x"})
    assert "not configured" in str(info.value)
    assert "WEATHER_KEY" not in str(info.value) and SECRET not in str(info.value)
    assert app.requests == []


async def test_http_tool_error_status_is_redacted(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    _, base = upstream
    with trio.fail_after(5), pytest.raises(ToolError) as info:
        await http_tool(client, f"{base}/error").call({"city": "x"})
    message = str(info.value)
    assert message.startswith("HTTP 500: upstream exploded; your key [redacted] is wrong; see logs")
    assert SECRET not in message
    assert len(message) < 400
    with trio.fail_after(5), pytest.raises(ToolError, match=r"^HTTP 404: Not Found$"):
        await http_tool(client, f"{base}/empty-error").call({"city": "x"})
    with trio.fail_after(5), pytest.raises(ToolError, match=r"^HTTP 302"):
        await http_tool(client, f"{base}/redirect").call({"city": "x"})


async def test_http_tool_response_too_large(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    _, base = upstream
    for path in ("/big", "/big-chunked"):
        with trio.fail_after(5), pytest.raises(ToolError, match="response too large"):
            await http_tool(client, f"{base}{path}").call({"city": "x"})
    # At the limit is fine.
    with trio.fail_after(5):
        text = await http_tool(client, f"{base}/big", max_response_bytes=5000).call({"city": "x"})
    assert text == "a" * 5000


async def test_http_tool_timeout(
    autojump_clock: MockClock, upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    let_loopback_land(autojump_clock)
    app, base = upstream
    tool = http_tool(client, f"{base}/slow", timeout=7.0)
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(ToolError, match=r"^no answer within 7 s$"):
        await tool.call({"city": "x"})
    assert 7.0 <= trio.current_time() - start < 8.0
    assert app.requests[-1]["path"] == "/slow"
    # The caller's scope (the agent's tool_timeout) is the other bound.
    with trio.move_on_after(2.0) as scope:
        await tool.call({"city": "x"})
    assert scope.cancelled_caught


async def test_http_tool_connection_refused(client: httpx.AsyncClient) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tool = http_tool(client, f"http://127.0.0.1:{port}/x")
    with trio.fail_after(5), pytest.raises(ToolError, match=r"^the request failed: "):
        await tool.call({"city": "x"})
    with trio.fail_after(5), pytest.raises(ToolError, match=r"^the request failed: "):
        await http_tool(client, "ftp://127.0.0.1/x").call({"city": "x"})


# --- the registry -----------------------------------------------------------------------------


def registry_from(client: httpx.AsyncClient, **tools: dict[str, Any]) -> ToolRegistry:
    """A registry from TOML-shaped ``[tools.NAME]`` tables, through the real config parser."""
    config = parse_config({"tools": tools})
    return ToolRegistry(config.tools, client, environ={"WEATHER_KEY": SECRET})


async def test_registry_builtins_and_lookup(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    _, base = upstream
    registry = registry_from(
        client,
        weather={"url": f"{base}/json", "parameters": WEATHER_SCHEMA},
        now={"type": "clock", "description": "What time is it?"},
        keyless={"url": f"{base}/json", "headers_env": {"X-Key": "NOT_SET_ANYWHERE"}},
    )
    names: Callable[[list[str]], list[str]] = lambda wanted: [  # noqa: E731
        tool.spec.name for tool in registry.tools_for(wanted)
    ]
    assert names(["weather", "clock", "now", "calculator"]) == [
        "weather",
        "clock",
        "now",
        "calculator",
    ]
    assert names(["calculator", "calculator", "nope"]) == ["calculator"]
    assert names([]) == []
    now = registry.get("now")
    assert now is not None and now.spec.description == "What time is it?"
    assert registry.get("nope") is None

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run)  # no mcp servers: ready at once
            weather, calculator = registry.get("weather"), registry.get("calculator")
            assert weather is not None and calculator is not None
            assert await weather.call({"city": "Oslo"}) == '{"got":{"city":"Oslo"},"ok":true}'
            with pytest.raises(ToolError):
                await weather.call({"city": 1})
            assert await calculator.call({"expression": "6 * 7"}) == "42"
            nursery.cancel_scope.cancel()

    snap = registry.snapshot()
    assert set(snap) == {"weather", "now", "keyless", "clock", "calculator"}
    assert snap["keyless"]["available"] is False  # its credential variable is not set
    assert snap["weather"] == {
        "type": "http",
        "available": True,
        "calls": 2,
        "errors": 1,
        "last_error": "invalid arguments: arguments.city: 1 is not of type 'string'",
    }
    assert snap["calculator"]["calls"] == 1 and snap["calculator"]["errors"] == 0
    assert snap["clock"]["type"] == "clock" and snap["clock"]["calls"] == 0


def test_registry_refuses_bad_config() -> None:
    configs = {
        "bad name": ToolConfig(type="clock"),
        "x" * 65: ToolConfig(type="calculator"),
        "api": ToolConfig(url="http://x", parameters={"type": 7}),
        "fs": ToolConfig(type="mcp", command=["x"]),
        "fs__read": ToolConfig(url="http://x"),
        "fine": ToolConfig(url="http://x", parameters=WEATHER_SCHEMA),
    }
    with pytest.raises(ConfigError) as info:
        ToolRegistry(configs, httpx.AsyncClient())
    problems = info.value.problems
    assert check_tool_configs(configs) == problems  # the same, without building anything
    assert check_tool_configs({"fine": configs["fine"], "fs": configs["fs"]}) == []
    assert problems[0].startswith("tools.bad name: a tool name must be 1 to 64 letters")
    assert problems[1].startswith(f"tools.{'x' * 65}: a tool name must be")
    assert problems[2].startswith("tools.api.parameters.type: not a valid JSON Schema")
    assert problems[3] == (
        "tools.fs__read: the name clashes with the tools of mcp server 'fs' (named fs__<tool>)"
    )
    assert len(problems) == 4


async def test_registry_turns_a_crashing_tool_into_a_tool_error(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ToolRegistry({}, client)

    async def crash(self: CalculatorTool, arguments: dict[str, Any]) -> str:
        raise RuntimeError("a bug with /secret/path in it")

    monkeypatch.setattr(CalculatorTool, "call", crash)
    tool = registry.get("calculator")
    assert tool is not None
    with pytest.raises(ToolError, match=r"^the tool failed \(internal error\)$"):
        await tool.call({"expression": "1"})
    assert registry.snapshot()["calculator"]["last_error"] == "internal error"


async def test_registry_counts_calls_in_metrics(client: httpx.AsyncClient) -> None:
    metrics = Metrics()
    first = ToolRegistry({}, client, metrics=metrics)
    second = ToolRegistry({}, client, metrics=metrics)  # a reload: same metrics, no clash
    calculator = second.get("calculator")
    assert calculator is not None and first.get("calculator") is not None
    await calculator.call({"expression": "1 + 1"})
    with pytest.raises(ToolError):
        await calculator.call({"expression": "1 / 0"})
    samples = metrics.snapshot()
    assert samples["raafd_tool_calls_total{outcome=ok,tool=calculator}"] == 1
    assert samples["raafd_tool_calls_total{outcome=error,tool=calculator}"] == 1


def test_no_environment_values_in_reprs() -> None:
    tool = http_tool(httpx.AsyncClient(), "http://127.0.0.1:1/x")
    assert SECRET not in repr(tool)
    assert os.environ.get("WEATHER_KEY") is None
