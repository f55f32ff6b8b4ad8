"""The built-in web chat at ``/`` and the browser client module at ``/static/raafd.js``.

The files live in the package (``raafd/web/``) and are read once, when the routes are added;
each answer carries its content type, an ``ETag`` (a ``304`` answers a matching
``If-None-Match``) and ``Cache-Control: no-cache`` (browsers revalidate, so an upgraded raafd
is seen at once and an unchanged file costs a 304). The page gets a strict
Content-Security-Policy: its own scripts, styles and connections only, nothing inline, no
frames, no plugins — agent and user text is always inserted as text, and the policy is the
second wall should that ever fail.

``http.web_ui`` turns both on or off; unset, they are on when the listener is on a loopback
address. Both are open without a token (the page asks for one and sends it in the WebSocket's
``hello`` frame and in ``Authorization`` headers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Final

from raafd.config import Config
from raafd.errors import NotFound
from raafd.http.asgi import Request, Response, Router

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_FILES", "add_web_routes", "web_ui_enabled"]

# name under /static/ (and the page) → content type
STATIC_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "raafd.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_LOOPBACK: Final = ("127.", "::1", "localhost")


def web_ui_enabled(config: Config) -> bool:
    """``http.web_ui`` when set; else on for a loopback listener only."""
    if config.http.web_ui is not None:
        return config.http.web_ui
    return config.server.host.startswith(_LOOPBACK)


class _File:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def _load() -> dict[str, _File]:
    root = resources.files("raafd") / "web"
    return {
        name: _File((root / name).read_bytes(), content_type)
        for name, content_type in STATIC_FILES.items()
    }


def add_web_routes(router: Router, config: Callable[[], Config]) -> None:
    """``GET /`` and ``GET /static/{name}``; ``config()`` is read per request (reloadable)."""
    files = _load()

    def serve(request: Request, name: str) -> Response:
        if not web_ui_enabled(config()):
            raise NotFound("the web UI is off (http.web_ui)")
        found = files.get(name)
        if found is None:
            raise NotFound(f"no file {name!r}")
        headers = {"etag": found.etag, "cache-control": "no-cache"}
        if name == "index.html":
            headers["content-security-policy"] = CONTENT_SECURITY_POLICY
            headers["x-content-type-options"] = "nosniff"
            headers["referrer-policy"] = "no-referrer"
        if request.headers.get("if-none-match") == found.etag:
            return Response(304, b"", found.content_type, headers)
        return Response(200, found.body, found.content_type, headers)

    async def page(request: Request) -> Response:
        return serve(request, "index.html")

    async def static(request: Request, name: str) -> Response:
        return serve(request, name)

    router.add("GET", "/", page)
    router.add("GET", "/static/{name}", static)
