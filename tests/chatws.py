"""WebSocket helpers for the chat tests (presence, direct messages, offline queues): a user's
connection by token, a frame, and a command's answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from tests.wsclient import open_ws

__all__ = ["ask", "recv", "user"]

# Generous: under an autojump clock minutes of daemon time pass in an instant, and on real
# time a loaded machine is slow.
_TIMEOUT = 600


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    """The next frame, a JSON object."""
    with trio.fail_after(_TIMEOUT):
        message = json.loads(await ws.get_message())
    assert isinstance(message, dict)
    return message


async def ask(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    """Send a command with a ref; its answer (no other frame may come first)."""
    await ws.send_message(json.dumps({"ref": "r", **command}))
    reply = await recv(ws)
    assert reply.get("ref") == "r", reply
    return reply


@asynccontextmanager
async def user(ws_url: str, token: str) -> AsyncIterator[tuple[WebSocketConnection, str]]:
    """A connection with ``token`` (empty: none), welcomed; and the user it is."""
    async with open_ws(f"{ws_url}?token={token}" if token else ws_url) as ws:
        welcome = await recv(ws)
        assert welcome["type"] == "welcome"
        yield ws, welcome["user"]
