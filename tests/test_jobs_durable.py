"""Jobs on the SQLite store of a real ``raafd serve``: nothing accepted is lost by ``kill -9``,
and a job whose attempt was running when its worker died runs again with that attempt counted.
Also the store itself (compare-and-set, idempotency retention, listing) on a real database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from raafd.store.db import open_database
from raafd.store.jobs import Job, bump
from raafd.store.jobs_sqlite import MIGRATIONS, SqliteJobStore
from tests.test_lifecycle import RAAFD, free_port, write_config

JOBS = 1000
SLOW_JOBS = 20  # about 5 s each, submitted first: certainly running when the process dies
DEMO_FAST = """
[providers.demo]
type = "demo"
tokens_per_second = 400.0
reply_words = 4
[providers.slow]
type = "demo"
tokens_per_second = 4.0
reply_words = 20
[agents.slow]
provider = "slow"
[jobs]
workers = 32
"""


def _config(tmp: Path, port: int, extra: str) -> Path:
    path = tmp / "raafd.toml"
    write_config(path, tmp, port, extra)
    return path


@asynccontextmanager
async def serve(
    tmp: Path, port: int, name: str, extra: str = DEMO_FAST
) -> AsyncIterator[trio.Process]:
    """A ``raafd serve`` process, yielded once it has told systemd READY=1."""
    notify_path = tmp / f"notify-{name}.sock"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1"}
    env.pop("RAAFD_CONFIG", None)
    with (tmp / f"stderr-{name}.log").open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [*RAAFD, "serve", "--config", str(_config(tmp, port, extra))],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        with trio.fail_after(60):
            while b"READY=1" not in await notify.recv(4096):
                pass
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.fail_after(10):
            await proc.wait()
        notify.close()


async def test_kill_9_with_1000_accepted_jobs_loses_none_and_runs_none_twice_silently(
    tmp_path: Path,
) -> None:
    port = free_port()
    accepted: list[str] = []
    async with serve(tmp_path, port, "first") as proc:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=32)
        ) as client:

            async def post(n: int) -> None:
                body: dict[str, Any] = {"input": f"job {n}"}
                if n < SLOW_JOBS:
                    body.update(agent="slow", priority="high")
                response = await client.post("/v1/jobs", json=body)
                assert response.status_code == 202, response.text
                accepted.append(response.json()["job"])

            with trio.fail_after(120):
                for start in range(0, JOBS, 50):
                    async with trio.open_nursery() as nursery:
                        for n in range(start, start + 50):
                            nursery.start_soon(post, n)
                # Some have completed and some are running: then the process dies.
                while True:
                    stats = (await client.get("/v1/stats")).json()["jobs"]
                    if stats["completed"] >= 50 and stats["running"] > 0:
                        break
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await proc.wait()
    assert len(accepted) == JOBS

    async with serve(tmp_path, port, "second") as proc:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            limits=httpx.Limits(max_connections=16),
            # Above the long poll's wait=60: a recovered slow job runs about 5 s again, past
            # httpx's default 5 s read timeout.
            timeout=httpx.Timeout(90.0, connect=10.0),
        ) as client:
            with trio.fail_after(240):
                recovered = (await client.get("/v1/stats")).json()["jobs"]["lease_recoveries"]
                assert recovered > 0
                found: list[dict[str, Any]] = []
                limiter = trio.CapacityLimiter(16)

                async def fetch(job_id: str) -> None:
                    async with limiter:
                        response = await client.get(f"/v1/jobs/{job_id}", params={"wait": 60})
                        found.append(response.json())

                async with trio.open_nursery() as nursery:
                    for job_id in accepted:
                        nursery.start_soon(fetch, job_id)
                assert sorted(j["job"] for j in found) == sorted(accepted)
                twice = 0
                for job in found:
                    assert job["status"] == "completed", job
                    outcomes = [a["outcome"] for a in job["attempt_history"]]
                    # Exactly one attempt completed; a second attempt only after a first that
                    # was running when the process died, and then `attempts` says 2.
                    assert outcomes.count("complete") == 1, job
                    if job["attempts"] == 2:
                        assert outcomes == ["node_lost", "complete"], job
                        twice += 1
                    else:
                        assert job["attempts"] == 1 and outcomes == ["complete"], job
                assert twice == recovered
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0


async def test_sigterm_puts_running_jobs_back_without_counting_the_attempt(
    tmp_path: Path,
) -> None:
    port = free_port()
    # Answers of 60 s: still running when the drain's grace (5 s) ends.
    long = '[providers.demo]\ntype = "demo"\ntokens_per_second = 1.0\nreply_words = 60\n'
    ids: list[str] = []
    async with serve(tmp_path, port, "draining", long + "[jobs]\nworkers = 2\n") as proc:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            with trio.fail_after(60):
                for n in range(3):
                    response = await client.post("/v1/jobs", json={"input": f"long {n}"})
                    ids.append(response.json()["job"])
                while (await client.get("/v1/stats")).json()["jobs"]["running"] < 2:
                    pass
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
    async with serve(tmp_path, port, "after") as proc:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            with trio.fail_after(60):
                assert (await client.get("/v1/stats")).json()["jobs"]["lease_recoveries"] == 0
                done = [
                    (await client.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
                    for job_id in ids
                ]
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    for job in done:
        assert job["status"] == "completed", job
        outcomes = [a["outcome"] for a in job["attempt_history"]]
        assert outcomes in (["complete"], ["drain", "complete"]), job
        assert job["attempts"] == 1  # the attempt the drain stopped is not counted
    assert sum(len(j["attempt_history"]) == 2 for j in done) == 2  # the two that were running


def _job(job_id: str, now: float, **kw: Any) -> Job:
    return Job(id=job_id, agent="assistant", messages=[], created_at=now, run_at=now, **kw)


async def test_the_sqlite_store_compare_and_sets_and_keeps_keys_for_their_retention(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with open_database(tmp_path / "db.sqlite3", {"jobs": MIGRATIONS}) as db:
            store = SqliteJobStore(db)
            [(a, created)] = await store.insert(
                [_job("a", 100.0, idempotency_key="k")], now=100.0, window=10.0
            )
            assert created
            [(same, created)] = await store.insert(
                [_job("b", 105.0, idempotency_key="k")], now=105.0, window=10.0
            )
            assert not created and same.id == "a"
            [(c, created)] = await store.insert(
                [_job("c", 111.0, idempotency_key="k")], now=111.0, window=10.0
            )
            assert created and c.id == "c"  # the key's retention was over
            running = bump(a, state="running")
            assert await store.update(running)
            assert not await store.update(bump(a, state="cancelled"))  # lost: stale version
            assert (await store.get("a")) == running
            await store.renew([("a", 500.0)])
            renewed = await store.get("a")
            assert renewed is not None and renewed.lease_until == 500.0
            assert renewed.version == running.version
            assert {j.id for j in await store.active()} == {"a", "c"}
            page, cursor = await store.find(state=None, agent=None, limit=1, cursor=None)
            assert [j.id for j in page] == ["c"] and cursor is not None
            page, cursor = await store.find(state=None, agent=None, limit=1, cursor=cursor)
            assert [j.id for j in page] == ["a"] and cursor is None
            done = bump(running, state="completed", finished_at=120.0)
            assert await store.update(done)
            assert await store.counts() == {"completed": 1, "queued": 1}
            assert await store.purge(states=["completed"], before=121.0) == 1
            assert await store.get("a") is None


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
