"""The event bus in a running daemon: WebSocket subscriptions, SSE with Last-Event-ID resume,
`raafd ctl events`, permissions, and the events the daemon's components emit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection

from raafd.admin import ctl
from raafd.admin.client import admin_call
from raafd.protocol.codes import SUBPROTOCOL
from tests.sse import sse_events
from tests.waiting import wait_until
from tests.wsclient import open_ws

FAST = {"providers": {"demo": {"tokens_per_second": 1000.0, "reply_words": 3}}}


async def recv(ws: WebSocketConnection, *types: str) -> dict[str, Any]:
    """The next message of one of ``types`` (others are skipped)."""
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] in types:
            return message


async def test_ws_subscribe_gets_stream_lifecycle_events_then_unsubscribes(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(**FAST)
    with trio.fail_after(20):
        async with open_ws(rd.ws_url, subprotocols=[SUBPROTOCOL]) as ws:
            await recv(ws, "welcome")
            await ws.send_message(
                json.dumps({"type": "events.subscribe", "pattern": "stream.*", "ref": "s1"})
            )
            subscribed = await recv(ws, "events.subscribed")
            assert subscribed == {
                "type": "events.subscribed",
                "ref": "s1",
                "sub": "stream.*",
                "pattern": "stream.*",
                "head": subscribed["head"],
            }
            await ws.send_message(json.dumps({"type": "stream.start", "input": "hi"}))
            started = await recv(ws, "event")
            assert started["sub"] == "stream.*"
            assert started["subject"] == "stream.started"
            assert started["seq"] > subscribed["head"]
            stream = started["data"]["stream"]
            assert started["data"]["agent"] == "assistant"
            completed = await recv(ws, "event")
            assert completed["subject"] == "stream.completed"
            assert completed["data"]["stream"] == stream
            assert completed["seq"] == started["seq"] + 1  # nothing else matched in between
            await ws.send_message(
                json.dumps({"type": "events.unsubscribe", "sub": "stream.*", "ref": "u"})
            )
            assert (await recv(ws, "events.unsubscribed"))["sub"] == "stream.*"
            await ws.send_message(
                json.dumps({"type": "events.unsubscribe", "sub": "stream.*", "ref": "u2"})
            )
            error = await recv(ws, "error")
            assert (error["code"], error["field"], error["ref"]) == ("not_found", "sub", "u2")


async def test_ws_subscribe_replays_since_filters_by_where_and_once(start_daemon: Any) -> None:
    rd = await start_daemon()
    bus = rd.daemon.bus
    for n in range(5):
        bus.emit("job.done", {"n": n, "queue": "a" if n % 2 else "b"})
    since = bus.head - 5  # (connecting adds events: connection.opened, presence.changed)
    with trio.fail_after(20):
        async with open_ws(rd.ws_url, subprotocols=[SUBPROTOCOL]) as ws:
            await recv(ws, "welcome")
            await ws.send_message(
                json.dumps(
                    {
                        "type": "events.subscribe",
                        "pattern": "job.>",
                        "since": since,
                        "where": {"queue": "a"},
                        "sub": "a-jobs",
                    }
                )
            )
            await recv(ws, "events.subscribed")
            got = [await recv(ws, "event") for _ in range(2)]
            assert [(m["sub"], m["data"]["n"]) for m in got] == [("a-jobs", 1), ("a-jobs", 3)]
            await ws.send_message(
                json.dumps({"type": "events.subscribe", "pattern": "job.*", "once": True})
            )
            await recv(ws, "events.subscribed")
            bus.emit("job.done", {"n": 10, "queue": "b"})
            bus.emit("job.done", {"n": 11, "queue": "a"})
            once = await recv(ws, "event")
            assert (once["sub"], once["data"]["n"]) == ("job.*", 10)
            second = await recv(ws, "event")
            assert (second["sub"], second["data"]["n"]) == ("a-jobs", 11)  # once is over
            # The once subscription ended by itself: its name is free again.
            await ws.send_message(
                json.dumps({"type": "events.subscribe", "pattern": "job.*", "ref": "again"})
            )
            assert (await recv(ws, "events.subscribed", "error"))["type"] == "events.subscribed"


@pytest.mark.parametrize(
    ("command", "code", "field"),
    [
        ({"pattern": "connection.>"}, "forbidden", "pattern"),
        ({"pattern": "a.>.b"}, "bad_request", "pattern"),
        ({"pattern": "a", "since": 10**6}, "bad_request", "since"),
        ({"pattern": "a", "where": {"x": [1]}}, "bad_request", "where.x"),
        ({"pattern": "a", "once": "yes"}, "bad_request", None),
        ({"pattern": "a", "bogus": 1}, "bad_request", "bogus"),
    ],
)
async def test_ws_bad_or_forbidden_subscriptions_are_refused_and_the_connection_goes_on(
    start_daemon: Any, command: dict[str, Any], code: str, field: str | None
) -> None:
    rd = await start_daemon()
    with trio.fail_after(20):
        async with open_ws(rd.ws_url, subprotocols=[SUBPROTOCOL]) as ws:
            await recv(ws, "welcome")
            await ws.send_message(json.dumps({"type": "events.subscribe", "ref": "r", **command}))
            error = await recv(ws, "error")
            assert (error["code"], error.get("field"), error["ref"]) == (code, field, "r")
            await ws.send_message(json.dumps({"type": "ping", "ref": "p"}))
            assert (await recv(ws, "pong"))["ref"] == "p"


async def test_a_wide_pattern_never_shows_restricted_subjects(start_daemon: Any) -> None:
    rd = await start_daemon()
    with trio.fail_after(20):
        async with open_ws(rd.ws_url, subprotocols=[SUBPROTOCOL]) as ws:
            await recv(ws, "welcome")
            await ws.send_message(json.dumps({"type": "events.subscribe", "pattern": ">"}))
            await recv(ws, "events.subscribed")
            async with open_ws(rd.ws_url, subprotocols=[SUBPROTOCOL]) as other:
                await recv(other, "welcome")  # connection.opened: hidden from the first
            rd.daemon.bus.emit("marker", {})
            assert (await recv(ws, "event"))["subject"] == "marker"


async def test_sse_follows_a_pattern_and_resumes_by_last_event_id(start_daemon: Any) -> None:
    rd = await start_daemon()
    bus = rd.daemon.bus
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=rd.base_url) as client:
            async with client.stream("GET", "/v1/events", params={"pattern": "room.>"}) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                for n in range(3):
                    bus.emit("room.lobby.message", {"n": n})
                    bus.emit("other", {"n": n})
                first = await sse_events(resp, limit=2)
            assert [e.event for e in first] == ["event", "event"]
            data = [json.loads(e.data) for e in first]
            assert [d["data"]["n"] for d in data] == [0, 1]
            assert [int(e.id) for e in first] == [d["seq"] for d in data]
            async with client.stream(
                "GET",
                "/v1/events",
                params={"pattern": "room.>", "since": "0"},  # Last-Event-ID wins
                headers={"last-event-id": first[-1].id},
            ) as resp:
                rest = await sse_events(resp, limit=1)
            assert json.loads(rest[0].data)["data"] == {"n": 2}
            async with client.stream(
                "GET", "/v1/events", params={"pattern": "room.>", "once": "1", "since": "0"}
            ) as resp:
                assert len(await sse_events(resp)) == 1  # the body ended after one event
            for params, status in [
                ({}, 400),
                ({"pattern": "connection.*"}, 403),
                ({"pattern": "a", "since": "x"}, 400),
                ({"pattern": "a", "where": "{"}, 400),
            ]:
                answer = await client.get("/v1/events", params=params)
                assert answer.status_code == status, params


async def test_ctl_events_prints_and_follows(
    start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rd = await start_daemon(**FAST)
    socket = tmp_path / "admin.sock"
    bus = rd.daemon.bus
    for n in range(3):
        bus.emit("job.done", {"n": n})
    with trio.fail_after(20):
        answer = await admin_call(socket, "events", {"pattern": "job.*", "since": 0})
        assert [e["data"]["n"] for e in answer["events"]] == [0, 1, 2]
        assert answer["next"] == bus.head and answer["lagged"] is None
        # Admins see every subject, and a long poll returns as soon as something matches.
        async with trio.open_nursery() as nursery:
            got: list[Any] = []

            async def poll() -> None:
                got.append(await admin_call(socket, "events", {"pattern": "x.>", "wait": 10}))

            waiting = bus.feed.subscribers
            nursery.start_soon(poll)
            with trio.fail_after(30):  # the long poll is subscribed before anything is emitted
                await wait_until(lambda: bus.feed.subscribers > waiting)
            bus.emit("x.y", {"secret": False})
        assert [e["subject"] for e in got[0]["events"]] == ["x.y"]
        code = await trio.to_thread.run_sync(
            ctl.main, ["--socket", str(socket), "events", "job.*", "--since", "0"]
        )
    assert code == 0
    # ctl's lines: seq, ts, subject, data (the daemon's own log lines share stdout here).
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if re.fullmatch(r"\s*\d+  \d+\.\d{3}  \S+  .*", line)
    ]
    assert [line.split()[2] for line in lines] == ["job.done"] * 3
    assert lines[0].split()[3] == '{"n":0}'


async def test_connection_and_config_events_reach_admins(start_daemon: Any) -> None:
    rd = await start_daemon()
    bus = rd.daemon.bus
    with trio.fail_after(20):
        async with open_ws(rd.ws_url, subprotocols=[SUBPROTOCOL]) as ws:
            welcome = await recv(ws, "welcome")
        opened = await bus.wait_for("connection.opened", since=0)
        expected = {"conn": welcome["conn"], "user": "anonymous", "transport": "websocket"}
        assert opened.data == expected
        closed = await bus.wait_for("connection.closed", since=0)
        assert closed.data["conn"] == welcome["conn"] and closed.data["code"] == 1000
        rd.daemon.reload(rd.daemon.config)
        reloaded = await bus.wait_for("config.reloaded", since=0)
        assert reloaded.data == {"applied": [], "needs_restart": []}


async def test_stream_ends_are_emitted_by_kind(start_daemon: Any) -> None:
    rd = await start_daemon(providers={"demo": {"tokens_per_second": 5.0, "reply_words": 50}})
    bus = rd.daemon.bus
    streams = rd.daemon.streams
    with trio.fail_after(20):
        stream = streams.start(agent=None, messages=[{"role": "user", "content": "x"}])
        started = await bus.wait_for("stream.started", since=0)
        assert started.data["stream"] == stream.id and started.data["owner"] == ""
        streams.cancel(stream.id, "admin")
        cancelled = await bus.wait_for("stream.cancelled", since=0)
        assert cancelled.data == {
            "stream": stream.id,
            "agent": "assistant",
            "seq": stream.head,
            "reason": "admin",
        }
        await stream.wait()
        await trio.testing.wait_all_tasks_blocked()
        ends, _ = bus.replay("stream.>", 0, limit=10)
        assert [e.subject for e in ends] == ["stream.started", "stream.cancelled"]


def test_breakers_emit_when_they_open_and_close() -> None:
    from raafd.config import BreakerConfig
    from raafd.providers.breaker import Breakers

    seen: list[tuple[str, dict[str, Any]]] = []
    breakers = Breakers(
        BreakerConfig(failure_threshold=2, cooldown=10.0),
        emit=lambda subject, data: seen.append((subject, data)),
    )
    breaker = breakers.get("openai")
    breaker.record_failure(1.0)
    assert seen == []
    breaker.record_failure(2.0)
    breaker.record_failure(3.0)  # already open: no second event
    assert seen == [("breaker.opened", {"provider": "openai", "failures": 2, "cooldown": 10.0})]
    assert breaker.allow(12.5)  # the half-open trial
    breaker.record_failure(12.6)  # opens again
    assert breaker.allow(23.0)
    breaker.record_success(23.1)
    assert [s for s, _ in seen] == ["breaker.opened", "breaker.opened", "breaker.closed"]
    assert seen[-1][1] == {"provider": "openai"}


async def test_role_permissions_and_restricted_subjects_apply_per_principal(
    start_daemon: Any, make_config: Any
) -> None:
    tokens = {"alice": "alice-token-0123456789", "root": "root-token-0123456789"}
    config = make_config(
        auth={
            "users": {
                "alice": {"token": tokens["alice"], "roles": ["viewer"]},
                "root": {"token": tokens["root"], "roles": ["admin"]},
            },
            "roles": {
                "viewer": {"agents": ["*"], "events": ["stream.>", "job.>"]},
                "admin": {"agents": ["*"], "events": [">"], "admin": True},
            },
        }
    )
    rd = await start_daemon(config)

    async def attempt(user: str, pattern: str) -> dict[str, Any]:
        headers = [("authorization", f"Bearer {tokens[user]}")]
        async with open_ws(rd.ws_url, subprotocols=[SUBPROTOCOL], extra_headers=headers) as ws:
            await recv(ws, "welcome")
            await ws.send_message(
                json.dumps({"type": "events.subscribe", "pattern": pattern, "ref": "r"})
            )
            return await recv(ws, "events.subscribed", "error")

    with trio.fail_after(30):
        assert (await attempt("alice", "stream.*"))["type"] == "events.subscribed"
        refused = await attempt("alice", "room.>")  # no role of hers grants it
        assert (refused["type"], refused["code"], refused["field"]) == (
            "error",
            "forbidden",
            "pattern",
        )
        assert (await attempt("alice", ">"))["code"] == "forbidden"
        assert (await attempt("root", "connection.>"))["type"] == "events.subscribed"
        async with httpx.AsyncClient(base_url=rd.base_url) as client:
            answer = await client.get(
                "/v1/events",
                params={"pattern": "room.>"},
                headers={"authorization": f"Bearer {tokens['alice']}"},
            )
            assert answer.status_code == 403
            assert answer.json()["error"]["field"] == "pattern"


async def test_a_websocket_subscriber_that_does_not_read_skips_ahead_and_stays_connected(
    start_daemon: Any,
) -> None:
    from tests.test_gateway import _masked_text, _raw_client, _take_frames

    rd = await start_daemon(websocket={"send_queue": 4}, events={"queue": 16})
    bus = rd.daemon.bus
    client, received = await _raw_client(rd.address, 4096)
    subscribe = json.dumps({"type": "events.subscribe", "pattern": "big.*"}).encode()
    await client.send_all(_masked_text(subscribe))
    with trio.fail_after(10):
        while b"events.subscribed" not in received:
            received.extend(await client.receive_some(65536))
    (conn,) = rd.daemon.gateway.connections.values()
    blob = "x" * 2000
    for n in range(1, 501):  # synchronous: the emitter never waits for the client
        bus.emit("big.thing", {"n": n, "blob": blob})
    head = bus.head
    seen: list[int] = []
    missed: list[tuple[int, int]] = []
    with trio.fail_after(20):
        while not seen or seen[-1] != head:
            received.extend(await client.receive_some(65536))
            for _opcode, payload in _take_frames(received):
                message = json.loads(payload)
                if message["type"] == "event":
                    seen.append(message["seq"])
                elif message["type"] == "events.lagged":
                    missed.append((message["missed_from"], message["missed_to"]))
    assert missed, "a client this far behind skips ahead"
    covered = sorted(seen + [s for a, b in missed for s in range(a, b + 1)])
    assert covered == list(range(head - 499, head + 1))  # no gap, no repeat, in order
    assert seen == sorted(seen)
    assert conn.id in rd.daemon.gateway.connections  # skipped ahead, not disconnected
    assert rd.daemon.metrics.registry.get_sample_value("raafd_subscriber_lag_skips_total")
    await client.aclose()
