"""Multi-agent workflows over HTTP and WebSocket: concurrency, pipelines, tags, one terminal."""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from raafd.providers.http import open_body
from raafd.providers.sse import SSEParser
from tests.wsclient import open_ws

TERMINAL = ("complete", "error", "cancelled")
FAST_DEMO = {"tokens_per_second": 1000.0, "reply_words": 3}


def run_time(rd: Any, events: list[dict[str, Any]]) -> float:
    """How long the stream ran, on the trio clock: from its start to its terminal event. (Not
    measured around the request: the autojump clock may jump while loopback I/O is slow.)"""
    stream = rd.daemon.streams.get(events[0]["stream"])
    assert stream.ended_clock is not None
    return float(stream.ended_clock - (trio.current_time() - stream.age))


async def post_sse(client: httpx.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /v1/workflows as SSE; every event until the terminal one, checked for framing."""
    parser = SSEParser()
    events: list[dict[str, Any]] = []
    async with client.stream(
        "POST", "/v1/workflows", json=body, headers={"accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200, await response.aread()
        stream = response.headers["x-raafd-stream"]
        async with open_body(response) as chunks:
            async for chunk in chunks:
                for frame in parser.feed(chunk):
                    data = json.loads(frame.data)
                    assert int(frame.id) == data["seq"] and frame.event == data["event"]
                    assert data["stream"] == stream
                    events.append(data)
                    if data["event"] in TERMINAL:
                        return events
    raise AssertionError("the response ended without a terminal event")


def check_one_terminal(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["event"] in TERMINAL for e in events].count(True) == 1
    assert events[-1]["event"] in TERMINAL


def text_by_agent(events: list[dict[str, Any]]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for e in events:
        if e["event"] == "content":
            texts[e["agent"]] = texts.get(e["agent"], "") + e["delta"]
    return texts


async def test_parallel_agents_run_concurrently(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        providers={
            "slow": {"first_token_delay": 5.0, "tokens_per_second": 10.0, "reply_words": 6},
            "demo": FAST_DEMO,
        },
        agents={"a": {"provider": "slow"}, "b": {"provider": "slow"}, "synth": {}},
    )
    body = {"mode": "parallel", "agents": ["a", "b"], "input": "hi", "synthesizer": "synth"}
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(120):
            events = await post_sse(client, body)
    elapsed = run_time(rd, events)
    check_one_terminal(events)
    # Each agent waits 5 s for its first token, then 7 words at 10/s: together ~5.7 s, where
    # one after the other would take over 11 s.
    assert 5.0 <= elapsed < 7.0
    assert events[0] == {**events[0], "event": "start", "agent": "synth"}
    assert all("agent" in e for e in events[1:-1])
    order = [e["agent"] for e in events if e["event"] == "content" and e["agent"] != "synth"]
    assert sorted(set(order)) == ["a", "b"]
    switches = sum(1 for x, y in itertools.pairwise(order) if x != y)
    assert switches >= 3, order  # interleaved, not one block after the other
    texts = text_by_agent(events)
    complete = events[-1]
    assert complete["event"] == "complete"
    assert complete["final_response"] == texts["synth"]
    # The synthesizer (a demo echo) read the input and both answers.
    assert "Request: hi" in texts["synth"]
    assert f"Answer from a: {texts['a']}" in texts["synth"]
    assert f"Answer from b: {texts['b']}" in texts["synth"]
    words = {agent: len(text.split()) for agent, text in texts.items()}
    assert complete["usage"]["completion_tokens"] == words["a"] + words["b"] + words["synth"]


async def test_sequential_pipeline_over_websocket(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={"demo": FAST_DEMO},
        agents={"drafter": {}, "editor": {}},
    )
    async with open_ws(rd.ws_url, subprotocols=["raafd.v1"]) as ws:
        with trio.fail_after(20):
            assert json.loads(await ws.get_message())["type"] == "welcome"
            await ws.send_message(
                json.dumps(
                    {
                        "type": "workflow.start",
                        "ref": "w",
                        "mode": "sequential",
                        "agents": ["drafter", "editor"],
                        "input": "hello world",
                    }
                )
            )
            started = json.loads(await ws.get_message())
            assert started == {"type": "stream.started", "ref": "w", "stream": started["stream"]}
            events: list[dict[str, Any]] = []
            while not events or events[-1]["event"] not in TERMINAL:
                message = json.loads(await ws.get_message())
                assert message.pop("type") == "stream.event"
                events.append(message)
    check_one_terminal(events)
    assert events[0]["agent"] == "drafter"
    assert all(e["agent"] in ("drafter", "editor") for e in events[1:-1])
    tags = [e["agent"] for e in events[1:-1]]
    assert tags == sorted(tags)  # drafter's events, then editor's: one after the other
    texts = text_by_agent(events)
    assert texts["drafter"] == "hello world streams tokens arrive"
    # The editor's only input was the drafter's answer (the demo echoes its input first).
    assert texts["editor"] == texts["drafter"] + " streams tokens arrive"
    assert events[-1]["event"] == "complete"
    assert events[-1]["final_response"] == texts["editor"]


async def test_one_failure_cancels_the_others_and_ends_with_one_error(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(
        providers={
            "flaky": {"max_retries": 0, "tokens_per_second": 100.0, "reply_words": 10},
            "slow": {"first_token_delay": 5.0, "reply_words": 10},
            "demo": FAST_DEMO,
        },
        agents={"a": {"provider": "flaky"}, "b": {"provider": "slow"}, "synth": {}},
    )
    body = {
        "mode": "parallel",
        "agents": ["a", "b"],
        "input": "[fail-after:2]",
        "synthesizer": "synth",
    }
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(120):
            events = await post_sse(client, body)
    elapsed = run_time(rd, events)
    check_one_terminal(events)
    assert events[-1]["event"] == "error"
    assert events[-1]["error"]["code"] == "upstream_error"
    assert elapsed < 1.0  # b was cancelled, not waited for
    assert {e["agent"] for e in events if e["event"] == "content"} == {"a"}


async def test_201_then_events_and_validation(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": FAST_DEMO}, agents={"x": {}, "y": {}})
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            # `type` is accepted for `mode` over HTTP.
            body = {"type": "sequential", "agents": ["x", "y"], "input": "go", "stream": "wf-1"}
            r = await client.post("/v1/workflows", json=body)
            assert r.status_code == 201 and r.json() == {"stream": "wf-1"}
            assert r.headers["location"] == "/v1/streams/wf-1"
            async with client.stream(
                "GET", "/v1/streams/wf-1/events", headers={"accept": "application/x-ndjson"}
            ) as response:
                lines = [json.loads(line) async for line in _lines(response)]
            check_one_terminal(lines)
            assert lines[-1]["event"] == "complete"
            status = (await client.get("/v1/streams/wf-1")).json()
            assert status["agent"] == "x" and status["status"] == "complete"

            async def refused(body: dict[str, Any]) -> dict[str, Any]:
                r = await client.post("/v1/workflows", json=body)
                error = r.json()["error"]
                error["status"] = r.status_code
                return dict(error)

            base = {"mode": "parallel", "agents": ["x", "y"], "input": "go", "synthesizer": "y"}
            error = await refused(base | {"agents": ["x", "ghost"]})
            assert (error["status"], error["code"], error["field"]) == (
                404,
                "not_found",
                "agents.1",
            )
            error = await refused(base | {"synthesizer": "ghost"})
            assert (error["status"], error["field"]) == (404, "synthesizer")
            error = await refused({k: v for k, v in base.items() if k != "synthesizer"})
            assert (error["status"], error["field"]) == (400, "synthesizer")
            error = await refused(base | {"agents": ["x"] * 17, "mode": "sequential"})
            assert (error["status"], error["field"]) == (400, "agents")
            error = await refused(base | {"agents": ["x", "x"]})
            assert (error["status"], error["field"]) == (400, "agents.1")
            error = await refused(base | {"mode": "round-robin"})
            assert (error["status"], error["field"]) == (400, "mode")
            error = await refused(base | {"type": "parallel"})
            assert (error["status"], error["field"]) == (400, "type")
            error = await refused(base | {"inptu": "x"})
            assert (error["status"], error["field"]) == (400, "inptu")
            error = await refused(base | {"stream": "wf-1"})
            assert (error["status"], error["code"]) == (409, "conflict")
    assert [s["id"] for s in rd.daemon.streams.list_streams()] == ["wf-1"]


async def _lines(response: httpx.Response) -> Any:
    buffer = b""
    async with open_body(response) as chunks:
        async for chunk in chunks:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line:
                    yield line
                    if json.loads(line).get("event") in TERMINAL:
                        return


async def test_websocket_validation_errors(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": FAST_DEMO})
    async with open_ws(rd.ws_url, subprotocols=["raafd.v1"]) as ws:
        with trio.fail_after(20):
            assert json.loads(await ws.get_message())["type"] == "welcome"
            frames = [
                ({"mode": "sequential", "agents": ["assistant", "nope"], "input": "x"}, "agents.1"),
                ({"mode": "parallel", "agents": ["assistant"], "input": "x"}, "synthesizer"),
                ({"mode": "sequential", "agents": [], "input": "x"}, "agents"),
                ({"mode": "sequential", "agents": ["assistant"]}, "input"),
            ]
            for i, (frame, field) in enumerate(frames):
                await ws.send_message(
                    json.dumps({"type": "workflow.start", "ref": f"r{i}", **frame})
                )
                error = json.loads(await ws.get_message())
                assert error["type"] == "error" and error["ref"] == f"r{i}", error
                assert error["field"] == field
                assert error["code"] == ("not_found" if field == "agents.1" else "bad_request")
    assert rd.daemon.streams.list_streams() == []


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
async def test_cancelling_a_workflow(
    start_daemon: Any, autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    rd = await start_daemon(
        providers={"demo": {"tokens_per_second": 1.0, "reply_words": 100}},
        agents={"a": {}, "b": {}},
    )
    body = {"mode": mode, "agents": ["a", "b"], "input": "x", "synthesizer": "a"}
    async with httpx.AsyncClient(base_url=rd.base_url, timeout=None) as client:
        with trio.fail_after(120):
            stream = (await client.post("/v1/workflows", json=body)).json()["stream"]
            await trio.sleep(3)  # clock seconds: a few tokens of the first agent
            r = await client.post(f"/v1/streams/{stream}/cancel")
            assert r.json()["status"] == "cancelled"
            async with client.stream("GET", f"/v1/streams/{stream}/events") as response:
                parser = SSEParser()
                events = []
                async with open_body(response) as chunks:
                    async for chunk in chunks:
                        events += [json.loads(f.data) for f in parser.feed(chunk)]
                        if events and events[-1]["event"] in TERMINAL:
                            break
    check_one_terminal(events)
    assert any(e["event"] == "content" for e in events)  # cancelled while it ran
    assert events[-1] == {**events[-1], "event": "cancelled", "reason": "client"}
