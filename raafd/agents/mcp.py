"""MCP tools: the tools of a Model Context Protocol server, through the official ``mcp`` SDK.

The rule of this module: one :class:`McpServer` per ``[tools.NAME]`` of type ``mcp``, and its
:meth:`McpServer.run` task is the only owner of the connection. It connects (for stdio it starts
the server process, which lives exactly as long as the connection), lists the tools, publishes
the session, and waits until the connection is seen to die; then it unpublishes, waits a bounded
backoff and connects again, listing the tools afresh. Calls come from agent tasks and use the
published session; with none published they fail at once with ``tool server unavailable``.
Nothing a call does can wedge the connection: a call that finds the connection broken only
*reports* it (sets the connection's ``lost`` event) and the owner task does the rest.

The SDK is built on anyio and runs under Trio unchanged. It is imported lazily, so the core of
raafd works without it; :func:`raafd.config.mcp_installed` tells the configuration checks whether
MCP tools can be built.

Tool names: a server's tool ``TOOL`` is offered to models as ``NAME__TOOL`` (see
:func:`exposed_names`), always a valid OpenAI function name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

import trio

from raafd import __version__
from raafd.agents.base import ToolError, ToolSpec
from raafd.config import ToolConfig
from raafd.logging import get_logger
from raafd.providers.http import redact_secrets

if TYPE_CHECKING:
    from mcp import Client
    from mcp.client._transport import ReadStream, TransportStreams
    from mcp.shared.message import SessionMessage
    from mcp_types import CallToolResult
    from mcp_types import Tool as RemoteTool

__all__ = [
    "EMPTY_RESULT",
    "UNAVAILABLE",
    "McpServer",
    "McpTool",
    "exposed_names",
]

log = get_logger("raafd.tools")

UNAVAILABLE = "tool server unavailable"
EMPTY_RESULT = "(empty result)"  # what a model reads for a tool's empty answer
MAX_TOOLS = 128  # tools taken from one server; more are ignored (with a warning)
MAX_LIST_PAGES = 16  # tools/list pages read per connection
MAX_DESCRIPTION = 1024  # characters of a tool description offered to models
STABLE_AFTER = 10.0  # seconds a connection must live for the backoff to start over
_STDERR_TAIL = 5  # last lines of a stdio server's stderr kept for error messages
_STDERR_LINE = 500  # characters kept of one stderr line
_STDERR_GRACE = 0.5  # seconds to read a stopped server's last stderr lines
_MESSAGE_LIMIT = 500  # characters of a server's error message shown to the model
_NAME_OK = re.compile(r"[A-Za-z0-9_-]")
_NAME_LIMIT = 64  # OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$


def exposed_names(server: str, tools: Iterable[str]) -> dict[str, str]:
    """The name models see for each of ``server``'s tools: ``{exposed: remote}``.

    ``<server>__<tool>`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``.
    Where that is longer than 64 characters, or two tools of the server would get the same
    name, the name is cut to 55 characters and ``_`` plus 8 hex digits of a hash of the server
    and tool names is appended, so names are unique, stable across reconnects, and valid."""
    remote = list(dict.fromkeys(tools))
    base = {
        name: f"{server}__" + "".join(c if _NAME_OK.match(c) else "_" for c in name)
        for name in remote
    }
    counts: dict[str, int] = {}
    for candidate in base.values():
        counts[candidate] = counts.get(candidate, 0) + 1
    out: dict[str, str] = {}
    for name in remote:
        candidate = base[name]
        if len(candidate) > _NAME_LIMIT or counts[candidate] > 1 or not name:
            digest = hashlib.sha256(f"{server}\0{name}".encode()).hexdigest()[:8]
            candidate = f"{candidate[: _NAME_LIMIT - 9]}_{digest}"
        out[candidate] = name
    return out


def _short(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _describe(exc: BaseException) -> str:
    """One line for an exception, naming every leaf of an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_describe(inner) for inner in exc.exceptions))
    text = str(exc)
    if isinstance(exc, _Failure):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Failure(Exception):
    """A connection failure described in full by its message."""


class _WatchedReadStream:
    """A transport's read stream that reports its end (the server went away) to ``lost``.

    The SDK's dispatcher reads it with ``async for``; stdio closes it when the server's stdout
    ends, streamable HTTP when the connection fails. ``last_context`` is passed through for the
    SDK's context-carrying streams."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], lost: trio.Event) -> None:
        self._inner = inner
        self._lost = lost

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        import anyio

        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._lost.set()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        import anyio

        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class McpTool:
    """One tool of an MCP server, as the agent loop sees it."""

    def __init__(self, server: McpServer, remote: str, spec: ToolSpec) -> None:
        self.server = server
        self.remote = remote  # the tool's name on the server
        self._spec = spec

    def __repr__(self) -> str:
        return f"<McpTool {self._spec.name!r} ({self.server.name}: {self.remote!r})>"

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def call(self, arguments: dict[str, Any]) -> str:
        return await self.server.call_tool(self.remote, arguments)


class McpServer:
    """The connection to one MCP server (``[tools.NAME]``, ``type = "mcp"``): over stdio when
    ``command`` is set, else over streamable HTTP to ``url``.

    ``connect_timeout`` bounds connecting (starting the process, the handshake, listing the
    tools) and ``config.timeout`` each call. ``backoff`` is the (first, largest) pause in
    seconds between connection attempts; it doubles on each failure and starts over once a
    connection has lived ``STABLE_AFTER`` s."""

    def __init__(
        self,
        name: str,
        config: ToolConfig,
        environ: Mapping[str, str] = os.environ,
        *,
        connect_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.name = name
        self.connect_timeout = connect_timeout
        self.config = config
        self.transport = "stdio" if config.command else "http"
        self._environ = environ
        self._backoff = backoff
        self._client: Client | None = None
        self._lost: trio.Event | None = None
        self._tools: dict[str, McpTool] = {}  # the last listing: kept while disconnected
        self._changed = trio.Event()
        self._stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL)
        self.available = False
        self.last_error: str | None = None
        self.connects = 0  # connections made
        self.failures = 0  # failed connection attempts since the last connection
        self.first_attempt = trio.Event()  # set when the first connection attempt has ended

    def __repr__(self) -> str:
        return f"<McpServer {self.name!r} {self.transport} available={self.available}>"

    # --- what the registry and the agent loop use -----------------------------------------

    @property
    def tools(self) -> Mapping[str, McpTool]:
        """The tools of the last listing by exposed name (empty before the first connection;
        kept while the server is down, when their calls fail with ``tool server unavailable``)."""
        return MappingProxyType(self._tools)

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": "mcp",
            "transport": self.transport,
            "available": self.available,
            "tools": sorted(self._tools),
            "connects": self.connects,
            "failures": self.failures,
            "connect_error": self.last_error,
        }

    async def wait_until(self, *, available: bool) -> None:
        """Return once :attr:`available` is ``available`` (bound it with a cancel scope)."""
        while self.available != available:
            await self._changed.wait()

    async def wait_changed(self) -> None:
        """Return at the next change: connected, disconnected, or a failed attempt."""
        await self._changed.wait()

    async def call_tool(self, remote: str, arguments: dict[str, Any]) -> str:
        """Call the server's tool ``remote``; a failure the model should read is a ToolError."""
        client, lost = self._client, self._lost
        if client is None or lost is None or lost.is_set():
            raise ToolError(UNAVAILABLE)
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED
        from pydantic import ValidationError

        try:
            with trio.fail_after(self.config.timeout):
                result = await client.call_tool(remote, arguments)
        except trio.TooSlowError:
            raise ToolError(
                f"the tool server did not answer within {self.config.timeout:g} s"
            ) from None
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                lost.set()
                raise ToolError(UNAVAILABLE) from None
            raise self._error(exc.message or "the tool server refused the call") from None
        except ValidationError:
            raise ToolError("the tool server sent a malformed result") from None
        except Exception as exc:
            # Transport failures (HTTP errors, broken pipes) surface here in many shapes; the
            # owner task reconnects, which is harmless if the connection was in fact fine.
            log.warning("mcp call failed; reconnecting", tool=self.name, error=_describe(exc))
            lost.set()
            raise ToolError(UNAVAILABLE) from None
        return self._result_text(result)

    def _error(self, message: str) -> ToolError:
        """A server's own words for the model: short, and with the header values this server
        is sent, and anything shaped like an API key, redacted."""
        secrets = tuple(filter(None, map(self._environ.get, self.config.headers_env.values())))
        return ToolError(redact_secrets(_short(message), secrets))

    def _result_text(self, result: CallToolResult) -> str:
        parts: list[str] = []
        for block in result.content:
            if block.type == "text":
                parts.append(block.text)
            elif block.type == "resource":
                resource = block.resource
                text = getattr(resource, "text", None)
                parts.append(text if isinstance(text, str) else f"[binary resource {resource.uri}]")
            elif block.type == "resource_link":
                parts.append(f"[resource {block.uri}]")
            else:  # image, audio: models read text here
                parts.append(f"[{block.type} {block.mime_type}]")
        if not parts and result.structured_content is not None:
            compact = json.dumps(
                result.structured_content, separators=(",", ":"), ensure_ascii=False, default=str
            )
            parts.append(compact)
        text = "\n".join(parts)
        if result.is_error:
            raise self._error(text or "the tool failed")
        if len(text.encode()) > self.config.max_response_bytes:
            raise ToolError(f"response too large (over {self.config.max_response_bytes} bytes)")
        return text or EMPTY_RESULT

    # --- the connection ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the server connected, forever: connect, serve until the connection dies, back
        off, connect again. Never raises for a server failure; cancel it to stop (the server
        process, for stdio, is stopped on the way out)."""
        first, largest = self._backoff
        delay = first
        async with trio.open_nursery() as nursery:  # the stdio servers' stderr readers
            task_status.started()
            while True:
                began = trio.current_time()
                try:
                    await self._serve_once(nursery)
                    error = "the connection closed"
                except Exception as exc:
                    error = _describe(exc)
                    self.failures += 1
                if self._stderr_tail:
                    error += f" (stderr: {' | '.join(self._stderr_tail)})"
                self.last_error = _short(error)
                self.first_attempt.set()
                self._notify()
                if trio.current_time() - began >= STABLE_AFTER:
                    delay = first
                pause = delay * random.uniform(0.5, 1.0)  # jitter: many nodes, one server
                log.warning(
                    "mcp server unavailable; retrying",
                    tool=self.name,
                    error=self.last_error,
                    retry_in=round(pause, 3),
                )
                await trio.sleep(pause)
                delay = min(delay * 2, largest)

    async def _serve_once(self, nursery: trio.Nursery) -> None:
        """One connection, from connecting until it dies. Returns when it was lost; raises
        when it could not be made."""
        from mcp import Client
        from mcp_types import Implementation

        self._stderr_tail.clear()
        lost = trio.Event()
        deadline = trio.current_time() + self.connect_timeout
        with trio.CancelScope(deadline=deadline) as connecting:
            async with Client(
                self._open_transport(lost, nursery),
                cache=None,
                client_info=Implementation(name="raafd", version=__version__),
            ) as client:
                listing = await self._list_tools(client)
                connecting.deadline = math.inf
                self._publish(client, lost, listing)
                try:
                    await lost.wait()
                finally:
                    self._unpublish()
        if connecting.cancelled_caught:
            raise _Failure(f"no answer within {self.connect_timeout:g} s while connecting")

    async def _list_tools(self, client: Client) -> list[RemoteTool]:
        tools: list[RemoteTool] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None or len(tools) > MAX_TOOLS:
                break
        if len(tools) > MAX_TOOLS or cursor is not None:
            log.warning(
                "mcp server lists too many tools; using the first", tool=self.name, kept=MAX_TOOLS
            )
        return tools[:MAX_TOOLS]

    def _publish(self, client: Client, lost: trio.Event, listing: list[RemoteTool]) -> None:
        by_remote = {tool.name: tool for tool in listing}
        tools: dict[str, McpTool] = {}
        for exposed, remote in exposed_names(self.name, by_remote).items():
            tool = by_remote[remote]
            schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
            description = tool.description or tool.title or f"{remote} (from {self.name})"
            spec = ToolSpec(exposed, description[:MAX_DESCRIPTION], dict(schema))
            tools[exposed] = McpTool(self, remote, spec)
        self._tools = tools
        self._client = client
        self._lost = lost
        self.available = True
        self.last_error = None
        self.connects += 1
        self.failures = 0
        self.first_attempt.set()
        log.info("mcp server connected", tool=self.name, tools=len(tools), connects=self.connects)
        self._notify()

    def _unpublish(self) -> None:
        self._client = None
        if self._lost is not None:
            self._lost.set()
        self._lost = None
        self.available = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- transports -------------------------------------------------------------------------

    @asynccontextmanager
    async def _open_transport(
        self, lost: trio.Event, nursery: trio.Nursery
    ) -> AsyncIterator[TransportStreams]:
        if self.config.command:
            async with self._open_stdio(lost, nursery) as streams:
                yield streams
        else:
            async with self._open_http(lost) as streams:
                yield streams

    @asynccontextmanager
    async def _open_stdio(
        self, lost: trio.Event, nursery: trio.Nursery
    ) -> AsyncIterator[TransportStreams]:
        from mcp import StdioServerParameters, stdio_client

        command, *args = self.config.command
        params = StdioServerParameters(command=command, args=args, env=dict(self.config.env))
        # The server's stderr comes through a pipe into the log (at debug, with the tool name),
        # and its last lines into the error when the server fails.
        read_fd, write_fd = os.pipe()
        reader = trio.CancelScope()
        read_all = trio.Event()
        nursery.start_soon(self._read_stderr, trio.lowlevel.FdStream(read_fd), reader, read_all)
        try:
            with os.fdopen(write_fd, "w") as errlog:  # wraps the fd, no file I/O
                async with stdio_client(params, errlog=errlog) as (read, write):
                    yield _WatchedReadStream(read, lost), write
        finally:
            # The process is gone and our end of the pipe closed: read what is left, unless a
            # descendant of the server still holds the pipe open.
            with trio.move_on_after(_STDERR_GRACE, shield=True):
                await read_all.wait()
            reader.cancel()

    async def _read_stderr(
        self, stream: trio.lowlevel.FdStream, scope: trio.CancelScope, done: trio.Event
    ) -> None:
        pending = b""
        with scope:
            try:
                async with stream:
                    while chunk := await stream.receive_some(4096):
                        lines = (pending + chunk).split(b"\n")
                        pending = lines.pop()[-_STDERR_LINE * 4 :]
                        for line in lines:
                            self._stderr_line(line)
                    if pending:
                        self._stderr_line(pending)
            except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                pass
            finally:
                done.set()

    def _stderr_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").strip()[:_STDERR_LINE]
        if line:
            self._stderr_tail.append(line)
            log.debug("mcp server stderr", tool=self.name, line=line)

    @asynccontextmanager
    async def _open_http(self, lost: trio.Event) -> AsyncIterator[TransportStreams]:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        headers = dict(self.config.headers)
        for header, variable in self.config.headers_env.items():
            value = self._environ.get(variable)
            if not value:
                raise _Failure(
                    f"not configured: the environment variable {variable} for header {header}"
                    " is not set"
                )
            headers[header] = value
        # The SDK's own timeouts (its streams are long-lived); calls are bounded by ours.
        timeout = httpx2.Timeout(30.0, read=300.0)
        async with (
            httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
            streamable_http_client(self.config.url, http_client=http) as (read, write),
        ):
            yield _WatchedReadStream(read, lost), write
