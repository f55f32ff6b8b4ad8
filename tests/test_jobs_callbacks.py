"""Job and batch callbacks against a receiving HTTP server: signed as Standard Webhooks (verified
with the spec's own Python library), retried after a 500 with every attempt recorded on the
job, and refused by the SSRF guard on the resolved address (``localhost`` as well as
127.0.0.1)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import attrs
import h11
import httpx
import orjson
import pytest
import trio
import trio.testing
from standardwebhooks.webhooks import Webhook

from raafd.net.webhooks import secret_bytes, signed_headers
from tests.waiting import wait_until

SECRET = "whsec_" + base64.b64encode(b"a-test-secret-of-32-bytes-length").decode()
FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 5}}}


@attrs.define
class Delivery:
    headers: dict[str, str]
    body: bytes


@attrs.define
class Receiver:
    """A plain HTTP server answering each POST with the next status of ``statuses``."""

    statuses: list[int]
    received: list[Delivery] = attrs.field(factory=list)
    port: int = 0

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        headers: dict[str, str] = {}
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Request):
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        self.received.append(Delivery(headers, body))
        status = self.statuses.pop(0) if self.statuses else 200
        await stream.send_all(
            conn.send(h11.Response(status_code=status, headers=[("content-length", "0")]))
            + conn.send(h11.EndOfMessage())
        )
        await stream.aclose()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._serve, listeners)


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> AsyncIterator[Receiver]:
    recv = Receiver(statuses=[])
    await nursery.start(recv.run)
    yield recv


def _config(private: bool) -> dict[str, Any]:
    return {
        "jobs": {
            "callback_secret_env": "HOOK_SECRET",
            "callbacks_allow_private": private,
            "callback_backoff": 2.0,
            "max_wait": 1000.0,
        },
        **FAST,
    }


async def test_a_signed_callback_is_retried_after_a_500_and_every_attempt_recorded(
    start_daemon: Any, receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    receiver.statuses = [500, 200]
    rd = await start_daemon(environ={"HOOK_SECRET": SECRET}, **_config(private=True))
    url = f"http://127.0.0.1:{receiver.port}/hook"
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(120):
            created = await client.post("/v1/jobs", json={"input": "call me", "callback_url": url})
            job_id = created.json()["job"]
            await wait_until(lambda: len(receiver.received) == 2)
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            while job["callback_state"] != "delivered":
                job = (await client.get(f"/v1/jobs/{job_id}")).json()
            stats = (await client.get("/v1/stats")).json()
    first, second = receiver.received
    verified = Webhook(SECRET).verify(second.body, second.headers)
    assert verified["type"] == "job.completed"
    assert verified["data"]["job"] == job_id
    assert verified["data"]["result"]["final_response"].startswith("call me")
    # The same message on every attempt: the receiver can drop a repeat by its id.
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"{job_id}.completed"
    assert first.body == second.body
    assert [(c["attempt"], c.get("status")) for c in job["callbacks"]] == [(1, 500), (2, 200)]
    assert job["callbacks"][1]["at"] - job["callbacks"][0]["at"] >= 2.0  # callback_backoff
    assert stats["jobs"]["callback_failures"] == 1


async def test_the_ssrf_guard_refuses_a_private_address_by_what_the_name_resolves_to(
    start_daemon: Any, receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(environ={"HOOK_SECRET": SECRET}, **_config(private=False))
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(120):
            for host in ("127.0.0.1", "localhost"):
                url = f"http://{host}:{receiver.port}/hook"
                created = await client.post("/v1/jobs", json={"input": "x", "callback_url": url})
                job_id = created.json()["job"]
                job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 100})).json()
                while job["callback_state"] != "failed":
                    job = (await client.get(f"/v1/jobs/{job_id}")).json()
                (attempt,) = job["callbacks"]  # refused: not retried
                assert "not a public address" in attempt["error"]
    assert receiver.received == []


async def test_a_batch_sends_one_callback_when_all_its_jobs_have_ended(
    start_daemon: Any, receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(environ={"HOOK_SECRET": SECRET}, **_config(private=True))
    url = f"http://127.0.0.1:{receiver.port}/batch"
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(120):
            created = await client.post(
                "/v1/batches", json={"inputs": ["a", "b", "c"], "callback_url": url}
            )
            batch = created.json()
            await wait_until(lambda: len(receiver.received) == 1)
    (delivery,) = receiver.received
    body = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert body["type"] == "batch.completed"
    assert [r["job"] for r in body["data"]["results"]] == batch["jobs"]
    assert body["data"]["counts"]["completed"] == 3


def test_the_signer_agrees_with_the_standard_webhooks_reference() -> None:
    body = orjson.dumps({"x": 1})
    headers = signed_headers(secret_bytes(SECRET), "msg_1", 1_700_000_000, body)
    reference = Webhook(SECRET).sign(
        "msg_1", datetime.fromtimestamp(1_700_000_000, tz=UTC), body.decode()
    )
    assert headers["webhook-signature"] == reference


async def test_a_callback_url_without_a_callback_secret_is_refused(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**FAST)
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(30):
            refused = await client.post(
                "/v1/jobs", json={"input": "x", "callback_url": "https://example.com/hook"}
            )
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "callback_url"
