"""Providers by name, built from ``[providers.NAME]`` config, and the daemon's two HTTP clients.

One :class:`~raafd.providers.upstream.UpstreamClient` (:func:`open_upstream_client`, the
providers' own lean HTTP/1.1 client) serves every network provider of the daemon, so
connections to an upstream are pooled and their number is bounded in one place. A streamed
answer holds its HTTP/1.1 connection until it ends, so ``max_connections`` bounds the upstream
requests in flight across all providers: one more waits for a free connection up to its
provider's ``connect_timeout``, then fails with a retryable ``ProviderError`` (reason ``pool``),
instead of opening sockets without end.

One :class:`httpx.AsyncClient` (:func:`open_http_client`) serves the rest: the ``http`` tools
and MCP over streamable HTTP, where a full-featured client matters more than microseconds.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import httpx

from raafd import __version__
from raafd.config import ProviderConfig
from raafd.providers.anthropic import AnthropicProvider
from raafd.providers.base import Provider
from raafd.providers.demo import DemoProvider
from raafd.providers.ollama import OllamaProvider
from raafd.providers.openai import OpenAIProvider
from raafd.providers.upstream import UpstreamClient, open_upstream_client

__all__ = ["build_providers", "open_http_client", "open_upstream_client"]

_BUILDERS: dict[str, Callable[..., Provider]] = {
    "demo": lambda name, config, client, environ: DemoProvider(name, config),
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
}


def build_providers(
    configs: Mapping[str, ProviderConfig],
    client: UpstreamClient,
    *,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Provider]:
    """One provider per config entry. The config was validated (``raafd.config`` refuses
    types this build does not implement), so every type here has a builder."""
    return {
        name: _BUILDERS[config.type](name, config, client, environ)
        for name, config in configs.items()
    }


@asynccontextmanager
async def open_http_client(
    *,
    max_connections: int = 1024,
    max_keepalive_connections: int = 128,
    keepalive_expiry: float = 30.0,
    trust_env: bool = True,
) -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's shared httpx client (tools, MCP), closed with its pooled connections on exit.

    Per-request timeouts come from each caller; the client's own are a fallback. Redirects are
    not followed (an endpoint that redirects is misconfigured, and following would resend its
    credentials elsewhere). ``trust_env`` honours ``HTTPS_PROXY``/``NO_PROXY``."""
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=keepalive_expiry,
    )
    async with httpx.AsyncClient(
        limits=limits,
        timeout=httpx.Timeout(120.0, connect=10.0),
        follow_redirects=False,
        trust_env=trust_env,
        headers={"user-agent": f"raafd/{__version__}"},
    ) as client:
        yield client
