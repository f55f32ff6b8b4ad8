"""What raafd makes per stream, delivery and message is freed by reference counting alone.

The daemon runs the collector rarely (``server.gc_thresholds``: a middle collection walks every
running stream), so anything raafd leaves in a reference cycle stays in memory until an old
generation is collected: the soak (``bench/soak.py``) saw RSS grow by about 6 KB per stream,
to hundreds of MiB, from a stream and its feed holding each other and a subscription and its
delivery doing the same. Here a real daemon runs streams over every transport and the other
subsystems; with ``gc.DEBUG_SAVEALL`` whatever a collection would have freed is kept for
inspection, and none of it may be raafd's.
"""

from __future__ import annotations

import collections
import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection

from tests.chatws import recv
from tests.waiting import wait_until
from tests.wsclient import open_ws

FAST = {"demo": {"tokens_per_second": 2000.0, "reply_words": 30}}
SLOW = {"demo": {"tokens_per_second": 20.0, "reply_words": 200}}


@contextmanager
def cyclic_garbage() -> Iterator[list[Any]]:
    """Collect first; inside, keep what collections find; at the end, the raafd objects found
    (a full collection then) in the list handed out."""
    found: list[Any] = []
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(o for o in gc.garbage if type(o).__module__.startswith("raafd."))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _described(objects: list[Any]) -> str:
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())


async def _command(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    """Send a command; its reply (stream events before it are skipped)."""
    await ws.send_message(json.dumps({"ref": "r", **command}))
    while (message := await recv(ws)).get("ref") != "r":
        pass
    return message


async def _until(ws: WebSocketConnection, event: str) -> None:
    while (await recv(ws)).get("event") != event:
        pass


async def _ws_streams(ws_url: str) -> None:
    async with open_ws(ws_url) as ws:
        await recv(ws)
        # One to its end, one cancelled while it runs, one attached and detached on another
        # connection.
        await _command(ws, type="stream.start", input="x")
        await _until(ws, "complete")
        started = await _command(ws, type="stream.start", input="x", agent="slow")
        await _command(ws, type="stream.cancel", stream=started["stream"])
        await _command(ws, type="stream.start", input="x", agent="slow", stream="watched")
        async with open_ws(ws_url) as other:
            await recv(other)
            attached = await _command(other, type="stream.attach", stream="watched")
            assert attached["type"] == "stream.attached", attached
            await _command(other, type="stream.detach", stream="watched")
        await _command(ws, type="stream.cancel", stream="watched")


async def _http_streams(http: httpx.AsyncClient) -> None:
    sse = {"accept": "text/event-stream"}
    async with http.stream("POST", "/v1/streams", json={"input": "x"}, headers=sse) as answer:
        assert answer.status_code == 200
        await answer.aread()
    completion = {"model": "assistant", "messages": [{"role": "user", "content": "x"}]}
    async with http.stream(
        "POST", "/v1/chat/completions", json={**completion, "stream": True}
    ) as answer:
        assert answer.status_code == 200
        await answer.aread()
    assert (await http.post("/v1/chat/completions", json=completion)).status_code == 200


async def _dropped_http_client(address: str) -> None:
    """A client that goes away mid-stream: the stream detaches, its grace (0) cancels it."""
    host, port = address.rsplit(":", 1)
    body = b'{"input": "x", "agent": "slow"}'
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"POST /v1/streams HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert (await stream.receive_some()).startswith(b"HTTP/1.1 200 ")


async def test_streams_and_their_deliveries_leave_no_cyclic_garbage(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers={**FAST, "slow": {"type": "demo", **SLOW["demo"]}},
        agents={"assistant": {"provider": "demo"}, "slow": {"provider": "slow"}},
        streams={"retention": 0.0, "detach_grace": 0.0},
    )
    manager = rd.daemon.streams
    with cyclic_garbage() as found:
        with trio.fail_after(60):
            await _ws_streams(rd.ws_url)
            async with httpx.AsyncClient(base_url=rd.base_url, timeout=30) as http:
                await _http_streams(http)
            await _dropped_http_client(rd.address)
            # Each stream is forgotten as it ends (retention 0).
            await wait_until(lambda: not manager.stats()["running"] + manager.stats()["retained"])
        assert manager.stats()["by_status"] == dict.fromkeys(manager.stats()["by_status"], 0)
    assert not found, f"cyclic garbage: {_described(found)}"


async def test_rooms_the_bus_and_jobs_leave_no_cyclic_garbage(start_daemon: Any) -> None:
    rd = await start_daemon(
        providers=FAST,
        streams={"retention": 0.0},
        rooms={"lobby": {"agent": "assistant"}},
    )
    manager = rd.daemon.streams
    with cyclic_garbage() as found:
        with trio.fail_after(60):
            async with open_ws(rd.ws_url) as ws, open_ws(rd.ws_url) as watcher:
                await recv(ws), await recv(watcher)
                await _command(watcher, type="events.subscribe", pattern="room.>")
                await _command(ws, type="room.join", room="lobby")
                await _command(watcher, type="room.join", room="lobby")
                # A message, and one the room's agent answers in a stream of its own.
                await _command(ws, type="room.send", room="lobby", text="hello")
                await _command(ws, type="room.send", room="lobby", text="@assistant hi")
                while (await recv(ws)).get("event") != "complete":
                    pass
                await _command(watcher, type="room.leave", room="lobby")
                await _command(watcher, type="events.unsubscribe", sub="room.>")
            async with httpx.AsyncClient(base_url=rd.base_url, timeout=30) as http:
                job = (await http.post("/v1/jobs", json={"input": "x"})).json()
                done = await http.get(f"/v1/jobs/{job['job']}", params={"wait": 20})
                assert done.json()["status"] == "completed", done.json()
            await wait_until(lambda: not manager.stats()["running"] + manager.stats()["retained"])
    assert not found, f"cyclic garbage: {_described(found)}"
