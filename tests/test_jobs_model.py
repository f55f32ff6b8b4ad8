"""The job model's rules as pure functions of (job, event, now), at exact times."""

from __future__ import annotations

import attrs
import pytest

from raafd.jobs.model import (
    Outcome,
    backoff_delay,
    cancel,
    due,
    effective_priority,
    finish_attempt,
    next_occurrence,
    rank,
    recover,
    requeue,
    retry,
    start_attempt,
)
from raafd.protocol.jobs import check_priority
from raafd.store.jobs import Job

NOW = 1_000.0


def job(**kw: object) -> Job:
    base: dict[str, object] = {
        "id": "jb_1",
        "agent": "assistant",
        "messages": [],
        "created_at": NOW,
        "run_at": NOW,
        "queued_at": NOW,
    }
    base.update(kw)
    return Job(**base)  # type: ignore[arg-type]


def finish(j: Job, outcome: Outcome, now: float = NOW + 5, u: float = 0.5) -> Job | None:
    return finish_attempt(j, outcome, now, backoff_max=300.0, jitter=0.2, u=u)


def test_priority_names_and_numbers() -> None:
    assert [check_priority(p) for p in ("high", "normal", "low", 0, 9)] == [0, 5, 9, 0, 9]
    for bad in ("urgent", 10, -1, True, 1.5):
        with pytest.raises(ValueError):
            check_priority(bad)


def test_aging_improves_priority_one_step_per_interval_never_below_zero() -> None:
    assert effective_priority(9, 100.0, 100.0, 60.0) == 9
    assert effective_priority(9, 100.0, 159.9, 60.0) == 9
    assert effective_priority(9, 100.0, 160.0, 60.0) == 8
    assert effective_priority(9, 100.0, 100.0 + 9 * 60, 60.0) == 0
    assert effective_priority(9, 100.0, 100.0 + 99 * 60, 60.0) == 0
    assert effective_priority(9, 100.0, 10_000.0, 0.0) == 9  # aging off


def test_rank_is_priority_then_fifo_and_an_old_low_job_overtakes_new_high_ones() -> None:
    now = 10_000.0
    high_new = rank(0, now, now, 60.0)
    normal_old = rank(5, now - 10, now, 60.0)
    low_older = rank(9, now - 20, now, 60.0)
    assert sorted([low_older, normal_old, high_new]) == [high_new, normal_old, low_older]
    first_high, second_high = rank(0, now - 2, now, 60.0), rank(0, now - 1, now, 60.0)
    assert first_high < second_high  # FIFO inside a priority
    starved_low = rank(9, now - 9 * 60, now, 60.0)
    assert starved_low < high_new  # ranks with high, and is older


def test_backoff_doubles_up_to_the_cap_with_jitter_around_it() -> None:
    assert [backoff_delay(n, 2.0, 30.0, 0.0, 0.9) for n in (1, 2, 3, 4, 5)] == [
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
    ]
    assert backoff_delay(2, 2.0, 30.0, 0.2, 0.0) == pytest.approx(3.2)
    assert backoff_delay(2, 2.0, 30.0, 0.2, 0.5) == pytest.approx(4.0)
    assert backoff_delay(2, 2.0, 30.0, 0.2, 0.999999) == pytest.approx(4.8, abs=1e-4)


def test_an_attempt_counts_and_completes() -> None:
    running = start_attempt(job(), "jb_1.1", NOW, 30.0)
    assert running is not None
    assert (running.state, running.attempts, running.lease_until) == ("running", 1, NOW + 30)
    assert start_attempt(running, "jb_1.2", NOW, 30.0) is None
    done = finish(running, Outcome("complete", {"final_response": "hi", "usage": {}}))
    assert done is not None and done.state == "completed"
    assert done.result == {"final_response": "hi", "usage": {}, "finish_reason": None}
    assert done.history[0].outcome == "complete" and done.history[0].finished_at == NOW + 5


def test_a_retryable_error_waits_its_backoff_then_is_due_and_the_last_one_is_dead() -> None:
    j = job(max_attempts=2, backoff=10.0)
    first = start_attempt(j, "jb_1.1", NOW, 30.0)
    assert first is not None
    upstream = Outcome("error", {"error": {"code": "upstream_error", "message": "502"}})
    failed = finish(first, upstream)
    assert failed is not None and failed.state == "failed"
    assert failed.run_at == NOW + 5 + 10.0  # u = 0.5: exactly the backoff
    assert due(failed, NOW + 14.9) is None
    queued = due(failed, NOW + 15.0)
    assert queued is not None and queued.state == "queued" and queued.queued_at == NOW + 15
    second = start_attempt(queued, "jb_1.2", NOW + 15, 30.0)
    assert second is not None and second.attempts == 2
    dead = finish(second, upstream, NOW + 20)
    assert dead is not None and dead.state == "dead" and dead.error == upstream.fields["error"]


def test_a_bad_request_is_not_retried_and_a_timeout_is() -> None:
    running = start_attempt(job(max_attempts=5), "s", NOW, 30.0)
    assert running is not None
    bad = finish(running, Outcome("error", {"error": {"code": "bad_request", "message": "x"}}))
    assert bad is not None and bad.state == "dead"
    timed_out = finish(running, Outcome("timeout"))
    assert timed_out is not None and timed_out.state == "failed"
    assert timed_out.error is not None and timed_out.error["code"] == "timeout"


def test_a_client_cancel_of_the_stream_cancels_the_job() -> None:
    running = start_attempt(job(), "s", NOW, 30.0)
    assert running is not None
    ended = finish(running, Outcome("cancelled", {"reason": "client"}))
    assert ended is not None and ended.state == "cancelled"


def test_recovery_counts_the_lost_attempt_and_drain_does_not() -> None:
    running = start_attempt(job(max_attempts=2), "s", NOW, 30.0)
    assert running is not None
    back = recover(running, NOW + 100)
    assert back is not None and (back.state, back.attempts) == ("queued", 1)
    assert back.history[0].outcome == "node_lost"
    again = start_attempt(back, "s2", NOW + 101, 30.0)
    assert again is not None
    lost_last = recover(again, NOW + 200)
    assert lost_last is not None and lost_last.state == "dead"
    drained = requeue(running, NOW + 3)
    assert drained is not None and (drained.state, drained.attempts) == ("queued", 0)
    assert drained.history[0].outcome == "drain"
    assert recover(job(), NOW) is None


def test_cancel_and_retry() -> None:
    assert cancel(job(), NOW) is not None
    done = attrs.evolve(job(), state="completed")
    assert cancel(done, NOW) is None
    dead = attrs.evolve(job(max_attempts=3), state="dead", attempts=3)
    again = retry(dead, NOW + 9)
    assert again is not None and again.state == "queued" and again.max_attempts == 6
    assert retry(done, NOW) is None


def test_a_recurring_job_runs_every_interval_without_catch_up_bursts() -> None:
    j = job(every=60.0, run_at=1000.0)
    assert next_occurrence(j, 1010.0) == 1060.0
    assert next_occurrence(j, 1060.0) == 1120.0
    assert next_occurrence(j, 1500.0) == 1540.0  # missed runs are skipped, not replayed
    assert next_occurrence(job(), 1010.0) is None
