"""The gateway commands of the connection itself and of agent streams.

- :func:`add_connection_commands`: ``hello`` and ``ping``, which every connection answers (the
  gateway registers them);
- :func:`add_stream_commands`: ``stream.start``, ``stream.attach``, ``stream.detach``,
  ``stream.cancel``/``pause``/``resume`` and ``workflow.start``, given the stream manager and
  the workflow starter (the daemon registers them).

See :mod:`raafd.gateway.table` for how a subsystem adds its own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from raafd.errors import Unavailable
from raafd.gateway.table import CommandHandler, CommandTable, Peer
from raafd.protocol.commands import (
    Hello,
    Ping,
    StreamAttach,
    StreamControl,
    StreamDetach,
    StreamStart,
    WorkflowStart,
)
from raafd.security.guard import Guard

if TYPE_CHECKING:
    from raafd.streams import Stream, StreamManager

__all__ = ["WorkflowStarter", "add_connection_commands", "add_stream_commands"]

WorkflowStarter = Callable[[WorkflowStart, str, str], "Stream"]  # cmd, owner, principal
"""Starts a ``workflow.start`` command's stream for an owner (checked against the running
agents); raises what :meth:`StreamManager.start` raises."""


def add_connection_commands(table: CommandTable) -> None:
    async def hello(conn: Peer, cmd: Hello) -> None:
        if conn.authenticated:
            await conn.send_json(
                {"type": "welcome", "conn": conn.id, "user": conn.user, "ref": cmd.ref}
            )
            return
        await conn.authenticate(cmd.token)

    async def ping(conn: Peer, cmd: Ping) -> None:
        await conn.send_json({"type": "pong", "ref": cmd.ref})

    table.add("hello", Hello, hello)
    table.add("ping", Ping, ping)


def add_stream_commands(
    table: CommandTable,
    streams: StreamManager,
    start_workflow: WorkflowStarter,
    guard: Guard,
    default_agent: Callable[[], str],
) -> None:
    """``guard`` checks each agent against the principal's roles (``forbidden``);
    ``default_agent()`` names the agent of a ``stream.start`` that names none."""

    async def start(conn: Peer, cmd: StreamStart) -> None:
        if conn.draining:
            raise Unavailable("the server is draining; start the stream elsewhere")
        guard.require(conn.principal, "agent.run", cmd.agent or default_agent(), "agent")
        conn.check_room()  # before the stream starts: nobody would receive it
        stream = streams.start(
            agent=cmd.agent,
            messages=cmd.conversation(),
            stream_id=cmd.stream,
            owner=conn.id,
            principal=conn.principal.counted_as,
            session=cmd.session,
        )
        _attach_started(conn, streams, stream.id, cmd.ref)

    async def workflow(conn: Peer, cmd: WorkflowStart) -> None:
        if conn.draining:
            raise Unavailable("the server is draining; start the workflow elsewhere")
        guard.require_agents(conn.principal, cmd.agents, cmd.synthesizer)
        conn.check_room()
        stream = start_workflow(cmd, conn.id, conn.principal.counted_as)
        _attach_started(conn, streams, stream.id, cmd.ref)

    async def attach(conn: Peer, cmd: StreamAttach) -> None:
        reply = None
        if cmd.ref is not None:
            reply = {
                "type": "stream.attached",
                "ref": cmd.ref,
                "stream": cmd.stream,
                "after": cmd.after,
            }
        subscribe = partial(streams.subscribe, cmd.stream, cmd.after, snapshot=cmd.snapshot)
        conn.attach(cmd.stream, subscribe, reply, cmd.ref)

    async def detach(conn: Peer, cmd: StreamDetach) -> None:
        conn.detach(cmd.stream)
        await conn.send_json({"type": "stream.detached", "ref": cmd.ref, "stream": cmd.stream})

    def control(kind: str, act: Callable[[str], object]) -> CommandHandler[StreamControl]:
        async def handler(conn: Peer, cmd: StreamControl) -> None:
            act(cmd.stream)
            await conn.send_json(
                {"type": "ok", "ref": cmd.ref, "command": kind, "stream": cmd.stream}
            )

        return handler

    table.add("stream.start", StreamStart, start)
    table.add("stream.attach", StreamAttach, attach)
    table.add("stream.detach", StreamDetach, detach)
    table.add(
        "stream.cancel",
        StreamControl,
        control("stream.cancel", partial(streams.cancel, reason="client")),
    )
    table.add("stream.pause", StreamControl, control("stream.pause", streams.pause))
    table.add("stream.resume", StreamControl, control("stream.resume", streams.resume))
    table.add("workflow.start", WorkflowStart, workflow)


def _attach_started(conn: Peer, streams: StreamManager, stream_id: str, ref: str | None) -> None:
    reply = {"type": "stream.started", "ref": ref, "stream": stream_id}
    conn.attach(stream_id, partial(streams.subscribe, stream_id, 0), reply)
