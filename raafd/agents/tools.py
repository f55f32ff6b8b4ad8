"""Tools agents can call, built from ``[tools.NAME]`` config, and the registry that owns them.

Kinds (``type``): ``clock`` and ``calculator`` (built in; also available by those names with
no section), ``http`` (the arguments are POSTed as JSON to a URL) and ``mcp`` (every tool of an
MCP server, see :mod:`raafd.agents.mcp`). What a model reads when a tool fails is a
:class:`~raafd.agents.base.ToolError` message: short, and never holding a secret.

The :class:`ToolRegistry` is a daemon component: its :meth:`~ToolRegistry.run` owns the MCP
connections (and, for stdio, the server processes) in its own nursery.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import httpx
import orjson
import trio
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from raafd.agents.base import Tool, ToolError, ToolSpec
from raafd.agents.calculator import MAX_LENGTH, CalculatorError, evaluate, format_number
from raafd.agents.mcp import EMPTY_RESULT, McpServer
from raafd.config import (
    BUILTIN_TOOLS,
    ConfigError,
    ToolConfig,
    check_tool_configs,
    schema_validator,
)
from raafd.logging import get_logger
from raafd.providers.http import open_body, redact_secrets

if TYPE_CHECKING:
    from prometheus_client import Counter

    from raafd.metrics import Metrics

__all__ = [
    "CalculatorTool",
    "ClockTool",
    "HttpTool",
    "ToolRegistry",
    "ToolStats",
    "check_arguments",
]

log = get_logger("raafd.tools")

ERROR_EXCERPT_BYTES = 4096  # bytes of a non-2xx body read for the error message
_EXCERPT_CHARS = 300  # characters of it shown to the model
_MESSAGE_CHARS = 200  # characters of a schema validation message
_START_MARGIN = 2.0  # seconds beyond the MCP connect timeouts that the registry waits at start


# --- arguments --------------------------------------------------------------------------------


def _path(error: ValidationError) -> str:
    out = "arguments"
    for part in error.absolute_path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{_clip(repr(part), 40)}]"
    return out


def check_arguments(validator: Draft202012Validator, arguments: Any) -> None:
    """Raise a :class:`ToolError` naming the path and the problem if ``arguments`` do not
    match the validator's schema (the most relevant problem when there are several)."""
    if not isinstance(arguments, dict):
        raise ToolError("invalid arguments: they must be a JSON object")
    error = best_match(validator.iter_errors(arguments))
    if error is not None:
        raise ToolError(f"invalid arguments: {_path(error)}: {_message(error)}")


def _message(error: ValidationError) -> str:
    # jsonschema puts the offending value's repr in its messages: keep it short.
    message = str(error.message)
    instance = repr(error.instance)
    if len(instance) > 60:
        message = message.replace(instance, f"{instance[:40]}…{instance[-10:]}")
    return _clip(message)


def _clip(text: str, limit: int = _MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --- built-ins --------------------------------------------------------------------------------


class ClockTool:
    """``clock``: the current time in ISO 8601, in UTC or an IANA time zone."""

    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "maxLength": 64,
                "description": "IANA time zone name such as Europe/Amsterdam; default UTC",
            }
        },
        "additionalProperties": False,
    }

    def __init__(
        self,
        name: str = "clock",
        description: str = "",
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._spec = ToolSpec(
            name,
            description or "The current date and time (ISO 8601), in UTC or a given time zone.",
            self.schema,
        )
        self._validator = Draft202012Validator(self.schema)
        self._now = now

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def call(self, arguments: dict[str, Any]) -> str:
        check_arguments(self._validator, arguments)
        key = arguments.get("timezone") or "UTC"
        try:
            zone = ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ToolError(
                f"unknown time zone {key!r}: use an IANA name such as Europe/Amsterdam or UTC"
            ) from None
        return self._now().astimezone(zone).isoformat(timespec="seconds")


class CalculatorTool:
    """``calculator``: evaluates an arithmetic expression (see :mod:`raafd.agents.calculator`)."""

    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "maxLength": MAX_LENGTH,
                "description": (
                    "Arithmetic such as (2 + 3) * 4 / 7 or sqrt(2) ** 3: + - * / // % ** and"
                    " parentheses; functions sqrt abs round min max floor ceil log exp sin cos"
                    " tan; constants pi e"
                ),
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    }

    def __init__(self, name: str = "calculator", description: str = "") -> None:
        self._spec = ToolSpec(
            name, description or "Evaluates an arithmetic expression exactly.", self.schema
        )
        self._validator = Draft202012Validator(self.schema)

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def call(self, arguments: dict[str, Any]) -> str:
        check_arguments(self._validator, arguments)
        try:
            return format_number(evaluate(arguments["expression"]))
        except CalculatorError as exc:
            raise ToolError(str(exc)) from None


# --- http -------------------------------------------------------------------------------------


class HttpTool:
    """An ``http`` tool: the arguments, checked against ``parameters``, are POSTed as JSON to
    ``url``; a 2xx answer's body is the result (JSON as compact JSON text), anything else a
    :class:`ToolError`.

    ``config.timeout`` bounds the whole call (connect, send, read) as a cancel scope inside the
    caller's own (``agents.NAME.tool_timeout``). Header values named by ``headers_env`` are read
    from the environment at each call and redacted from every error message."""

    def __init__(
        self,
        name: str,
        config: ToolConfig,
        client: httpx.AsyncClient,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.name = name
        self.config = config
        self._client = client
        self._environ = environ
        self._validator = schema_validator(config.parameters, f"tools.{name}.parameters")
        self._spec = ToolSpec(
            name, config.description or f"Calls the {name} service.", dict(config.parameters)
        )

    def __repr__(self) -> str:
        return f"<HttpTool {self.name!r} {self.config.url}>"

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    @property
    def configured(self) -> bool:
        """Whether every environment variable ``headers_env`` names is set."""
        return all(self._environ.get(variable) for variable in self.config.headers_env.values())

    def _secrets(self) -> tuple[str, ...]:
        return tuple(
            value
            for variable in self.config.headers_env.values()
            if (value := self._environ.get(variable, ""))
        )

    def _error(self, message: str) -> ToolError:
        return ToolError(redact_secrets(message, self._secrets()))

    def _headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/plain;q=0.9, */*;q=0.5",
            # A compressed body could inflate far past max_response_bytes in one chunk.
            "accept-encoding": "identity",
        }
        headers.update(self.config.headers)
        for header, variable in self.config.headers_env.items():
            value = self._environ.get(variable)
            if not value:
                # The operator learns which variable; the model only that it cannot work.
                log.warning(
                    "tool header variable is not set", tool=self.name, header=header, env=variable
                )
                raise ToolError("the tool is not configured (a credential is missing)")
            headers[header] = value
        return headers

    async def call(self, arguments: dict[str, Any]) -> str:
        check_arguments(self._validator, arguments)
        headers = self._headers()
        try:
            body = orjson.dumps(arguments)
        except orjson.JSONEncodeError as exc:
            raise ToolError(f"invalid arguments: not encodable as JSON ({exc})") from None
        try:
            with trio.fail_after(self.config.timeout):
                return await self._post(body, headers)
        except trio.TooSlowError:
            raise ToolError(f"no answer within {self.config.timeout:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            reason = str(exc) or type(exc).__name__
            raise self._error(f"the request failed: {_clip(reason)}") from None

    async def _post(self, body: bytes, headers: dict[str, str]) -> str:
        limit = self.config.max_response_bytes
        # timeout=None: the cancel scope around this is the one timeout.
        async with self._client.stream(
            "POST", self.config.url, content=body, headers=headers, timeout=None
        ) as response:
            if not response.is_success:
                data, _ = await _read_at_most(response, ERROR_EXCERPT_BYTES)
                excerpt = " ".join(data.decode("utf-8", "replace").split())
                status = response.status_code
                excerpt = (
                    _clip(excerpt, _EXCERPT_CHARS)
                    or response.reason_phrase
                    or httpx.codes.get_reason_phrase(status)
                )
                raise self._error(f"HTTP {status}: {excerpt}".rstrip(": "))
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ToolError(f"response too large (over {limit} bytes)")
            data, over = await _read_at_most(response, limit)
            if over:
                raise ToolError(f"response too large (over {limit} bytes)")
            return _body_text(response, data) or EMPTY_RESULT


async def _read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether there was more."""
    body = bytearray()
    async with open_body(response) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                return bytes(body[:limit]), True
    return bytes(body), False


def _body_text(response: httpx.Response, data: bytes) -> str:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return orjson.dumps(orjson.loads(data)).decode()
        except orjson.JSONDecodeError:
            pass  # mislabelled: pass the text on as it is
    try:
        return data.decode(response.charset_encoding or "utf-8", "replace")
    except LookupError:  # an unknown charset name
        return data.decode("utf-8", "replace")


# --- the registry -----------------------------------------------------------------------------


@attrs.define
class ToolStats:
    """Calls of one configured tool (for an MCP server: of all its tools)."""

    calls: int = 0
    errors: int = 0
    last_error: str | None = None


_counters: weakref.WeakKeyDictionary[Metrics, Counter] = weakref.WeakKeyDictionary()


def _calls_counter(metrics: Metrics) -> Counter:
    """``raafd_tool_calls_total{tool, outcome}`` on the daemon's registry, made once per
    :class:`Metrics` (a reload builds a new ToolRegistry on the same metrics)."""
    counter = _counters.get(metrics)
    if counter is None:
        from prometheus_client import Counter

        counter = Counter(
            "raafd_tool_calls_total",
            "Tool calls by configured tool and outcome (ok, error)",
            ["tool", "outcome"],
            registry=metrics.registry,
        )
        _counters[metrics] = counter
    return counter


class _Observed:
    """A tool as the registry hands it out: counts its calls, and turns an unexpected failure
    (a bug) into a ToolError the model reads, so one broken tool cannot end a stream."""

    def __init__(self, tool: Tool, key: str, stats: ToolStats, counter: Counter | None) -> None:
        self.tool = tool
        self._key = key
        self._stats = stats
        self._counter = counter

    def __repr__(self) -> str:
        return repr(self.tool)

    @property
    def spec(self) -> ToolSpec:
        return self.tool.spec

    def _count(self, outcome: str) -> None:
        if self._counter is not None:
            self._counter.labels(self._key, outcome).inc()

    async def call(self, arguments: dict[str, Any]) -> str:
        self._stats.calls += 1
        try:
            result = await self.tool.call(arguments)
        except ToolError as exc:
            self._stats.errors += 1
            self._stats.last_error = str(exc)
            self._count("error")
            raise
        except Exception as exc:
            log.error("tool failed unexpectedly", tool=self._key, exc_info=exc)
            self._stats.errors += 1
            self._stats.last_error = "internal error"
            self._count("error")
            raise ToolError("the tool failed (internal error)") from None
        self._count("ok")
        return result


class ToolRegistry:
    """Every tool of the configuration by name, built once; MCP servers kept connected by
    :meth:`run`. ``clock`` and ``calculator`` are there even without a section.

    Construction refuses what :func:`raafd.config.check_tool_configs` finds, every problem in one
    :class:`ConfigError`. ``mcp_connect_timeout`` bounds each MCP connection attempt (and so
    how long :meth:`run` waits before it reports started); ``mcp_backoff`` is the (first,
    largest) pause between attempts. ``metrics``, when given, gets
    ``raafd_tool_calls_total{tool, outcome}``."""

    def __init__(
        self,
        configs: Mapping[str, ToolConfig],
        client: httpx.AsyncClient,
        environ: Mapping[str, str] = os.environ,
        metrics: Metrics | None = None,
        *,
        mcp_connect_timeout: float = 10.0,
        mcp_backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        configs = {**{name: ToolConfig(type=name) for name in BUILTIN_TOOLS}, **configs}
        problems = check_tool_configs(configs)
        if problems:
            raise ConfigError(problems)
        self._tools: dict[str, Tool] = {}
        self._servers: dict[str, McpServer] = {}
        self._types = {name: config.type for name, config in configs.items()}
        self._stats = {name: ToolStats() for name in configs}
        self._counter = _calls_counter(metrics) if metrics is not None else None
        for name, config in configs.items():
            if config.type == "mcp":
                self._servers[name] = McpServer(
                    name,
                    config,
                    environ,
                    connect_timeout=mcp_connect_timeout,
                    backoff=mcp_backoff,
                )
            elif config.type == "http":
                self._tools[name] = HttpTool(name, config, client, environ)
            elif config.type == "clock":
                self._tools[name] = ClockTool(name, config.description)
            else:
                self._tools[name] = CalculatorTool(name, config.description)

    def __repr__(self) -> str:
        return f"<ToolRegistry tools={sorted(self._tools)} mcp={sorted(self._servers)}>"

    @property
    def servers(self) -> Mapping[str, McpServer]:
        """The MCP servers by config name."""
        return self._servers

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the MCP servers connected until cancelled. Started once the built-in and http
        tools are ready and every MCP server has had its first connection attempt (bounded by
        ``mcp_connect_timeout``); a server that failed is retried in the background, its tools
        unavailable until it connects."""
        async with trio.open_nursery() as nursery:
            for server in self._servers.values():
                await nursery.start(server.run)
            if self._servers:
                wait = max(server.connect_timeout for server in self._servers.values())
                with trio.move_on_after(wait + _START_MARGIN):
                    for server in self._servers.values():
                        await server.first_attempt.wait()
                down = [name for name, server in self._servers.items() if not server.available]
                if down:
                    log.warning("tools starting without mcp servers", unavailable=down)
            task_status.started()
            await trio.sleep_forever()

    def _observed(self, tool: Tool, key: str) -> Tool:
        return _Observed(tool, key, self._stats[key], self._counter)

    def tools_for(self, names: Sequence[str]) -> list[Tool]:
        """The tools for an agent's ``tools`` list, in order: an mcp entry expands to every
        tool of its server's last listing (none before it first connected). Names that are not
        configured are skipped (configuration checking refuses them)."""
        out: list[Tool] = []
        seen: set[str] = set()
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            if (server := self._servers.get(name)) is not None:
                out.extend(self._observed(tool, name) for tool in server.tools.values())
            elif (tool := self._tools.get(name)) is not None:
                out.append(self._observed(tool, name))
            else:
                log.warning("agent names an unknown tool; skipped", tool=name)
        return out

    def get(self, name: str) -> Tool | None:
        """The tool models call ``name`` (a configured or built-in tool, or an MCP tool's
        exposed ``SERVER__TOOL`` name), or ``None``."""
        if (tool := self._tools.get(name)) is not None:
            return self._observed(tool, name)
        for key, server in self._servers.items():
            if (mcp_tool := server.tools.get(name)) is not None:
                return self._observed(mcp_tool, key)
        return None

    def snapshot(self) -> dict[str, Any]:
        """Per configured tool: ``type``, ``available``, ``calls``, ``errors``, ``last_error``;
        for mcp servers also ``transport``, ``tools``, ``connects`` and ``connect_error``."""
        out: dict[str, Any] = {}
        for name, kind in self._types.items():
            entry: dict[str, Any] = {"type": kind, "available": True}
            if (server := self._servers.get(name)) is not None:
                entry.update(server.snapshot())
            elif isinstance(tool := self._tools[name], HttpTool):
                entry["available"] = tool.configured
            entry.update(attrs.asdict(self._stats[name]))
            out[name] = entry
        return out
