"""The HTTP API's routes. Transports only frame; the daemon's components decide.

When ``[auth]`` has tokens every request needs one (see :mod:`raafd.auth`), except
``GET /healthz``, ``GET /readyz`` and, with ``http.public_metrics``, ``GET /metrics``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

from raafd.auth import check_http
from raafd.errors import Unavailable
from raafd.http.asgi import JSONResponse, Request, Response, Router
from raafd.http.openai_compat import add_openai_routes
from raafd.http.sessions import add_session_routes
from raafd.http.streams import add_stream_routes
from raafd.http.workflows import add_workflow_routes

if TYPE_CHECKING:
    from raafd.daemon import Daemon

__all__ = ["build_app"]


def build_app(daemon: Daemon) -> Router:
    def authorize(request: Request) -> None:
        # Read at each request: tokens and public_metrics are reloadable.
        check_http(
            request.method,
            request.path,
            request.headers,
            request.query,
            daemon.tokens(),
            public_metrics=daemon.config.http.public_metrics,
        )

    router = Router(daemon.metrics, lambda: daemon.config.http.max_body_bytes, authorize)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if daemon.draining:
            raise Unavailable("draining", retry_after=1)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        daemon.refresh_gauges()
        return Response(200, daemon.metrics.render(), CONTENT_TYPE_LATEST)

    async def agents(request: Request) -> Response:
        cfg = daemon.config
        listing = [
            {
                "name": name,
                "provider": agent.provider,
                "model": agent.model or cfg.providers[agent.provider].model or agent.provider,
                "tools": agent.tools,
                "handoffs": agent.handoffs,
                "fallback": agent.fallback,
                "max_turns": agent.max_turns,
                "default": name == cfg.default_agent,
            }
            for name, agent in cfg.agents.items()
        ]
        return JSONResponse({"agents": listing})

    async def stats(request: Request) -> Response:
        return JSONResponse(daemon.stats())

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    router.add("GET", "/metrics", metrics)
    router.add("GET", "/v1/stats", stats)
    router.add("GET", "/v1/agents", agents)
    add_stream_routes(router, daemon)
    add_openai_routes(router, daemon)
    add_session_routes(router, daemon)
    add_workflow_routes(router, daemon)
    return router
