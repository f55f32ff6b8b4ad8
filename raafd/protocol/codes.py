"""The codes of the wire protocol, in one place for the server and the Python client: the
WebSocket subprotocol, the WebSocket close codes and the error codes.

Pure constants: this module imports nothing from the rest of raafd, so anything may import it.
Every value here is part of the v1 contract (docs/protocol.md): add codes freely; rename or
remove one only together with docs/protocol.md, the tests and the changelog.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["SUBPROTOCOL", "CloseCode", "ErrorCode"]

SUBPROTOCOL: Final = "raafd.v1"
"""The WebSocket subprotocol of ``GET /v1/ws``."""


class CloseCode(enum.IntEnum):
    """Why the server closed a WebSocket connection, and what the client should do."""

    NORMAL = 1000
    """Normal closure."""
    GOING_AWAY = 1001
    """The server is draining (after ``shutdown``): reconnect after ``reconnect_after`` and
    attach again with your last seq."""
    KICKED = 1008
    """Closed by an administrator (``raafd ctl kick``)."""
    TOO_BIG = 1009
    """A message over ``websocket.max_frame``."""
    INTERNAL = 1011
    """An internal error: reconnect."""
    SLOW_CONSUMER = 4001
    """Too far behind a shared stream: reconnect and attach with your last seq."""
    UNAUTHORIZED = 4401
    """No valid token: reconnecting with the same one cannot help."""
    FORBIDDEN = 4403
    """The origin is not allowed: reconnecting cannot help."""
    TIMEOUT = 4408
    """No frame within the heartbeat timeout, or no ``hello`` within the auth timeout."""
    RATE_LIMITED = 4429
    """Rate limited: back off."""


class ErrorCode(enum.StrEnum):
    """The stable ``code`` of an error, the same on every transport (WebSocket ``error``
    messages, a stream's ``error`` event, HTTP error bodies, admin answers). Members are
    strings: ``ErrorCode.GONE == "gone"``."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"  # HTTP only
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_STREAMS = "too_many_streams"
    UNAVAILABLE = "unavailable"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    GONE = "gone"
    """Events older than what a stream still holds were asked for."""
    MAX_TURNS = "max_turns"
    """An agent run used ``max_turns`` model turns without a final answer."""
    SLOW_CONSUMER = "slow_consumer"
    """A subscriber fell too far behind a shared stream (WebSocket: close 4001)."""
    # Reserved by the v1 contract for features not built yet; raafd does not send them today.
    OUTPUT_LIMIT = "output_limit"
    CONTENT_FILTERED = "content_filtered"
    NODE_LOST = "node_lost"
