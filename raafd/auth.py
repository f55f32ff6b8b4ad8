"""Bearer tokens: where a request carries one, and whether it is good.

One rule for every transport (the WebSocket handshake, the HTTP API through hypercorn, and the
raw HTTP streaming path): when tokens are configured, a request names one in
``Authorization: Bearer TOKEN`` or in the query as ``?token=TOKEN`` (the header wins when both
are given). A token is compared against every configured token in constant time, so neither
which token matched nor how much of one matched shows in the time taken. Tokens are never
logged or echoed; errors say only that a token is missing or not valid.

Whoever a request or connection acts as is a :class:`Principal`: a user name and roles. With
static tokens the user is ``token-`` and the first 12 hex digits of the token's SHA-256 (stable,
and not the token); with auth off, and on public endpoints, it is :data:`ANONYMOUS`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from attrs import field, frozen

from raafd.errors import Unauthorized

__all__ = [
    "ANONYMOUS",
    "PUBLIC_PATHS",
    "Principal",
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


ANONYMOUS = Principal("anonymous")
"""Whoever acts where no token is needed (auth off, public endpoints)."""


def principal_for_token(token: str) -> Principal:
    """The principal a good static token stands for."""
    return Principal("token-" + hashlib.sha256(token.encode()).hexdigest()[:12])


# HTTP endpoints open without a token: liveness and readiness probes (load balancers and
# service managers do not carry tokens). /metrics joins them with `http.public_metrics`.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


def bearer_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token a request carries (header names lower-cased), or ``None``."""
    auth = headers.get("authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return query.get("token")


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
    tokens: frozenset[str],
    *,
    public_metrics: bool,
) -> Principal:
    """Who the request acts as, or raise :class:`~raafd.errors.Unauthorized`: no tokens are
    configured or the endpoint is public (:data:`ANONYMOUS`), or it carries a good token."""
    if not tokens or is_public(method, path, public_metrics=public_metrics):
        return ANONYMOUS
    given = bearer_token(headers, query)
    if given is None:
        raise Unauthorized(
            "a token is required: send Authorization: Bearer TOKEN (or ?token=TOKEN)"
        )
    if not token_ok(given, tokens):
        raise Unauthorized("the token is not valid")
    return principal_for_token(given)
