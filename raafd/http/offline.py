"""``GET /v1/users/{user}/queue``: a user's offline queue, for operators.

``?limit=`` (default 100, 1 to 1000) → ``{"user", "depth", "messages": [{id, kind, from, room?,
text, ts, expires_at}, …]}``: ``depth`` counts every message waiting (not expired), oldest
first. Reading it changes nothing (nothing is acknowledged). It needs the ``admin``
permission (as ``/v1/stats`` does: another user's messages are in it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raafd.http.asgi import JSONResponse, Request, Response, Router
from raafd.http.presence import query_limit

if TYPE_CHECKING:
    from raafd.chat.offline import OfflineQueues
    from raafd.security.guard import Guard

__all__ = ["add_offline_routes"]


def add_offline_routes(router: Router, queues: OfflineQueues, guard: Guard) -> None:
    async def queue(request: Request, user: str) -> Response:
        guard.require(request.principal, "admin", "queue")
        depth, messages = await queues.listing(user, query_limit(request))
        listing = [{**m.to_wire(), "expires_at": round(m.expires_at, 3)} for m in messages]
        return JSONResponse({"user": user, "depth": depth, "messages": listing})

    router.add("GET", "/v1/users/{user}/queue", queue)
