"""``/v1/sessions/{id}``: read or forget a conversation kept across streams.

- ``GET`` → ``{"session", "messages", "updated_at"}`` (the kept messages, oldest first, after
  trimming to ``[sessions]`` bounds; ``updated_at`` is the unix time of the last append), or
  404 ``not_found``;
- ``DELETE`` → 204, or 404 ``not_found``. A stream running on the session when it is deleted
  still saves its run when it completes (the session then starts again from that run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from raafd.errors import NotFound, Unavailable
from raafd.http.asgi import JSONResponse, Request, Response, Router

if TYPE_CHECKING:
    from raafd.store import SessionBackend

__all__ = ["add_session_routes"]


def add_session_routes(router: Router, sessions: Callable[[], SessionBackend | None]) -> None:
    """``sessions()``: the session store, None until the daemon has opened it."""

    def store() -> SessionBackend:
        opened = sessions()
        if opened is None:  # only before the daemon has opened its store
            raise Unavailable("the session store is not open yet")
        return opened

    async def get(request: Request, session: str) -> Response:
        found = await store().get(session)
        if found is None:
            raise NotFound(f"no session {session!r}", field="session")
        return JSONResponse(
            {
                "session": found["id"],
                "messages": found["messages"],
                "updated_at": found["updated_at"],
            }
        )

    async def delete(request: Request, session: str) -> Response:
        if not await store().delete(session):
            raise NotFound(f"no session {session!r}", field="session")
        return Response(204, b"")

    router.add("GET", "/v1/sessions/{session}", get)
    router.add("DELETE", "/v1/sessions/{session}", delete)
