"""The secrets of a configuration, for the log and error redaction of :mod:`raafd.logging`:
the plain auth tokens, the HMAC secrets of JWT keys, the providers' API keys and extra
headers, the http tools' header values and the MCP servers' environment values."""

from __future__ import annotations

import os
from collections.abc import Mapping

from raafd.config import Config

__all__ = ["config_secrets"]


def config_secrets(config: Config, environ: Mapping[str, str] | None = None) -> set[str]:
    env = os.environ if environ is None else environ
    auth = config.auth
    found = {t.strip() for t in auth.all_tokens(environ) if not t.startswith("sha256:")}
    for name in auth.users:
        token = auth.user_token(name, environ)
        if not token.startswith("sha256:"):
            found.add(token)
    found.update(env.get(key.secret_env, "").strip() for key in auth.jwt.values() if key.secret_env)
    for provider in config.providers.values():
        if provider.api_key_env:
            found.add(env.get(provider.api_key_env, "").strip())
        found.update(provider.headers.values())
    for tool in config.tools.values():
        found.update(env.get(var, "").strip() for var in tool.headers_env.values())
        found.update(tool.env.values())
    found.discard("")
    return found
