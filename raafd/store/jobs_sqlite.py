"""The job store on the shared SQLite database (:mod:`raafd.store.db`): durable when a write
returns, and cheap per write because writes queued together share one commit (group commit).

Each job is a row: the columns the queries need (state, agent, idempotency key, batch, a
pending callback, version) and the whole job as JSON in ``data``. Every update is a
compare-and-set on ``version`` inside the write, so two writers never both win. The rowid
orders the listing (newest first) and is its cursor.

Component ``jobs`` (see :data:`MIGRATIONS`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Final

from raafd.store.db import Database
from raafd.store.jobs import (
    TERMINAL_STATES,
    Batch,
    Job,
    decode_batch,
    decode_job,
    encode_batch,
    encode_job,
)

__all__ = ["MIGRATIONS", "SqliteJobStore"]

MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        agent TEXT NOT NULL,
        created_at REAL NOT NULL,
        ended_at REAL,                  -- finished_at of an ended job (purge)
        idempotency_key TEXT,           -- cleared when the key's retention is over
        batch TEXT,
        version INTEGER NOT NULL,
        data TEXT NOT NULL              -- the job, JSON
    );
    CREATE UNIQUE INDEX jobs_by_key ON jobs (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_by_state ON jobs (state);
    CREATE INDEX jobs_by_batch ON jobs (batch) WHERE batch IS NOT NULL;
    CREATE TABLE job_batches (
        id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        data TEXT NOT NULL              -- the batch, JSON
    );
    """,
    """
    ALTER TABLE jobs ADD COLUMN callback TEXT;  -- 'pending': an ended job owed a delivery
    CREATE INDEX jobs_by_callback ON jobs (callback) WHERE callback IS NOT NULL;
    """,
    """
    CREATE INDEX jobs_by_end ON jobs (ended_at) WHERE ended_at IS NOT NULL;
    """,
)

_ACTIVE_SQL: Final = "SELECT data FROM jobs WHERE state NOT IN ({})".format(
    ", ".join(f"'{s}'" for s in sorted(TERMINAL_STATES))
)


def _row(job: Job) -> tuple[object, ...]:
    ended = job.finished_at if job.state in TERMINAL_STATES else None
    pending = "pending" if job.terminal and job.callback_state == "pending" else None
    return (
        job.id,
        pending,
        job.state,
        job.agent,
        job.created_at,
        ended,
        job.idempotency_key,
        job.batch,
        job.version,
        encode_job(job).decode(),
    )


_INSERT: Final = (
    "INSERT INTO jobs (id, callback, state, agent, created_at, ended_at, idempotency_key, batch,"
    " version, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SqliteJobStore:
    """See the module docstring and :class:`raafd.store.jobs.JobStore`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(
        self, jobs: Sequence[Job], *, now: float, window: float, batch: Batch | None = None
    ) -> list[tuple[Job, bool]]:
        def write(conn: sqlite3.Connection) -> list[tuple[Job, bool]]:
            out: list[tuple[Job, bool]] = []
            for job in jobs:
                if job.idempotency_key is not None:
                    held = conn.execute(
                        "SELECT data, created_at FROM jobs WHERE idempotency_key = ?",
                        (job.idempotency_key,),
                    ).fetchone()
                    if held is not None:
                        if held[1] + window > now:
                            out.append((decode_job(held[0]), False))
                            continue
                        conn.execute(  # the key's retention is over: it is free again
                            "UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key = ?",
                            (job.idempotency_key,),
                        )
                conn.execute(_INSERT, _row(job))
                out.append((job, True))
            if batch is not None:
                conn.execute(
                    "INSERT INTO job_batches (id, version, data) VALUES (?, ?, ?)",
                    (batch.id, batch.version, encode_batch(batch).decode()),
                )
            return out

        return await self._db.write(write)

    async def update(self, new: Job, *, also: Sequence[Job] = ()) -> bool:
        row = _row(new)

        def write(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE jobs SET callback = ?, state = ?, ended_at = ?, version = ?, data = ?"
                " WHERE id = ? AND version = ?",
                (row[1], new.state, row[5], new.version, row[9], new.id, new.version - 1),
            ).rowcount
            if changed != 1:
                return False
            for job in also:
                conn.execute(_INSERT, _row(job))
            return True

        return await self._db.write(write)

    async def renew(self, leases: Sequence[tuple[str, float]]) -> None:
        ids = [job_id for job_id, _ in leases]

        def write(conn: sqlite3.Connection) -> None:
            # The lease lives in the JSON only; json_set keeps the version (see JobStore).
            conn.executemany(
                "UPDATE jobs SET data = json_set(data, '$.lease_until', ?)"
                " WHERE id = ? AND state = 'running'",
                [(until, job_id) for job_id, until in leases],
            )

        if ids:
            await self._db.write(write)

    async def get(self, job_id: str) -> Job | None:
        def read(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return decode_job(row[0]) if row is not None else None

        return await self._db.read(read)

    async def active(self) -> list[Job]:
        def read(conn: sqlite3.Connection) -> list[Job]:
            return [decode_job(row[0]) for row in conn.execute(_ACTIVE_SQL)]

        return await self._db.read(read)

    async def find(
        self, *, state: str | None, agent: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        where = ["1"]
        args: list[object] = []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if agent is not None:
            where.append("agent = ?")
            args.append(agent)
        if cursor is not None:
            where.append("rowid < ?")
            args.append(int(cursor))
        sql = (
            f"SELECT rowid, data FROM jobs WHERE {' AND '.join(where)} ORDER BY rowid DESC LIMIT ?"
        )
        args.append(limit + 1)

        def read(conn: sqlite3.Connection) -> tuple[list[Job], str | None]:
            rows = conn.execute(sql, args).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            nxt = str(rows[-1][0]) if more and rows else None
            return [decode_job(r[1]) for r in rows], nxt

        return await self._db.read(read)

    async def counts(self) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            return {state: n for state, n in rows}

        return await self._db.read(read)

    async def purge(self, *, states: Sequence[str], before: float) -> int:
        marks = ", ".join("?" for _ in states)

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"DELETE FROM jobs WHERE state IN ({marks}) AND ended_at < ?",
                (*states, before),
            ).rowcount

        return await self._db.write(write)

    async def pending_callbacks(self) -> list[Job]:
        def read(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute("SELECT data FROM jobs WHERE callback = 'pending'")
            return [decode_job(row[0]) for row in rows]

        return await self._db.read(read)

    async def get_batch(self, batch_id: str) -> Batch | None:
        def read(conn: sqlite3.Connection) -> Batch | None:
            row = conn.execute("SELECT data FROM job_batches WHERE id = ?", (batch_id,)).fetchone()
            return decode_batch(row[0]) if row is not None else None

        return await self._db.read(read)

    async def batch_jobs(self, batch_id: str) -> list[Job]:
        def read(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute("SELECT data FROM jobs WHERE batch = ?", (batch_id,))
            jobs = [decode_job(row[0]) for row in rows]
            return sorted(jobs, key=lambda j: j.batch_index or 0)

        return await self._db.read(read)

    async def update_batch(self, new: Batch) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE job_batches SET version = ?, data = ? WHERE id = ? AND version = ?",
                    (new.version, encode_batch(new).decode(), new.id, new.version - 1),
                ).rowcount
                == 1
            )

        return await self._db.write(write)
