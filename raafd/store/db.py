"""The one SQLite database every durable component shares: one file, one writer, group commit.

The rule of this file: **a returned :meth:`Database.write` is on disk.** How it is kept:

- WAL journal with ``synchronous = FULL``: the write-ahead log is fsynced at every commit, so
  ``kill -9`` or a power loss right after a write returns loses nothing (DESIGN invariant 6).
- No SQLite work on the event loop. Writes run on one connection in a worker thread, one batch
  at a time; reads run on a second connection (WAL readers never wait for the writer) in
  another worker thread.
- **Group commit.** The fsync is what a durable write costs (a millisecond or more), so writes
  that queue up while a commit is in progress share the next one: the writer that gets the
  turn takes every queued write (at most :data:`MAX_BATCH`), runs each in its own
  ``SAVEPOINT`` of one ``BEGIN IMMEDIATE`` transaction, commits once, and hands every caller
  its own result or error. A write that raises rolls back only its own savepoint. There is no
  writer task: the caller holding the turn (a FIFO :class:`trio.Lock`) does the batch, the
  callers behind it find their writes done when their turn comes.
- A caller cancelled before its write is taken into a batch writes nothing; once taken, the
  write commits with its batch and the caller sees ``Cancelled`` afterwards (as with any
  request whose answer is lost).
- At most :data:`MAX_PENDING` writes wait at once; past that a write fails at once with
  :class:`~raafd.store.base.StoreUnavailable` (``unavailable``) instead of queueing without
  bound.

Schemas are per component (``sessions``, ``chat``, ``jobs``, …): each store module defines its
migrations, a tuple of SQL scripts where step *i* takes the component from version *i* to
*i + 1*, and the daemon opens the database with all of them (:func:`open_database`). The
versions live in the ``schema_versions`` table; a component whose version in the file is newer
than this raafd knows is refused, one the file does not know is created. Files from before
``schema_versions`` carried the session store's version in ``PRAGMA user_version``; it is read
once, and kept equal to the ``sessions`` version so an older raafd can still open the file.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import trio

from raafd.logging import get_logger
from raafd.store.base import StoreUnavailable

__all__ = ["BUSY_TIMEOUT_MS", "MAX_BATCH", "MAX_PENDING", "Database", "open_database"]

log = get_logger("raafd.store")
T = TypeVar("T")

BUSY_TIMEOUT_MS: Final = 5000
MAX_BATCH: Final = 512  # writes per transaction (one fsync)
MAX_PENDING: Final = 10_000  # writes waiting for their turn; past it a write fails at once


class _Write(Generic[T]):
    """One queued write: its work and, once its batch has committed, its outcome."""

    __slots__ = ("done", "error", "fn", "result", "taken")

    def __init__(self, fn: Callable[[sqlite3.Connection], T]) -> None:
        self.fn = fn
        self.taken = False  # in a batch: it will commit (or fail) whatever the caller does
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None


class Database:
    """See the module docstring. Get one from :func:`open_database`."""

    def __init__(self, writer: sqlite3.Connection, reader: sqlite3.Connection, path: Path):
        self.path = path
        self._writer: sqlite3.Connection | None = writer
        self._reader: sqlite3.Connection | None = reader
        self._turn = trio.Lock()  # FIFO: the writer holding it commits a batch
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._pending: deque[_Write[Any]] = deque()
        # Figures for stats and tests.
        self.commits = 0
        self.writes = 0
        self.largest_batch = 0
        self.commit_seconds = 0.0

    # --- writing ------------------------------------------------------------------------------

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the writer thread inside a transaction shared with the
        other writes queued at that moment (in its own savepoint; ``fn`` must not begin, commit
        or roll back itself). Returns ``fn``'s result once the commit is durable; re-raises
        what ``fn`` raised (its work rolled back). SQLite failures (disk full, I/O error) raise
        :class:`StoreUnavailable`, their detail logged."""
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        if len(self._pending) >= MAX_PENDING:
            raise StoreUnavailable("the store is overloaded; try again", retry_after=1)
        item: _Write[T] = _Write(fn)
        self._pending.append(item)
        try:
            async with self._turn:
                if not item.done:
                    await self._commit_batch()
        finally:
            if not item.taken:  # cancelled while waiting: it never runs
                self._pending.remove(item)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]  # T, set by the batch

    async def _commit_batch(self) -> None:
        batch: list[_Write[Any]] = []
        while self._pending and len(batch) < MAX_BATCH:
            item = self._pending.popleft()
            item.taken = True
            batch.append(item)
        # Not cancellable once taken: the callers were promised their writes run.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._run_batch, batch, limiter=self._write_limiter)

    def _run_batch(self, batch: list[_Write[Any]]) -> None:
        started = time.perf_counter()
        conn = self._writer
        try:
            if conn is None:
                raise StoreUnavailable("the store is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for item in batch:
                    conn.execute("SAVEPOINT w")
                    try:
                        item.result = item.fn(conn)
                    except BaseException as exc:
                        conn.execute("ROLLBACK TO w")
                        item.error = _public(exc, self.path)
                    conn.execute("RELEASE w")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, StoreUnavailable) as exc:
            error = _public(exc, self.path)
            for item in batch:
                item.result, item.error = None, error
        finally:
            for item in batch:
                item.done = True
        self.commits += 1
        self.writes += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        self.commit_seconds += time.perf_counter() - started

    # --- reading ------------------------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the reader connection in a worker thread, inside one read
        transaction (everything it reads is of the same commit). It sees every write that has
        returned."""

        def in_thread() -> T:
            conn = self._reader
            if conn is None:
                raise StoreUnavailable("the store is closed")
            try:
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _public(exc, self.path) from None

        return await trio.to_thread.run_sync(in_thread, limiter=self._read_limiter)

    # --- lifecycle ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Commits, writes, the average and largest batch, and the mean commit time."""
        return {
            "commits": self.commits,
            "writes": self.writes,
            "pending": len(self._pending),
            "largest_batch": self.largest_batch,
            "mean_batch": round(self.writes / self.commits, 2) if self.commits else 0.0,
            "mean_commit_ms": round(1000 * self.commit_seconds / self.commits, 3)
            if self.commits
            else 0.0,
        }

    async def aclose(self) -> None:
        """Close both connections after the work in progress; later calls raise
        :class:`StoreUnavailable`."""
        with trio.CancelScope(shield=True):
            async with self._turn:

                def close_writer() -> None:
                    conn, self._writer = self._writer, None
                    if conn is not None:
                        conn.close()

                def close_reader() -> None:
                    conn, self._reader = self._reader, None
                    if conn is not None:
                        conn.close()

                await trio.to_thread.run_sync(close_writer, limiter=self._write_limiter)
                await trio.to_thread.run_sync(close_reader, limiter=self._read_limiter)


def _public(exc: BaseException, path: Path) -> BaseException:
    """SQLite's own errors become :class:`StoreUnavailable` (detail logged, never sent);
    anything else (a component's own error, a bug) goes to its caller as it is."""
    if isinstance(exc, sqlite3.IntegrityError):
        return exc  # a constraint the component relies on (e.g. a unique key): its business
    if isinstance(exc, sqlite3.Error):
        log.error("store failed", path=str(path), error=str(exc))
        return StoreUnavailable("the store is unavailable")
    return exc


# --- opening and migrating ----------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions (every write is an explicit BEGIN IMMEDIATE
    # ... COMMIT). check_same_thread=False: trio's worker threads take turns under a limiter.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"cannot use the WAL journal for {path} (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path, schemas: Mapping[str, Sequence[str]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        known = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_versions'"
        ).fetchone()
        if known is None:
            conn.execute(
                "CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT"
                " NULL)"
            )
            legacy = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if legacy:  # a file from before schema_versions: the session store's version
                conn.execute("INSERT INTO schema_versions VALUES ('sessions', ?)", (legacy,))
        versions = dict(conn.execute("SELECT component, version FROM schema_versions"))
        for component, steps in schemas.items():
            version = int(versions.get(component, 0))
            if version > len(steps):
                raise StoreUnavailable(
                    f"{path} has {component} schema version {version}, newer than this raafd"
                    f" knows ({len(steps)}); use a newer raafd or another state directory"
                )
            for target in range(version + 1, len(steps) + 1):
                # Statement by statement, not executescript (which commits first): a migration
                # and its version are one transaction. So no ';' inside a statement or comment.
                for statement in steps[target - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_versions VALUES (?, ?) ON CONFLICT (component)"
                    " DO UPDATE SET version = excluded.version",
                    (component, target),
                )
                log.info("store migrated", path=str(path), component=component, version=target)
            if component == "sessions":  # so an older raafd still opens the file
                conn.execute(f"PRAGMA user_version = {len(steps)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _open(path: Path, schemas: Mapping[str, Sequence[str]]) -> Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _connect(path)
    try:
        _migrate(writer, path, schemas)
        reader = _connect(path)
    except BaseException:
        writer.close()
        raise
    return Database(writer, reader, path)


@asynccontextmanager
async def open_database(
    path: str | Path, schemas: Mapping[str, Sequence[str]]
) -> AsyncIterator[Database]:
    """Open the file (creating it and its directory), bring every component in ``schemas`` to
    its newest version, and close it on exit."""
    where = Path(path)
    try:
        db = await trio.to_thread.run_sync(_open, where, schemas)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open the store {where}: {exc}") from None
    try:
        yield db
    finally:
        await db.aclose()
