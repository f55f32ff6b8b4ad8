"""``kill -9`` of a real ``raafd serve`` right after acknowledged room sends: every message
answered ``room.sent`` is in the room after the restart, with its id, in order; the room made
at run time and its members are there too, and a resend by ``client_id`` stores nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from tests.chatws import ask, recv, user
from tests.test_offline_durability import serve

PER_USER = 15  # under the default per-connection send rate's burst


async def send_all(ws: WebSocketConnection, prefix: str) -> list[tuple[int, str]]:
    """Send PER_USER messages at once, then collect their acknowledgements: (id, text)."""
    for i in range(PER_USER):
        await ws.send_message(
            json.dumps(
                {
                    "type": "room.send",
                    "room": "ops",
                    "text": f"{prefix} {i}",
                    "client_id": f"{prefix}-{i}",
                    "ref": f"{prefix} {i}",
                }
            )
        )
    acked: list[tuple[int, str]] = []
    while len(acked) < PER_USER:
        frame = await recv(ws)
        assert frame["type"] in ("room.message", "room.sent", "room.member"), frame
        if frame["type"] == "room.sent":
            acked.append((frame["id"], frame["ref"]))
    return acked


async def test_every_acknowledged_room_message_survives_kill_9(tmp_path: Path) -> None:
    acked: dict[str, list[tuple[int, str]]] = {}
    async with (
        serve(tmp_path) as url,
        user(url, "tok-ann") as (ann, ann_user),
        user(url, "tok-bob") as (bob, bob_user),
    ):
        created = await ask(ann, type="room.create", room="ops", title="Ops", history=1000)
        assert created["type"] == "room.created"
        assert (await ask(ann, type="room.join", room="ops"))["type"] == "room.joined"
        assert (await ask(bob, type="room.join", room="ops"))["type"] == "room.joined"

        async def run(name: str, ws: WebSocketConnection) -> None:
            acked[name] = await send_all(ws, name)

        async with trio.open_nursery() as n:
            n.start_soon(run, "ann", ann)
            n.start_soon(run, "bob", bob)
    # The last room.sent has been answered: kill -9 at once (the context's exit).
    sent: dict[int, str] = {i: text for got in acked.values() for i, text in got}
    assert sorted(sent) == list(range(1, 2 * PER_USER + 1))
    async with serve(tmp_path) as url, user(url, "tok-bob") as (bob, _):
        joined: dict[str, Any] = await ask(bob, type="room.join", room="ops", after=0)
        assert joined["type"] == "room.joined" and joined["head"] == 2 * PER_USER
        assert [(m["id"], m["text"]) for m in joined["messages"]] == sorted(sent.items())
        assert {m["user"] for m in joined["members"]} == {ann_user, bob_user}
        again = await ask(bob, type="room.send", room="ops", text="bob 3", client_id="bob-3")
        assert again["duplicate"] is True and sent[again["id"]] == "bob 3"
        await bob.send_message(
            json.dumps({"type": "room.send", "room": "ops", "text": "after the restart"})
        )
        while (frame := await recv(bob))["type"] != "room.sent":
            assert frame["type"] == "room.message" and frame["id"] == 2 * PER_USER + 1
        assert frame["id"] == 2 * PER_USER + 1
