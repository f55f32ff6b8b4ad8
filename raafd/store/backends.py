"""The session store that ``[store] backend`` names, opened for the daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from raafd.config import Config
from raafd.store.base import SessionBackend
from raafd.store.memory import open_memory_session_store
from raafd.store.sqlite import database_path, open_session_store

__all__ = ["open_session_backend"]


@asynccontextmanager
async def open_session_backend(config: Config) -> AsyncIterator[SessionBackend]:
    """``sqlite``: ``<state.dir>/raafd.sqlite3``, durable; ``memory``: empty at every start."""
    backend = config.store.backend
    if backend == "memory":
        async with open_memory_session_store(config.sessions) as memory:
            yield memory
    elif backend == "sqlite":
        async with open_session_store(database_path(config.state), config.sessions) as sqlite:
            yield sqlite
    else:  # pragma: no cover - the config validator allows only the names above
        raise ValueError(f"unknown store backend {backend!r}")
