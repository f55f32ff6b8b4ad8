"""The Python client's rooms against a real daemon: join with history, send (a generated
client_id), every message once and in order across dropped connections and a slow caller."""

from __future__ import annotations

import io
import os
from typing import Any

import trio

from raafd.client import RoomHandle, open_client
from raafd.client import chat as chat_cli
from tests.test_rooms import NO_LIMITS, TOKENS, client, join, say
from tests.waiting import wait_until


def kick_user(rd: Any, user: str) -> None:
    for conn_id, conn in list(rd.daemon.gateway.connections.items()):
        if conn.user == user:
            assert rd.daemon.gateway.kick(conn_id)


async def take(room: RoomHandle, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async for event in room:
            if event["type"] == "room.message":
                got.append(event)
                if len(got) == count:
                    break
    return got


async def test_a_joined_room_delivers_every_message_once_in_order_across_drops(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(
        auth={"tokens": TOKENS}, limits=NO_LIMITS, rooms={"lobby": {"rate_limit": 10_000}}
    )
    async with (
        open_client(rd.ws_url, token=TOKENS[0], backoff_base=0.01, backoff_max=0.05) as alice,
        open_client(rd.ws_url, token=TOKENS[1], room_buffer=8) as bob,
    ):
        first = await alice.join("lobby")
        assert first.history == [] and first.head == 0
        for i in range(5):
            assert await alice.send("lobby", f"early {i}") == i + 1
        # Bob joins late: the history brings what was said.
        room = await bob.join("lobby")
        assert [m["text"] for m in room.history] == [f"early {i}" for i in range(5)]
        assert room.last_id == 5
        # Alice's connection drops again and again while Bob talks and while she reads.
        sender_done = trio.Event()

        async def talk() -> None:
            for i in range(60):
                await bob.send("lobby", f"live {i}", meta={"i": i})
                if i in (10, 30, 45):
                    kick_user(rd, alice.user or "")
            sender_done.set()

        async with trio.open_nursery() as n:
            n.start_soon(talk)
            got = await take(first, 65)
        assert [m["id"] for m in got] == list(range(1, 66))
        assert [m["text"] for m in got[5:]] == [f"live {i}" for i in range(60)]
        assert alice.reconnects >= 3
        # Bob read nothing meanwhile: his buffer (8) overflowed; he still gets every message,
        # the missed ones read back from the room's history.
        got = await take(room, 60)
        assert [m["id"] for m in got] == list(range(6, 66))


async def test_a_retried_send_after_a_drop_never_posts_twice(start_daemon: Any) -> None:
    rd = await start_daemon(auth={"tokens": TOKENS}, limits=NO_LIMITS)
    async with open_client(rd.ws_url, token=TOKENS[0], backoff_base=0.01) as alice:
        await rd.daemon.rooms.create("ops", {}, "admin")
        await alice.join("ops")
        first = await alice.send("ops", "once", client_id="fixed")
        kick_user(rd, alice.user or "")
        with trio.fail_after(10):
            await wait_until(lambda: alice.reconnects == 1 and alice.connected)
        again = await alice.send("ops", "once", client_id="fixed")
        assert again == first == 1
        assert rd.daemon.rooms.rooms["ops"].head == 1
        await alice.typing("ops")  # answered by nothing; the connection goes on
        history = await alice.room_history("ops", after=0)
        assert [(m["id"], m["text"]) for m in history] == [(1, "once")]


async def test_raafd_chat_room_shows_others_and_the_agents_streamed_reply_on_their_own_lines(
    start_daemon: Any,
) -> None:
    rd = await start_daemon(
        auth={"tokens": TOKENS},
        limits=NO_LIMITS,
        providers={"demo": {"tokens_per_second": 200.0, "reply_words": 30}},
        rooms={"lobby": {"agent": "assistant"}},
    )
    read_end, write_end = os.pipe()
    stdout = io.StringIO()
    _, interrupts = trio.open_memory_channel[None](1)
    result: list[int] = []
    with os.fdopen(read_end) as stdin, os.fdopen(write_end, "w") as typed:

        async def run_chat() -> None:
            status = await chat_cli.chat(
                rd.ws_url,
                agent=None,
                token=TOKENS[0],
                stdin=stdin,
                stdout=stdout,
                interrupts=interrupts,
                room="lobby",
            )
            result.append(status)

        async with trio.open_nursery() as n, client(rd, TOKENS[1]) as (b, bob):
            await join(b, "lobby")
            await say(b, "lobby", "before you came")
            n.start_soon(run_chat)
            room = rd.daemon.rooms.rooms["lobby"]
            with trio.fail_after(30):
                await wait_until(lambda: "joined lobby" in stdout.getvalue())
                typed.write("hello @assistant\n")
                typed.flush()
                await wait_until(lambda: room.reply is not None)
                # Someone else speaks while the agent's reply streams.
                await say(b, "lobby", "bob here")
                await wait_until(lambda: room.head == 4)  # the reply is stored
                await wait_until(lambda: stdout.getvalue().endswith("\n") and room.reply is None)
            typed.close()
            with trio.fail_after(10):
                await wait_until(lambda: bool(result))
    assert result == [0]
    lines = stdout.getvalue().splitlines()
    assert f"[{bob}] before you came" in lines
    assert f"[{bob}] bob here" in lines
    kept = await rd.daemon.rooms.history("lobby", None, after=0)
    (reply,) = [m for m in kept if m.sender == "agent:assistant"]
    reply_lines = [line for line in lines if line.startswith("[agent:assistant] ")]
    # Streamed on lines of its own (taken up again after bob's line), and whole.
    assert "".join(line.removeprefix("[agent:assistant] ") for line in reply_lines) == reply.text
