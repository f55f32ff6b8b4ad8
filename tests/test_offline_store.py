"""The offline queue stores, SQLite and memory, held to the same contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from raafd.store.db import open_database
from raafd.store.offline import NewMessage, OfflineStore, QueueFull
from raafd.store.offline_memory import MemoryOfflineStore
from raafd.store.offline_sqlite import MIGRATIONS, SqliteOfflineStore


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OfflineStore]:
    if request.param == "memory":
        yield MemoryOfflineStore()
        return
    with trio.fail_after(30):
        async with open_database(tmp_path / "raafd.sqlite3", {"offline": MIGRATIONS}) as db:
            yield await SqliteOfflineStore.open(db)


def dm(text: str, ts: float = 1000.0, ttl: float = 100.0, **kw: str) -> NewMessage:
    return NewMessage(
        kind="dm", sender=kw.pop("sender", "ann"), text=text, ts=ts, expires_at=ts + ttl, **kw
    )


async def put(store: OfflineStore, user: str, message: NewMessage, **bounds: int) -> str:
    with trio.fail_after(30):
        done = await store.enqueue(
            user,
            message,
            max_queue=bounds.get("max_queue", 10),
            max_total=bounds.get("max_total", 100),
        )
    return done.message.id


async def texts(store: OfflineStore, user: str, now: float = 1000.0) -> list[str]:
    with trio.fail_after(30):
        found = [m.text for m in await store.pending(user, now, 100)]
        if isinstance(store, SqliteOfflineStore):  # the kept queue lengths are the true ones
            kept = await store.db.read(
                lambda c: c.execute("SELECT user, depth FROM offline_depths").fetchall()
            )
            counted = await store.db.read(
                lambda c: c.execute(
                    "SELECT user, count(*) FROM offline_messages GROUP BY user"
                ).fetchall()
            )
            assert sorted(kept) == sorted(counted)
    return found


async def test_a_queue_keeps_order_and_an_ack_deletes_only_the_owners_messages(
    store: OfflineStore,
) -> None:
    ids = [await put(store, "bob", dm(t)) for t in ("one", "two", "three")]
    await put(store, "cy", dm("for cy"))
    assert await texts(store, "bob") == ["one", "two", "three"]
    with trio.fail_after(30):
        assert await store.ack("cy", ids) == 0  # not cy's
        assert await store.ack("bob", [ids[0], ids[2], "nonsense", "99999"]) == 2
    assert await texts(store, "bob") == ["two"]
    assert await texts(store, "cy") == ["for cy"]
    assert store.total() == 2


async def test_a_full_queue_drops_its_oldest_and_the_total_bound_refuses(
    store: OfflineStore,
) -> None:
    dropped = []
    for i in range(5):
        with trio.fail_after(30):
            done = await store.enqueue("bob", dm(f"m{i}"), max_queue=3, max_total=4)
        dropped.append(done.dropped)
    assert dropped == [0, 0, 0, 1, 1]
    assert await texts(store, "bob") == ["m2", "m3", "m4"]
    await put(store, "cy", dm("c1"), max_total=4)
    with pytest.raises(QueueFull), trio.fail_after(30):
        await store.enqueue("cy", dm("c2"), max_queue=3, max_total=4)
    assert await texts(store, "cy") == ["c1"]


async def test_expired_messages_are_never_pending_and_expire_deletes_them(
    store: OfflineStore,
) -> None:
    await put(store, "bob", dm("old", ts=1000.0, ttl=10.0))
    await put(store, "bob", dm("new", ts=1005.0, ttl=10.0))
    assert await texts(store, "bob", now=1009.99) == ["old", "new"]
    assert await texts(store, "bob", now=1010.0) == ["new"]
    with trio.fail_after(30):
        assert await store.depth("bob", 1010.0) == 1
        assert await store.expire(1010.0, 100) == 1
    assert store.total() == 1
    assert await texts(store, "bob", now=1000.0) == ["new"]


async def test_a_client_id_resend_returns_the_first_message_even_after_its_ack(
    store: OfflineStore,
) -> None:
    first = await put(store, "bob", dm("hi", client_id="c-1"))
    again = await store.enqueue("bob", dm("hi", client_id="c-1"), max_queue=10, max_total=100)
    assert again.duplicate and again.message.id == first
    assert await texts(store, "bob") == ["hi"]
    with trio.fail_after(30):
        await store.ack("bob", [first])
    after_ack = await store.enqueue("bob", dm("hi", client_id="c-1"), max_queue=10, max_total=100)
    assert after_ack.duplicate and after_ack.message.id == first
    assert await texts(store, "bob") == []
    # Another sender's same client_id is another message.
    other = await put(store, "bob", dm("yo", client_id="c-1", sender="cy"))
    assert other != first


async def test_the_second_migration_counts_the_queues_a_first_version_file_holds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "raafd.sqlite3"
    with trio.fail_after(30):
        async with open_database(path, {"offline": MIGRATIONS[:1]}) as db:
            old = await SqliteOfflineStore.open(db)
            for user in ("bob", "bob", "cy"):
                await db.write(
                    lambda c, u=user: c.execute(
                        "INSERT INTO offline_messages (user, kind, sender, text, ts, expires_at)"
                        " VALUES (?, 'dm', 'ann', 'x', 1, 2000)",
                        (u,),
                    )
                )
            assert old.total() == 0  # (written behind its back)
        async with open_database(path, {"offline": MIGRATIONS}) as db:
            store = await SqliteOfflineStore.open(db)
            assert store.total() == 3
            depths = await db.read(
                lambda c: c.execute("SELECT user, depth FROM offline_depths").fetchall()
            )
            assert sorted(depths) == [("bob", 2), ("cy", 1)]
            done = await store.enqueue("bob", dm("new"), max_queue=2, max_total=100)
            assert done.dropped == 1
