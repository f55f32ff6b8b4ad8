"""The session stores: bounded by whole turns, LRU across sessions, all or nothing; SQLite is
also durable on return. The cases that apply to both backends run on each (``backend``)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from raafd.config import SessionsConfig
from raafd.errors import Unavailable
from raafd.store import (
    SCHEMA_VERSION,
    MemorySessionStore,
    SessionBackend,
    open_memory_session_store,
    open_session_store,
)
from raafd.store.trim import Row, estimate_tokens, plan_trim

ROOT = str(Path(__file__).resolve().parent.parent)
BIG = SessionsConfig(max_messages=10_000, max_tokens=10_000_000, max_sessions=10_000)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def call(call_id: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "clock", "arguments": "{}"}}
        ],
    }


def result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "12:00"}


def turn(n: int, tools: int = 0) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [user(f"q{n}")]
    for i in range(tools):
        steps += [call(f"c{n}.{i}"), result(f"c{n}.{i}")]
    return [*steps, assistant(f"a{n}")]


# --- the trimming rule, pure ------------------------------------------------------------------


def rows_of(messages: list[dict[str, Any]]) -> list[Row]:
    kinds = {"user": "user", "tool": "tool"}
    return [
        Row(i, kinds.get(m["role"], "other"), estimate_tokens(m)) for i, m in enumerate(messages, 1)
    ]


def test_estimate_tokens_counts_role_content_and_tool_calls() -> None:
    assert estimate_tokens({"role": "user", "content": "x" * 36}) == 10  # 4 + 36 chars
    assert estimate_tokens({"role": "user", "content": ""}) == 1
    with_call = estimate_tokens(call("c"))  # "assistant" + "clock" + "{}" = 16 chars
    assert with_call == 4
    parts = {"role": "user", "content": [{"type": "text", "text": "abcd"}]}
    assert estimate_tokens(parts) == 2


def test_plan_trim_drops_oldest_whole_turns() -> None:
    messages = turn(1, tools=1) + turn(2) + turn(3, tools=2)
    rows = rows_of(messages)
    # 4 + 2 + 6 = 12 messages; a bound of 8 drops turn 1 (4) → 8.
    assert plan_trim(rows, 8, 10_000) == [1, 2, 3, 4]
    # 7 must also drop turn 2, never half of a turn.
    assert plan_trim(rows, 7, 10_000) == [1, 2, 3, 4, 5, 6]
    assert plan_trim(rows, 12, 10_000) == []


def test_plan_trim_last_turn_keeps_its_question_and_last_step() -> None:
    rows = rows_of(turn(1, tools=3))  # user, (call, tool) x3, assistant = 8
    dropped = plan_trim(rows, 4, 10_000)
    kept = [r for r in rows if r.seq not in dropped]
    # The user message, the newest call with its result, the answer: tool pairs never split.
    assert [r.seq for r in kept] == [1, 6, 7, 8]
    # Still over: the turn goes entirely.
    assert plan_trim(rows, 1, 10_000) == [r.seq for r in rows]


def test_plan_trim_by_tokens() -> None:
    messages = [user("x" * 400), assistant("y"), user("z"), assistant("w")]
    rows = rows_of(messages)  # ~101 + 3 + 2 + 3 tokens
    assert plan_trim(rows, 100, 50) == [1, 2]


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": "be brief"})
    for n in range(draw(st.integers(0, 6))):
        messages.append(user("q" * draw(st.integers(0, 40))))
        for i in range(draw(st.integers(0, 3))):
            messages.append(call(f"c{n}.{i}"))
            messages += [result(f"c{n}.{i}")] * draw(st.integers(1, 2))
        if draw(st.booleans()):
            messages.append(assistant("a" * draw(st.integers(0, 40))))
    return messages


@given(conversations(), st.integers(2, 20), st.integers(1, 60))
def test_plan_trim_properties(
    messages: list[dict[str, Any]], max_messages: int, max_tokens: int
) -> None:
    rows = rows_of(messages)
    dropped = set(plan_trim(rows, max_messages, max_tokens))
    kept = [r for r in rows if r.seq not in dropped]
    assert len(kept) <= max_messages
    assert sum(r.tokens for r in kept) <= max_tokens
    kept_seqs = {r.seq for r in kept}
    for r in kept:
        if r.kind == "tool":  # its tool_calls message (the nearest non-tool before it) is kept
            head = max(x.seq for x in rows if x.seq < r.seq and x.kind != "tool")
            assert head in kept_seqs
    if dropped and kept and any(r.kind == "user" for r in rows):
        assert kept[0].kind == "user"  # a trimmed history starts with a turn's question
    # Whole turns go first: what is kept ends with the newest message, unless all went.
    assert not kept or kept[-1].seq == rows[-1].seq


# --- the store, on each backend --------------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def open_store(
    backend: str, tmp_path: Path, config: SessionsConfig
) -> AbstractAsyncContextManager[SessionBackend]:
    if backend == "sqlite":
        return open_session_store(tmp_path / "state" / "raafd.sqlite3", config)
    return open_memory_session_store(config)


async def test_append_load_get_delete_count_and_close(backend: str, tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_store(backend, tmp_path, BIG) as store:
            assert await store.load("s1") == []
            assert await store.get("s1") is None
            await store.append("s1", turn(1, tools=1))
            await store.append("s1", [user("héllo ✓"), assistant("hi")])
            await store.append("s2", turn(9))
            await store.append("s2", [])
            got = await store.get("s1")
            assert got is not None and got["id"] == "s1" and got["updated_at"] > 0
            assert got["messages"] == [*turn(1, tools=1), user("héllo ✓"), assistant("hi")]
            assert await store.count() == 2
            loaded = await store.load("s2")
            loaded[0]["content"] = "changed by the caller"  # a copy: the kept one stays
            assert await store.load("s2") == turn(9)
            assert await store.delete("s2") is True
            assert await store.delete("s2") is False
            assert await store.load("s2") == []
            assert await store.count() == 1
        with pytest.raises(Unavailable):
            await store.load("s1")  # closed
        with pytest.raises(Unavailable):
            await store.append("s1", turn(2))


async def test_sqlite_keeps_what_was_appended_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "raafd.sqlite3"  # the directory is created
    with trio.fail_after(10):
        async with open_session_store(path, BIG) as store:
            await store.append("s1", turn(1, tools=1))
            await store.append("s1", [user("héllo ✓"), assistant("hi")])
            await store.append("s2", turn(9))
            synchronous = await store.db.write(
                lambda c: c.execute("PRAGMA synchronous").fetchone()[0]
            )
            assert synchronous == 2  # FULL: the WAL is fsynced at every commit
        async with open_session_store(path, BIG) as store:
            assert await store.load("s1") == [*turn(1, tools=1), user("héllo ✓"), assistant("hi")]
            assert await store.count() == 2
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_bounds_trim_whole_turns(backend: str, tmp_path: Path) -> None:
    cfg = SessionsConfig(max_messages=6, max_tokens=10_000, max_sessions=10)
    with trio.fail_after(10):
        async with open_store(backend, tmp_path, cfg) as store:
            for n in range(5):
                await store.append("s", turn(n, tools=n % 2))
            # turn 4 (2) + turn 3 (4) = 6: turns 0..2 went whole; tool pairs intact.
            assert await store.load("s") == turn(3, tools=1) + turn(4)
            store.reload(SessionsConfig(max_messages=100, max_tokens=6, max_sessions=10))
            await store.append("s", turn(5))
            assert await store.load("s") == turn(5)  # 3 + 2 tokens; turn 4 would add 5
            # A newest turn alone over the bound keeps its question and its last step.
            store.reload(SessionsConfig(max_messages=4, max_tokens=10_000, max_sessions=10))
            await store.append("s", turn(6, tools=3))
            assert await store.load("s") == [user("q6"), *turn(6, tools=3)[-3:]]


async def test_least_recently_used_sessions_are_forgotten(backend: str, tmp_path: Path) -> None:
    cfg = SessionsConfig(max_messages=100, max_tokens=10_000, max_sessions=3)
    with trio.fail_after(10):
        async with open_store(backend, tmp_path, cfg) as store:
            for name in ("a", "b", "c"):
                await store.append(name, turn(0))
            await store.append("a", turn(1))  # a is now the most recent; b the least
            assert await store.load("b") == turn(0)  # a read does not make b recent
            await store.append("d", turn(0))
            assert await store.count() == 3
            assert await store.load("b") == []
            assert await store.load("a") == turn(0) + turn(1)
            assert await store.load("c") == turn(0)
            await store.append("e", turn(0))
            assert await store.load("c") == []
            assert await store.count() == 3


async def test_concurrent_appends_keep_every_message(backend: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_store(backend, tmp_path, BIG) as store:

            async def writer(task: int) -> None:
                for i in range(5):
                    await store.append(f"s{task % 4}", [user(f"{task}.{i}"), assistant("ok")])

            async with trio.open_nursery() as nursery:
                for task in range(40):
                    nursery.start_soon(writer, task)
            for s in range(4):
                messages = await store.load(f"s{s}")
                questions = [m["content"] for m in messages if m["role"] == "user"]
                expected = {f"{t}.{i}" for t in range(s, 40, 4) for i in range(5)}
                assert sorted(questions) == sorted(expected)
                # Each append stayed contiguous: every answer directly follows its question.
                assert [m["role"] for m in messages] == ["user", "assistant"] * len(expected)
                for task in range(s, 40, 4):  # one writer's appends are in its order
                    mine = [q for q in questions if q.startswith(f"{task}.")]
                    assert mine == [f"{task}.{i}" for i in range(5)]


async def test_a_cancelled_append_writes_nothing(backend: str, tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_store(backend, tmp_path, BIG) as store:
            with trio.CancelScope() as scope:
                scope.cancel()
                await store.append("s", turn(1))
            assert scope.cancelled_caught
            assert await store.load("s") == []
            assert await store.count() == 0


async def test_a_message_that_is_not_json_is_refused_and_changes_nothing(
    backend: str, tmp_path: Path
) -> None:
    with trio.fail_after(10):
        async with open_store(backend, tmp_path, BIG) as store:
            await store.append("s", turn(1))
            with pytest.raises(TypeError):
                await store.append("s", [user("ok"), {"role": "user", "content": object()}])
            assert await store.load("s") == turn(1)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with trio.fail_after(10), pytest.raises(Unavailable, match="newer"):
        async with open_session_store(path, BIG):
            pass  # pragma: no cover


_CHILD = textwrap.dedent(
    """
    import sys, time, trio
    from raafd.config import SessionsConfig
    from raafd.store import open_session_store

    async def main():
        async with open_session_store(sys.argv[1], SessionsConfig()) as store:
            for i in range(3):
                await store.append("s", [{"role": "user", "content": f"q{i}"},
                                         {"role": "assistant", "content": f"a{i}"}])
            print("ok", flush=True)
            time.sleep(60)  # killed here, the connection never closed

    trio.run(main)
    """
)


async def test_an_append_that_returned_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "var" / "raafd.sqlite3"
    with trio.fail_after(20):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _CHILD, str(path)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert process.stdout is not None
        try:
            seen = b""
            while b"ok\n" not in seen:
                chunk = await process.stdout.receive_some(1024)
                assert chunk, "the child exited before appending"
                seen += chunk
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
        finally:
            process.kill()
            await process.wait()
            await process.stdout.aclose()
        async with open_session_store(path, BIG) as store:
            messages = await store.load("s")
    assert [m["content"] for m in messages] == ["q0", "a0", "q1", "a1", "q2", "a2"]


# --- the HTTP API -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_sessions_http_api(start_daemon: Any, tmp_path: Path, backend: str) -> None:
    rd = await start_daemon(store={"backend": backend})
    store = rd.daemon.sessions
    async with httpx.AsyncClient(base_url=rd.base_url) as client:
        with trio.fail_after(20):
            await store.append("chat-1", turn(1, tools=1))
            r = await client.get("/v1/sessions/chat-1")
            assert r.status_code == 200
            body = r.json()
            assert body["session"] == "chat-1" and body["messages"] == turn(1, tools=1)
            assert body["updated_at"] > 0
            r = await client.delete("/v1/sessions/chat-1")
            assert r.status_code == 204 and r.content == b""
            for r in (
                await client.get("/v1/sessions/chat-1"),
                await client.delete("/v1/sessions/chat-1"),
            ):
                assert r.status_code == 404
                assert r.json()["error"] == {
                    "code": "not_found",
                    "message": "no session 'chat-1'",
                    "field": "session",
                }
    # Only the SQLite backend touches the disk.
    assert (tmp_path / "var" / "raafd.sqlite3").exists() == (backend == "sqlite")


async def test_a_daemon_under_autojump_keeps_its_sessions_in_memory(
    start_daemon: Any, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # No worker thread the clock cannot see (tests/conftest.py); nothing on disk.
    rd = await start_daemon()
    assert isinstance(rd.daemon.sessions, MemorySessionStore)
    with trio.fail_after(10):
        await rd.daemon.sessions.append("s", turn(1))
        assert await rd.daemon.sessions.load("s") == turn(1)
    assert not (tmp_path / "var" / "raafd.sqlite3").exists()
