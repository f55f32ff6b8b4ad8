"""The job store in memory: for ``[store] backend = "memory"`` and tests under ``autojump_clock``
(nothing survives a restart). Same rules as every job store (:mod:`raafd.store.jobs`); the jobs
are bounded by the jobs service's own limits (``jobs.max_active``) and ``purge``."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from raafd.store.jobs import TERMINAL_STATES, Batch, Job

__all__ = ["MemoryJobStore"]


class MemoryJobStore:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}  # insertion order: oldest first
        self._order: dict[str, int] = {}
        self._next = 0
        self._keys: dict[str, str] = {}  # idempotency key → job id
        self._batches: dict[str, Batch] = {}

    def _put(self, job: Job) -> None:
        if job.id not in self._order:
            self._next += 1
            self._order[job.id] = self._next
        self._jobs[job.id] = job

    async def insert(
        self, jobs: Sequence[Job], *, now: float, window: float, batch: Batch | None = None
    ) -> list[tuple[Job, bool]]:
        await trio.lowlevel.checkpoint()
        out: list[tuple[Job, bool]] = []
        for job in jobs:
            key = job.idempotency_key
            held = self._jobs.get(self._keys.get(key, "")) if key is not None else None
            if held is not None and held.created_at + window > now:
                out.append((held, False))
                continue
            if key is not None:
                self._keys[key] = job.id
            self._put(job)
            out.append((job, True))
        if batch is not None:
            self._batches[batch.id] = batch
        return out

    async def update(self, new: Job, *, also: Sequence[Job] = ()) -> bool:
        await trio.lowlevel.checkpoint()
        old = self._jobs.get(new.id)
        if old is None or old.version != new.version - 1:
            return False
        self._put(new)
        for job in also:
            self._put(job)
        return True

    async def renew(self, leases: Sequence[tuple[str, float]]) -> None:
        await trio.lowlevel.checkpoint()
        for job_id, until in leases:
            job = self._jobs.get(job_id)
            if job is not None and job.state == "running":
                self._jobs[job_id] = attrs.evolve(job, lease_until=until)

    async def get(self, job_id: str) -> Job | None:
        await trio.lowlevel.checkpoint()
        return self._jobs.get(job_id)

    async def active(self) -> list[Job]:
        await trio.lowlevel.checkpoint()
        return [j for j in self._jobs.values() if j.state not in TERMINAL_STATES]

    async def find(
        self, *, state: str | None, agent: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        await trio.lowlevel.checkpoint()
        below = int(cursor) if cursor else None
        out: list[Job] = []
        for job in reversed(self._jobs.values()):
            order = self._order[job.id]
            if below is not None and order >= below:
                continue
            if (state is None or job.state == state) and (agent is None or job.agent == agent):
                if len(out) == limit:
                    return out, str(self._order[out[-1].id])
                out.append(job)
        return out, None

    async def counts(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        counts: dict[str, int] = {}
        for job in self._jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    async def purge(self, *, states: Sequence[str], before: float) -> int:
        await trio.lowlevel.checkpoint()
        gone = [
            j.id
            for j in self._jobs.values()
            if j.state in states and (j.finished_at or j.created_at) < before
        ]
        for job_id in gone:
            job = self._jobs.pop(job_id)
            del self._order[job_id]
            if job.idempotency_key is not None and self._keys.get(job.idempotency_key) == job_id:
                del self._keys[job.idempotency_key]
        return len(gone)

    async def pending_callbacks(self) -> list[Job]:
        await trio.lowlevel.checkpoint()
        return [j for j in self._jobs.values() if j.terminal and j.callback_state == "pending"]

    async def get_batch(self, batch_id: str) -> Batch | None:
        await trio.lowlevel.checkpoint()
        return self._batches.get(batch_id)

    async def batch_jobs(self, batch_id: str) -> list[Job]:
        await trio.lowlevel.checkpoint()
        batch = self._batches.get(batch_id)
        if batch is None:
            return []
        return [self._jobs[j] for j in batch.jobs if j in self._jobs]

    async def update_batch(self, new: Batch) -> bool:
        await trio.lowlevel.checkpoint()
        old = self._batches.get(new.id)
        if old is None or old.version != new.version - 1:
            return False
        self._batches[new.id] = new
        return True
