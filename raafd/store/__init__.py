"""Durable state (Redis later, for many nodes).

- :class:`SessionBackend`: what a session store offers the daemon (conversations kept across
  streams); :func:`open_session_backend` opens the one ``[store] backend`` names:
- ``sqlite`` (default): :class:`SqliteSessionStore`, :func:`open_session_store` on
  :func:`database_path`, durable when an append returns;
- ``memory``: :class:`MemorySessionStore`, for tests and throwaway runs (nothing survives a
  restart).
"""

from raafd.store.backends import open_session_backend
from raafd.store.base import SessionBackend, StoreUnavailable
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
    "SCHEMA_VERSION",
    "MemorySessionStore",
    "SessionBackend",
    "SqliteSessionStore",
    "StoreUnavailable",
    "database_path",
    "open_memory_session_store",
    "open_session_backend",
    "open_session_store",
]
