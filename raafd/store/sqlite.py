"""The SQLite session store: conversations kept across streams, durable when ``append`` returns.

The rule of this file: **a returned ``append`` is on disk, and the kept history is always a
valid conversation.** How it is kept:

- Durability (DESIGN invariant 6): WAL journal with ``synchronous = FULL``, so the write-ahead
  log is fsynced at every commit. An ``append`` returns only after its commit; ``kill -9`` or a
  power loss right after it loses nothing.
- No SQLite work on the event loop: one connection, used only through
  ``trio.to_thread.run_sync`` under a ``CapacityLimiter(1)`` (so one thread at a time touches
  it, in call order). A caller cancelled while waiting its turn writes nothing; once its
  transaction runs it is not interrupted, and the call returns (or raises ``Cancelled`` at the
  next checkpoint) after the commit.
- One transaction per ``append``: insert the messages, trim the session to its bounds, forget
  the least recently used sessions past ``max_sessions``. A crash leaves all of it or none.
- Trimming drops whole turns, oldest first (:mod:`raafd.store.trim`, shared with the memory
  store), so a kept history is always a valid conversation.

Bounds (DESIGN invariant 2): ``sessions.max_messages`` and ``sessions.max_tokens`` (approximate:
4 characters a token over role, content and tool-call text) per session; ``max_sessions``
sessions, the least recently *appended to* forgotten first (reads do not write).

The file (``<state.dir>/raafd.sqlite3``) carries its schema version in ``PRAGMA user_version``;
:data:`_MIGRATIONS` takes an older file forward, a newer one is refused.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
import trio

from raafd.config import SessionsConfig, StateConfig
from raafd.logging import get_logger
from raafd.store.base import StoreUnavailable
from raafd.store.trim import Row, estimate_tokens, kind_of, plan_trim

__all__ = [
    "DATABASE_FILE",
    "SCHEMA_VERSION",
    "SqliteSessionStore",
    "database_path",
    "open_session_store",
]

log = get_logger("raafd.store")
T = TypeVar("T")

DATABASE_FILE: Final = "raafd.sqlite3"
BUSY_TIMEOUT_MS: Final = 5000

# Each entry takes the file from version i to i + 1 (user_version is the file's, shared by every
# store that will live in it: add their tables here).
_MIGRATIONS: Final[tuple[str, ...]] = (
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
SCHEMA_VERSION: Final = len(_MIGRATIONS)


def database_path(state: StateConfig) -> Path:
    """Where the daemon's database lives: ``<state.dir>/raafd.sqlite3``."""
    return Path(state.dir) / DATABASE_FILE


# --- the store --------------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; every write is an explicit BEGIN IMMEDIATE
    # ... COMMIT. check_same_thread=False: trio's worker threads take turns (CapacityLimiter 1).
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"cannot use the WAL journal for {path} (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{path} has schema version {version}, newer than this raafd knows"
                f" ({SCHEMA_VERSION}); use a newer raafd or another state directory"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # Statement by statement, not executescript (which commits first): a migration and
            # its user_version are one transaction. So no ';' inside a statement or comment.
            for statement in _MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            log.info("session store migrated", path=str(path), version=target)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class SqliteSessionStore:
    """The :class:`~raafd.agents.base.SessionStore` on SQLite; see the module docstring.

    Get one from :func:`open_session_store`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, config: SessionsConfig) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.config = config
        self._limiter = trio.CapacityLimiter(1)

    def reload(self, config: SessionsConfig) -> None:
        """Apply new bounds; they take effect on each session's next append."""
        self.config = config

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def in_thread() -> T:
            conn = self._conn
            if conn is None:
                raise StoreUnavailable("the session store is closed")
            try:
                return work(conn)
            except sqlite3.OperationalError as exc:
                log.error("session store failed", path=str(self.path), error=str(exc))
                raise StoreUnavailable("the session store is unavailable") from None

        return await trio.to_thread.run_sync(in_thread, limiter=self._limiter)

    # --- SessionStore -------------------------------------------------------------------------

    async def load(self, session: str) -> list[dict[str, Any]]:
        """The kept messages, oldest first (``[]`` for an unknown session)."""

        def work(conn: sqlite3.Connection) -> list[bytes]:
            cursor = conn.execute(
                "SELECT data FROM session_messages WHERE session = ? ORDER BY seq", (session,)
            )
            return [row[0] for row in cursor]

        return [orjson.loads(data) for data in await self._run(work)]

    async def append(self, session: str, messages: list[dict[str, Any]]) -> None:
        """Add ``messages`` and trim to the bounds in one transaction, durable on return."""
        if not messages:
            return
        encoded = [(kind_of(m), estimate_tokens(m), orjson.dumps(m)) for m in messages]
        cfg = self.config
        now = time.time()

        def work(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                _append(conn, session, encoded, cfg, now)

        await self._run(work)

    async def delete(self, session: str) -> bool:
        """Forget a session; ``False`` if there was none."""

        def work(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                conn.execute("DELETE FROM session_messages WHERE session = ?", (session,))
                return conn.execute("DELETE FROM sessions WHERE id = ?", (session,)).rowcount > 0

        return await self._run(work)

    # --- for the HTTP API and stats -----------------------------------------------------------

    async def get(self, session: str) -> dict[str, Any] | None:
        """``{"id", "messages", "updated_at"}``, or None for an unknown session."""

        def work(conn: sqlite3.Connection) -> tuple[float, list[bytes]] | None:
            # A read transaction: the messages and updated_at are of the same commit.
            with _transaction(conn, "BEGIN"):
                row = conn.execute(
                    "SELECT updated_at FROM sessions WHERE id = ?", (session,)
                ).fetchone()
                if row is None:
                    return None
                cursor = conn.execute(
                    "SELECT data FROM session_messages WHERE session = ? ORDER BY seq", (session,)
                )
                return float(row[0]), [r[0] for r in cursor]

        found = await self._run(work)
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

        return await self._run(work)

    async def aclose(self) -> None:
        """Close the connection (after any call in progress). Later calls raise
        :class:`StoreUnavailable`."""

        def work() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(work, limiter=self._limiter)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any failure."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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
    """Open (creating the file and its directory, migrating the schema) and close the store."""
    where = Path(path)
    try:
        conn = await trio.to_thread.run_sync(_connect, where)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open the session store {where}: {exc}") from None
    store = SqliteSessionStore(conn, where, config)
    try:
        yield store
    finally:
        await store.aclose()
