"""The HTTP API's own routes: health, readiness, metrics, stats and the agent list. The
subsystems add theirs to the same router (``add_stream_routes``, ``add_session_routes`` …),
each with the services it uses; the daemon wires them.

When ``[auth]`` has tokens every request needs one (see :mod:`raafd.auth`), except
``GET /healthz``, ``GET /readyz`` and, with ``http.public_metrics``, ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from raafd.auth import Principal, check_http
from raafd.errors import Unauthorized, Unavailable
from raafd.http.asgi import JSONResponse, Request, Response, Router
from raafd.http.context import HttpContext

__all__ = ["build_app"]


def build_app(
    ctx: HttpContext,
    *,
    stats: Callable[[], dict[str, Any]],
    refresh_gauges: Callable[[], None],
) -> Router:
    """The router with the API's own routes. ``stats`` gives ``GET /v1/stats`` its figures;
    ``refresh_gauges`` sets the gauges that mirror component state before a scrape."""

    def authorize(request: Request) -> Principal:
        client = request.scope.get("client")
        address = str(client[0]) if client else ""
        ctx.guard.limit_ip("http_requests", address)
        # Read at each request: tokens and public_metrics are reloadable.
        try:
            return check_http(
                request.method,
                request.path,
                request.headers,
                request.query,
                ctx.authenticator(),
                public_metrics=ctx.config().http.public_metrics,
            )
        except Unauthorized as err:
            ctx.guard.auth_failed("http", err.message, address)
            raise

    router = Router(
        ctx.metrics,
        lambda: ctx.config().http.max_body_bytes,
        authorize,
        cors_origins=lambda: ctx.config().http.cors_origins,
        body_timeout=lambda: ctx.config().server.header_timeout,
    )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if ctx.draining():
            raise Unavailable("draining", retry_after=1)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        if not ctx.config().http.public_metrics:
            ctx.guard.require(request.principal, "admin", "metrics")
        refresh_gauges()
        return Response(200, ctx.metrics.render(), CONTENT_TYPE_LATEST)

    async def agents(request: Request) -> Response:
        cfg = ctx.config()
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

    async def stats_route(request: Request) -> Response:
        ctx.guard.require(request.principal, "admin", "stats")
        return JSONResponse(stats())

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    router.add("GET", "/metrics", metrics)
    router.add("GET", "/v1/stats", stats_route)
    router.add("GET", "/v1/agents", agents)
    return router
