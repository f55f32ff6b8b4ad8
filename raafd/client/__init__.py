"""The raafd client: a Trio WebSocket client that resumes streams across dropped connections,
and ``raafd chat``, the terminal chat built on it.

    async with open_client("ws://127.0.0.1:8080/v1/ws", token=...) as client:
        handle = await client.start("hello")
        async for event in handle:
            ...

Direct messages and presence: ``await client.dm(user, text)``, ``client.set_presence``,
``client.get_presence``; pass ``on_queued=handler`` to :func:`open_client` to receive your
offline queue (each message acknowledged only after ``handler`` returned for it) and
``on_presence=`` for the presence changes of the users you watch.

Rooms: ``room = await client.join("lobby", after=last_id)`` (``room.history``, then
``async for event in room``: every message once, in order, across drops), ``await
client.send("lobby", text)`` (a generated ``client_id``: a retry never posts twice),
``await client.typing("lobby")``.

Background jobs: ``job = await client.submit_job("text", agent=..., priority="high")``, then
``await job.wait(timeout)`` or ``async for event in job.events()`` (every attempt's stream,
resumed across drops); ``await client.submit_batch(inputs=[...], max_concurrent=4)``.
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
from raafd.client.jobs import JobHandle
from raafd.client.queued import QueuedHandler
from raafd.client.rooms import RoomHandle

__all__ = [
    "DEFAULT_URL",
    "SUBPROTOCOL",
    "ClientError",
    "JobHandle",
    "QueuedHandler",
    "RaafdClient",
    "RoomHandle",
    "StreamHandle",
    "backoff_delay",
    "open_client",
]
