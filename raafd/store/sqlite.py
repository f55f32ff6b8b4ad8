"""The SQLite session store: conversations kept across streams, durable when ``append`` returns.

The rule of this file: **a returned ``append`` is on disk, and the kept history is always a
valid conversation.** How it is kept:

- Durability (DESIGN invariant 6): WAL journal with ``synchronous = FULL``, so the write-ahead
  log is fsynced at every commit. An ``append`` returns only after its commit; ``kill -9`` or a
  power loss right after it loses nothing.
- No SQLite work on the event loop, and one writer for the whole daemon: the store runs on the
  shared :class:`~raafd.store.db.Database` (writes in its writer thread with group commit,
  reads on its reader connection). A caller cancelled while waiting its turn writes nothing.
- Each ``append`` is all or nothing (its own savepoint of the commit it shares): insert the
  messages, trim the session to its bounds, forget the least recently used sessions past
  ``max_sessions``.
- Trimming drops whole turns, oldest first (:mod:`raafd.store.trim`, shared with the memory
  store), so a kept history is always a valid conversation.

Bounds (DESIGN invariant 2): ``sessions.max_messages`` and ``sessions.max_tokens`` (approximate:
4 characters a token over role, content and tool-call text) per session; ``max_sessions``
sessions, the least recently *appended to* forgotten first (reads do not write).

The database file is ``<state.dir>/raafd.sqlite3``; :data:`MIGRATIONS` is this store's schema,
component ``sessions`` (see :mod:`raafd.store.db` for how versions are kept).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import orjson

from raafd.config import SessionsConfig, StateConfig
from raafd.store.db import Database, open_database
from raafd.store.trim import Row, estimate_tokens, kind_of, plan_trim

__all__ = [
    "DATABASE_FILE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SqliteSessionStore",
    "database_path",
    "open_session_store",
]

DATABASE_FILE: Final = "raafd.sqlite3"

# The sessions component's schema: step i takes it from version i to i + 1.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        used INTEGER NOT NULL,      -- LRU order: larger is more recent
        updated_at REAL NOT NULL    -- unix time of the last append
    );
    CREATE INDEX sessions_by_use ON sessions (used);
    CREATE TABLE session_messages (
        session TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,         -- 'user', 'tool' or 'other': what trimming needs to know
        tokens INTEGER NOT NULL,    -- the estimate, so trimming never parses the JSON
        data BLOB NOT NULL,         -- the message, JSON
        PRIMARY KEY (session, seq)
    ) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)  # of the sessions component


def database_path(state: StateConfig) -> Path:
    """Where the daemon's database lives: ``<state.dir>/raafd.sqlite3``."""
    return Path(state.dir) / DATABASE_FILE


# --- the store --------------------------------------------------------------------------------


class SqliteSessionStore:
    """The :class:`~raafd.agents.base.SessionStore` on SQLite; see the module docstring.

    Get one from :func:`open_session_store`."""

    def __init__(self, db: Database, config: SessionsConfig) -> None:
        self.db = db
        self.path = db.path
        self.config = config

    def reload(self, config: SessionsConfig) -> None:
        """Apply new bounds; they take effect on each session's next append."""
        self.config = config

    # --- SessionStore -------------------------------------------------------------------------

    async def load(self, session: str) -> list[dict[str, Any]]:
        """The kept messages, oldest first (``[]`` for an unknown session)."""

        def work(conn: sqlite3.Connection) -> list[bytes]:
            cursor = conn.execute(
                "SELECT data FROM session_messages WHERE session = ? ORDER BY seq", (session,)
            )
            return [row[0] for row in cursor]

        return [orjson.loads(data) for data in await self.db.read(work)]

    async def append(self, session: str, messages: list[dict[str, Any]]) -> None:
        """Add ``messages`` and trim to the bounds in one transaction, durable on return."""
        if not messages:
            return
        encoded = [(kind_of(m), estimate_tokens(m), orjson.dumps(m)) for m in messages]
        cfg = self.config
        now = time.time()

        await self.db.write(lambda conn: _append(conn, session, encoded, cfg, now))

    async def delete(self, session: str) -> bool:
        """Forget a session; ``False`` if there was none."""

        def work(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM session_messages WHERE session = ?", (session,))
            return conn.execute("DELETE FROM sessions WHERE id = ?", (session,)).rowcount > 0

        return await self.db.write(work)

    # --- for the HTTP API and stats -----------------------------------------------------------

    async def get(self, session: str) -> dict[str, Any] | None:
        """``{"id", "messages", "updated_at"}``, or None for an unknown session."""

        def work(conn: sqlite3.Connection) -> tuple[float, list[bytes]] | None:
            # One read transaction: the messages and updated_at are of the same commit.
            row = conn.execute(
                "SELECT updated_at FROM sessions WHERE id = ?", (session,)
            ).fetchone()
            if row is None:
                return None
            cursor = conn.execute(
                "SELECT data FROM session_messages WHERE session = ? ORDER BY seq", (session,)
            )
            return float(row[0]), [r[0] for r in cursor]

        found = await self.db.read(work)
        if found is None:
            return None
        updated_at, blobs = found
        return {
            "id": session,
            "messages": [orjson.loads(b) for b in blobs],
            "updated_at": updated_at,
        }

    async def count(self) -> int:
        """How many sessions are kept."""

        def work(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])

        return await self.db.read(work)

    async def aclose(self) -> None:
        """Nothing of its own to close: the database is closed by whoever opened it."""


def _append(
    conn: sqlite3.Connection,
    session: str,
    encoded: Iterable[tuple[str, int, bytes]],
    cfg: SessionsConfig,
    now: float,
) -> None:
    (used,) = conn.execute("SELECT COALESCE(MAX(used), 0) + 1 FROM sessions").fetchone()
    created = (
        conn.execute(
            "UPDATE sessions SET used = ?, updated_at = ? WHERE id = ?", (used, now, session)
        ).rowcount
        == 0
    )
    if created:
        conn.execute(
            "INSERT INTO sessions (id, used, updated_at) VALUES (?, ?, ?)", (session, used, now)
        )
    (last,) = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM session_messages WHERE session = ?", (session,)
    ).fetchone()
    conn.executemany(
        "INSERT INTO session_messages (session, seq, kind, tokens, data) VALUES (?, ?, ?, ?, ?)",
        [
            (session, last + i, kind, tokens, data)
            for i, (kind, tokens, data) in enumerate(encoded, 1)
        ],
    )
    count, tokens = conn.execute(
        "SELECT count(*), COALESCE(SUM(tokens), 0) FROM session_messages WHERE session = ?",
        (session,),
    ).fetchone()
    if count > cfg.max_messages or tokens > cfg.max_tokens:
        rows = [
            Row(seq, kind, n)
            for seq, kind, n in conn.execute(
                "SELECT seq, kind, tokens FROM session_messages WHERE session = ? ORDER BY seq",
                (session,),
            )
        ]
        doomed = plan_trim(rows, cfg.max_messages, cfg.max_tokens)
        conn.executemany(
            "DELETE FROM session_messages WHERE session = ? AND seq = ?",
            [(session, seq) for seq in doomed],
        )
    if created:
        (total,) = conn.execute("SELECT count(*) FROM sessions").fetchone()
        excess = total - cfg.max_sessions
        if excess > 0:
            oldest = [
                sid
                for (sid,) in conn.execute(
                    "SELECT id FROM sessions ORDER BY used LIMIT ?", (excess,)
                )
            ]
            gone = [(sid,) for sid in oldest]
            conn.executemany("DELETE FROM session_messages WHERE session = ?", gone)
            conn.executemany("DELETE FROM sessions WHERE id = ?", gone)


@asynccontextmanager
async def open_session_store(
    path: str | os.PathLike[str], config: SessionsConfig
) -> AsyncIterator[SqliteSessionStore]:
    """A session store on its own database at ``path`` (created and migrated; closed on exit).
    The daemon shares one database between its stores instead (:mod:`raafd.store.backends`)."""
    async with open_database(Path(path), {"sessions": MIGRATIONS}) as db:
        yield SqliteSessionStore(db, config)
