"""Durable state (Redis later, for many nodes).

- :func:`open_stores` opens every store on the ``[store] backend`` (:class:`Stores`); the SQLite
  ones share one :class:`Database` (one writer, group commit; :mod:`raafd.store.db`).
- :class:`SessionBackend`: what a session store offers the daemon (conversations kept across
  streams):
- ``sqlite`` (default): :class:`SqliteSessionStore`, :func:`open_session_store` on
  :func:`database_path`, durable when an append returns;
- ``memory``: :class:`MemorySessionStore`, for tests and throwaway runs (nothing survives a
  restart).
"""

from raafd.store.backends import SCHEMAS, Stores, open_session_backend, open_stores
from raafd.store.base import SessionBackend, StoreUnavailable
from raafd.store.db import Database, open_database
from raafd.store.memory import MemorySessionStore, open_memory_session_store
from raafd.store.sqlite import (
    DATABASE_FILE,
    SCHEMA_VERSION,
    SqliteSessionStore,
    database_path,
    open_session_store,
)

__all__ = [
    "DATABASE_FILE",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "Database",
    "MemorySessionStore",
    "SessionBackend",
    "SqliteSessionStore",
    "StoreUnavailable",
    "Stores",
    "database_path",
    "open_database",
    "open_memory_session_store",
    "open_session_backend",
    "open_session_store",
    "open_stores",
]
