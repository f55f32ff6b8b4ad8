"""The jobs service: accepts jobs durably, keeps the queue and the schedule, runs each attempt
as an ordinary raafd stream, and writes every transition the model's rules decide.

The rule of this file:

    A job is acknowledged only after the store has it; every later change is the model's rule
    applied to the job the store holds (compare-and-set on its ``version``); and an attempt's
    stream starts only after ``running`` (the attempt counted) is durable.

So a ``kill -9`` at any point leaves each job either not accepted (the client got no answer),
or in a state the store holds; a job that was running is found at the next start and goes back
to ``queued`` with its attempt counted (:func:`raafd.jobs.model.recover`): at-least-once, and
visible. Two writers (a worker's end of an attempt and a client's cancel) never both win.

Tasks (all in the nursery :meth:`Jobs.run` opens, which the daemon's nursery owns):

- ``workers`` worker tasks. Each takes the best queued job (priority with aging, FIFO inside a
  priority; see :mod:`raafd.jobs.model`), writes ``running``, starts the attempt's stream
  through the stream manager (``<job>.<n>``: a client may ``stream.attach`` to it), waits for
  its terminal event under the job's ``timeout`` (a cancel scope), and writes the outcome.
- one scheduler task, sleeping until the earliest ``run_at`` of a scheduled job or a retry's
  backoff (a heap; no per-job polling or task).
- one heartbeat task renewing the leases of the running jobs in one write every ``lease / 3``.

In memory, bounded by ``jobs.max_active`` (submissions past it are refused with
``unavailable``): every job not yet ended (``_active``), the ready queue (ten FIFO deques, one
per priority), the schedule heap, jobs held back by ``max_per_agent`` / ``max_per_provider``
(moved back when a job of theirs ends) and the open window of each batch (``max_concurrent``:
its other jobs wait in the batch, not in the ready queue, so they hold no worker).
"""

from __future__ import annotations

import heapq
import random
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson
import structlog
import trio

from raafd.config import Config
from raafd.errors import BadRequest, Conflict, NotFound, RaafdError, Unavailable
from raafd.jobs.callbacks import Callbacks, Post
from raafd.jobs.model import (
    Outcome,
    cancel,
    due,
    finish_attempt,
    next_occurrence,
    rank,
    recover,
    requeue,
    retry,
    start_attempt,
)
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.protocol.jobs import BatchSubmit, JobSubmit, check_priority
from raafd.store.jobs import STATES, Batch, Job, JobStore, bump

if TYPE_CHECKING:
    from raafd.protocol.events import StreamEvent
    from raafd.streams import Stream

__all__ = ["Emit", "Jobs", "StreamStarter", "new_batch_id", "new_job_id"]

log = get_logger("raafd.jobs")

StreamStarter = Callable[[Job, str], "Stream"]
"""Starts the stream of one attempt of a job, with the given stream id (the daemon gives one
that runs the job's agent on its messages, watched by nobody: no detach grace)."""

Emit = Callable[[str, dict[str, Any]], None]
"""Publishes an event (subject, data) without blocking: the event bus, when wired."""


_PRIORITIES: Final = 10
_RECENT_ENDS: Final = 10_000  # ended jobs' last versions kept to spot stale writes
_CANCEL_TRIES: Final = 5
_SWEEP_EVERY: Final = 60.0  # seconds between sweeps of ended jobs past jobs.retention
_ENDED: Final = ("completed", "dead", "cancelled")
_EMIT_STATES: Final = frozenset({"queued", "running", "completed", "failed", "dead", "cancelled"})


def _noop(subject: str, data: dict[str, Any]) -> None:
    return None


def new_job_id() -> str:
    return "jb_" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "bt_" + secrets.token_hex(12)


def outcome_of(event: StreamEvent | None) -> Outcome:
    """What an attempt's stream's terminal event means for its job."""
    if event is None:  # pragma: no cover - a stream that waited has its terminal event
        return Outcome("error", {"error": {"code": "internal", "message": "no terminal event"}})
    kind = event.kind
    if kind == "complete":
        return Outcome("complete", dict(event.fields))
    if kind == "cancelled":
        return Outcome("cancelled", dict(event.fields))
    return Outcome("error", dict(event.fields))


class _Window:
    """A batch's share of the queue: at most ``size`` of its jobs admitted (ready or running)."""

    __slots__ = ("admitted", "left", "pending", "size")

    def __init__(self, size: int, left: int) -> None:
        self.size = size
        self.left = left  # its jobs not yet ended
        self.admitted: set[str] = set()
        self.pending: deque[str] = deque()


class Jobs:
    """See the module docstring. Run with ``await nursery.start(jobs.run)`` after the stream
    manager runs."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: JobStore,
        metrics: Metrics,
        *,
        start_stream: StreamStarter,
        emit: Emit = _noop,
        post: Post | None = None,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._start_stream = start_stream
        self._emit = emit
        self._callbacks = (
            None
            if post is None
            else Callbacks(
                config().jobs,
                store,
                post,
                on_failure=self.count_callback_failure,
                describe_batch=self._describe_batch,
                now=self.now,
            )
        )
        self._deliver = self._callbacks.deliver if self._callbacks is not None else None
        self._uniform = uniform
        self._cfg = config().jobs  # [jobs] applies at start
        self._clock: tuple[float, float] | None = None  # (unix time, trio time) at run()
        self._active: dict[str, Job] = {}
        self._ended: OrderedDict[str, int] = OrderedDict()
        self._ready: list[deque[str]] = [deque() for _ in range(_PRIORITIES)]
        self._heap: list[tuple[float, int, str]] = []
        self._heap_seq = 0
        self._held: dict[str, deque[str]] = {}
        self._per_agent: Counter[str] = Counter()
        self._per_provider: Counter[str] = Counter()
        self._windows: dict[str, _Window] = {}
        self._streams: dict[str, Stream] = {}  # job → its running attempt's stream
        self._running: set[str] = set()
        self._waiters: dict[str, trio.Event] = {}
        self._ready_lot = trio.lowlevel.ParkingLot()
        self._schedule_lot = trio.lowlevel.ParkingLot()
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._busy_workers = 0
        self._workers = 0
        self._draining = False
        self._nursery: trio.Nursery | None = None
        self._counts: Counter[str] = Counter()  # since start: ends by state, retries, ...

    # --- time ---------------------------------------------------------------------------------

    def now(self) -> float:
        """Unix time, moving with trio's clock (so an autojump clock moves it too)."""
        if self._clock is None:
            return time.time()
        wall, at = self._clock
        return wall + (trio.current_time() - at)

    def _trio_time(self, unix: float) -> float:
        wall, at = self._clock or (time.time(), trio.current_time())
        return at + (unix - wall)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover what a previous run left, then run the workers, the scheduler and the
        heartbeat; never returns (cancel it, after :meth:`drain`)."""
        self._clock = (time.time(), trio.current_time())
        await self._load()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._schedule_loop)
                nursery.start_soon(self._heartbeat)
                if self._callbacks is not None:
                    await nursery.start(self._callbacks.run)
                for n in range(self._cfg.workers):
                    nursery.start_soon(self._worker, name=f"job worker {n}")
                task_status.started()
        finally:
            self._nursery = None

    async def drain(self) -> None:
        """Take no more jobs; return once every worker has finished its attempt (the stream
        manager's drain ends the streams; a stream cancelled by it puts its job back to
        ``queued``, the attempt not counted)."""
        self._draining = True
        self._ready_lot.unpark_all()
        while self._busy_workers:
            await self._idle_lot.park()

    @property
    def draining(self) -> bool:
        return self._draining

    async def _load(self) -> None:
        now = self.now()
        batches: dict[str, Batch | None] = {}
        for job in await self._store.active():
            if job.batch is not None and job.batch not in batches:
                batches[job.batch] = await self._store.get_batch(job.batch)
            if job.state == "running":
                recovered = recover(job, now)
                if recovered is not None:
                    new = bump(_owing(recovered))
                    if await self._store.update(new):
                        self._metrics.job_lease_recoveries.inc()
                        self._counts["lease_recoveries"] += 1
                        log.warning(
                            "job recovered: its worker died",
                            job=job.id,
                            attempts=new.attempts,
                            state=new.state,
                        )
                        job = new
            if job.terminal:
                continue
            if job.batch is not None:
                window = self._windows.get(job.batch)
                if window is None:
                    found = batches.get(job.batch)
                    size = found.max_concurrent if found is not None else 1
                    window = self._windows[job.batch] = _Window(size, 0)
                window.left += 1
            self._active[job.id] = job
            self._place(job)

    # --- submitting ---------------------------------------------------------------------------

    def _check_room(self, n: int) -> None:
        if self._draining:
            raise Unavailable("the server is draining; submit the job elsewhere", retry_after=1)
        if len(self._active) + n > self._cfg.max_active:
            raise Unavailable(
                f"{len(self._active)} jobs are waiting or running (jobs.max_active"
                f" {self._cfg.max_active}); try again later",
                retry_after=1,
            )

    def _agent(self, name: str | None, field: str = "agent") -> str:
        config = self._config()
        name = name or config.default_agent
        if name not in config.agents:
            raise NotFound(f"no agent named {name!r}", field=field)
        return name

    def _metadata(self, metadata: dict[str, Any] | None) -> dict[str, Any]:
        if not metadata:
            return {}
        size = len(orjson.dumps(metadata))
        if size > self._cfg.max_metadata_bytes:
            raise BadRequest(
                f"metadata is {size} bytes of JSON; at most {self._cfg.max_metadata_bytes}",
                field="metadata",
            )
        return metadata

    def _check_callback(self, url: str | None) -> None:
        if url is not None and self._callbacks is None:
            raise BadRequest(
                "callbacks are signed, and this server has no callback secret"
                " (jobs.callback_secret_env)",
                field="callback_url",
            )

    def _timeout(self, timeout: float | None) -> float:
        cfg = self._cfg
        if timeout is not None and timeout > cfg.max_timeout:
            raise BadRequest(f"timeout must be at most {cfg.max_timeout} s", field="timeout")
        return timeout or cfg.timeout

    def build(self, cmd: JobSubmit, owner: str, now: float) -> Job:
        """The job ``cmd`` asks for, checked against the running configuration (raises
        ``not_found`` for the agent, ``bad_request`` naming the field)."""
        cfg = self._cfg
        self._check_callback(cmd.callback_url)
        workflow = None
        if cmd.workflow is not None:
            agents = self._config().agents
            flow = cmd.workflow
            for i, name in enumerate(flow.agents):
                if name not in agents:
                    raise NotFound(f"no agent named {name!r}", field=f"workflow.agents.{i}")
            if flow.synthesizer is not None and flow.synthesizer not in agents:
                raise NotFound(f"no agent named {flow.synthesizer!r}", field="workflow.synthesizer")
            workflow = {"mode": flow.mode, "agents": flow.agents, "synthesizer": flow.synthesizer}
            # The agent the workflow's stream names (and the limits count), as workflow.start.
            parallel = flow.mode == "parallel" and flow.synthesizer is not None
            agent = flow.synthesizer if parallel and flow.synthesizer else flow.agents[0]
        else:
            agent = self._agent(cmd.agent)
        if cmd.delay is not None:
            if cmd.delay > cfg.max_delay:
                raise BadRequest(f"delay must be at most {cfg.max_delay} s", field="delay")
            run_at = now + cmd.delay
        elif cmd.run_at is not None:
            if cmd.run_at - now > cfg.max_delay:
                raise BadRequest(f"run_at must be within {cfg.max_delay} s", field="run_at")
            run_at = max(now, cmd.run_at)
        else:
            run_at = now
        if cmd.every is not None and cmd.every < cfg.min_every:
            raise BadRequest(f"every must be at least {cfg.min_every} s", field="every")
        job_id = new_job_id()
        return Job(
            id=job_id,
            agent=agent,
            messages=cmd.conversation(),
            workflow=workflow,
            created_at=now,
            run_at=run_at,
            state="scheduled" if run_at > now else "queued",
            priority=check_priority(cmd.priority),
            queued_at=run_at,
            session=cmd.session,
            max_attempts=cmd.max_attempts or cfg.max_attempts,
            backoff=cmd.backoff or cfg.backoff,
            timeout=self._timeout(cmd.timeout),
            every=cmd.every,
            series=job_id if cmd.every is not None else None,
            callback_url=cmd.callback_url,
            idempotency_key=cmd.idempotency_key,
            metadata=self._metadata(cmd.metadata),
            owner=owner,
        )

    async def submit(self, cmd: JobSubmit, owner: str = "") -> tuple[Job, bool]:
        """Accept a job; returns once it is durable: the job and True, or (same
        ``idempotency_key`` within its retention) the existing job and False."""
        self._check_room(1)
        now = self.now()
        job = self.build(cmd, owner, now)
        [(stored, created)] = await self._store.insert(
            [job], now=now, window=self._cfg.idempotency_retention
        )
        if created:
            self._metrics.jobs_submitted.inc()
            self._apply(stored, None)
        elif stored.id in self._active:
            stored = self._active[stored.id]
        return stored, created

    async def submit_batch(self, cmd: BatchSubmit, owner: str = "") -> tuple[Batch, list[Job]]:
        """Accept a batch and its jobs in one durable write."""
        runs = cmd.runs()
        if len(runs) > self._cfg.max_batch:
            where = "inputs" if cmd.inputs is not None else "agents"
            raise BadRequest(f"a batch holds at most {self._cfg.max_batch} jobs", field=where)
        self._check_room(len(runs))
        self._check_callback(cmd.callback_url)
        now = self.now()
        batch_id = new_batch_id()
        metadata = self._metadata(cmd.metadata)
        jobs = []
        for i, (agent, text) in enumerate(runs):
            name = self._agent(agent, "agent" if cmd.inputs is not None else f"agents.{i}")
            job_id = new_job_id()
            jobs.append(
                Job(
                    id=job_id,
                    agent=name,
                    messages=[{"role": "user", "content": text}],
                    created_at=now,
                    run_at=now,
                    priority=check_priority(cmd.priority),
                    queued_at=now,
                    max_attempts=cmd.max_attempts or self._cfg.max_attempts,
                    backoff=self._cfg.backoff,
                    timeout=self._timeout(cmd.timeout),
                    metadata=metadata,
                    owner=owner,
                    batch=batch_id,
                    batch_index=i,
                )
            )
        batch = Batch(
            id=batch_id,
            created_at=now,
            max_concurrent=cmd.max_concurrent,
            jobs=[j.id for j in jobs],
            callback_url=cmd.callback_url,
            owner=owner,
            metadata=metadata,
        )
        await self._store.insert(jobs, now=now, window=0.0, batch=batch)
        self._windows[batch_id] = _Window(cmd.max_concurrent, len(jobs))
        self._metrics.jobs_submitted.inc(len(jobs))
        for job in jobs:
            self._apply(job, None)
        return batch, jobs

    # --- reading ------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        job = self._active.get(job_id) or await self._store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job")
        return job

    async def wait(self, job_id: str, seconds: float) -> Job:
        """The job once it has ended, or after ``seconds`` (at most ``jobs.max_wait``)."""
        job = await self.get(job_id)
        if job.terminal or seconds <= 0:
            return job
        event = self._waiters.get(job_id)
        if event is None:
            event = self._waiters[job_id] = trio.Event()
        with trio.move_on_after(min(seconds, self._cfg.max_wait)):
            await event.wait()
        return await self.get(job_id)

    async def find(
        self, *, state: str | None, agent: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        if state is not None and state not in STATES:
            raise BadRequest(f"status must be one of {', '.join(STATES)}", field="status")
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be 1 to 1000", field="limit")
        if cursor is not None and not cursor.isdigit():
            raise BadRequest("not a cursor this server gave", field="cursor")
        jobs, nxt = await self._store.find(state=state, agent=agent, limit=limit, cursor=cursor)
        # The store's copy of a due job still says scheduled; memory has the running truth.
        return [self._active.get(j.id, j) for j in jobs], nxt

    def stream_of(self, job_id: str) -> Stream | None:
        """The stream of the job's running attempt, if one runs."""
        return self._streams.get(job_id)

    # --- controls -----------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job not yet ended; a running attempt's stream is cancelled (the upstream
        request closes). ``conflict`` for a job that has ended."""
        job: Job | None = await self.get(job_id)
        for _ in range(_CANCEL_TRIES):
            assert job is not None
            cancelled = cancel(job, self.now())
            if cancelled is None:
                raise Conflict(f"job {job_id} has already ended ({job.state})", field="job")
            new = bump(_owing(cancelled))
            if await self._store.update(new):
                stream = self._streams.get(job_id)
                self._apply(new, job)
                if stream is not None:
                    stream.cancel("client")
                return new
            job = await self._store.get(job_id)  # another write won: read what it wrote
            if job is None:  # pragma: no cover - purged under our feet
                break
        raise Conflict(f"job {job_id} kept changing; try again", field="job")

    async def retry(self, job_id: str) -> Job:
        """A ``dead`` job → ``queued`` with ``max_attempts`` more attempts."""
        self._check_room(1)
        job = await self.get(job_id)
        again = retry(job, self.now())
        if again is None:
            raise Conflict(f"only a dead job is retried; job {job_id} is {job.state}", field="job")
        new = bump(again)
        if not await self._store.update(new):
            raise Conflict(f"job {job_id} changed; try again", field="job")
        if job.batch is not None and job.batch in self._windows:
            self._windows[job.batch].left += 1
        self._apply(new, job)
        return new

    async def purge(self, states: Sequence[str], older_than: float) -> int:
        """Forget ended jobs in ``states`` that ended more than ``older_than`` seconds ago."""
        for state in states:
            if state not in ("completed", "dead", "cancelled"):
                raise BadRequest(
                    "only completed, dead or cancelled jobs are purged", field="status"
                )
        return await self._store.purge(states=states, before=self.now() - older_than)

    # --- batches ------------------------------------------------------------------------------

    async def batch(self, batch_id: str) -> tuple[Batch, list[Job]]:
        batch = await self._store.get_batch(batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}", field="batch")
        jobs = [self._active.get(j.id, j) for j in await self._store.batch_jobs(batch_id)]
        return batch, jobs

    async def wait_batch(self, batch_id: str, seconds: float) -> tuple[Batch, list[Job]]:
        batch, jobs = await self.batch(batch_id)
        if batch.state != "running" or seconds <= 0:
            return batch, jobs
        key = "batch:" + batch_id
        event = self._waiters.get(key)
        if event is None:
            event = self._waiters[key] = trio.Event()
        with trio.move_on_after(min(seconds, self._cfg.max_wait)):
            await event.wait()
        return await self.batch(batch_id)

    async def cancel_batch(self, batch_id: str) -> tuple[Batch, list[Job]]:
        """Cancel every job of the batch not yet ended (concurrently: one group commit)."""
        _, jobs = await self.batch(batch_id)

        async def one(job_id: str) -> None:
            try:
                await self.cancel(job_id)
            except Conflict:
                pass  # it ended meanwhile

        async with trio.open_nursery() as nursery:
            for job in jobs:
                if not job.terminal:
                    nursery.start_soon(one, job.id)
        return await self.batch(batch_id)

    async def _end_batch(self, batch_id: str) -> None:
        for _ in range(_CANCEL_TRIES):
            batch = await self._store.get_batch(batch_id)
            if batch is None or batch.state != "running":
                break
            jobs = await self._store.batch_jobs(batch_id)
            state = "cancelled" if any(j.state == "cancelled" for j in jobs) else "completed"
            new = attrs.evolve(
                batch, state=state, finished_at=self.now(), version=batch.version + 1
            )
            if await self._store.update_batch(new):
                self._emit("batch." + state, {"batch": batch_id, "jobs": len(jobs)})
                if new.callback_url is not None and self._deliver is not None:
                    self._deliver(new)
                break
        event = self._waiters.pop("batch:" + batch_id, None)
        if event is not None:
            event.set()

    async def _describe_batch(self, batch: Batch) -> dict[str, Any]:
        return public_batch(batch, await self._store.batch_jobs(batch.id))

    # --- figures ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """``/v1/stats`` ``jobs`` and ``raafd ctl stats``: the processor's figures."""
        by_state: Counter[str] = Counter()
        by_priority: Counter[int] = Counter()
        for job in self._active.values():
            by_state[job.state] += 1
            if job.state == "queued":
                by_priority[job.priority] += 1
        c = self._counts
        return {
            "workers": self._cfg.workers,
            "busy_workers": self._busy_workers,
            "running": by_state["running"],
            "queued": by_state["queued"],
            "queued_by_priority": {str(p): by_priority[p] for p in range(_PRIORITIES)},
            "scheduled": by_state["scheduled"],
            "waiting_retry": by_state["failed"],
            "held_by_limits": sum(len(d) for d in self._held.values()),
            "completed": c["completed"],
            "failed": c["failed"],
            "dead": c["dead"],
            "cancelled": c["cancelled"],
            "retries": c["failed"],
            "lease_recoveries": c["lease_recoveries"],
            "callback_failures": c["callback_failures"],
            "batches_open": len(self._windows),
            "draining": self._draining,
        }

    def refresh_gauges(self) -> None:
        stats = self.stats()
        for state in ("queued", "running", "scheduled"):
            self._metrics.jobs.labels(state).set(stats[state])
        self._metrics.jobs.labels("failed").set(stats["waiting_retry"])
        for priority, n in stats["queued_by_priority"].items():
            self._metrics.jobs_queued.labels(priority).set(n)

    def count_callback_failure(self) -> None:
        self._counts["callback_failures"] += 1
        self._metrics.job_callback_failures.inc()

    # --- the queue ----------------------------------------------------------------------------

    def _apply(self, new: Job, old: Job | None) -> None:
        """Take a written job into memory (and act on its new state), unless a later version
        is already there (two writes' answers may come back in either order)."""
        current = self._active.get(new.id)
        if current is not None and current.version >= new.version and current is not new:
            return
        if self._ended.get(new.id, -1) >= new.version:
            return
        before = old.state if old is not None else None
        if new.state == "running":
            self._running.add(new.id)
        else:
            self._running.discard(new.id)
        if new.terminal:
            self._active.pop(new.id, None)
            self._ended[new.id] = new.version
            while len(self._ended) > _RECENT_ENDS:
                self._ended.popitem(last=False)
            self._on_end(new)
        else:
            self._active[new.id] = new
            self._place(new)
        if new.state != before and new.state in _EMIT_STATES:
            if new.state != "running":  # counted in _attempt with its latency
                self._counts[new.state] += 1
                if new.state != "queued":
                    self._metrics.jobs_ended.labels(new.state).inc()
            self._emit(
                "job.started" if new.state == "running" else "job." + new.state,
                {
                    "job": new.id,
                    "agent": new.agent,
                    "status": new.state,
                    "attempts": new.attempts,
                    "stream": new.stream,
                    "batch": new.batch,
                },
            )

    def _place(self, job: Job) -> None:
        if job.state in ("scheduled", "failed"):
            self._schedule(job)
        elif job.state == "queued":
            self._enqueue(job)

    def _schedule(self, job: Job) -> None:
        self._heap_seq += 1
        heapq.heappush(self._heap, (job.run_at, self._heap_seq, job.id))
        if len(self._heap) > 2 * self._cfg.max_active:  # stale entries of cancelled jobs
            self._heap = [
                (j.run_at, n, j.id)
                for n, j in enumerate(self._active.values())
                if j.state in ("scheduled", "failed")
            ]
            heapq.heapify(self._heap)
        if self._heap[0][2] == job.id:
            self._schedule_lot.unpark_all()

    def _enqueue(self, job: Job) -> None:
        if job.batch is not None:
            window = self._windows.get(job.batch)
            if window is not None and job.id not in window.admitted:
                if len(window.admitted) >= window.size:
                    window.pending.append(job.id)
                    return
                window.admitted.add(job.id)
        self._ready[job.priority].append(job.id)
        self._ready_lot.unpark()

    def _on_end(self, job: Job) -> None:
        event = self._waiters.pop(job.id, None)
        if event is not None:
            event.set()
        if job.callback_url is not None and self._deliver is not None:
            self._deliver(job)
        if job.batch is None:
            return
        window = self._windows.get(job.batch)
        if window is None:
            return
        window.admitted.discard(job.id)
        window.left -= 1
        while window.pending and len(window.admitted) < window.size:
            nxt = self._active.get(window.pending.popleft())
            if nxt is not None and nxt.state == "queued":
                window.admitted.add(nxt.id)
                self._ready[nxt.priority].append(nxt.id)
                self._ready_lot.unpark()
        if window.left <= 0:
            del self._windows[job.batch]
            if self._nursery is not None:
                self._nursery.start_soon(self._end_batch, job.batch)

    def _limit_key(self, job: Job) -> str | None:
        cfg = self._cfg
        if cfg.max_per_agent and self._per_agent[job.agent] >= cfg.max_per_agent:
            return "agent:" + job.agent
        if cfg.max_per_provider:
            provider = self._provider(job)
            if self._per_provider[provider] >= cfg.max_per_provider:
                return "provider:" + provider
        return None

    def _provider(self, job: Job) -> str:
        agent = self._config().agents.get(job.agent)
        return agent.provider if agent is not None else ""

    def _pick(self) -> Job | None:
        """The queued job to run next (see the model's priority rule), or None."""
        now = self.now()
        aging = self._cfg.aging
        while True:
            best: Job | None = None
            best_key: tuple[int, float] | None = None
            for queue in self._ready:
                while queue:
                    job = self._active.get(queue[0])
                    if job is not None and job.state == "queued":
                        key = rank(job.priority, job.queued_at, now, aging)
                        if best_key is None or key < best_key:
                            best, best_key = job, key
                        break
                    queue.popleft()  # cancelled or already taken
            if best is None:
                return None
            self._ready[best.priority].popleft()
            held = self._limit_key(best)
            if held is None:
                return best
            self._held.setdefault(held, deque()).append(best.id)

    def _release_limits(self, job: Job) -> None:
        self._per_agent[job.agent] -= 1
        if self._per_agent[job.agent] <= 0:
            del self._per_agent[job.agent]
        provider = self._provider(job)
        self._per_provider[provider] -= 1
        if self._per_provider[provider] <= 0:
            del self._per_provider[provider]
        for key in ("agent:" + job.agent, "provider:" + provider):
            held = self._held.pop(key, None)
            while held:
                job_id = held.pop()
                held_job = self._active.get(job_id)
                if held_job is not None:
                    self._ready[held_job.priority].appendleft(job_id)
                    self._ready_lot.unpark()

    # --- tasks --------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            # Draining: take nothing more (a job taken now would only be put back).
            job = None if self._draining else self._pick()
            while job is None:
                if self._draining:
                    return
                await self._ready_lot.park()
                job = None if self._draining else self._pick()
            self._busy_workers += 1
            self._per_agent[job.agent] += 1
            self._per_provider[self._provider(job)] += 1
            try:
                await self._attempt(job)
            except Exception:
                # The store failed (disk full, a database error): the job stays as stored,
                # this worker goes on, and a job still queued is offered again after a second.
                log.exception("job attempt failed in the daemon", job=job.id)
                await trio.sleep(1.0)
                again = self._active.get(job.id)
                if again is not None and again.state == "queued":
                    self._ready[again.priority].append(again.id)
                    self._ready_lot.unpark()
            finally:
                self._busy_workers -= 1
                self._release_limits(job)
                if not self._busy_workers:
                    self._idle_lot.unpark_all()

    async def _attempt(self, job: Job) -> None:
        structlog.contextvars.bind_contextvars(job=job.id)
        try:
            await self._run_attempt(job)
        finally:
            structlog.contextvars.unbind_contextvars("job")

    async def _run_attempt(self, job: Job) -> None:
        now = self.now()
        stream_id = f"{job.id}.{len(job.history) + 1}"
        begun = start_attempt(job, stream_id, now, self._cfg.lease)
        if begun is None:
            return
        started = bump(begun)
        if not await self._store.update(started):
            return  # cancelled meanwhile; the canceller took it into memory
        self._apply(started, job)
        if self._active.get(job.id) is not started:
            return  # a cancel's write came back first
        self._counts["started"] += 1
        self._metrics.job_queue_latency.observe(max(0.0, now - job.queued_at))
        outcome: Outcome
        try:
            stream = self._start_stream(started, stream_id)
        except RaafdError as err:
            if self._draining:
                outcome = Outcome("cancelled", {"reason": "drain"})
            else:
                outcome = Outcome("error", {"error": err.to_dict()})
        else:
            self._streams[job.id] = stream
            try:
                with trio.move_on_after(started.timeout) as scope:
                    await stream.wait()
                if scope.cancelled_caught:
                    stream.cancel("timeout")
                    outcome = Outcome("timeout")
                else:
                    outcome = outcome_of(stream.terminal)
            finally:
                del self._streams[job.id]
        await self._finish(started, outcome)

    async def _finish(self, job: Job, outcome: Outcome) -> None:
        now = self.now()
        cfg = self._cfg
        if outcome.kind == "cancelled" and outcome.fields.get("reason") == "drain":
            ended = requeue(job, now)
        else:
            ended = finish_attempt(
                job,
                outcome,
                now,
                backoff_max=cfg.backoff_max,
                jitter=cfg.jitter,
                u=self._uniform(),
            )
        if ended is None:
            return
        also: list[Job] = []
        if ended.terminal and ended.every is not None and ended.state != "cancelled":
            nxt = self._next_run(ended, now)
            ended = attrs.evolve(ended, next_job=nxt.id)
            also.append(nxt)
        new = bump(_owing(ended))
        if await self._store.update(new, also=also):
            if job.started_at is not None:
                self._metrics.job_run_latency.observe(max(0.0, now - job.started_at))
            self._apply(new, job)
            for extra in also:
                self._apply(extra, None)

    def _next_run(self, job: Job, now: float) -> Job:
        run_at = next_occurrence(job, now) or now
        return Job(
            id=new_job_id(),
            agent=job.agent,
            messages=job.messages,
            created_at=now,
            run_at=run_at,
            state="scheduled",
            priority=job.priority,
            queued_at=run_at,
            session=job.session,
            max_attempts=job.max_attempts,
            backoff=job.backoff,
            timeout=job.timeout,
            every=job.every,
            series=job.series or job.id,
            callback_url=job.callback_url,
            metadata=job.metadata,
            owner=job.owner,
        )

    async def _schedule_loop(self) -> None:
        while True:
            while not self._heap:
                await self._schedule_lot.park()
            run_at = self._heap[0][0]
            with trio.move_on_at(self._trio_time(run_at)) as scope:
                await self._schedule_lot.park()  # an earlier run_at arrived: look again
            if not scope.cancelled_caught:
                continue
            now = self.now()
            while self._heap and self._heap[0][0] <= now:
                at, _, job_id = heapq.heappop(self._heap)
                job = self._active.get(job_id)
                if job is None or job.run_at != at:
                    continue  # cancelled, or moved
                ready = due(job, now)
                if ready is not None:
                    # In memory only: the store's copy says scheduled (or failed) with a past
                    # run_at, which means the same after a restart; the start writes running.
                    self._active[job_id] = ready
                    self._enqueue(ready)

    async def _heartbeat(self) -> None:
        """Renew the running jobs' leases every ``lease / 3``; once a minute, forget the jobs
        that ended more than ``jobs.retention`` ago."""
        period = self._cfg.lease / 3
        next_sweep = trio.current_time() + _SWEEP_EVERY
        while True:
            await trio.sleep(period)
            if self._running:
                until = self.now() + self._cfg.lease
                await self._store.renew([(job_id, until) for job_id in self._running])
            if self._cfg.retention and trio.current_time() >= next_sweep:
                next_sweep = trio.current_time() + _SWEEP_EVERY
                before = self.now() - self._cfg.retention
                gone = await self._store.purge(states=_ENDED, before=before)
                if gone:
                    log.info("ended jobs forgotten", jobs=gone, retention=self._cfg.retention)


def _owing(job: Job) -> Job:
    """``job``, marked as owed a callback when it has ended with a ``callback_url``."""
    if job.terminal and job.callback_url is not None and job.callback_state is None:
        return attrs.evolve(job, callback_state="pending")
    return job


def describe(job: Job) -> dict[str, Any]:
    """A job's row in ``raafd ctl jobs`` and ``GET /v1/jobs``."""
    return {
        "job": job.id,
        "status": job.state,
        "agent": job.agent,
        "priority": job.priority,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "stream": job.stream,
    }


def public_batch(batch: Batch, jobs: Sequence[Job]) -> dict[str, Any]:
    """``GET /v1/batches/{id}``: counts by state, progress and results in input order."""
    counts = dict.fromkeys(STATES, 0)
    for job in jobs:
        counts[job.state] += 1
    ended = counts["completed"] + counts["dead"] + counts["cancelled"]
    total = len(batch.jobs)
    return {
        "batch": batch.id,
        "status": batch.state,
        "max_concurrent": batch.max_concurrent,
        "created_at": batch.created_at,
        "finished_at": batch.finished_at,
        "total": total,
        "counts": counts,
        "progress": round(ended / total, 4) if total else 1.0,
        "results": [
            {
                "job": job.id,
                "agent": job.agent,
                "status": job.state,
                "result": job.result,
                "error": job.error,
                "stream": job.stream,
            }
            for job in sorted(jobs, key=lambda j: j.batch_index or 0)
        ],
        "metadata": batch.metadata,
        **(
            {"callback_url": batch.callback_url, "callbacks": batch.callbacks}
            if batch.callback_url
            else {}
        ),
    }
