"""``kill -9`` of a real ``raafd serve`` right after answers: every direct message answered
``dm.sent`` is still queued after a restart, and every one answered ``acked`` is gone."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection

from tests.chatws import ask, recv, user
from tests.test_lifecycle import RAAFD, free_port, write_config

TOKENS = '[auth]\ntokens = ["tok-ann", "tok-bob"]\n'


@asynccontextmanager
async def serve(tmp: Path) -> AsyncIterator[str]:
    """A ``raafd serve`` on the state in ``tmp``, ready; killed (SIGKILL) on exit."""
    port = free_port()
    write_config(tmp / "raafd.toml", tmp, port, TOKENS)
    notify_path = tmp / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1"}
    env.pop("RAAFD_CONFIG", None)
    with (tmp / "stderr.log").open("ab") as stderr:
        proc = await trio.lowlevel.open_process(
            [*RAAFD, "serve", "--config", str(tmp / "raafd.toml")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        with trio.fail_after(60):  # a loaded machine imports slowly
            while b"READY=1" not in await notify.recv(4096):
                pass
        yield f"ws://127.0.0.1:{port}/v1/ws"
    finally:
        proc.kill()  # SIGKILL: no drain, no close of the database
        with trio.fail_after(10):
            await proc.wait()
        notify.close()


async def queued_ids(ws: WebSocketConnection, count: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        frame = await recv(ws)
        assert frame["type"] == "queued", frame
        ids += [m["id"] for m in frame["messages"]]
    return ids


async def test_everything_answered_survives_kill_9(tmp_path: Path) -> None:
    async with serve(tmp_path) as url:
        async with user(url, "tok-bob") as (_, bob):
            pass
        async with user(url, "tok-ann") as (ann_ws, _):
            first = [
                (await ask(ann_ws, type="dm.send", to=bob, text=f"m{i}", client_id=f"k{i}"))["id"]
                for i in range(20)
            ]
        async with user(url, "tok-bob") as (bob_ws, _):
            assert await queued_ids(bob_ws, 20) == first
            acked = await ask(bob_ws, type="ack", ids=first[:10])
            assert acked["deleted"] == 10
            async with user(url, "tok-ann") as (ann_ws, _):
                later = [
                    (await ask(ann_ws, type="dm.send", to=bob, text=f"n{i}"))["id"]
                    for i in range(5)
                ]
        # The last dm.sent has been answered: kill -9 at once (the context's exit).
    async with serve(tmp_path) as url:
        async with user(url, "tok-bob") as (bob_ws, _):
            assert await queued_ids(bob_ws, 15) == first[10:] + later
            assert (await ask(bob_ws, type="ping"))["type"] == "pong"  # and nothing else
        async with user(url, "tok-ann") as (ann_ws, _):
            # The client_id of an acknowledged message is still known: no duplicate.
            resent = await ask(ann_ws, type="dm.send", to=bob, text="m0", client_id="k0")
            assert resent["id"] == first[0]
