"""CORS for the HTTP API: which ``Access-Control-*`` headers a request gets, as a pure function.

The rule of this file: the decision is one function of (``Origin``, method, request headers,
``http.cors_origins``) and nothing else; both HTTP paths (the ASGI app under hypercorn and the
raw streaming server) only apply what it answers. So the two paths cannot disagree, and the
rules are tested without sockets.

- A request without ``Origin`` (every non-browser client) gets nothing, at no cost.
- An allowed origin is echoed in ``Access-Control-Allow-Origin`` with ``Vary: Origin`` and the
  response headers a browser app needs to read (``x-raafd-stream``, ``retry-after``,
  ``location``) exposed. An origin listed by name also gets
  ``Access-Control-Allow-Credentials: true``; one allowed only by ``*`` gets
  ``Access-Control-Allow-Origin: *`` and never credentials (raafd's bearer tokens are not
  credentials in the CORS sense: a page sets ``Authorization`` itself, which ``*`` permits).
- A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) carries no credentials, so it
  is answered here, before authentication: ``204`` with the methods, the request headers it
  asked for (header names, at most 64; else a default list) and max-age, and
  ``Vary: Origin, Access-Control-Request-Headers``, when the origin is allowed; a plain ``403``
  with no CORS headers when it is not. It says nothing about the routes or the tokens either
  way.
- A disallowed origin gets no CORS headers at all; the browser then keeps the answer from the
  page.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from attrs import frozen

__all__ = [
    "ALLOW_HEADERS",
    "ALLOW_METHODS",
    "EXPOSE_HEADERS",
    "MAX_AGE",
    "NOTHING",
    "CorsAnswer",
    "Headers",
    "cors",
]

ALLOW_METHODS = "GET, HEAD, POST, DELETE"
# What a preflight allows when it names no headers, or names some that are not header names.
# Otherwise the headers it asks for are allowed as asked: the origin is what CORS checks, and
# the official SDKs send headers of their own (the OpenAI and Anthropic ones x-stainless-*,
# the Anthropic one x-api-key and anthropic-version).
ALLOW_HEADERS = "authorization, content-type, last-event-id, accept, x-api-key"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,64}")
_MAX_REQUESTED = 64  # header names one preflight may have allowed
EXPOSE_HEADERS = "x-raafd-stream, retry-after, location"
MAX_AGE = "600"  # seconds a browser may cache a preflight answer

Headers = tuple[tuple[str, str], ...]


@frozen
class CorsAnswer:
    """What a request gets: ``headers`` to add to its response, and ``preflight``, the status
    to answer at once (204 allowed, 403 refused), or ``None`` when the request goes on."""

    headers: Headers = ()
    preflight: int | None = None


NOTHING = CorsAnswer()
REFUSED = CorsAnswer(preflight=403)


def cors(
    origin: str | None,
    method: str,
    headers: Mapping[str, str],
    allowed: Sequence[str],
) -> CorsAnswer:
    """The CORS answer for a request from ``origin`` (its ``Origin`` header, None without one)
    with ``method`` and ``headers`` (names lower-cased), under ``http.cors_origins``."""
    preflight = method == "OPTIONS" and "access-control-request-method" in headers
    if origin is None:
        return NOTHING
    if origin in allowed:
        base: Headers = (
            ("access-control-allow-origin", origin),
            ("access-control-allow-credentials", "true"),
            ("vary", "Origin"),
        )
    elif "*" in allowed:
        base = (("access-control-allow-origin", "*"), ("vary", "Origin"))
    else:
        return REFUSED if preflight else NOTHING
    if preflight:
        vary = (("vary", "Origin, Access-Control-Request-Headers"),)
        return CorsAnswer(
            (
                *(base[:-1] + vary),
                ("access-control-allow-methods", ALLOW_METHODS),
                ("access-control-allow-headers", _allowed_headers(headers)),
                ("access-control-max-age", MAX_AGE),
            ),
            204,
        )
    return CorsAnswer((*base, ("access-control-expose-headers", EXPOSE_HEADERS)))


def _allowed_headers(headers: Mapping[str, str]) -> str:
    """The headers a preflight asked for (``Access-Control-Request-Headers``), when each is a
    header name and they are not too many; else :data:`ALLOW_HEADERS`."""
    asked = headers.get("access-control-request-headers", "")
    names = [name.strip().lower() for name in asked.split(",") if name.strip()]
    if not names or len(names) > _MAX_REQUESTED:
        return ALLOW_HEADERS
    if not all(_HEADER_NAME.fullmatch(name) for name in names):
        return ALLOW_HEADERS
    return ", ".join(dict.fromkeys(names))
