"""What every session store backend offers the daemon, and the error they share.

The agent run loop needs only :class:`raafd.agents.base.SessionStore` (load, append, delete);
the daemon and the HTTP API also read whole sessions, count them, apply new bounds and close
the store. :class:`SessionBackend` is that whole surface, implemented by
:class:`~raafd.store.sqlite.SqliteSessionStore` (durable) and
:class:`~raafd.store.memory.MemorySessionStore` (tests and throwaway runs).
"""

from __future__ import annotations

from typing import Any, Protocol

from raafd.config import SessionsConfig
from raafd.errors import Unavailable

__all__ = ["SessionBackend", "StoreUnavailable"]


class StoreUnavailable(Unavailable):
    """The store cannot be used right now (closed; for SQLite: disk full, I/O error, locked past
    the busy timeout). The backend's detail is logged, never sent to a client."""


class SessionBackend(Protocol):
    """Conversations keyed by session id, bounded by ``[sessions]``."""

    async def load(self, session: str) -> list[dict[str, Any]]:
        """The kept messages, oldest first (``[]`` for an unknown session)."""
        ...

    async def append(self, session: str, messages: list[dict[str, Any]]) -> None:
        """Add ``messages`` and trim to the bounds, all or nothing."""
        ...

    async def delete(self, session: str) -> bool:
        """Forget a session; ``False`` if there was none."""
        ...

    async def get(self, session: str) -> dict[str, Any] | None:
        """``{"id", "messages", "updated_at"}``, or None for an unknown session."""
        ...

    async def count(self) -> int:
        """How many sessions are kept."""
        ...

    def reload(self, config: SessionsConfig) -> None:
        """Apply new bounds; they take effect on each session's next append."""
        ...

    async def aclose(self) -> None:
        """Close the store; later calls raise :class:`StoreUnavailable`."""
        ...
