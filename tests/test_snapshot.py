"""Snapshots: one ``snapshot`` event standing for a stream's events up to a seq, then exactly
the events after it; possible after the log evicted the start; the same on the WebSocket, SSE,
NDJSON (both HTTP paths) and through the Python client."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from raafd.agents.bodies import AgentBodies
from raafd.agents.runner import AgentLoop
from raafd.client import open_client
from raafd.config import AgentConfig, BreakerConfig, StreamsConfig
from raafd.errors import Gone
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.providers.breaker import Breakers
from raafd.streams import Stream, StreamManager
from raafd.streams.body import StreamWriter
from tests.sse import sse_events
from tests.test_http_streams import SLOW
from tests.test_http_streams import open_client as open_http
from tests.wsclient import open_ws

LIMIT = 1000  # clock seconds: the absolute timeout around every wait

Script = list[tuple[str, dict[str, Any]]]


# --- the stream's own snapshot ----------------------------------------------------------------


async def scripted(
    nursery: trio.Nursery, script: Script, *, end: bool, **streams: Any
) -> tuple[StreamManager, Stream]:
    """A manager running one stream whose body emits ``script`` (then ``complete`` when
    ``end``, else waits); returned once every event is in the log."""
    agents = {"assistant": AgentConfig(provider="demo")}
    config, metrics = StreamsConfig(**streams), Metrics()
    loop = AgentLoop(agents, {}, Breakers(BreakerConfig()), None, metrics, config)
    manager = StreamManager(config, agents, {}, metrics, "assistant", bodies=AgentBodies(loop))
    await nursery.start(manager.run)
    emitted = trio.Event()

    async def body(out: StreamWriter) -> None:
        for kind, fields in script:
            await out.emit(kind, **fields)
        if end:
            await out.emit("complete", final_response="", usage=None, finish_reason="stop")
        emitted.set()
        await trio.sleep_forever()

    stream = manager.start(agent="assistant", body=body, detach_grace=LIMIT)
    with trio.fail_after(LIMIT):
        await emitted.wait()
    return manager, stream


def expected(script: Script, agent: str = "assistant") -> dict[str, Any]:
    """The snapshot a script's events add up to, computed here from the events themselves."""
    text, calls = "", []
    for kind, fields in script:
        if kind == "content":
            text += fields["delta"]
        elif kind == "tool_call":
            calls.append({k: fields[k] for k in ("tool_id", "tool_name", "arguments")})
        elif kind == "tool_result":  # the result of the latest call with its id, if any
            for call in reversed(calls):
                if call["tool_id"] == fields["tool_id"]:
                    call.update({k: fields[k] for k in ("result", "is_error")})
                    break
        elif kind == "handoff":
            agent = fields["to_agent"]
    return {"text": text, "tool_calls": calls, "agent": agent}


def take_all(sub: Any) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    while (batch := sub.take_nowait()) is not None:
        out += batch
    return out


events = st.one_of(
    st.builds(lambda d: ("content", {"delta": d}), st.text(max_size=12)),
    st.builds(
        lambda i, a: ("tool_call", {"tool_id": f"t{i}", "tool_name": "calc", "arguments": a}),
        st.integers(0, 5),
        st.dictionaries(st.sampled_from("xyz"), st.integers(-999, 999), max_size=2),
    ),
    st.builds(
        lambda i, r: ("tool_result", {"tool_id": f"t{i}", "result": r, "is_error": False}),
        st.integers(0, 5),
        st.text(max_size=5),
    ),
    st.builds(lambda a: ("handoff", {"from_agent": "x", "to_agent": a}), st.sampled_from("ab")),
)


@settings(max_examples=60, deadline=None)
@given(script=st.lists(events, max_size=40), end=st.booleans(), log_max=st.integers(1, 12))
def test_a_snapshot_is_the_events_it_replaces_then_exactly_the_rest(
    script: Script, end: bool, log_max: int
) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            manager, stream = await scripted(nursery, script, end=end, log_max_events=log_max)
            sub = manager.subscribe(stream.id, 0, snapshot=True)
            sub.open()
            got = take_all(sub)
            snap, rest = got[0], got[1:]
            assert snap.kind == "snapshot"
            assert snap.fields == expected(script)
            assert orjson.loads(snap.json) == {
                "stream": stream.id,
                "seq": snap.seq,
                "event": "snapshot",
                **expected(script),
            }
            # Everything but the terminal event is in the snapshot; exactly the rest follows.
            assert snap.seq == len(script) + 1  # `start`, then the script
            assert [e.seq for e in rest] == list(range(snap.seq + 1, stream.head + 1))
            assert [e.kind for e in rest] == (["complete"] if end else [])
            # The log really evicted what the snapshot still covers.
            if stream.log.oldest > 1:
                with pytest.raises(Gone):
                    manager.subscribe(stream.id, 0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_live_events_after_a_snapshot_are_delivered_once_in_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    manager, stream = await scripted(
        nursery, [("content", {"delta": "ab"}), ("content", {"delta": "cd"})], end=False
    )
    sub = manager.subscribe(stream.id, 0, snapshot=True)
    pushed: list[int] = []
    sub.push = lambda e: pushed.append(e.seq) or True
    sub.open()
    # No push before the snapshot was taken: the next event waits for the pull.
    stream.feed.append("content", {"delta": "ef"})
    assert pushed == []
    first = sub.take_nowait()
    assert first is not None
    assert [(e.kind, e.seq) for e in first] == [("snapshot", 3), ("content", 4)]
    assert first[0].fields["text"] == "abcd"
    assert sub.take_nowait() is None
    stream.feed.append("content", {"delta": "gh"})  # caught up: pushed
    assert pushed == [5]


async def test_past_max_snapshot_bytes_there_is_no_snapshot(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    script: Script = [("content", {"delta": "x" * 10}) for _ in range(10)]
    # Held whole: a plain replay from 0 instead.
    manager, stream = await scripted(nursery, script, end=True, max_snapshot_bytes=50)
    sub = manager.subscribe(stream.id, 0, snapshot=True)
    sub.open()
    assert [e.seq for e in take_all(sub)] == list(range(1, stream.head + 1))
    # Evicted: `gone`, as without snapshot.
    manager, stream = await scripted(
        nursery, script, end=True, max_snapshot_bytes=50, log_max_events=4
    )
    with pytest.raises(Gone):
        manager.subscribe(stream.id, 0, snapshot=True)
    # A resume (after > 0) never asks for one.
    sub = manager.subscribe(stream.id, stream.head - 1, snapshot=True)
    sub.open()
    assert [e.kind for e in take_all(sub)] == ["complete"]


# --- over the wire ----------------------------------------------------------------------------

SMALL_LOG = {"log_max_events": 8, "detach_grace": 30.0}


async def finished_stream(client: httpx.AsyncClient) -> tuple[str, str]:
    """Run a stream to its end (NDJSON); its id and its final response."""
    async with client.stream(
        "POST",
        "/v1/streams",
        json={"input": "a long answer"},
        headers={"accept": "application/x-ndjson"},
    ) as response:
        lines = [json.loads(x) async for x in response.aiter_lines() if x]
    return lines[0]["stream"], lines[-1]["final_response"]


@pytest.mark.parametrize("via", ["raw", "hypercorn"])
async def test_http_snapshot_after_the_log_evicted_the_start(start_daemon: Any, via: str) -> None:
    rd = await start_daemon(streams=SMALL_LOG, **SLOW)
    with trio.fail_after(20):
        async with open_http(rd, via) as client:
            stream, final = await finished_stream(client)
            url = f"/v1/streams/{stream}/events"
            gone = await client.get(url, headers={"accept": "text/event-stream"})
            assert gone.status_code == 410 and gone.json()["error"]["code"] == "gone"
            async with client.stream(
                "GET", url + "?snapshot=1", headers={"accept": "text/event-stream"}
            ) as response:
                assert response.status_code == 200
                sse = await sse_events(response)
            async with client.stream(
                "GET", url + "?snapshot=true", headers={"accept": "application/x-ndjson"}
            ) as response:
                lines = [json.loads(x) async for x in response.aiter_lines() if x]
            bad = await client.get(url + "?snapshot=yes")
            assert bad.status_code == 400 and bad.json()["error"]["field"] == "snapshot"
    assert [e.event for e in sse] == ["snapshot", "complete"]
    snap = json.loads(sse[0].data)
    assert int(sse[0].id) == snap["seq"] and int(sse[1].id) == snap["seq"] + 1
    assert snap["text"] == final and snap["agent"] == "assistant" and snap["tool_calls"] == []
    assert lines == [snap, json.loads(sse[1].data)]


async def test_ws_attach_with_snapshot_mid_stream(start_daemon: Any) -> None:
    rd = await start_daemon(**SLOW)
    with trio.fail_after(20):
        async with open_ws(rd.ws_url, subprotocols=["raafd.v1"]) as starter:
            await starter.send_message(json.dumps({"type": "stream.start", "input": "go"}))
            first: list[dict[str, Any]] = []
            while len(first) < 12:  # a running stream, part way
                message = json.loads(await starter.get_message())
                if message["type"] == "stream.event":
                    first.append(message)
            stream = first[0]["stream"]
            async with open_ws(rd.ws_url, subprotocols=["raafd.v1"]) as ws:
                assert json.loads(await ws.get_message())["type"] == "welcome"
                attach = {"type": "stream.attach", "stream": stream, "snapshot": True, "ref": "a"}
                await ws.send_message(json.dumps(attach))
                got: list[dict[str, Any]] = []
                while not got or got[-1].get("event") not in ("complete", "error", "cancelled"):
                    got.append(json.loads(await ws.get_message()))
    assert got[0] == {"type": "stream.attached", "ref": "a", "stream": stream, "after": 0}
    snap, rest = got[1], got[2:]
    assert snap["event"] == "snapshot" and snap["seq"] >= 12
    assert [e["seq"] for e in rest] == list(range(snap["seq"] + 1, snap["seq"] + 1 + len(rest)))
    text = snap["text"] + "".join(e.get("delta", "") for e in rest)
    assert text == rest[-1]["final_response"]


async def test_the_python_client_attaches_with_a_snapshot(start_daemon: Any) -> None:
    rd = await start_daemon(streams=SMALL_LOG, **SLOW)
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=rd.base_url) as http:
            stream, final = await finished_stream(http)
        async with open_client(rd.ws_url) as client:
            handle = await client.attach(stream)
            events = [e async for e in handle]
            with pytest.raises(Exception, match="no longer held"):
                await client.attach(stream, snapshot=False)
    assert [e["event"] for e in events] == ["snapshot", "complete"]
    assert events[0]["text"] == final
    assert handle.last_seq == events[-1]["seq"] == events[0]["seq"] + 1
