"""The raafd client: a Trio WebSocket client that resumes streams across dropped connections,
and ``raafd chat``, the terminal chat built on it.

    async with open_client("ws://127.0.0.1:8080/v1/ws", token=...) as client:
        handle = await client.start("hello")
        async for event in handle:
            ...
"""

from raafd.client.client import (
    DEFAULT_URL,
    SUBPROTOCOL,
    ClientError,
    RaafdClient,
    StreamHandle,
    backoff_delay,
    open_client,
)

__all__ = [
    "DEFAULT_URL",
    "SUBPROTOCOL",
    "ClientError",
    "RaafdClient",
    "StreamHandle",
    "backoff_delay",
    "open_client",
]
