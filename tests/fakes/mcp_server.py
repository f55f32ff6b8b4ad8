"""A tiny MCP server for the tool tests, written with the official SDK.

Run it over stdio (what ``[tools.NAME] command`` does)::

    python -m tests.fakes.mcp_server

Tools: ``add(a, b)`` → the sum, ``shout(text)`` → upper case, ``fail(reason)`` → always an
error result (``isError``), ``pid()`` → the server's process id (so a test can kill it), and
``sleep(seconds)`` → answers after a pause (for cancellation tests). ``build_server()`` is the
same server for in-process or streamable-HTTP use.
"""

from __future__ import annotations

import os

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["build_server"]


def build_server() -> MCPServer:
    server = MCPServer("raafd-test", instructions="A test server.", log_level="WARNING")

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="The text in upper case.")
    def shout(text: str) -> str:
        return text.upper()

    @server.tool(description="Always fails.")
    def fail(reason: str = "it broke") -> str:
        raise ToolError(reason)

    @server.tool(description="The server's process id.")
    def pid() -> int:
        return os.getpid()

    @server.tool(description="Answer after a pause.")
    async def sleep(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "slept"

    return server


if __name__ == "__main__":
    build_server().run("stdio")
