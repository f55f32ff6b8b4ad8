"""Which job runs when, on a real daemon under ``autojump_clock`` (memory store): priority order
and aging, delays, retries with backoff to dead and a retry of the dead job, recurring jobs,
and the per-agent limit."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.test_jobs_http import submit

# One job takes 10 s: a blocker that keeps a single worker busy while others queue.
SLOW = {"providers": {"demo": {"tokens_per_second": 1.0, "reply_words": 10}}}
FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 5}}}
DOWN = {
    "providers": {
        "down": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0}
    },
    "agents": {"assistant": {"provider": "demo"}, "flaky": {"provider": "down"}},
}


async def finished(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 1000})).json()
    return data


async def test_strict_priority_with_fifo_inside_a_priority(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"workers": 1, "aging": 0.0, "max_wait": 1000.0}, **SLOW)
    with trio.fail_after(300):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            blocker = await submit(client)
            order = ["low", "normal", "high", 3, "high"]
            jobs = [await submit(client, priority=p) for p in order]
            await finished(client, blocker["job"])
            done = [await finished(client, j["job"]) for j in jobs]
    started = sorted(range(len(done)), key=lambda i: done[i]["started_at"])
    assert [order[i] for i in started] == ["high", "high", 3, "normal", "low"]
    assert started[:2] == [2, 4]  # the first high before the second


async def test_aging_lets_a_waiting_low_job_overtake_a_new_high_one(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"workers": 1, "aging": 1.0, "max_wait": 1000.0}, **SLOW)
    with trio.fail_after(300):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            blocker = await submit(client)
            low = await submit(client, priority="low")
            await trio.sleep(9.5)  # the blocker still runs; low has aged 9 steps
            high = await submit(client, priority="high")
            await finished(client, blocker["job"])
            low_done, high_done = (
                await finished(client, low["job"]),
                await finished(client, high["job"]),
            )
    assert low_done["started_at"] < high_done["started_at"]


async def test_a_delayed_job_is_scheduled_and_starts_at_its_time(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"max_wait": 1000.0}, **FAST)
    with trio.fail_after(300):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            job = await submit(client, delay=100)
            assert job["status"] == "scheduled"
            assert job["run_at"] == pytest.approx(job["created_at"] + 100)
            later = await submit(client, run_at=job["created_at"] + 50)
            done = await finished(client, job["job"])
            first = await finished(client, later["job"])
    assert done["status"] == "completed"
    assert done["started_at"] - done["created_at"] == pytest.approx(100, abs=0.05)
    assert first["started_at"] - job["created_at"] == pytest.approx(50, abs=0.05)


async def test_retryable_failures_back_off_exponentially_then_the_job_is_dead(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"jitter": 0.0, "max_wait": 1000.0}, **DOWN)
    with trio.fail_after(300):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            job = await submit(client, agent="flaky", max_attempts=3, backoff=10)
            dead = await finished(client, job["job"])
            assert dead["status"] == "dead"
            assert dead["attempts"] == 3
            assert dead["error"]["code"] == "upstream_error"
            starts = [a["started_at"] for a in dead["attempt_history"]]
            ends = [a["finished_at"] for a in dead["attempt_history"]]
            assert starts[1] - ends[0] == pytest.approx(10, abs=0.05)
            assert starts[2] - ends[1] == pytest.approx(20, abs=0.05)
            stats = (await client.get("/v1/stats")).json()["jobs"]
            assert (stats["retries"], stats["dead"]) == (2, 1)
            # A retry of the dead job gives it max_attempts more attempts.
            again = await client.post(f"/v1/jobs/{job['job']}/retry")
            assert again.status_code == 202 and again.json()["status"] == "queued"
            assert (await client.post(f"/v1/jobs/{job['job']}/retry")).status_code == 409
            dead_again = await finished(client, job["job"])
            assert (dead_again["status"], dead_again["attempts"]) == ("dead", 6)


async def test_a_recurring_job_creates_its_next_run_linked_to_the_series(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"max_wait": 1000.0}, **FAST)
    with trio.fail_after(300):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            first = await submit(client, every=30)
            one = await finished(client, first["job"])
            assert one["status"] == "completed" and one["series"] == first["job"]
            two_id = one["next_job"]
            two = await finished(client, two_id)
            assert two["status"] == "completed" and two["series"] == first["job"]
            assert two["run_at"] == pytest.approx(one["run_at"] + 30)
            assert two["started_at"] == pytest.approx(one["run_at"] + 30, abs=0.05)
            # Cancelling the scheduled next run ends the series.
            three = (await client.get(f"/v1/jobs/{two['next_job']}")).json()
            assert three["status"] == "scheduled"
            cancelled = await client.delete(f"/v1/jobs/{three['job']}")
            assert cancelled.json()["status"] == "cancelled"


async def test_the_per_agent_limit_holds_jobs_back_without_holding_workers(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        jobs={"workers": 4, "max_per_agent": 1, "max_wait": 1000.0},
        agents={"assistant": {"provider": "demo"}, "other": {"provider": "demo"}},
        **SLOW,
    )
    jobs = rd.daemon.jobs
    with trio.fail_after(300):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            a = [await submit(client) for _ in range(3)]
            b = await submit(client, agent="other")
            done_b = await finished(client, b["job"])
            assert jobs.stats()["running"] <= 2
            done_a = [await finished(client, j["job"]) for j in a]
    # `other` ran beside the first assistant job; the assistant jobs ran one at a time.
    assert done_b["started_at"] < done_a[1]["started_at"]
    for earlier, later in itertools.pairwise(done_a):
        assert later["started_at"] >= earlier["finished_at"]


async def test_ended_jobs_are_forgotten_after_the_retention(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"retention": 300.0}, **FAST)
    with trio.fail_after(600):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            job = await submit(client)
            await finished(client, job["job"])
            later = await submit(client, delay=3000)  # not ended: kept whatever its age
            await trio.sleep(200)
            assert (await client.get(f"/v1/jobs/{job['job']}")).status_code == 200
            await trio.sleep(200)  # past 300 s and the next sweep
            assert (await client.get(f"/v1/jobs/{job['job']}")).status_code == 404
            assert (await client.get(f"/v1/jobs/{later['job']}")).json()["status"] == "scheduled"
