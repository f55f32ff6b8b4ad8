"""The WebSocket gateway: owns the set of live connections and what applies to all of them:
their heartbeat timers (one :class:`~raafd.timers.Timers` heap and task for all) and the
command table (:mod:`raafd.gateway.table`) that subsystems add their commands to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from raafd.auth import TokenCheck
from raafd.config import Config
from raafd.gateway.commands import add_connection_commands
from raafd.gateway.connection import Connection
from raafd.gateway.table import CommandTable, ConnectionObserver
from raafd.metrics import Metrics
from raafd.net.h1 import RequestHead
from raafd.protocol.codes import CloseCode
from raafd.security.guard import Guard
from raafd.timers import Timers

__all__ = ["Gateway"]


def _no_emit(subject: str, data: dict[str, Any]) -> None:
    pass


class Gateway:
    """Serves ``/v1/ws`` connections handed over by the public listener. Each connection runs
    in the listener's per-connection task; the gateway only keeps the registry (bounded by the
    listener's ``max_connections``) for drain, stats and admin, and the connections'
    heartbeat timers: :meth:`run` must run (in the daemon's nursery) for them to fire.

    It gets what every connection reads: the running configuration (``config()``, reloadable
    sections included), the metrics, whom tokens stand for now (``authenticator()``) and the
    guard (role policy and rate limits). What a command uses comes with its handler
    (:attr:`commands`, which holds ``hello`` and ``ping`` from the start). ``emit`` puts
    ``connection.opened`` (when a connection is authenticated and welcomed) and
    ``connection.closed`` (when that connection ends) on the event bus."""

    def __init__(
        self,
        config: Callable[[], Config],
        metrics: Metrics,
        authenticator: Callable[[], TokenCheck],
        guard: Guard,
        emit: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.emit = emit or _no_emit
        self.metrics = metrics
        self.authenticator = authenticator
        self.guard = guard
        self.commands = CommandTable()
        add_connection_commands(self.commands)
        # Told of every authenticated connection's start and end (presence, offline queues).
        self.observers: list[ConnectionObserver] = []
        self.connections: dict[str, Connection] = {}
        self.draining = False
        self.timers = Timers()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire the connections' heartbeat timers until cancelled."""
        await self.timers.run(task_status=task_status)

    async def handle(self, stream: trio.SocketStream, prefix: bytes, head: RequestHead) -> None:
        echo_path = self.config().websocket.echo_path
        echo = bool(echo_path) and head.path == echo_path
        connection = Connection(self, stream, prefix, head, echo=echo)
        # Not kept in this frame for the connection's life: the connection reads the prefix
        # once and drops the head once authenticated (memory of idle connections).
        del prefix, head
        self.connections[connection.id] = connection
        gauge = self.metrics.connections.labels("websocket")
        gauge.inc()
        try:
            await connection.serve()
        finally:
            gauge.dec()
            del self.connections[connection.id]
            if connection.authenticated and not connection.echo:
                self.emit(
                    "connection.closed",
                    {
                        "conn": connection.id,
                        "user": connection.user,
                        "transport": "websocket",
                        "code": connection.close_code,
                        "events_sent": connection.events_sent,
                    },
                )

    def shutdown(self, reconnect_after: float = 1.0) -> None:
        """Drain: every client gets ``shutdown``, then close 1001 when its streams end."""
        self.draining = True
        for connection in list(self.connections.values()):
            connection.notify_shutdown(reconnect_after)

    def kick(self, conn_id: str, reason: str = "kicked by an administrator") -> bool:
        connection = self.connections.get(conn_id)
        if connection is None:
            return False
        connection.close(CloseCode.KICKED, reason)
        return True

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "conn": c.id,
                "user": c.user,
                "streams": sorted(c.attachments),
                "events_sent": c.events_sent,
            }
            for c in self.connections.values()
        ]
