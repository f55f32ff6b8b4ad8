"""Rooms over HTTP and the admin socket, against a real daemon: list, create, read and publish;
restricted rooms refused; ``raafd ctl rooms``, ``room``, ``kick --room``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from raafd.admin.client import admin_call
from raafd.admin.ctl import main as ctl_main
from raafd.errors import NotFound
from tests.test_rooms import NO_LIMITS, TOKENS, client, join, recv_type, say

ROOMS = {"lobby": {"title": "Lobby"}, "vip": {"restricted": True}}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_a_service_publishes_and_reads_over_http_what_members_see_live(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(auth={"tokens": TOKENS}, limits=NO_LIMITS, rooms=ROOMS)
    async with (
        httpx.AsyncClient(base_url=rd.base_url, headers=bearer(TOKENS[0]), timeout=10) as http,
        client(rd, TOKENS[1]) as (ws, _),
    ):
        await join(ws, "lobby")
        listing = (await http.get("/v1/rooms")).json()["rooms"]
        assert [r["room"] for r in listing] == ["lobby"]  # vip is not listed to this principal
        first = await http.post("/v1/rooms/lobby/messages", json={"text": "deploy done"})
        assert first.status_code == 201 and first.json() == {"room": "lobby", "id": 1}
        live = await recv_type(ws, "room.message")
        assert (live["id"], live["text"]) == (1, "deploy done")
        again = await http.post(
            "/v1/rooms/lobby/messages", json={"text": "x", "client_id": "k", "meta": {"n": 1}}
        )
        repeat = await http.post("/v1/rooms/lobby/messages", json={"text": "x", "client_id": "k"})
        assert again.json()["id"] == repeat.json()["id"] == 2 and repeat.json()["duplicate"]
        for i in range(3, 8):
            await say(ws, "lobby", f"m{i}")
        page = (await http.get("/v1/rooms/lobby/messages", params={"after": 2, "limit": 3})).json()
        assert [m["id"] for m in page["messages"]] == [3, 4, 5]
        newest = (await http.get("/v1/rooms/lobby/messages", params={"limit": 2})).json()
        assert [m["id"] for m in newest["messages"]] == [6, 7]
        older = await http.get("/v1/rooms/lobby/messages", params={"before": 3})
        assert [(m["id"], m["meta"]) for m in older.json()["messages"]] == [
            (1, None),
            (2, {"n": 1}),
        ]
        room = (await http.get("/v1/rooms/lobby")).json()
        assert room["head"] == 7 and room["member_count"] == 1 and room["connections"] == 1
        made = await http.post("/v1/rooms", json={"room": "ops", "title": "Ops"})
        assert made.status_code == 201 and made.json()["room"] == "ops"
        assert (await http.post("/v1/rooms", json={"room": "ops"})).status_code == 409
        bad = await http.post("/v1/rooms", json={"room": "no spaces"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "room"
        long = await http.post("/v1/rooms/lobby/messages", json={"text": "y" * 5000})
        assert long.status_code == 413 and long.json()["error"]["field"] == "text"
        missing = await http.get("/v1/rooms/nope/messages")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        wrong = await http.get("/v1/rooms/lobby/messages", params={"after": "x"})
        assert wrong.status_code == 400 and wrong.json()["error"]["field"] == "after"


async def test_a_restricted_room_is_refused_over_http(start_daemon: Any) -> None:
    rd = await start_daemon(auth={"tokens": TOKENS}, limits=NO_LIMITS, rooms=ROOMS)
    async with httpx.AsyncClient(base_url=rd.base_url, headers=bearer(TOKENS[0])) as http:
        for method, path, body in (
            ("GET", "/v1/rooms/vip", None),
            ("GET", "/v1/rooms/vip/messages", None),
            ("POST", "/v1/rooms/vip/messages", {"text": "let me in"}),
        ):
            answer = await http.request(method, path, json=body)
            assert answer.status_code == 403, path
            assert answer.json()["error"]["code"] == "forbidden"
        assert rd.daemon.rooms.rooms["vip"].head == 0


async def test_operators_list_rooms_show_one_and_kick_a_member(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rd = await start_daemon(auth={"tokens": TOKENS}, limits=NO_LIMITS, rooms=ROOMS)
    sock = rd.daemon.config.admin_socket_path
    async with client(rd, TOKENS[0]) as (a, alice), client(rd, TOKENS[1]) as (b, bob):
        await join(a, "lobby")
        await join(b, "lobby")
        await say(a, "lobby", "hello")
        rows = await admin_call(sock, "rooms")
        lobby = next(r for r in rows if r["room"] == "lobby")
        assert (lobby["members"], lobby["online"], lobby["head"]) == (2, 2, 1)
        shown = await admin_call(sock, "room", {"room": "lobby"})
        assert {m["user"] for m in shown["members"]} == {alice, bob}
        assert shown["messages_per_minute"] >= 1
        assert await admin_call(sock, "room-kick", {"room": "lobby", "user": bob}) == {
            "room": "lobby",
            "kicked": bob,
        }
        left = await recv_type(a, "room.member")
        while left["event"] != "leave":
            left = await recv_type(a, "room.member")
        assert left["user"] == bob
        assert bob not in rd.daemon.rooms.rooms["lobby"].members
        await b.send_message('{"type": "room.send", "room": "lobby", "text": "still here?"}')
        assert (await recv_type(b, "error"))["code"] == "forbidden"
        with pytest.raises(NotFound):
            await admin_call(sock, "room-kick", {"room": "lobby", "user": bob})
        stats = rd.daemon.stats()["rooms"]
        assert stats["by_room"]["lobby"]["members"] == 1
        # The ctl command prints the same for people.
        for argv in (["rooms"], ["room", "lobby"]):
            argv += ["--socket", str(sock)]
            assert await trio.to_thread.run_sync(ctl_main, argv) == 0
            assert "lobby" in capsys.readouterr().out
