"""The in-memory session store: the SQLite store's behaviour without a disk or a thread.

For tests and throwaway runs: **nothing survives a restart.** It runs entirely on trio (no
worker thread), so an autojump clock sees all of its work.

The rule of this file: **every call is one step with no ``await`` inside.** A call checks for
cancellation first, does all of its work synchronously, then yields (trio's checkpoint
contract): a cancelled call changed nothing, a returned one is whole, and concurrent appends
never interleave, as SQLite's transactions don't.

Bounds (DESIGN invariant 2) are the SQLite store's, from ``[sessions]``: ``max_messages`` and
``max_tokens`` per session, trimmed by :mod:`raafd.store.trim` (whole turns, oldest first);
``max_sessions`` sessions, the least recently *appended to* forgotten first (reads do not
count). Messages are kept as JSON bytes, so what ``load`` returns is the caller's own copy, and
a message SQLite could not store is refused here too.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
import trio
from attrs import define, field

from raafd.config import SessionsConfig
from raafd.store.base import StoreUnavailable
from raafd.store.trim import Row, estimate_tokens, kind_of, plan_trim

__all__ = ["MemorySessionStore", "open_memory_session_store"]

T = TypeVar("T")
_Sessions = OrderedDict[str, "_Session"]


@define
class _Session:
    messages: list[tuple[Row, bytes]] = field(factory=list)  # oldest first
    tokens: int = 0  # the sum of the kept rows' estimates
    last_seq: int = 0
    updated_at: float = 0.0  # unix time of the last append


class MemorySessionStore:
    """The :class:`~raafd.store.base.SessionBackend` in memory; see the module docstring.

    Get one from :func:`open_memory_session_store`."""

    def __init__(self, config: SessionsConfig) -> None:
        self.config = config
        # Least recently appended to first; None once closed.
        self._sessions: _Sessions | None = OrderedDict()

    def reload(self, config: SessionsConfig) -> None:
        """Apply new bounds; they take effect on each session's next append."""
        self.config = config

    async def _step(self, work: Callable[[_Sessions], T]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        sessions = self._sessions
        if sessions is None:
            raise StoreUnavailable("the session store is closed")
        result = work(sessions)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    # --- SessionStore -------------------------------------------------------------------------

    async def load(self, session: str) -> list[dict[str, Any]]:
        """The kept messages, oldest first (``[]`` for an unknown session)."""

        def work(sessions: _Sessions) -> list[dict[str, Any]]:
            kept = sessions.get(session)
            return [] if kept is None else [orjson.loads(data) for _, data in kept.messages]

        return await self._step(work)

    async def append(self, session: str, messages: list[dict[str, Any]]) -> None:
        """Add ``messages``, trim the session to its bounds and forget the least recently used
        sessions past ``max_sessions``, in one step."""
        encoded = [(kind_of(m), estimate_tokens(m), orjson.dumps(m)) for m in messages]
        cfg = self.config
        now = time.time()

        def work(sessions: _Sessions) -> None:
            if not encoded:
                return
            kept = sessions.get(session)
            created = kept is None
            if kept is None:
                kept = sessions[session] = _Session()
            sessions.move_to_end(session)
            kept.updated_at = now
            for kind, tokens, data in encoded:
                kept.last_seq += 1
                kept.messages.append((Row(kept.last_seq, kind, tokens), data))
                kept.tokens += tokens
            if len(kept.messages) > cfg.max_messages or kept.tokens > cfg.max_tokens:
                rows = [row for row, _ in kept.messages]
                doomed = set(plan_trim(rows, cfg.max_messages, cfg.max_tokens))
                kept.messages = [(r, d) for r, d in kept.messages if r.seq not in doomed]
                kept.tokens = sum(r.tokens for r, _ in kept.messages)
            if created:
                while len(sessions) > cfg.max_sessions:
                    sessions.popitem(last=False)

        await self._step(work)

    async def delete(self, session: str) -> bool:
        """Forget a session; ``False`` if there was none."""
        return await self._step(lambda sessions: sessions.pop(session, None) is not None)

    # --- for the HTTP API and stats -----------------------------------------------------------

    async def get(self, session: str) -> dict[str, Any] | None:
        """``{"id", "messages", "updated_at"}``, or None for an unknown session."""

        def work(sessions: _Sessions) -> dict[str, Any] | None:
            kept = sessions.get(session)
            if kept is None:
                return None
            return {
                "id": session,
                "messages": [orjson.loads(data) for _, data in kept.messages],
                "updated_at": kept.updated_at,
            }

        return await self._step(work)

    async def count(self) -> int:
        """How many sessions are kept."""
        return await self._step(len)

    async def aclose(self) -> None:
        """Forget everything. Later calls raise :class:`StoreUnavailable`."""
        self._sessions = None
        await trio.lowlevel.cancel_shielded_checkpoint()


@asynccontextmanager
async def open_memory_session_store(config: SessionsConfig) -> AsyncIterator[MemorySessionStore]:
    """An empty store, forgotten when the block ends."""
    store = MemorySessionStore(config)
    try:
        yield store
    finally:
        await store.aclose()
