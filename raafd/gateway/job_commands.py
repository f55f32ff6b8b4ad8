"""The gateway commands of background jobs:

- ``job.submit`` {the body of ``POST /v1/jobs``, ``ref``} → ``job.submitted`` {``ref``,
  ``created`` (false: an ``idempotency_key`` already used), ``job``: the job};
- ``job.status`` {``job``} → ``job.status`` {``ref``, ``job``};
- ``job.cancel`` {``job``} → ``job.cancelled`` {``ref``, ``job``};
- ``batch.submit`` {the body of ``POST /v1/batches``} → ``batch.submitted`` {``ref``,
  ``batch``, ``jobs``}; ``batch.status`` {``batch``} → ``batch.status`` {``ref``, and the
  batch as ``GET /v1/batches/{id}`` answers it};
- ``job.watch`` {``job``, ``after``} → attaches the job's current (or last) attempt's stream
  like ``stream.attach`` (its events follow as ``stream.event``), answered ``job.watching``
  {``ref``, ``job``, ``stream``, ``status``}; a job with no attempt yet answers
  ``job.watching`` with ``stream`` null: watch again once ``job.status`` shows a stream.

``job.submit`` needs the role permission ``job.submit`` for the agent; the connection counts it
against ``job_submits``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from raafd.errors import Unavailable
from raafd.gateway.table import CommandTable, Peer
from raafd.jobs.service import public_batch
from raafd.protocol.jobs import BatchRef, BatchSubmit, JobRef, JobSubmit
from raafd.security.guard import Guard

if TYPE_CHECKING:
    from raafd.jobs import Jobs
    from raafd.streams import StreamManager

__all__ = ["add_job_commands"]


def add_job_commands(
    table: CommandTable,
    jobs: Callable[[], Jobs | None],
    streams: StreamManager,
    guard: Guard,
    default_agent: Callable[[], str],
) -> None:
    """``jobs()``: the jobs service, None until the daemon has opened its store."""

    def service() -> Jobs:
        opened = jobs()
        if opened is None:
            raise Unavailable("the job store is not open yet")
        return opened

    async def submit(conn: Peer, cmd: JobSubmit) -> None:
        if conn.draining:
            raise Unavailable("the server is draining; submit the job elsewhere")
        for agent, field in cmd.agents_named(default_agent()):
            guard.require(conn.principal, "job.submit", agent, field)
        job, created = await service().submit(cmd, owner=conn.user)
        await conn.send_json(
            {"type": "job.submitted", "ref": cmd.ref, "created": created, "job": job.public()}
        )

    async def status(conn: Peer, cmd: JobRef) -> None:
        job = await service().get(cmd.job)
        await conn.send_json({"type": "job.status", "ref": cmd.ref, "job": job.public()})

    async def cancel(conn: Peer, cmd: JobRef) -> None:
        job = await service().cancel(cmd.job)
        await conn.send_json({"type": "job.cancelled", "ref": cmd.ref, "job": job.public()})

    async def watch(conn: Peer, cmd: JobRef) -> None:
        job = await service().get(cmd.job)
        reply = {
            "type": "job.watching",
            "ref": cmd.ref,
            "job": job.id,
            "stream": job.stream,
            "status": job.state,
        }
        stream_id = job.stream
        if stream_id is None:
            await conn.send_json(reply)
            return
        conn.attach(stream_id, partial(streams.subscribe, stream_id, cmd.after), reply, cmd.ref)

    async def submit_batch(conn: Peer, cmd: BatchSubmit) -> None:
        if conn.draining:
            raise Unavailable("the server is draining; submit the batch elsewhere")
        if cmd.agents is not None:
            for i, name in enumerate(cmd.agents):
                guard.require(conn.principal, "job.submit", name, f"agents.{i}")
        else:
            guard.require(conn.principal, "job.submit", cmd.agent or default_agent(), "agent")
        batch, members = await service().submit_batch(cmd, owner=conn.user)
        await conn.send_json(
            {
                "type": "batch.submitted",
                "ref": cmd.ref,
                "batch": batch.id,
                "jobs": [j.id for j in members],
            }
        )

    async def batch_status(conn: Peer, cmd: BatchRef) -> None:
        batch, members = await service().batch(cmd.batch)
        reply = {"type": "batch.status", "ref": cmd.ref, **public_batch(batch, members)}
        await conn.send_json(reply)

    table.add("job.submit", JobSubmit, submit)
    table.add("batch.submit", BatchSubmit, submit_batch)
    table.add("batch.status", BatchRef, batch_status)
    table.add("job.status", JobRef, status)
    table.add("job.cancel", JobRef, cancel)
    table.add("job.watch", JobRef, watch)
