"""The shared SQLite database: group commit, a failing write costs only itself, cancellation
before the turn writes nothing, per-component migrations. Real threads and a real file, so these
run on the real clock, each under an absolute timeout."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from raafd.store import StoreUnavailable, open_database

SCHEMA = {"t": ("CREATE TABLE items (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",)}


def _insert(k: str, v: int):  # type: ignore[no-untyped-def]
    def work(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO items VALUES (?, ?)", (k, v))
        return v

    return work


def _all(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT k, v FROM items"))


async def test_writes_queued_together_share_one_commit(tmp_path: Path) -> None:
    results: dict[int, int] = {}
    with trio.fail_after(30):
        async with open_database(tmp_path / "db.sqlite3", SCHEMA) as db:

            async def one(i: int) -> None:
                results[i] = await db.write(_insert(f"k{i}", i))

            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(one, i)
            assert results == {i: i for i in range(50)}
            assert await db.read(_all) == {f"k{i}": i for i in range(50)}
            # 50 writers arrived together: far fewer fsyncs than writes.
            assert db.commits < 50
            assert db.writes == 50
            assert db.stats()["largest_batch"] > 1


async def test_a_failing_write_rolls_back_only_itself(tmp_path: Path) -> None:
    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO items VALUES ('bad', 1)")
        raise ValueError("the component's own error")

    outcomes: dict[str, object] = {}
    with trio.fail_after(30):
        async with open_database(tmp_path / "db.sqlite3", SCHEMA) as db:

            async def run(name: str, fn) -> None:  # type: ignore[no-untyped-def]
                try:
                    outcomes[name] = await db.write(fn)
                except Exception as exc:
                    outcomes[name] = exc

            await db.write(_insert("a", 1))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "c", _insert("c", 3))
                nursery.start_soon(run, "bad", half_then_fail)
                nursery.start_soon(run, "b", _insert("b", 2))
                nursery.start_soon(run, "dup", _insert("a", 3))  # unique key: IntegrityError
            assert outcomes["c"] == 3 and outcomes["b"] == 2
            assert isinstance(outcomes["bad"], ValueError)
            # A constraint is the component's business: it gets SQLite's error as it is.
            assert isinstance(outcomes["dup"], sqlite3.IntegrityError)
            assert await db.read(_all) == {"a": 1, "b": 2, "c": 3}


async def test_a_write_cancelled_before_its_turn_never_runs(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_database(tmp_path / "db.sqlite3", SCHEMA) as db:
            scope = trio.CancelScope()

            async def doomed() -> None:
                with scope:
                    await db.write(_insert("never", 1))

            # Hold the turn: the write has to queue behind it.
            async with db._turn, trio.open_nursery() as nursery:
                nursery.start_soon(doomed)
                await trio.testing.wait_all_tasks_blocked()
                assert db.stats()["pending"] == 1
                scope.cancel()
            assert scope.cancelled_caught
            assert db.stats()["pending"] == 0
            assert await db.write(_insert("after", 2)) == 2
            assert await db.read(_all) == {"after": 2}


async def test_components_migrate_separately_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with trio.fail_after(30):
        async with open_database(path, SCHEMA) as db:
            await db.write(_insert("x", 1))
        two = {**SCHEMA, "u": ("CREATE TABLE u1 (a)", "CREATE TABLE u2 (a)")}
        async with open_database(path, two) as db:
            tables = await db.read(
                lambda c: sorted(r[0] for r in c.execute("SELECT name FROM sqlite_master"))
            )
            assert {"items", "u1", "u2", "schema_versions"} <= set(tables)
            assert await db.read(_all) == {"x": 1}
            versions = await db.read(
                lambda c: dict(c.execute("SELECT component, version FROM schema_versions"))
            )
            assert versions == {"t": 1, "u": 2}
        with pytest.raises(StoreUnavailable, match="u schema version 2, newer"):
            async with open_database(path, {"u": ("CREATE TABLE u1 (a)",)}):
                pass


async def test_a_file_from_before_schema_versions_keeps_its_sessions(tmp_path: Path) -> None:
    from raafd.store.sqlite import MIGRATIONS

    path = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO sessions VALUES ('s1', 1, 0)")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with trio.fail_after(30):
        async with open_database(path, {"sessions": MIGRATIONS}) as db:
            assert await db.read(lambda c: c.execute("SELECT id FROM sessions").fetchall()) == [
                ("s1",)
            ]
            version = await db.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
            assert version == len(MIGRATIONS)


async def test_a_closed_database_refuses_work(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_database(tmp_path / "db.sqlite3", SCHEMA) as db:
            pass
        with pytest.raises(StoreUnavailable):
            await db.write(_insert("a", 1))
        with pytest.raises(StoreUnavailable):
            await db.read(_all)
