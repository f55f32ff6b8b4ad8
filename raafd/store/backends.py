"""The stores that ``[store] backend`` names, opened together for the daemon.

- ``sqlite`` (default): one :class:`~raafd.store.db.Database` at ``<state.dir>/raafd.sqlite3``
  shared by every durable store (one writer, group commit); each store brings its component's
  migrations (:data:`SCHEMAS`).
- ``memory``: every store in memory, empty at each start (tests, throwaway runs).

A new durable component adds its migrations to :data:`SCHEMAS` and its store to :class:`Stores`
(built in both branches of :func:`open_stores`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

from attrs import frozen

from raafd.config import Config
from raafd.store import chat_sqlite, jobs_sqlite
from raafd.store import sqlite as session_sqlite
from raafd.store.base import SessionBackend
from raafd.store.chat import ChatStore
from raafd.store.chat_memory import MemoryChatStore
from raafd.store.chat_sqlite import SqliteChatStore
from raafd.store.db import Database, open_database
from raafd.store.jobs import JobStore
from raafd.store.jobs_memory import MemoryJobStore
from raafd.store.jobs_sqlite import SqliteJobStore
from raafd.store.memory import open_memory_session_store
from raafd.store.offline import OfflineStore
from raafd.store.offline_memory import MemoryOfflineStore
from raafd.store.offline_sqlite import MIGRATIONS as OFFLINE_MIGRATIONS
from raafd.store.offline_sqlite import SqliteOfflineStore
from raafd.store.sqlite import SqliteSessionStore, database_path

__all__ = ["SCHEMAS", "Stores", "open_session_backend", "open_stores"]

# Component → its migrations, for the shared SQLite database.
SCHEMAS: Final[Mapping[str, Sequence[str]]] = {
    "sessions": session_sqlite.MIGRATIONS,
    "offline": OFFLINE_MIGRATIONS,
    "jobs": jobs_sqlite.MIGRATIONS,
    "chat": chat_sqlite.MIGRATIONS,
}


@frozen
class Stores:
    """Every store the daemon uses, on one backend."""

    sessions: SessionBackend
    offline: OfflineStore  # per-user offline queues (direct messages, room messages)
    jobs: JobStore
    chat: ChatStore  # rooms: their history and members
    db: Database | None  # the shared SQLite database; None with the memory backend


@asynccontextmanager
async def open_stores(config: Config) -> AsyncIterator[Stores]:
    """Open every store on ``config.store.backend``; close them on exit."""
    backend = config.store.backend
    if backend == "memory":
        async with open_memory_session_store(config.sessions) as memory:
            yield Stores(
                sessions=memory,
                offline=MemoryOfflineStore(),
                jobs=MemoryJobStore(),
                chat=MemoryChatStore(),
                db=None,
            )
    elif backend == "sqlite":
        async with open_database(database_path(config.state), SCHEMAS) as db:
            yield Stores(
                sessions=SqliteSessionStore(db, config.sessions),
                offline=await SqliteOfflineStore.open(db),
                jobs=SqliteJobStore(db),
                chat=SqliteChatStore(db),
                db=db,
            )
    else:  # pragma: no cover - the config validator allows only the names above
        raise ValueError(f"unknown store backend {backend!r}")


@asynccontextmanager
async def open_session_backend(config: Config) -> AsyncIterator[SessionBackend]:
    """The session store alone, on ``config.store.backend`` (tools and tests)."""
    async with open_stores(config) as stores:
        yield stores.sessions
