"""A trio-websocket client whose TCP stream the test owns.

trio-websocket's client does not close its socket when the server starts the close handshake
(its reader stops on EOF in state CLOSED and ``aclose()`` then returns early), which leaks the
socket (a ResourceWarning). Opening the TCP stream ourselves and wrapping it with the public
``wrap_client_stream`` lets us close it on the way out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):  # the opening handshake
                ws = await wrap_client_stream(nursery, stream, parts.hostname, resource, **kwargs)
            try:
                yield ws
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


async def recv_json(ws: WebSocketConnection) -> dict[str, Any]:
    """The next message, as a JSON object (within 10 s)."""
    with trio.fail_after(10):
        message = json.loads(await ws.get_message())
    assert isinstance(message, dict)
    return message


async def send_json(ws: WebSocketConnection, **message: Any) -> None:
    await ws.send_message(json.dumps(message))
