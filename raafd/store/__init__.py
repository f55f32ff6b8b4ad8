"""Durable state: the SQLite database under the state directory (Redis later, for many nodes).

- ``sqlite``: :class:`SqliteSessionStore` (conversations kept across streams), opened with
  :func:`open_session_store` on :func:`database_path`.
"""

from raafd.store.sqlite import (
    DATABASE_FILE,
    SCHEMA_VERSION,
    SqliteSessionStore,
    StoreUnavailable,
    database_path,
    open_session_store,
)

__all__ = [
    "DATABASE_FILE",
    "SCHEMA_VERSION",
    "SqliteSessionStore",
    "StoreUnavailable",
    "database_path",
    "open_session_store",
]
