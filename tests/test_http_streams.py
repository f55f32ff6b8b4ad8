"""`/v1/streams` over SSE, NDJSON and plain JSON against a real daemon.

A connection whose first request is a streaming one is served by raafd's raw HTTP path; one that
began with another request belongs to hypercorn for life. The tests marked with ``via`` run on
both, so the two paths keep behaving alike (test_http_raw.py checks the raw path byte by byte).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from raafd.providers.http import open_body
from tests.sse import sse_events

SLOW = {"providers": {"demo": {"tokens_per_second": 200.0, "reply_words": 40}}}


@pytest.fixture(params=["raw", "hypercorn"])
def via(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def open_client(rd: Any, via: str, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client on one keep-alive connection; for ``hypercorn``, a first plain request hands
    that connection to hypercorn before the streaming ones."""
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=rd.base_url, limits=limits, **kw) as client:
        if via == "hypercorn":
            assert (await client.get("/healthz")).status_code == 200
        yield client


def check_sse(events: list[Any], first: int = 1) -> list[dict[str, Any]]:
    data = [json.loads(e.data) for e in events]
    assert [int(e.id) for e in events] == [d["seq"] for d in data]
    assert [e.event for e in events] == [d["event"] for d in data]
    assert [d["seq"] for d in data] == list(range(first, first + len(data)))
    return data


async def test_post_sse_then_resume_by_last_event_id(start_daemon: Any, via: str) -> None:
    rd = await start_daemon(**SLOW)
    with trio.fail_after(20):
        async with open_client(rd, via) as client:
            async with client.stream(
                "POST",
                "/v1/streams",
                json={"input": "hello sse"},
                headers={"accept": "text/event-stream"},
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                stream = response.headers["x-raafd-stream"]
                first = check_sse(await sse_events(response, limit=8))
            # Dropped after 8 events; the stream keeps running within its detach grace.
            async with client.stream(
                "GET",
                f"/v1/streams/{stream}/events",
                headers={"accept": "text/event-stream", "last-event-id": str(first[-1]["seq"])},
            ) as response:
                rest = check_sse(await sse_events(response), first=9)
        whole = first + rest
        assert whole[-1]["event"] == "complete"
        text = "".join(d["delta"] for d in whole if d["event"] == "content")
        assert text == whole[-1]["final_response"]


async def test_ndjson_and_201(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            created = await client.post("/v1/streams", json={"input": "plain"})
            assert created.status_code == 201
            stream = created.json()["stream"]
            assert created.headers["location"] == f"/v1/streams/{stream}"
            status = (await client.get(f"/v1/streams/{stream}")).json()
            assert status["status"] in ("running", "complete") and status["agent"] == "assistant"
            assert status["stream"] == stream and status["id"] == stream  # id: deprecated
            async with client.stream(
                "GET",
                f"/v1/streams/{stream}/events?after=0",
                headers={"accept": "application/x-ndjson"},
            ) as response:
                assert response.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(line) async for line in response.aiter_lines() if line]
            assert [d["seq"] for d in lines] == list(range(1, len(lines) + 1))
            assert lines[-1]["event"] == "complete"
            r = await client.get("/v1/streams/st_nope")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await client.post("/v1/streams", json={"input": "x", "agent": "ghost"})
            assert r.status_code == 404 and r.json()["error"]["field"] == "agent"
            r = await client.post("/v1/streams", json={"inptu": "x"})
            assert r.status_code == 400 and r.json()["error"]["field"] == "inptu"
            r = await client.post("/v1/streams", content=b"{not json")
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
            r = await client.get(f"/v1/streams/{stream}/events?after=x")
            assert r.status_code == 400 and r.json()["error"]["field"] == "after"


async def test_control_over_http(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 20.0, "reply_words": 200}})
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            stream = (await client.post("/v1/streams", json={"input": "x"})).json()["stream"]
            assert (await client.post(f"/v1/streams/{stream}/pause")).json()["status"] == "paused"
            assert (await client.post(f"/v1/streams/{stream}/resume")).json()["status"] == (
                "running"
            )
            r = await client.post(f"/v1/streams/{stream}/cancel")
            assert r.json()["status"] == "cancelled" and r.json()["stream"] == stream
            r = await client.post(f"/v1/streams/{stream}/pause")
            assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
            async with client.stream("GET", f"/v1/streams/{stream}/events") as response:
                data = check_sse(await sse_events(response))
            kinds = [d["event"] for d in data]
            assert "paused" in kinds and "resumed" in kinds
            assert data[-1] == {**data[-1], "event": "cancelled", "reason": "client"}


async def test_heartbeats_while_waiting_for_the_first_token(
    start_daemon: Any, autojump_clock: trio.testing.MockClock, via: str
) -> None:
    rd = await start_daemon(
        providers={"demo": {"first_token_delay": 40.0, "reply_words": 1}},
        http={"heartbeat_interval": 15.0},
    )
    with trio.fail_after(120):
        async with open_client(rd, via, timeout=None) as client:
            async with client.stream(
                "POST", "/v1/streams", json={"input": "x"}, headers={"accept": "text/event-stream"}
            ) as response:
                raw = b""
                async with open_body(response) as chunks:
                    async for chunk in chunks:
                        raw += chunk
                        if b"event: complete" in raw:
                            break
            assert raw.count(b": heartbeat\n\n") == 2  # at 15 s and 30 s, before the token at 40
            async with client.stream(
                "POST",
                "/v1/streams",
                json={"input": "x"},
                headers={"accept": "application/x-ndjson"},
            ) as response:
                body = b""
                async with open_body(response) as chunks:
                    async for chunk in chunks:
                        body += chunk
                        if b'"event":"complete"' in body:
                            break
                lines = [json.loads(line) for line in body.splitlines() if line]
            assert lines.count({"event": "heartbeat"}) == 2


async def test_closing_an_http_stream_detaches_it(
    start_daemon: Any, autojump_clock: trio.testing.MockClock, via: str
) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 1.0, "reply_words": 1000}},
        streams={"detach_grace": 10.0, "idle_timeout": 3600.0, "max_duration": 36000.0},
    )
    with trio.fail_after(60):
        async with open_client(rd, via, timeout=None) as client:
            async with client.stream(
                "POST", "/v1/streams", json={"input": "x"}, headers={"accept": "text/event-stream"}
            ) as response:
                stream = response.headers["x-raafd-stream"]
                await sse_events(response, limit=2)
            manager = rd.daemon.streams
            await manager.get(stream).wait()
    terminal = manager.get(stream).terminal
    assert terminal is not None and terminal.fields == {"reason": "detached"}


async def test_replay_past_the_log_is_refused_before_the_stream_starts(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 1000.0, "reply_words": 30}},
        streams={"log_max_events": 8},
    )
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            stream = (await client.post("/v1/streams", json={"input": "x"})).json()["stream"]
            await rd.daemon.streams.get(stream).wait()
            for accept in ("text/event-stream", "application/x-ndjson"):
                r = await client.get(
                    f"/v1/streams/{stream}/events?after=1", headers={"accept": accept}
                )
                assert r.status_code == 410, r.text
                error = r.json()["error"]
                assert error["code"] == "gone" and "oldest" in error["message"]
            r = await client.get(f"/v1/streams/{stream}/events?after=999")
            assert r.status_code == 400 and r.json()["error"]["field"] == "after"
