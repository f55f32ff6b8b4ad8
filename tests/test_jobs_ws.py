"""Jobs over the WebSocket and from the Python client: job.submit / status / cancel / watch,
batch.submit / status, a job's events watched live and resumed after dropped connections."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing
from trio_websocket import open_websocket_url

from raafd.client import open_client
from raafd.protocol.codes import SUBPROTOCOL
from tests.test_client import assert_whole_stream, kick_all

LONG = {"providers": {"demo": {"tokens_per_second": 1000, "reply_words": 300}}}


async def test_a_job_watched_live_resumes_after_drops_and_ends_with_its_result(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**LONG)
    kicks = [30, 150]  # a delivery may coalesce content: a seq at or past each one
    events: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with open_client(rd.ws_url, backoff_base=0.01) as client:
            job = await client.submit_job("watch me", priority="high", metadata={"n": 1})
            assert job.status in ("queued", "running")
            async for event in job.events():
                events.append(event)
                if kicks and event["seq"] >= kicks[0]:
                    kicks.pop(0)
                    kick_all(rd)
            assert job.status == "completed"
            done = await job.wait(5)
            assert client.reconnects >= 1  # the second kick may find it still reconnecting
    assert_whole_stream(events)
    assert events[-1]["event"] == "complete"
    assert done["result"]["final_response"] == events[-1]["final_response"]
    assert done["attempts"] == 1 and done["metadata"] == {"n": 1}


async def test_ws_job_commands_answer_with_the_ref_and_errors_name_the_field(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 5.0, "reply_words": 50}})
    with trio.fail_after(60):
        async with open_websocket_url(rd.ws_url, subprotocols=[SUBPROTOCOL]) as ws:

            async def call(**message: Any) -> dict[str, Any]:
                await ws.send_message(json.dumps(message))
                while True:
                    reply: dict[str, Any] = json.loads(await ws.get_message())
                    if reply.get("ref") == message.get("ref") and reply["type"] != "welcome":
                        return reply

            bad = await call(type="job.submit", input="x", delay=-1, ref="b")
            assert (bad["type"], bad["code"], bad["field"]) == ("error", "bad_request", "delay")
            unknown = await call(type="job.submit", input="x", agent="nobody", ref="u")
            assert (unknown["code"], unknown["field"]) == ("not_found", "agent")
            submitted = await call(type="job.submit", input="hello", ref="s")
            assert submitted["type"] == "job.submitted" and submitted["created"] is True
            job_id = submitted["job"]["job"]
            status = await call(type="job.status", job=job_id, ref="q")
            assert status["job"]["job"] == job_id
            while status["job"]["stream"] is None:
                await trio.sleep(0.01)
                status = await call(type="job.status", job=job_id, ref="q")
            watching = await call(type="job.watch", job=job_id, ref="w")
            assert watching["stream"] == f"{job_id}.1" and watching["status"] == "running"
            cancelled = await call(type="job.cancel", job=job_id, ref="c")
            assert cancelled["job"]["status"] == "cancelled"
            batch = await call(type="batch.submit", inputs=["a", "b"], max_concurrent=1, ref="t")
            assert batch["type"] == "batch.submitted" and len(batch["jobs"]) == 2
            shown = await call(type="batch.status", batch=batch["batch"], ref="v")
            assert [r["job"] for r in shown["results"]] == batch["jobs"]
