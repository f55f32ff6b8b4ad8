"""Batches on a real daemon under ``autojump_clock``: never more than ``max_concurrent`` of its
jobs at once, results in input order, one agent over many inputs or many agents over one input,
cancel of what has not ended."""

from __future__ import annotations

from typing import Any

import httpx
import trio
import trio.testing

from tests.waiting import wait_until

DEMO = {"providers": {"demo": {"tokens_per_second": 20.0, "reply_words": 4}}}


async def test_a_batch_runs_at_most_max_concurrent_jobs_and_keeps_input_order(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"workers": 8, "max_wait": 1000.0}, **DEMO)
    streams = rd.daemon.streams
    peak = 0

    def watch() -> bool:
        nonlocal peak
        peak = max(peak, streams.running_count())
        return False

    inputs = [f"input number {n}" for n in range(10)]
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client,
    ):
        nursery.start_soon(wait_until, watch)
        with trio.fail_after(300):
            created = await client.post("/v1/batches", json={"inputs": inputs, "max_concurrent": 3})
            assert created.status_code == 202, created.text
            batch = created.json()
            assert len(batch["jobs"]) == 10
            done = (await client.get(f"/v1/batches/{batch['batch']}", params={"wait": 1000})).json()
        nursery.cancel_scope.cancel()
    assert done["status"] == "completed"
    assert done["counts"]["completed"] == 10 and done["progress"] == 1.0
    assert [r["job"] for r in done["results"]] == batch["jobs"]
    # The demo provider echoes the input: each result is its own input's, in input order.
    for text, result in zip(inputs, done["results"], strict=True):
        assert result["result"]["final_response"].startswith(text)
    assert peak == 3


async def test_one_input_through_many_agents_and_cancel_of_the_rest(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        agents={"assistant": {"provider": "demo"}, "b": {"provider": "demo"}},
        jobs={"max_wait": 1000.0},
        **DEMO,
    )
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(300):
            bad = await client.post(
                "/v1/batches", json={"agents": ["assistant", "nobody"], "input": "x"}
            )
            assert bad.status_code == 404 and bad.json()["error"]["field"] == "agents.1"
            created = await client.post(
                "/v1/batches",
                json={
                    "agents": ["assistant", "b", "assistant"],
                    "input": "hi",
                    "max_concurrent": 1,
                },
            )
            batch = created.json()
            first = await client.get(f"/v1/jobs/{batch['jobs'][0]}", params={"wait": 1000})
            assert first.json()["status"] == "completed"
            cancelled = (await client.delete(f"/v1/batches/{batch['batch']}")).json()
            states = [r["status"] for r in cancelled["results"]]
            assert states[0] == "completed" and states[2] == "cancelled"
            assert [r["agent"] for r in cancelled["results"]] == ["assistant", "b", "assistant"]
            done = (await client.get(f"/v1/batches/{batch['batch']}", params={"wait": 1000})).json()
            assert done["status"] == "cancelled"
