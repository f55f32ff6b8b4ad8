"""The job store's interface: what the jobs service needs from durable storage, and the types it
keeps. Implementations: :mod:`raafd.store.jobs_sqlite` (the shared database, durable when a write
returns) and :mod:`raafd.store.jobs_memory` (tests, ``[store] backend = "memory"``). A Redis one
can follow the same interface: every write is a compare-and-set on a job's ``version``, and
nothing here needs a transaction across more than the jobs one call names.

The rules every implementation keeps:

- a write returns only once it is durable (for the memory store: once it is made);
- :meth:`JobStore.update` writes ``new`` only if the stored job still has ``new.version - 1``
  (two writers never both win: a worker's completion and a client's cancel);
- an ``idempotency_key`` is held by one job for ``window`` seconds after that job was created:
  inserting another job with the key inside the window returns the existing job instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal, Protocol, TypeVar

import attrs
import orjson
from attrs import field, frozen
from cattrs.preconf.orjson import make_converter

__all__ = [
    "ACTIVE_STATES",
    "STATES",
    "TERMINAL_STATES",
    "Attempt",
    "Batch",
    "Job",
    "JobState",
    "JobStore",
    "bump",
    "decode_batch",
    "decode_job",
    "encode_batch",
    "encode_job",
]

T = TypeVar("T")

JobState = Literal["scheduled", "queued", "running", "completed", "failed", "dead", "cancelled"]
STATES: Final[tuple[JobState, ...]] = (
    "scheduled",
    "queued",
    "running",
    "completed",
    "failed",
    "dead",
    "cancelled",
)
TERMINAL_STATES: Final = frozenset({"completed", "dead", "cancelled"})
ACTIVE_STATES: Final = frozenset({"scheduled", "queued", "running", "failed"})


@frozen
class Attempt:
    """One attempt of a job: the stream that ran it and how it ended."""

    stream: str
    started_at: float
    finished_at: float | None = None
    outcome: str | None = None  # complete, error, cancelled, timeout, node_lost, drain
    error: dict[str, Any] | None = None


@frozen
class Job:
    """A job as the store keeps it. ``version`` grows by one at every write: a write names the
    version it read, so two writers never both win (compare-and-set)."""

    id: str
    agent: str
    messages: list[dict[str, Any]]
    created_at: float
    run_at: float  # when it may run (its first run, or after a backoff)
    state: JobState = "queued"
    priority: int = 5  # 0 (most urgent) to 9
    queued_at: float = 0.0  # since when it waits in the queue (the FIFO and aging order)
    workflow: dict[str, Any] | None = None  # {mode, agents, synthesizer}: a workflow, not agent
    session: str | None = None
    max_attempts: int = 3
    backoff: float = 1.0
    timeout: float = 600.0
    every: float | None = None  # recurring: the next run is created when this one ends
    series: str | None = None  # the first job of a recurring series (itself for the first)
    callback_url: str | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] = field(factory=dict)
    owner: str = ""  # who submitted it (the principal's user)
    batch: str | None = None
    batch_index: int | None = None
    attempts: int = 0
    history: list[Attempt] = field(factory=list)
    result: dict[str, Any] | None = None  # {final_response, usage}
    error: dict[str, Any] | None = None  # the last error {code, message}
    started_at: float | None = None
    finished_at: float | None = None
    lease_until: float | None = None
    next_job: str | None = None  # recurring: the id of the run created when this one ended
    callbacks: list[dict[str, Any]] = field(factory=list)  # delivery attempts of callback_url
    callback_state: str | None = None  # pending (owed a delivery), delivered, failed
    version: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def stream(self) -> str | None:
        """The stream of the current (or last) attempt."""
        return self.history[-1].stream if self.history else None

    def public(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it."""
        out: dict[str, Any] = {
            "job": self.id,
            "status": self.state,
            "agent": self.agent,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "created_at": self.created_at,
            "run_at": self.run_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "stream": self.stream,
            "streams": [a.stream for a in self.history],
            "attempt_history": [attrs.asdict(a) for a in self.history],
            "result": self.result,
            "error": self.error,
            "metadata": self.metadata,
        }
        if self.workflow is not None:
            out["workflow"] = self.workflow
        if self.session is not None:
            out["session"] = self.session
        if self.every is not None:
            out["every"] = self.every
            out["series"] = self.series
            out["next_job"] = self.next_job
        if self.batch is not None:
            out["batch"] = self.batch
            out["batch_index"] = self.batch_index
        if self.callback_url is not None:
            out["callback_url"] = self.callback_url
            out["callbacks"] = self.callbacks
            out["callback_state"] = self.callback_state
        if self.idempotency_key is not None:
            out["idempotency_key"] = self.idempotency_key
        return out


_converter = make_converter()


@frozen
class Batch:
    """A batch: many inputs through one agent, or one input through many agents; its jobs are
    ``jobs`` (in input order), at most ``max_concurrent`` of them running at once."""

    id: str
    created_at: float
    max_concurrent: int
    jobs: list[str]
    state: str = "running"  # running, completed (every job terminal), cancelled
    finished_at: float | None = None
    callback_url: str | None = None
    owner: str = ""
    metadata: dict[str, Any] = field(factory=dict)
    callbacks: list[dict[str, Any]] = field(factory=list)
    version: int = 0


def encode_job(job: Job) -> bytes:
    return orjson.dumps(_converter.unstructure(job))


def decode_job(data: bytes | str) -> Job:
    return _converter.structure(orjson.loads(data), Job)


def encode_batch(batch: Batch) -> bytes:
    return orjson.dumps(_converter.unstructure(batch))


def decode_batch(data: bytes | str) -> Batch:
    return _converter.structure(orjson.loads(data), Batch)


class JobStore(Protocol):
    """Durable jobs and batches; see the module docstring."""

    async def insert(
        self, jobs: Sequence[Job], *, now: float, window: float, batch: Batch | None = None
    ) -> list[tuple[Job, bool]]:
        """Insert ``jobs`` (and ``batch``) in one durable write. Each answer is the job and True,
        or, for a key another job holds, that job and False."""
        ...

    async def update(self, new: Job, *, also: Sequence[Job] = ()) -> bool:
        """Write ``new`` if the stored job has ``new.version - 1``, inserting ``also`` (the next
        run of a recurring job) in the same write; False (and nothing written) otherwise."""
        ...

    async def renew(self, leases: Sequence[tuple[str, float]]) -> None:
        """Move the leases of running jobs (id, lease_until) in one write; no version change
        (a lease is the worker's, not part of the job's story)."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def active(self) -> list[Job]:
        """Every job not terminal (at startup: the queue, the schedule and the leases)."""
        ...

    async def find(
        self, *, state: str | None, agent: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, filtered; the cursor of the next page or None."""
        ...

    async def counts(self) -> dict[str, int]:
        """Jobs by state."""
        ...

    async def purge(self, *, states: Sequence[str], before: float) -> int:
        """Forget jobs in ``states`` that finished before ``before``; how many."""
        ...

    async def pending_callbacks(self) -> list[Job]:
        """Ended jobs still owed a callback delivery (at startup)."""
        ...

    async def get_batch(self, batch_id: str) -> Batch | None: ...

    async def batch_jobs(self, batch_id: str) -> list[Job]:
        """The batch's jobs in input order."""
        ...

    async def update_batch(self, new: Batch) -> bool:
        """Compare-and-set on ``version``, as :meth:`update`."""
        ...


def bump(job: Job, **changes: Any) -> Job:
    """``job`` with ``changes`` and the next version (what a write of it expects)."""
    return attrs.evolve(job, version=job.version + 1, **changes)
