"""Presence in rooms, through a real daemon (autojump clock, memory store): member lists with
each member's presence, ``room.member`` updates after the linger, ``presence.get {room}``,
``GET /v1/rooms/{room}/members``, and room messages queued for members with no connection."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection

from tests.chatws import ask, recv, user

TOKENS = {"auth": {"tokens": ["tok-ann", "tok-bob"]}}
ROOMS = {"lobby": {"offline_delivery": True}, "plain": {}}


async def next_of(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    while (message := await recv(ws))["type"] != kind:
        pass
    return message


async def answer(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    """A command's answer, past the room's own frames that may come first."""
    await ws.send_message(json.dumps({"ref": "r", **command}))
    while (message := await recv(ws)).get("ref") != "r":
        pass
    return message


async def test_members_carry_presence_and_a_change_is_a_room_member_update(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(rooms=ROOMS, **TOKENS)
    async with user(rd.ws_url, "tok-ann") as (ann_ws, ann):
        async with user(rd.ws_url, "tok-bob") as (bob_ws, bob):
            await ask(bob_ws, type="room.join", room="plain")
            # Bob's own connections in the room hear of it too (before the answer).
            await bob_ws.send_message(
                json.dumps({"type": "presence.set", "status": "away", "meta": {"text": "afk"}})
            )
            mine = await next_of(bob_ws, "room.member")
            assert (mine["user"], mine["status"]) == (bob, "away")
            assert (await next_of(bob_ws, "presence"))["status"] == "away"
            joined = await ask(ann_ws, type="room.join", room="plain")
            by_user = {m["user"]: m for m in joined["members"]}
            assert (by_user[bob]["status"], by_user[bob]["meta"]) == ("away", {"text": "afk"})
            assert by_user[ann]["status"] == "online"
            listed = await ask(ann_ws, type="presence.get", room="plain")
            assert (listed["room"], [u["user"] for u in listed["users"]]) == (
                "plain",
                sorted([ann, bob]),
            )
        left_at = trio.current_time()
        update = await next_of(ann_ws, "room.member")
        assert (update["room"], update["user"], update["event"], update["status"]) == (
            "plain",
            bob,
            "update",
            "offline",
        )
        assert trio.current_time() - left_at == pytest.approx(15.0, abs=0.01)  # the linger
        async with httpx.AsyncClient(
            base_url=rd.base_url, headers={"authorization": "Bearer tok-ann"}
        ) as http:
            with trio.fail_after(10):
                members = (await http.get("/v1/rooms/plain/members")).json()
                missing = await http.get("/v1/rooms/nowhere/members")
        assert {m["user"]: m["status"] for m in members["members"]} == {
            ann: "online",
            bob: "offline",
        }
        assert missing.status_code == 404
        bad = await ask(ann_ws, type="presence.get", room="nowhere")
        assert (bad["code"], bad["field"]) == ("not_found", "room")


async def test_a_room_with_offline_delivery_queues_messages_for_absent_members(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(rooms=ROOMS, **TOKENS)
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        await answer(bob_ws, type="room.join", room="lobby")
        await answer(bob_ws, type="room.join", room="plain")
    async with user(rd.ws_url, "tok-ann") as (ann_ws, ann):
        await answer(ann_ws, type="room.join", room="lobby")
        await answer(ann_ws, type="room.join", room="plain")
        sent = await answer(ann_ws, type="room.send", room="lobby", text="while you were out")
        await answer(ann_ws, type="room.send", room="plain", text="not queued: no offline_delivery")
    async with user(rd.ws_url, "tok-bob") as (bob_ws, _):
        queued = await next_of(bob_ws, "queued")
        assert [(m["kind"], m["room"], m["from"], m["text"]) for m in queued["messages"]] == [
            ("room", "lobby", ann, "while you were out")
        ]
        assert sent["type"] == "room.sent"
        await answer(bob_ws, type="ack", ids=[queued["messages"][0]["id"]])
    assert rd.daemon.offline.store.total() == 0
