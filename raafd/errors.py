"""The raafd error family.

Every error a client can see is a :class:`RaafdError` with a stable ``code`` (the wire
protocol's error code, an :class:`~raafd.protocol.codes.ErrorCode`), a human sentence, and
optionally the offending field path and a ``retry_after`` hint. Transports turn them into
frames or HTTP bodies; nothing else about an exception (type, traceback, upstream secrets) is
ever sent to a client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from raafd.logging import redact_text
from raafd.protocol.codes import ErrorCode


class RaafdError(Exception):
    """Base of every client-visible error."""

    code: ClassVar[str] = ErrorCode.INTERNAL
    http_status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        """The ``{"code", "message", "field"}`` object used on every transport (a secret of the
        running configuration in the message, e.g. echoed by an upstream, is redacted)."""
        body: dict[str, Any] = {"code": self.code, "message": redact_text(self.message)}
        if self.field is not None:
            body["field"] = self.field
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class BadRequest(RaafdError):
    code = ErrorCode.BAD_REQUEST
    http_status = 400


class Unauthorized(RaafdError):
    code = ErrorCode.UNAUTHORIZED
    http_status = 401


class Forbidden(RaafdError):
    code = ErrorCode.FORBIDDEN
    http_status = 403


class NotFound(RaafdError):
    code = ErrorCode.NOT_FOUND
    http_status = 404


class MethodNotAllowed(RaafdError):
    """``allow``: the methods the resource answers (HTTP sends them as the ``Allow`` header)."""

    code = ErrorCode.METHOD_NOT_ALLOWED
    http_status = 405

    def __init__(self, message: str, *, allow: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.allow = tuple(allow)


class Conflict(RaafdError):
    code = ErrorCode.CONFLICT
    http_status = 409


class TooLarge(RaafdError):
    code = ErrorCode.TOO_LARGE
    http_status = 413


class RequestTimeout(RaafdError):
    """A request's head or body did not arrive within ``server.header_timeout`` (HTTP 408; the
    connection closes)."""

    code = ErrorCode.TIMEOUT
    http_status = 408


class RateLimited(RaafdError):
    code = ErrorCode.RATE_LIMITED
    http_status = 429


class TooManyStreams(RaafdError):
    code = ErrorCode.TOO_MANY_STREAMS
    http_status = 429


class Unavailable(RaafdError):
    code = ErrorCode.UNAVAILABLE
    http_status = 503


class UpstreamError(RaafdError):
    code = ErrorCode.UPSTREAM_ERROR
    http_status = 502


class Timeout(RaafdError):
    code = ErrorCode.TIMEOUT
    http_status = 504


class Internal(RaafdError):
    code = ErrorCode.INTERNAL
    http_status = 500


class Gone(RaafdError):
    """Events older than what a stream's log still holds were asked for."""

    code = ErrorCode.GONE
    http_status = 410


class MaxTurns(RaafdError):
    """An agent run used ``max_turns`` model turns without a final answer."""

    code = ErrorCode.MAX_TURNS
    http_status = 500
