"""Direct messages and offline queues through a real daemon (autojump clock, memory store: the
times are exact): deliver → ack → gone, unacked → redelivered, expired → never, bounds, the
operators' listing, and bad commands."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection

from raafd.store.offline import NewMessage
from tests.chatws import ask, recv, user
from tests.waiting import wait_until

TOKENS = {"auth": {"tokens": ["tok-ann", "tok-bob"]}}


async def names(rd: Any) -> tuple[str, str]:
    async with user(rd.ws_url, "tok-ann") as (_, ann), user(rd.ws_url, "tok-bob") as (_, bob):
        return ann, bob


async def nothing_queued(ws: WebSocketConnection) -> None:
    """The next frame is the answer to a ping: nothing was queued before it."""
    assert (await ask(ws, type="ping"))["type"] == "pong"


async def test_delivered_on_the_next_connection_then_acked_and_gone(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    ann, bob = await names(rd)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        sent = [await ask(ann_ws, type="dm.send", to=bob, text=f"hi {i}") for i in range(3)]
    assert [s["type"] for s in sent] == ["dm.sent"] * 3
    ids = [s["id"] for s in sent]
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        queued = await recv(bob_ws)  # right after welcome
        assert queued["type"] == "queued"
        assert [(m["id"], m["kind"], m["from"], m["text"]) for m in queued["messages"]] == [
            (ids[i], "dm", ann, f"hi {i}") for i in range(3)
        ]
        acked = await ask(bob_ws, type="ack", ids=ids[:2])
        assert (acked["type"], acked["deleted"]) == ("acked", 2)
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        again = await recv(bob_ws)
        assert [m["id"] for m in again["messages"]] == [ids[2]]  # unacked: delivered again
        await ask(bob_ws, type="ack", ids=[ids[2]])
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        await nothing_queued(bob_ws)
    snap = rd.daemon.metrics.snapshot()
    assert snap["raafd_offline_queued_total{kind=dm}"] == 3
    assert snap["raafd_offline_acked_total"] == 3
    assert snap["raafd_offline_delivered_total"] == 4
    assert rd.daemon.stats()["offline"]["depth"] == 0


async def test_an_unacked_message_is_redelivered_on_the_same_connection_after_redeliver_after(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(chat={"redeliver_after": 30.0}, **TOKENS)
    _, bob = await names(rd)
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _), user(rd.ws_url, "tok-ann") as (ann_ws, _):
        sent = await ask(ann_ws, type="dm.send", to=bob, text="are you there?")
        pushed = await recv(bob_ws)  # a connected recipient gets it at once
        pushed_at = trio.current_time()
        assert [m["id"] for m in pushed["messages"]] == [sent["id"]]
        again = await recv(bob_ws)
        assert trio.current_time() - pushed_at == pytest.approx(30.0, abs=0.01)
        assert again == pushed
        await ask(bob_ws, type="ack", ids=[sent["id"]])
        await trio.sleep(120)  # acknowledged: never again
        await nothing_queued(bob_ws)
    snap = rd.daemon.metrics.snapshot()
    assert snap["raafd_offline_redelivered_total"] == 1


async def test_an_expired_message_is_never_delivered(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(chat={"offline_ttl": 100.0}, **TOKENS)
    _, bob = await names(rd)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        await ask(ann_ws, type="dm.send", to=bob, text="soon stale")
    await trio.sleep(99.5)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        await ask(ann_ws, type="dm.send", to=bob, text="fresh")
    await trio.sleep(0.5)  # the first one has lived its 100 s
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        queued = await recv(bob_ws)
        assert [m["text"] for m in queued["messages"]] == ["fresh"]
    await trio.sleep(60)  # the reaper deletes it
    assert rd.daemon.metrics.snapshot()["raafd_offline_expired_total"] == 1
    assert rd.daemon.stats()["offline"]["depth"] == 1


async def test_a_resend_with_the_same_client_id_is_one_message(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    _, bob = await names(rd)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        first = await ask(ann_ws, type="dm.send", to=bob, text="once", client_id="k1")
        second = await ask(ann_ws, type="dm.send", to=bob, text="once", client_id="k1")
        assert first["id"] == second["id"]
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        assert len((await recv(bob_ws))["messages"]) == 1


async def test_a_full_queue_drops_the_oldest_and_counts_them(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(chat={"offline_max": 3}, **TOKENS)
    _, bob = await names(rd)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        for i in range(5):
            await ask(ann_ws, type="dm.send", to=bob, text=f"m{i}")
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        assert [m["text"] for m in (await recv(bob_ws))["messages"]] == ["m2", "m3", "m4"]
    assert rd.daemon.metrics.snapshot()["raafd_offline_dropped_total"] == 2


async def test_operators_read_a_queue_over_http_without_acknowledging_it(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    ann, bob = await names(rd)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        for i in range(3):
            await ask(ann_ws, type="dm.send", to=bob, text=f"m{i}")
    async with httpx.AsyncClient(
        base_url=rd.base_url, headers={"authorization": "Bearer tok-ann"}
    ) as http:
        with trio.fail_after(10):
            got = (await http.get(f"/v1/users/{bob}/queue", params={"limit": "2"})).json()
            bad = await http.get(f"/v1/users/{bob}/queue", params={"limit": "x"})
    assert (got["user"], got["depth"]) == (bob, 3)
    assert [(m["from"], m["text"]) for m in got["messages"]] == [(ann, "m0"), (ann, "m1")]
    assert got["messages"][0]["expires_at"] > got["messages"][0]["ts"]
    assert bad.status_code == 400
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        assert len((await recv(bob_ws))["messages"]) == 3


@pytest.mark.parametrize(
    ("command", "code", "field"),
    [
        ({"type": "dm.send", "text": "hi"}, "bad_request", "to"),
        ({"type": "dm.send", "to": "x", "text": ""}, "bad_request", "text"),
        ({"type": "dm.send", "to": "x", "text": "y" * 41}, "too_large", "text"),
        ({"type": "dm.send", "to": "x", "text": "y", "client_id": 7}, "bad_request", "client_id"),
        ({"type": "ack", "ids": []}, "bad_request", "ids"),
        ({"type": "ack", "ids": [1]}, "bad_request", "ids.0"),
        ({"type": "ack", "ids": ["1"], "all": True}, "bad_request", "all"),
    ],
)
async def test_a_bad_dm_or_ack_is_refused_and_the_connection_goes_on(
    start_daemon: Any,
    autojump_clock: trio.testing.MockClock,
    command: dict[str, Any],
    code: str,
    field: str,
) -> None:
    rd = await start_daemon(chat={"max_message_length": 40})
    async with user(rd.ws_url, "") as (ws, me):
        error = await ask(ws, **command)
        assert (error["type"], error["code"], error.get("field")) == ("error", code, field), error
        await ws.send_message(json.dumps({"type": "dm.send", "to": me, "text": "to myself"}))
        # To oneself: the push (`queued`) and the answer (`dm.sent`) both come.
        frames = {f["type"]: f for f in [await recv(ws), await recv(ws)]}
        sent = frames["dm.sent"]
        assert frames["queued"]["messages"][0]["id"] == sent["id"]
        assert (await ask(ws, type="ack", ids=[sent["id"]]))["deleted"] == 1


async def test_a_long_queue_comes_a_window_at_a_time_as_the_client_acks(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(chat={"offline_max": 5000}, **TOKENS)
    _, bob = await names(rd)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        first = await ask(ann_ws, type="dm.send", to=bob, text="m0")
    store = rd.daemon.offline.store
    now = rd.daemon.presence.clock()
    for i in range(1, 1050):  # straight into the store: 1,050 in all
        message = NewMessage("dm", "ann", f"m{i}", now, now + 3600)
        await store.enqueue(bob, message, max_queue=5000, max_total=10_000)
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        window: list[str] = []
        while len(window) < 1000:
            frame = await recv(bob_ws)
            assert frame["type"] == "queued" and len(frame["messages"]) <= 100
            window += [m["id"] for m in frame["messages"]]
        assert window[0] == first["id"] and len(window) == 1000
        await nothing_queued(bob_ws)  # the rest waits for acks
        assert (await ask(bob_ws, type="ack", ids=window))["deleted"] == 1000
        rest = await recv(bob_ws)
        assert [m["text"] for m in rest["messages"]] == [f"m{i}" for i in range(1000, 1050)]


async def test_a_room_message_is_queued_for_the_members_with_no_connection(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    ann, bob = await names(rd)
    offline = rd.daemon.offline
    async with user(rd.ws_url, "tok-ann") as (ann_ws, _):
        now = rd.daemon.presence.clock()
        # Ann (the sender, connected) and Bob (no connection) are members; so is carol.
        assert offline.room_message("lobby", [ann, bob, "carol"], ann, "hello room", now) == 2
        await wait_until(lambda: offline.store.total() == 2)
        await nothing_queued(ann_ws)
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        queued = (await recv(bob_ws))["messages"]
        assert [(m["kind"], m["room"], m["from"], m["text"]) for m in queued] == [
            ("room", "lobby", ann, "hello room")
        ]
    assert rd.daemon.metrics.snapshot()["raafd_offline_queued_total{kind=room}"] == 2


async def test_only_an_admin_reads_another_users_queue_when_roles_are_defined(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    auth = {
        "users": {
            "ann": {"token": "tok-ann", "roles": ["member"]},
            "ops": {"token": "tok-ops", "roles": ["ops"]},
        },
        "roles": {"member": {"agents": ["*"]}, "ops": {"agents": ["*"], "admin": True}},
    }
    rd = await start_daemon(auth=auth)
    async with httpx.AsyncClient(base_url=rd.base_url) as http:
        with trio.fail_after(10):
            ann = await http.get("/v1/users/bob/queue", headers={"authorization": "Bearer tok-ann"})
            ops = await http.get("/v1/users/bob/queue", headers={"authorization": "Bearer tok-ops"})
    assert ann.status_code == 403 and ann.json()["error"]["code"] == "forbidden"
    assert ops.status_code == 200 and ops.json()["depth"] == 0
