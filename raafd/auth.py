"""Bearer tokens: where a request carries one, and who it stands for.

One rule for every transport (the WebSocket handshake, the HTTP API through hypercorn, and the
raw HTTP streaming path): when auth is on, a request names a token in
``Authorization: Bearer TOKEN`` or, unless ``auth.query_token = false``, in the query as
``?token=TOKEN`` (the header wins when both are given). Whether a token is good and whom it
stands for is the :class:`TokenCheck`'s to say (:mod:`raafd.security.authenticator`: static
tokens compared in constant time, JWTs). Tokens are never logged or echoed; errors say only
why a token was refused. The Anthropic Messages API (``POST /v1/messages``) also takes
``x-api-key: TOKEN``, what its SDKs send (``Authorization`` wins when both are given).

Whoever a request or connection acts as is a :class:`Principal`: a user name and roles. With
static tokens the user is ``token-`` and the first 12 hex digits of the token's SHA-256 (stable,
and not the token); with auth off, and on public endpoints, it is :data:`ANONYMOUS`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Protocol

from attrs import field, frozen

from raafd.errors import Unauthorized

__all__ = [
    "ANONYMOUS",
    "API_KEY_PATHS",
    "PUBLIC_PATHS",
    "Principal",
    "TokenCheck",
    "bearer_token",
    "check_http",
    "is_public",
    "principal_for_token",
    "token_ok",
]


@frozen
class Principal:
    """Who acts: the user name other parts of raafd show and key state by (presence, room
    messages, job owners), and the roles permissions are granted to."""

    user: str
    roles: frozenset[str] = field(factory=frozenset)

    @property
    def counted_as(self) -> str:
        """The name per-principal caps count under (``streams.max_streams_per_principal``):
        the user, or empty for :data:`ANONYMOUS` (with auth off there is nobody to tell
        apart; the per-connection and global caps still hold)."""
        return "" if self.user == ANONYMOUS.user else self.user


ANONYMOUS = Principal("anonymous")
"""Whoever acts where no token is needed (auth off, public endpoints)."""


def principal_for_token(token: str) -> Principal:
    """The principal a good static token stands for."""
    return Principal("token-" + hashlib.sha256(token.encode()).hexdigest()[:12])


# HTTP endpoints open without a token: liveness and readiness probes (load balancers and
# service managers do not carry tokens). /metrics joins them with `http.public_metrics`.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
# Where a token may also come as `x-api-key` (the Anthropic SDKs send their key so); the
# Authorization header wins when both are given.
API_KEY_PATHS = frozenset({"/v1/messages"})


class TokenCheck(Protocol):
    """What the transports ask about tokens (built per configuration)."""

    @property
    def enabled(self) -> bool:
        """Auth is on: every request needs a token."""
        ...

    @property
    def query_token(self) -> bool:
        """``?token=`` is accepted."""
        ...

    def authenticate(self, token: str) -> Principal:
        """Whom ``token`` stands for, or raise :class:`~raafd.errors.Unauthorized`."""
        ...


MISSING = "a token is required: send Authorization: Bearer TOKEN (or ?token=TOKEN)"
MISSING_NO_QUERY = "a token is required: send Authorization: Bearer TOKEN"
IN_QUERY = "a token in the URL is not accepted here: send Authorization: Bearer TOKEN"


def bearer_token(
    headers: Mapping[str, str], query: Mapping[str, str], *, query_token: bool = True
) -> str | None:
    """The token a request carries (header names lower-cased), or ``None``; a token in the
    query when ``query_token`` is false is :class:`~raafd.errors.Unauthorized`."""
    auth = headers.get("authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    given = query.get("token")
    if given is not None and not query_token:
        raise Unauthorized(IN_QUERY)
    return given


def authenticate(
    headers: Mapping[str, str], query: Mapping[str, str], check: TokenCheck
) -> Principal | None:
    """Who a request's token stands for; ``None`` when it carries none; refusals raise."""
    given = bearer_token(headers, query, query_token=check.query_token)
    if given is None:
        return None
    return check.authenticate(given)


def token_ok(given: str, tokens: Iterable[str]) -> bool:
    """True when ``given`` is one of ``tokens``. Both sides are hashed first, so each
    comparison takes the same time whatever the lengths, and every token is compared."""
    digest = hashlib.sha256(given.encode()).digest()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(digest, hashlib.sha256(token.encode()).digest())
    return ok


def is_public(method: str, path: str, *, public_metrics: bool) -> bool:
    """Whether an HTTP request needs no token (``HEAD`` is ``GET`` without the body). The web
    chat's page and static files are public: the page asks for the token, and the files hold
    nothing secret (they answer 404 when ``http.web_ui`` is off)."""
    if method not in ("GET", "HEAD"):
        return False
    return (
        path in PUBLIC_PATHS
        or path == "/"
        or path.startswith("/static/")
        or (public_metrics and path == "/metrics")
    )


def check_http(
    method: str,
    path: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    check: TokenCheck,
    *,
    public_metrics: bool,
) -> Principal:
    """Who the request acts as, or raise :class:`~raafd.errors.Unauthorized`: auth off or the
    endpoint is public (:data:`ANONYMOUS`), or whom its good token stands for."""
    if not check.enabled or is_public(method, path, public_metrics=public_metrics):
        return ANONYMOUS
    principal = authenticate(headers, query, check)
    if principal is None and path in API_KEY_PATHS and "x-api-key" in headers:
        principal = check.authenticate(headers["x-api-key"])
    if principal is None:
        raise Unauthorized(MISSING if check.query_token else MISSING_NO_QUERY)
    return principal
