"""The Python client's direct messages, queued-message handler and presence, against a real
daemon (autojump clock, memory store)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from raafd.client import open_client
from tests.waiting import wait_until

TOKENS = {"auth": {"tokens": ["tok-ann", "tok-bob"]}}


async def depth(rd: Any, user: str) -> int:
    count, _ = await rd.daemon.offline.listing(user, 10)
    return int(count)


async def test_a_queued_message_is_acked_only_after_the_handler_returned(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(chat={"redeliver_after": 30.0}, **TOKENS)
    async with open_client(rd.ws_url, token="tok-bob") as bob:
        bob_user = bob.user
    assert bob_user is not None
    async with open_client(rd.ws_url, token="tok-ann") as ann:
        first = await ann.dm(bob_user, "first")
        second = await ann.dm(bob_user, "second")
    assert first != second

    seen: list[str] = []
    release = trio.Event()
    failed_once = False

    async def handler(message: dict[str, Any]) -> None:
        nonlocal failed_once
        seen.append(message["text"])
        if message["text"] == "first":
            await release.wait()  # the caller is still handling it
        elif not failed_once:
            failed_once = True
            raise RuntimeError("the application failed on this one")

    with trio.fail_after(600):
        async with open_client(rd.ws_url, token="tok-bob", on_queued=handler):
            await wait_until(lambda: seen == ["first"])
            assert await depth(rd, bob_user) == 2  # nothing acknowledged while it runs
            failed_at = trio.current_time()
            release.set()
            await wait_until(lambda: seen == ["first", "second"])
            # The failed one stays queued and comes again after redeliver_after.
            await wait_until(lambda: len(seen) == 3)
            assert seen[2] == "second"
            assert trio.current_time() - failed_at >= 30.0
            await wait_until(lambda: rd.daemon.offline.store.total() == 0)
    assert rd.daemon.metrics.snapshot()["raafd_offline_acked_total"] == 2


async def test_a_dm_sent_twice_by_client_id_is_one_message(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    async with open_client(rd.ws_url, token="tok-ann") as ann:
        again = [await ann.dm("somebody", "hello", client_id="once") for _ in range(2)]
    assert again[0] == again[1]
    assert await depth(rd, "somebody") == 1


async def test_presence_through_the_client(
    start_daemon: Any, autojump_clock: trio.testing.MockClock
) -> None:
    rd = await start_daemon(**TOKENS)
    changes: list[dict[str, Any]] = []
    async with open_client(rd.ws_url, token="tok-bob", on_presence=changes.append) as bob:
        async with open_client(rd.ws_url, token="tok-ann") as ann:
            mine = await ann.set_presence("away", {"text": "reading"})
            assert (mine["status"], mine["meta"]) == ("away", {"text": "reading"})
            assert ann.user is not None
            found = await bob.get_presence([ann.user], watch=True)
            assert [(p["user"], p["status"]) for p in found] == [(ann.user, "away")]
        with trio.fail_after(600):
            await wait_until(lambda: bool(changes))
        assert (changes[0]["user"], changes[0]["status"]) == (ann.user, "offline")
