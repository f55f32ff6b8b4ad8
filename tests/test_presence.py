"""Presence through a real daemon: the reconnect linger, away and back, watching, the HTTP
listing, and bad commands (autojump clock: the times are exact)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.chatws import ask, recv, user

TOKENS = {"auth": {"tokens": ["tok-ann", "tok-bob"]}}


async def test_a_reconnect_within_the_linger_is_invisible_and_offline_comes_exactly_after_it(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    clock = rd.daemon.presence.clock
    async with user(rd.ws_url, "tok-bob") as (bob, _):
        async with user(rd.ws_url, "tok-ann") as (_, ann):
            listed = await ask(bob, type="presence.get", users=[ann, "nobody"], watch=True)
            assert listed["type"] == "presence.list"
            assert [u["status"] for u in listed["users"]] == ["online", "offline"]
            assert listed["users"][1]["last_seen"] is None
        # Ann's page reloads 14 s later: Bob is told nothing.
        await trio.sleep(14)
        async with user(rd.ws_url, "tok-ann"):
            still = await ask(bob, type="presence.get", users=[ann])
            assert still["users"][0]["status"] == "online"
        left_at = trio.current_time()
        offline = await recv(bob)
        assert offline == {
            "type": "presence",
            "user": ann,
            "status": "offline",
            "last_seen": offline["last_seen"],
            "meta": None,
        }
        assert trio.current_time() - left_at == pytest.approx(15.0, abs=0.01)
        assert clock.deadline(offline["last_seen"]) == pytest.approx(left_at, abs=0.01)
        stats = rd.daemon.stats()["presence"]
        assert (stats["online"], stats["offline_known"]) == (1, 1)
        # On the event bus: each change once (the reconnect is not one).
        changes, _ = rd.daemon.bus.replay("presence.changed", 0, limit=100)
        assert [(e.data["user"], e.data["status"]) for e in changes if e.data["user"] == ann] == [
            (ann, "online"),
            (ann, "offline"),
        ]


async def test_away_after_inactivity_and_back_with_a_custom_status(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(chat={"away_after": 120.0}, **TOKENS)
    async with user(rd.ws_url, "tok-bob") as (bob, _), user(rd.ws_url, "tok-ann") as (ann_ws, ann):
        active_at = trio.current_time()
        await ask(bob, type="presence.get", users=[ann], watch=True)
        # Ann's client pings (passive: not activity); her tab is idle.
        await trio.sleep(60)
        await ask(ann_ws, type="ping")
        away = await recv(bob)
        assert (away["status"], away["user"]) == ("away", ann)
        assert trio.current_time() - active_at == pytest.approx(120.0, abs=0.01)
        # Her next real command brings her back, and her custom status comes along.
        mine = await ask(ann_ws, type="presence.set", status="online", meta={"text": "back"})
        assert (mine["type"], mine["status"], mine["meta"]) == (
            "presence",
            "online",
            {"text": "back"},
        )
        back = await recv(bob)
        assert (back["status"], back["meta"]) == ("online", {"text": "back"})
        # Set away by hand: activity does not undo it.
        await ask(ann_ws, type="presence.set", status="away")
        assert (await recv(bob))["status"] == "away"
        await ask(ann_ws, type="presence.get", users=[ann])
        await ask(ann_ws, type="presence.set", status="away", meta={"text": "lunch"})
        assert (await recv(bob))["meta"] == {"text": "lunch"}
        # Unwatched: nothing more arrives (the next frame is the reply to a later ping).
        await ask(bob, type="presence.unwatch", users=[ann])
        await ask(ann_ws, type="presence.set", status="online")
        assert (await ask(bob, type="ping"))["type"] == "pong"
        snap = rd.daemon.metrics.snapshot()
        assert snap["raafd_presence_changes_total{status=away}"] == 3


async def test_get_presence_over_http(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    headers = {"authorization": "Bearer tok-bob"}
    async with (
        httpx.AsyncClient(base_url=rd.base_url, headers=headers) as http,
        user(rd.ws_url, "tok-ann") as (_, ann),
    ):
        with trio.fail_after(10):
            listing = (await http.get("/v1/presence")).json()
            assert [(u["user"], u["status"]) for u in listing["users"]] == [(ann, "online")]
            asked = (await http.get("/v1/presence", params={"users": f"x,{ann}"})).json()
            assert [u["status"] for u in asked["users"]] == ["offline", "online"]
            bad = await http.get("/v1/presence", params={"limit": "0"})
            assert bad.status_code == 400 and bad.json()["error"]["field"] == "limit"
            many = await http.get("/v1/presence", params={"users": ",".join(["u"] * 101)})
            assert many.status_code == 400 and many.json()["error"]["field"] == "users"
            assert (
                await http.get("/v1/presence", headers={"authorization": ""})
            ).status_code == 401


@pytest.mark.parametrize(
    ("command", "field"),
    [
        ({"type": "presence.set", "status": "busy"}, "status"),
        ({"type": "presence.set", "meta": [1, 2]}, "meta"),
        ({"type": "presence.set", "meta": {"text": "x" * 600}}, "meta"),
        ({"type": "presence.set", "mood": "ok"}, "mood"),
        ({"type": "presence.get", "users": []}, "users"),
        ({"type": "presence.get", "users": ["a"], "watch": "yes"}, "watch"),
        ({"type": "presence.get", "users": ["x" * 129]}, "users.0"),
        ({"type": "presence.get"}, "users"),
        ({"type": "presence.get", "users": [f"u{i}" for i in range(3)], "watch": True}, "users"),
    ],
)
async def test_a_bad_presence_command_is_refused_and_the_connection_goes_on(
    start_daemon: Any, command: dict[str, Any], field: str
) -> None:
    rd = await start_daemon(chat={"presence_watch_max": 2})
    async with user(rd.ws_url, "") as (ws, me):
        error = await ask(ws, **command)
        assert error["type"] == "error" and error["field"] == field, error
        assert error["code"] in ("bad_request", "too_large")
        ok = await ask(ws, type="presence.get", users=[me])
        assert ok["users"][0]["status"] == "online"
