"""The job model: what a job is, and the rules that move it, as pure functions of (job, event,
now). No I/O, no clock, no randomness of its own (jitter comes in as a number).

The rule of this file, which everything else in the jobs package serves:

    A job's state changes only through :func:`start_attempt`, :func:`finish_attempt`,
    :func:`recover`, :func:`requeue`, :func:`cancel`, :func:`retry` and :func:`due`, and each
    returns the job it makes (or None: that event does not apply in that state). The store
    writes what they return; nothing else edits a job.

States::

    scheduled ──due──▶ queued ──start──▶ running ──complete──▶ completed
        ▲                 ▲                 │ ──retryable error, attempts left──▶ failed
        │                 │                 │ ──error, none left or not retryable──▶ dead
        │                 │                 │ ──cancel──▶ cancelled
        │                 └──recover/drain──┘
        └─ failed (its backoff is its run_at; due → queued)

``completed``, ``dead`` and ``cancelled`` are terminal; ``retry`` takes a dead job back to
``queued`` with fresh attempts.

**Priority** is 0 (most urgent) to 9; ``high`` is 0, ``normal`` 5, ``low`` 9. **Aging**: a
queued job's effective priority improves by one for every ``aging`` seconds it has waited
(never below 0). Workers take the job with the lowest effective priority, the longest waiting
first among equals (FIFO inside a priority). So a ``low`` job waits at most ``9 * aging``
seconds behind newer work of any priority before it ranks with ``high``, and after that its
age puts it first: low never starves.

**Attempts** count the attempts that began. A worker that dies mid-attempt (``kill -9``, a
lost lease) leaves the attempt counted: at-least-once, visible as ``attempts``. A drain puts a
running job back without counting the interrupted attempt (the daemon stopped it, not the job).

**Backoff**: after failed attempt ``n`` the job waits ``min(backoff_max, backoff * 2^(n-1))``
seconds, times ``1 + jitter * (2u - 1)`` for ``u`` in [0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
from attrs import field, frozen

from raafd.protocol.codes import ErrorCode
from raafd.store.jobs import ACTIVE_STATES, STATES, TERMINAL_STATES, Attempt, Job, JobState

__all__ = [
    "ACTIVE_STATES",
    "PRIORITIES",
    "STATES",
    "TERMINAL_STATES",
    "Attempt",
    "Job",
    "JobState",
    "Outcome",
    "backoff_delay",
    "cancel",
    "due",
    "effective_priority",
    "finish_attempt",
    "is_retryable",
    "next_occurrence",
    "parse_priority",
    "rank",
    "recover",
    "requeue",
    "retry",
    "start_attempt",
]

PRIORITIES: Final[dict[str, int]] = {"high": 0, "normal": 5, "low": 9}

# Error codes worth another attempt: the upstream or the daemon had a passing problem. Anything
# else (a bad request, an unknown agent, max_turns) would fail the same way again.
_RETRYABLE: Final = frozenset(
    {
        ErrorCode.UPSTREAM_ERROR,
        ErrorCode.TIMEOUT,
        ErrorCode.UNAVAILABLE,
        ErrorCode.INTERNAL,
        ErrorCode.TOO_MANY_STREAMS,
        ErrorCode.RATE_LIMITED,
        ErrorCode.NODE_LOST,
    }
)


@frozen
class Outcome:
    """How an attempt's stream ended: its terminal event's kind and fields, or what the worker
    saw instead (``timeout``: the job's own timeout ended it)."""

    kind: Literal["complete", "error", "cancelled", "timeout"]
    fields: Mapping[str, Any] = field(factory=dict)


def parse_priority(value: str | int) -> int:
    """``high``/``normal``/``low`` or an integer 0-9 → 0-9; ValueError otherwise."""
    if isinstance(value, str):
        if value in PRIORITIES:
            return PRIORITIES[value]
        raise ValueError("must be high, normal, low or an integer 0 to 9")
    if isinstance(value, bool) or not 0 <= value <= 9:
        raise ValueError("must be high, normal, low or an integer 0 to 9")
    return value


def effective_priority(priority: int, queued_at: float, now: float, aging: float) -> int:
    """``priority`` improved by one per ``aging`` seconds waited, never below 0."""
    if aging <= 0 or now <= queued_at:
        return priority
    return max(0, priority - int((now - queued_at) // aging))


def rank(priority: int, queued_at: float, now: float, aging: float) -> tuple[int, float]:
    """The order workers take queued jobs in: lowest first."""
    return effective_priority(priority, queued_at, now, aging), queued_at


def backoff_delay(attempt: int, base: float, cap: float, jitter: float, u: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based); see the module docstring."""
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    return max(0.0, delay * (1.0 + jitter * (2.0 * u - 1.0)))


def is_retryable(error: Mapping[str, Any] | None) -> bool:
    return error is not None and error.get("code") in _RETRYABLE


def due(job: Job, now: float) -> Job | None:
    """A ``scheduled`` or ``failed`` job whose ``run_at`` has come → ``queued``."""
    if job.state not in ("scheduled", "failed") or job.run_at > now:
        return None
    return attrs.evolve(job, state="queued", queued_at=job.run_at)


def start_attempt(job: Job, stream: str, now: float, lease: float) -> Job | None:
    """A worker takes a ``queued`` job: ``running``, the attempt counted, a lease held."""
    if job.state != "queued":
        return None
    return attrs.evolve(
        job,
        state="running",
        attempts=job.attempts + 1,
        history=[*job.history, Attempt(stream=stream, started_at=now)],
        started_at=now,
        lease_until=now + lease,
        error=None,
    )


def _close_attempt(job: Job, now: float, outcome: str, error: dict[str, Any] | None) -> list[Any]:
    if not job.history:
        return []
    last = attrs.evolve(job.history[-1], finished_at=now, outcome=outcome, error=error)
    return [*job.history[:-1], last]


def finish_attempt(
    job: Job,
    outcome: Outcome,
    now: float,
    *,
    backoff_max: float,
    jitter: float,
    u: float,
) -> Job | None:
    """The attempt's stream ended: ``completed``, ``failed`` (a retry is due at ``run_at``),
    ``dead`` or ``cancelled``. None when the job is no longer running (a cancel won)."""
    if job.state != "running":
        return None
    done: dict[str, Any] = {"lease_until": None, "finished_at": now}
    if outcome.kind == "complete":
        result = {
            "final_response": outcome.fields.get("final_response"),
            "usage": outcome.fields.get("usage"),
            "finish_reason": outcome.fields.get("finish_reason"),
        }
        history = _close_attempt(job, now, "complete", None)
        return attrs.evolve(job, state="completed", result=result, history=history, **done)
    if outcome.kind == "cancelled" and outcome.fields.get("reason") in ("client", "admin"):
        history = _close_attempt(job, now, "cancelled", None)
        return attrs.evolve(job, state="cancelled", history=history, **done)
    if outcome.kind == "error":
        raw = outcome.fields.get("error")
        error = dict(raw) if isinstance(raw, Mapping) else {"code": ErrorCode.INTERNAL}
    elif outcome.kind == "timeout":
        error = {"code": ErrorCode.TIMEOUT, "message": f"the attempt ran past {job.timeout} s"}
    else:  # cancelled for another reason (the stream's own timeouts, detached)
        reason = outcome.fields.get("reason")
        error = {"code": ErrorCode.TIMEOUT, "message": f"the stream was cancelled ({reason})"}
    history = _close_attempt(job, now, outcome.kind, error)
    if is_retryable(error) and job.attempts < job.max_attempts:
        wait = backoff_delay(job.attempts, job.backoff, backoff_max, jitter, u)
        return attrs.evolve(
            job, state="failed", error=error, history=history, run_at=now + wait, **done
        )
    return attrs.evolve(job, state="dead", error=error, history=history, **done)


def recover(job: Job, now: float) -> Job | None:
    """A ``running`` job whose worker died (found at startup, or its lease expired): back to
    ``queued`` with the attempt counted, or ``dead`` when that was its last attempt."""
    if job.state != "running":
        return None
    error = {"code": ErrorCode.NODE_LOST, "message": "the worker running this attempt died"}
    history = _close_attempt(job, now, "node_lost", error)
    if job.attempts >= job.max_attempts:
        return attrs.evolve(
            job, state="dead", error=error, history=history, lease_until=None, finished_at=now
        )
    return attrs.evolve(
        job, state="queued", error=error, history=history, lease_until=None, queued_at=now
    )


def requeue(job: Job, now: float) -> Job | None:
    """Drain: a ``running`` job the daemon stopped goes back to ``queued``; the interrupted
    attempt is not counted (its stream stays in the history, outcome ``drain``)."""
    if job.state != "running":
        return None
    history = _close_attempt(job, now, "drain", None)
    return attrs.evolve(
        job,
        state="queued",
        attempts=max(0, job.attempts - 1),
        history=history,
        lease_until=None,
        queued_at=job.queued_at,  # keeps its place in the queue
    )


def cancel(job: Job, now: float) -> Job | None:
    """Any job not yet terminal → ``cancelled``; None for a terminal one."""
    if job.terminal:
        return None
    history = _close_attempt(job, now, "cancelled", None) if job.state == "running" else None
    return attrs.evolve(
        job,
        state="cancelled",
        finished_at=now,
        lease_until=None,
        history=job.history if history is None else history,
    )


def retry(job: Job, now: float) -> Job | None:
    """``POST /v1/jobs/{id}/retry``: a ``dead`` job → ``queued`` with ``max_attempts`` more."""
    if job.state != "dead":
        return None
    return attrs.evolve(
        job,
        state="queued",
        max_attempts=job.attempts + job.max_attempts,
        queued_at=now,
        run_at=now,
        finished_at=None,
        error=None,
    )


def next_occurrence(job: Job, now: float) -> float | None:
    """A recurring job's next run time: ``run_at + every``, skipping runs missed while nothing
    ran (at most one run is owed, never a burst of catch-up runs)."""
    if job.every is None:
        return None
    nxt = job.run_at + job.every
    if nxt <= now:
        nxt += math.ceil((now - nxt) / job.every) * job.every
        if nxt <= now:
            nxt += job.every
    return nxt
