"""Outgoing webhooks: Standard Webhooks signatures and the SSRF guard, for every sender (the
event bus's ``[[webhooks]]``, job callbacks).

Signing (https://www.standardwebhooks.com): each request carries ``webhook-id`` (unique per
message, the same on every retry), ``webhook-timestamp`` (unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``. A secret written as the
spec does, ``whsec_`` + base64, is the base64-decoded key; any other text is used as its UTF-8
bytes.

The SSRF guard: a webhook's host is resolved here, every address it resolves to must be public
(not private, loopback, link-local, multicast, reserved or unspecified, IPv4-mapped IPv6
included) unless the hook allows private addresses, and the request goes to the *checked*
address (``Host`` and TLS SNI/verification keep the name), so a DNS answer that changes between
the check and the connection (rebinding) cannot send it elsewhere. Redirects are not followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from raafd.errors import BadRequest, Forbidden

__all__ = [
    "TOLERANCE",
    "check_public",
    "post_signed",
    "resolve_public",
    "secret_bytes",
    "sign",
    "signed_headers",
    "verify",
]

TOLERANCE: Final = 300  # seconds a receiver accepts between a timestamp and its clock
_PREFIX: Final = "whsec_"


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a configured secret (see the module docstring)."""
    if secret.startswith(_PREFIX):
        try:
            return base64.b64decode(secret[len(_PREFIX) :], validate=True)
        except ValueError:
            raise BadRequest("a whsec_ secret must be base64 after the prefix") from None
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of
    ``"{msg_id}.{timestamp}.{body}"``."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(key: bytes, headers: Mapping[str, str], body: bytes, now: float) -> bool:
    """A receiver's check (and the tests'): a ``v1`` signature of these headers and body
    matches, and the timestamp is within :data:`TOLERANCE` of ``now``."""
    try:
        msg_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        given = headers["webhook-signature"]
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > TOLERANCE:
        return False
    expected = sign(key, msg_id, timestamp, body)
    # The header may list several space-separated signatures (a secret being rotated).
    return any(hmac.compare_digest(expected, candidate) for candidate in given.split())


def check_public(address: str) -> None:
    """Raise :class:`~raafd.errors.Forbidden` unless ``address`` is a public (global) one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast:
        raise Forbidden(f"{address} is not a public address; webhooks go to public hosts only")


async def resolve_public(host: str, port: int, *, allow_private: bool) -> str:
    """The address to connect to for ``host``: every address it resolves to is checked
    (:func:`check_public`, unless ``allow_private``), the first is used."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise Forbidden(f"{host} does not resolve")
    if not allow_private:
        for address in addresses:
            check_public(address)
    return addresses[0]


async def post_signed(
    client: httpx.AsyncClient,
    url: str,
    key: bytes,
    msg_id: str,
    timestamp: int,
    body: bytes,
    *,
    allow_private: bool = False,
) -> int:
    """POST ``body`` to ``url``, signed, to the checked address; the answer's status.

    Raises :class:`~raafd.errors.Forbidden` (the SSRF guard: a permanent refusal) and what
    httpx raises for a network failure (:class:`httpx.HTTPError`). Bound it with the caller's
    cancel scope."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"not an http(s) URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = await resolve_public(parts.hostname, port, allow_private=allow_private)
    literal = f"[{address}]" if ":" in address else address
    target = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    headers = {"host": host, **signed_headers(key, msg_id, timestamp, body)}
    response = await client.post(
        target,
        content=body,
        headers=headers,
        extensions={"sni_hostname": parts.hostname},
    )
    await response.aclose()
    return response.status_code
