"""Background jobs over HTTP against a real daemon: submit, status with ``?wait``, listing,
idempotency, cancel of a queued and of a running job, retry of a dead one, bad input.

Most run under ``autojump_clock`` with the memory store (nothing touches the disk); the durable
path (the SQLite store, restarts) is in test_jobs_durable.py."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from raafd.admin.client import admin_call
from raafd.admin.ctl import main as ctl_main
from raafd.errors import RaafdError
from tests.waiting import wait_until

FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 5}}}
SLOW = {"providers": {"demo": {"tokens_per_second": 5.0, "reply_words": 50}}}


async def submit(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("input", "hello")
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()
    return data


async def test_a_job_runs_as_a_stream_and_its_status_follows_the_terminal_event(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            job = await submit(client, metadata={"who": "test"})
            assert job["status"] == "queued"
            assert job["attempts"] == 0
            done = (await client.get(f"/v1/jobs/{job['job']}", params={"wait": 30})).json()
            assert done["status"] == "completed"
            assert done["attempts"] == 1
            assert done["streams"] == [f"{job['job']}.1"]
            assert done["result"]["final_response"]
            assert done["result"]["usage"]["completion_tokens"] > 0
            assert done["metadata"] == {"who": "test"}
            # The attempt's stream is an ordinary stream: its log ends with `complete`.
            stream = (await client.get(f"/v1/streams/{done['stream']}")).json()
            assert stream["status"] == "complete"
            listing = (await client.get("/v1/jobs", params={"status": "completed"})).json()
            assert [row["job"] for row in listing["jobs"]] == [job["job"]]
            stats = (await client.get("/v1/stats")).json()["jobs"]
            assert stats["completed"] == 1
            assert stats["workers"] == 4


async def test_the_same_idempotency_key_returns_the_same_job(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            first = await submit(client, idempotency_key="k-1")
            again = await client.post("/v1/jobs", json={"input": "other", "idempotency_key": "k-1"})
            assert again.status_code == 200
            assert again.json()["job"] == first["job"]
            other = await submit(client, idempotency_key="k-2")
            assert other["job"] != first["job"]


async def test_cancel_of_a_queued_and_of_a_running_job(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(jobs={"workers": 1}, **SLOW)
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            running = await submit(client)
            queued = await submit(client)
            jobs = rd.daemon.jobs
            await wait_until(lambda: jobs.stream_of(running["job"]) is not None)
            stream = jobs.stream_of(running["job"])
            cancelled = await client.delete(f"/v1/jobs/{queued['job']}")
            assert cancelled.json()["status"] == "cancelled"
            assert cancelled.json()["attempts"] == 0
            cancelled = await client.delete(f"/v1/jobs/{running['job']}")
            assert cancelled.json()["status"] == "cancelled"
            # The attempt's stream ends `cancelled` {client}: the upstream request is closed.
            await stream.wait()
            assert stream.terminal.kind == "cancelled"
            assert stream.terminal.fields["reason"] == "client"
            again = await client.delete(f"/v1/jobs/{running['job']}")
            assert again.status_code == 409
            final = (await client.get(f"/v1/jobs/{running['job']}")).json()
            assert final["status"] == "cancelled"
            assert final["attempts"] == 1


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"agent": "nobody", "input": "x"}, 404, "agent"),
        ({"input": "x", "delay": -1}, 400, "delay"),
        ({"input": "x", "metadata": {"blob": "x" * 10_000}}, 400, "metadata"),
        ({"input": "x", "priority": "urgent"}, 400, "priority"),
        ({"input": "x", "priority": 12}, 400, "priority"),
        ({"input": "x", "max_attempts": 0}, 400, "max_attempts"),
        ({"input": "x", "callback_url": "ftp://x"}, 400, "callback_url"),
        ({"input": "x", "every": 0.001}, 400, "every"),
        ({"input": "x", "surprise": 1}, 400, "surprise"),
        ({}, 400, "input"),
    ],
)
async def test_bad_input_is_refused_with_the_field_named(
    start_daemon: Any,
    autojump_clock: trio.testing.MockClock,
    body: dict[str, Any],
    status: int,
    field: str,
) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            response = await client.post("/v1/jobs", json=body)
            assert response.status_code == status, response.text
            assert response.json()["error"]["field"] == field
            assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_an_unknown_job_is_not_found(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            response = await client.get("/v1/jobs/jb_nothing")
            assert response.status_code == 404
            assert response.json()["error"]["field"] == "job"


async def test_the_admin_commands_list_show_retry_cancel_and_purge_jobs(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**FAST)
    sock = rd.daemon.config.admin_socket_path
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            done = await submit(client)
            await client.get(f"/v1/jobs/{done['job']}", params={"wait": 30})
            later = await submit(client, delay=3600)
        rows = await admin_call(sock, "jobs", {"status": "completed"})
        assert [r["job"] for r in rows] == [done["job"]]
        shown = await admin_call(sock, "job", {"id": later["job"]})
        assert shown["status"] == "scheduled"
        cancelled = await admin_call(sock, "job", {"id": later["job"], "action": "cancel"})
        assert cancelled["status"] == "cancelled"
        with pytest.raises(RaafdError) as refused:
            await admin_call(sock, "job", {"id": later["job"], "action": "retry"})
        assert refused.value.code == "conflict"
        with pytest.raises(RaafdError) as bad:
            await admin_call(sock, "jobs-purge", {"status": ["completed"], "older_than": -1})
        assert bad.value.field == "args.older_than"
        await trio.sleep(10)
        purged = await admin_call(
            sock, "jobs-purge", {"status": ["completed", "cancelled"], "older_than": 5}
        )
        assert purged == {"purged": 2}
        assert await admin_call(sock, "jobs", {}) == []


async def test_submitting_needs_the_job_permission_for_the_agent(
    start_daemon: Any, make_config: Any, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        auth={
            "users": {
                "runner": {"token": "t-runner", "roles": ["runner"]},
                "worker": {"token": "t-worker", "roles": ["worker"]},
            },
            "roles": {
                "runner": {"agents": ["assistant"]},
                "worker": {"agents": ["assistant"], "jobs": True},
            },
        },
        **FAST,
    )
    rd = await start_daemon(config)
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            refused = await client.post(
                "/v1/jobs", json={"input": "x"}, headers={"authorization": "Bearer t-runner"}
            )
            assert refused.status_code == 403
            assert refused.json()["error"]["field"] == "agent"
            batch = await client.post(
                "/v1/batches",
                json={"agents": ["assistant"], "input": "x"},
                headers={"authorization": "Bearer t-runner"},
            )
            assert batch.status_code == 403
            accepted = await client.post(
                "/v1/jobs", json={"input": "x"}, headers={"authorization": "Bearer t-worker"}
            )
            assert accepted.status_code == 202


async def test_raafd_ctl_jobs_job_and_purge(start_daemon: Any) -> None:
    rd = await start_daemon(**FAST)
    sock = str(rd.daemon.config.admin_socket_path)

    async def ctl(*args: str) -> tuple[int, str]:
        out = io.StringIO()

        def call() -> int:
            with contextlib.redirect_stdout(out):
                return ctl_main([*args, "--socket", sock, "--json"])

        code = await trio.to_thread.run_sync(call)
        # The daemon's audit lines share this process's stdout: ctl's JSON starts a line.
        lines = out.getvalue().splitlines()
        starts = [i for i, line in enumerate(lines) if line[:1] in ("{", "[")]
        return code, "\n".join(lines[starts[0] :]) if starts else ""

    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            job = await submit(client)
            await client.get(f"/v1/jobs/{job['job']}", params={"wait": 30})
        code, text = await ctl("jobs", "--status", "completed")
        assert code == 0 and [r["job"] for r in json.loads(text)] == [job["job"]]
        code, text = await ctl("job", job["job"])
        assert code == 0 and json.loads(text)["status"] == "completed"
        code, _ = await ctl("job", "retry", job["job"])
        assert code == 1  # only dead jobs are retried
        code, text = await ctl("jobs", "purge", "--status", "completed", "--older-than", "1d")
        assert code == 0 and json.loads(text) == {"purged": 0}
        code, text = await ctl("jobs", "purge", "--status", "completed", "--older-than", "0")
        assert code == 0 and json.loads(text) == {"purged": 1}
        code, _ = await ctl("jobs", "purge", "--status", "completed")
        assert code == 2  # --older-than is required


async def test_a_workflow_job_runs_its_agents_on_the_input(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        agents={"assistant": {"provider": "demo"}, "b": {"provider": "demo"}}, **FAST
    )
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
            flow = {"mode": "sequential", "agents": ["assistant", "b"]}
            job = await submit(client, input="flow", workflow=flow)
            assert job["workflow"]["agents"] == ["assistant", "b"]
            done = (await client.get(f"/v1/jobs/{job['job']}", params={"wait": 30})).json()
            assert done["status"] == "completed" and done["result"]["final_response"]
            stream = (await client.get(f"/v1/streams/{done['stream']}")).json()
            assert stream["status"] == "complete"
            bad = {"mode": "sequential", "agents": ["assistant", "nobody"]}
            refused = await client.post("/v1/jobs", json={"input": "x", "workflow": bad})
            assert refused.status_code == 404
            assert refused.json()["error"]["field"] == "workflow.agents.1"
            parallel = {"mode": "parallel", "agents": ["assistant", "b"]}
            refused = await client.post("/v1/jobs", json={"input": "x", "workflow": parallel})
            assert refused.status_code == 400
            assert refused.json()["error"]["field"] == "workflow.synthesizer"
