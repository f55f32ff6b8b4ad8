"""Configuration: TOML and environment into a tree of frozen attrs classes.

The rule of this module: a configuration is either entirely valid or rejected with *every*
problem listed as ``path.to.key: reason``. Nothing half-valid ever reaches the daemon, on start
or on reload.

Lookup order (first found wins): ``--config PATH``, ``$RAAFD_CONFIG``, ``./raafd.toml``,
``/etc/raafd/raafd.toml``, else the built-in defaults. ``RAAFD_<SECTION>__<KEY>=value``
environment variables override single keys after the file is read; the value is parsed as a
TOML value when it is one (``8081``, ``true``, ``["a"]``) and taken as a string otherwise.
"""

from __future__ import annotations

import base64
import difflib
import importlib.util
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import cattrs
from attrs import field, frozen
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from raafd.protocol.rooms import ROOM_NAME

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

__all__ = [
    "DEFAULT_PATHS",
    "AdminConfig",
    "AgentConfig",
    "AuthConfig",
    "BreakerConfig",
    "ChatConfig",
    "Config",
    "ConfigError",
    "EventsConfig",
    "FilterConfig",
    "HttpConfig",
    "JobsConfig",
    "JwtKeyConfig",
    "LimitsConfig",
    "LoggingConfig",
    "ProviderConfig",
    "RateConfig",
    "RoleConfig",
    "RoomConfig",
    "ServerConfig",
    "SessionsConfig",
    "StoreConfig",
    "StreamsConfig",
    "ToolConfig",
    "UserConfig",
    "WebSocketConfig",
    "WebhookConfig",
    "check_tool_configs",
    "find_config_file",
    "load_config",
    "parse_config",
    "schema_validator",
]

DEFAULT_PATHS = (Path("raafd.toml"), Path("/etc/raafd/raafd.toml"))
ENV_PREFIX = "RAAFD_"


class ConfigError(Exception):
    """A configuration was rejected; ``problems`` holds one ``path: reason`` line each."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems))


# --- validators -------------------------------------------------------------------------------


def _positive(_: Any, a: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")


def _non_negative(_: Any, a: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")


def _between(lo: float, hi: float) -> Callable[[Any, attrs.Attribute[Any], float], None]:
    def check(_: Any, a: attrs.Attribute[Any], value: float) -> None:
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")

    return check


def _gc_thresholds(_: Any, a: attrs.Attribute[Any], value: list[int]) -> None:
    if len(value) != 3:
        raise ValueError(f"must be three integers (young, middle, old), got {len(value)}")
    if value[0] < 100 or value[1] < 1 or value[2] < 1:
        raise ValueError(f"the first must be 100 or more and the others 1 or more, got {value}")


def _one_of(*choices: str) -> Callable[[Any, attrs.Attribute[Any], str], None]:
    def check(_: Any, a: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")

    return check


def _origins(_: Any, a: attrs.Attribute[Any], value: list[str]) -> None:
    # As browsers send Origin: compared as written, so a path or capitals would never match.
    for entry in value:
        scheme, sep, rest = entry.partition("://")
        ok = entry == "*" or (
            bool(sep and rest)
            and scheme.isascii()
            and scheme.isalpha()
            and entry == entry.lower()
            and not any(c in rest for c in "/?#@ ")
        )
        if not ok:
            raise ValueError(
                f"{entry!r} is not an origin: give * or scheme://host[:port] in lower case,"
                " with no path or trailing slash"
            )


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# --- the tree ---------------------------------------------------------------------------------


@frozen
class ServerConfig:
    """``[server]``: the public listener (HTTP, SSE, NDJSON and WebSocket on one port) and the
    process around it."""

    host: str = "127.0.0.1"
    port: int = field(default=8080, validator=_between(0, 65535))
    unix_socket: str = ""  # listen on this unix socket path instead of host:port when set
    allow_public_without_auth: bool = False
    shutdown_grace: float = field(default=10.0, validator=_non_negative)
    drain_delay: float = field(default=0.0, validator=_non_negative)
    max_connections: int = field(default=10_000, validator=_positive)
    header_timeout: float = field(default=10.0, validator=_positive)
    max_header_bytes: int = field(default=16_384, validator=_between(1024, 1 << 20))
    keep_alive_timeout: float = field(default=5.0, validator=_positive)
    backlog: int = field(default=1024, validator=_positive)
    # The garbage collector's thresholds (gc.set_threshold); see conf/raafd.toml.
    gc_thresholds: list[int] = field(factory=lambda: [1000, 1000, 10], validator=_gc_thresholds)


@frozen
class HttpConfig:
    """``[http]``: the HTTP API's request limits, streaming heartbeats and send bounds, and
    whether ``/metrics`` needs a token."""

    max_body_bytes: int = field(default=1 << 20, validator=_positive)
    heartbeat_interval: float = field(default=15.0, validator=_positive)
    # Origins whose browser pages may use the HTTP API (CORS); "*" allows any, without
    # credentials. Empty: no CORS headers, and preflights are refused.
    cors_origins: list[str] = field(factory=list, validator=_origins)
    # GET /metrics without a token when [auth] has tokens (for a scraper on a trusted network).
    public_metrics: bool = False
    # Streaming responses (SSE, NDJSON of /v1/streams): chunks queued per connection towards a
    # slow socket before the stream waits for it, and seconds a socket may take nothing.
    send_queue: int = field(default=256, validator=_positive)
    send_timeout: float = field(default=60.0, validator=_positive)
    # The web chat at / and /static/raafd.js: true, false, or unset (on for a loopback host).
    web_ui: bool | None = None


def _echo_path(_: Any, a: attrs.Attribute[Any], value: str) -> None:
    if value and (not value.startswith("/") or value == "/v1/ws" or "?" in value):
        raise ValueError("a path such as /v1/echo, other than /v1/ws, with no query")


@frozen
class WebSocketConfig:
    """``[websocket]``: per-connection limits and heartbeats of ``/v1/ws``."""

    max_frame: int = field(default=1 << 20, validator=_between(1024, 64 << 20))
    heartbeat_interval: float = field(default=20.0, validator=_positive)
    heartbeat_timeout: float = field(default=60.0, validator=_positive)
    auth_timeout: float = field(default=10.0, validator=_positive)
    send_queue: int = field(default=256, validator=_positive)
    allowed_origins: list[str] = field(factory=list)
    # An echo endpoint for WebSocket conformance suites (Autobahn): off when empty. Read at
    # start; refused on a non-loopback host without auth; a token comes with the upgrade.
    echo_path: str = field(default="", validator=_echo_path)


JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA")
_SHA256_PREFIX = "sha256:"


def _token_entries(_: Any, a: attrs.Attribute[Any], value: list[str]) -> None:
    for i, entry in enumerate(value):
        if entry.startswith(_SHA256_PREFIX):
            digest = entry[len(_SHA256_PREFIX) :]
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                # The entry itself is not repeated: it may be a secret with a typo.
                raise ValueError(f"entry {i}: sha256: must be followed by 64 hex digits")


def _algorithms(_: Any, a: attrs.Attribute[Any], value: list[str]) -> None:
    if not value:
        raise ValueError("name at least one algorithm (an explicit allowlist)")
    for alg in value:
        if alg not in JWT_ALGORITHMS:
            raise ValueError(f"{alg!r} is not allowed; use one of {', '.join(JWT_ALGORITHMS)}")
    if {alg[:2] for alg in value} & {"HS"} and {alg[:2] for alg in value} - {"HS"}:
        raise ValueError("HS* and public-key algorithms on one key invite algorithm confusion")


@frozen
class JwtKeyConfig:
    """``[auth.jwt.NAME]``: one key (or JWKS file) that signs JWTs, with its algorithm
    allowlist and the claims it requires. Exactly one key source: ``secret_env`` (HS*),
    ``key`` (a PEM public key inline), ``key_file`` (PEM public key, or an HS* secret) or
    ``jwks_file``."""

    algorithms: list[str] = field(factory=list, validator=_algorithms)
    secret_env: str = ""
    key: str = ""
    key_file: str = ""
    jwks_file: str = ""
    kid: str = ""  # tokens whose header names this kid use this key (JWKS: their own kids)
    audience: str = ""  # checked (aud) when set
    issuer: str = ""  # checked (iss) when set
    leeway: float = field(default=30.0, validator=_between(0, 300))
    roles_claim: str = "roles"  # a list of strings (or one space-separated string)

    def sources(self) -> list[str]:
        return [n for n in ("secret_env", "key", "key_file", "jwks_file") if getattr(self, n)]


@frozen
class UserConfig:
    """``[auth.users.NAME]``: a static token that stands for the principal NAME."""

    token: str = field(default="", repr=False)  # plain, or sha256:<hex of its SHA-256>
    token_env: str = ""  # or the name of an environment variable holding it
    roles: list[str] = field(factory=list)


@frozen
class RoleConfig:
    """``[auth.roles.NAME]``: what a principal with this role may do. Lists hold glob
    patterns (``*`` any, ``support-*``); ``events`` holds event-bus patterns (``*`` one
    segment, ``>`` the rest); an empty list grants nothing."""

    agents: list[str] = field(factory=list)  # agents it may run (streams, workflows, jobs)
    rooms_join: list[str] = field(factory=list)
    rooms_publish: list[str] = field(factory=list)
    jobs: bool = False  # may submit jobs
    events: list[str] = field(factory=list)
    admin: bool = False  # admin-only HTTP surfaces (/v1/stats, /metrics)


@frozen
class AuthConfig:
    """``[auth]``: who may connect, as whom, and what each role may do. No source configured
    means authentication is off; a source configured that yields no token is a configuration
    error (see :meth:`problems`)."""

    tokens: list[str] = field(factory=list, repr=False, validator=_token_entries)
    tokens_env: str = ""  # name of an environment variable holding comma-separated tokens
    users: dict[str, UserConfig] = field(factory=dict)
    jwt: dict[str, JwtKeyConfig] = field(factory=dict)
    roles: dict[str, RoleConfig] = field(factory=dict)
    # Roles of principals that carry none: static [auth] tokens, JWTs without the roles claim,
    # and everyone while auth is off.
    default_roles: list[str] = field(factory=list)
    query_token: bool = True  # accept ?token= (URLs end up in logs; prefer the header)

    def _env_tokens(self, environ: Mapping[str, str] | None) -> list[str]:
        if not self.tokens_env:
            return []
        env = os.environ if environ is None else environ
        return [t.strip() for t in env.get(self.tokens_env, "").split(",")]

    def all_tokens(self, environ: Mapping[str, str] | None = None) -> frozenset[str]:
        """Every usable anonymous token of ``tokens`` and ``tokens_env`` (blank entries are
        not tokens)."""
        return frozenset(t for t in [*self.tokens, *self._env_tokens(environ)] if t.strip())

    def user_token(self, name: str, environ: Mapping[str, str] | None = None) -> str:
        user = self.users[name]
        if user.token_env:
            env = os.environ if environ is None else environ
            return env.get(user.token_env, "").strip()
        return user.token.strip()

    def enabled(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether anything can authenticate: auth is on."""
        return bool(self.all_tokens(environ) or self.users or self.jwt)

    def problems(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """One ``auth.KEY: reason`` line for each configured source that yields no token or
        key: auth fails closed, never open. The lines name sources, never a secret's value."""
        out: list[str] = []
        env = os.environ if environ is None else environ
        if self.tokens and not any(t.strip() for t in self.tokens):
            out.append("auth.tokens: every entry is empty, so it holds no token")
        if self.tokens_env and not any(self._env_tokens(environ)):
            how = "is empty or holds no token" if env.get(self.tokens_env) else "is not set"
            out.append(
                f"auth.tokens_env: the environment variable {self.tokens_env} {how}; set it, or"
                " remove tokens_env to run without authentication"
            )
        for name, user in self.users.items():
            if bool(user.token) == bool(user.token_env):
                out.append(f"auth.users.{name}: give exactly one of token or token_env")
            elif user.token_env and not self.user_token(name, environ):
                out.append(
                    f"auth.users.{name}.token_env: the environment variable {user.token_env}"
                    " is not set or empty"
                )
            elif user.token:
                try:
                    _token_entries(None, None, [user.token])  # type: ignore[arg-type]
                except ValueError:
                    out.append(
                        f"auth.users.{name}.token: sha256: must be followed by 64 hex digits"
                    )
        for name, key in self.jwt.items():
            sources = key.sources()
            if len(sources) != 1:
                out.append(
                    f"auth.jwt.{name}: give exactly one of secret_env, key, key_file or"
                    f" jwks_file (got {len(sources)})"
                )
                continue
            hmac_only = all(alg.startswith("HS") for alg in key.algorithms)
            if key.secret_env:
                if not hmac_only:
                    out.append(f"auth.jwt.{name}.secret_env: a secret is for HS* algorithms only")
                elif not env.get(key.secret_env, "").strip():
                    out.append(
                        f"auth.jwt.{name}.secret_env: the environment variable {key.secret_env}"
                        " is not set or empty"
                    )
            elif key.key and hmac_only:
                out.append(f"auth.jwt.{name}.key: put HS* secrets in secret_env or key_file")
            for attr in ("key_file", "jwks_file"):
                path = getattr(key, attr)
                if path and not Path(path).is_file():
                    out.append(f"auth.jwt.{name}.{attr}: {path} is not a readable file")
        roles = set(self.roles)
        named = [("auth.default_roles", self.default_roles)] + [
            (f"auth.users.{n}.roles", u.roles) for n, u in self.users.items()
        ]
        for where, listed in named:
            for i, role in enumerate(listed):
                if role not in roles:
                    out.append(
                        f"{where}.{i}: no role named {role!r} in [auth.roles]" + _near(role, roles)
                    )
        return out


@frozen
class RateConfig:
    """A token bucket: ``rate`` actions a second, ``burst`` at once; ``rate = 0``: no limit."""

    rate: float = field(default=0.0, validator=_non_negative)
    burst: int = field(default=1, validator=_positive)


@frozen
class ConnectionLimits:
    """``[limits.connection]``: per WebSocket connection."""

    commands: RateConfig = field(factory=lambda: RateConfig(50, 100))
    stream_starts: RateConfig = field(factory=lambda: RateConfig(5, 20))
    room_sends: RateConfig = field(factory=lambda: RateConfig(10, 20))
    typing: RateConfig = field(factory=lambda: RateConfig(2, 5))
    job_submits: RateConfig = field(factory=lambda: RateConfig(5, 20))


@frozen
class PrincipalLimits:
    """``[limits.principal]``: per authenticated principal, across its connections and HTTP
    requests (with auth off everyone is ``anonymous``: not limited as one)."""

    commands: RateConfig = field(factory=lambda: RateConfig(200, 400))
    stream_starts: RateConfig = field(factory=lambda: RateConfig(20, 50))
    room_sends: RateConfig = field(factory=lambda: RateConfig(20, 40))
    typing: RateConfig = field(factory=lambda: RateConfig(5, 10))
    job_submits: RateConfig = field(factory=lambda: RateConfig(20, 50))


@frozen
class IpLimits:
    """``[limits.ip]``: per client IP address (off by default: behind a load balancer every
    client has the balancer's address)."""

    connections: RateConfig = field(factory=lambda: RateConfig(0, 1))
    http_requests: RateConfig = field(factory=lambda: RateConfig(0, 1))


@frozen
class LimitsConfig:
    """``[limits]``: rate limits (token buckets) and concurrency caps."""

    connection: ConnectionLimits = field(factory=ConnectionLimits)
    principal: PrincipalLimits = field(factory=PrincipalLimits)
    ip: IpLimits = field(factory=IpLimits)
    hard_limit: int = field(default=50, validator=_non_negative)  # refusals in a row: 4429
    max_tracked: int = field(default=100_000, validator=_positive)  # principals / IPs kept


@frozen
class StreamsConfig:
    """``[streams]``: the stream engine's bounds and timeouts."""

    max_streams: int = field(default=10_000, validator=_positive)
    max_streams_per_connection: int = field(default=32, validator=_positive)
    # Running streams one principal may have started, over all its connections and requests
    # (background jobs are not counted: they queue instead). Not applied with auth off.
    max_streams_per_principal: int = field(default=100, validator=_positive)
    log_max_events: int = field(default=100_000, validator=_positive)
    log_max_bytes: int = field(default=8 << 20, validator=_positive)
    retention: float = field(default=300.0, validator=_non_negative)
    detach_grace: float = field(default=30.0, validator=_non_negative)
    pause_timeout: float = field(default=300.0, validator=_positive)
    first_token_timeout: float = field(default=60.0, validator=_positive)
    idle_timeout: float = field(default=60.0, validator=_positive)
    max_duration: float = field(default=900.0, validator=_positive)
    subscriber_buffer: int = field(default=64, validator=_positive)
    max_lag: int = field(default=1024, validator=_positive)
    # A snapshot's bound: the text and tool calls it folds (see streams/snapshot.py).
    max_snapshot_bytes: int = field(default=1 << 20, validator=_positive)


@frozen
class ProviderConfig:
    """``[providers.NAME]``: one upstream. ``type`` picks the implementation."""

    type: str = field(default="demo", validator=_one_of("demo", "openai", "anthropic", "ollama"))
    # openai-compatible and other network providers
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""  # the *name* of the environment variable holding the key
    headers: dict[str, str] = field(factory=dict, repr=False)
    connect_timeout: float = field(default=10.0, validator=_positive)
    read_timeout: float = field(default=120.0, validator=_positive)
    max_retries: int = field(default=3, validator=_between(0, 20))
    retry_base: float = field(default=0.5, validator=_positive)
    retry_max: float = field(default=30.0, validator=_positive)
    # demo provider
    tokens_per_second: float = field(default=50.0, validator=_positive)
    reply_words: int = field(default=40, validator=_between(0, 1_000_000))
    jitter: float = field(default=0.0, validator=_between(0.0, 1.0))
    first_token_delay: float = field(default=0.0, validator=_non_negative)
    seed: int = 0


BUILTIN_FILTERS = ("redact", "buffer", "max_output_chars", "block")


@frozen
class FilterConfig:
    """One entry of ``[agents.NAME] filters``: an output filter. ``type`` is a built-in
    (``redact``, ``buffer``, ``max_output_chars``, ``block``) or the name of an entry point in
    the ``raafd.filters`` group. Patterns and plugin options are checked where the filters are
    built (:func:`raafd.streams.filters.build_filters`), which ``check-config`` runs too."""

    type: str
    patterns: list[str] = field(factory=list)  # redact, block
    replacement: str = "[redacted]"  # redact
    min_chars: int = field(default=64, validator=_positive)  # buffer
    max_delay_ms: float = field(default=100.0, validator=_positive)  # buffer
    max_chars: int = field(default=100_000, validator=_positive)  # max_output_chars
    options: dict[str, Any] = field(factory=dict)  # an entry point's own options


@frozen
class AgentConfig:
    """``[agents.NAME]``: an agent, run on a provider, with tools and handoffs."""

    provider: str = "demo"
    model: str = ""
    instructions: str = "You are a helpful assistant."
    temperature: float | None = None
    max_tokens: int | None = field(default=None, validator=_positive)
    tools: list[str] = field(factory=list)  # names of [tools.NAME] or built-ins
    handoffs: list[str] = field(factory=list)  # agents this one may hand the conversation to
    max_turns: int = field(default=10, validator=_between(1, 1000))
    fallback: list[str] = field(factory=list)  # providers tried in order before the first token
    tool_timeout: float = field(default=30.0, validator=_positive)
    filters: list[FilterConfig] = field(factory=list)  # output filters, applied in order


TOOL_TYPES = ("http", "mcp", "clock", "calculator")
BUILTIN_TOOLS = ("clock", "calculator")


@frozen
class ToolConfig:
    """``[tools.NAME]``: a tool agents can call. ``type`` picks the implementation."""

    type: str = field(default="http", validator=_one_of(*TOOL_TYPES))
    description: str = ""
    # http: POST the arguments as JSON to url
    url: str = ""
    headers: dict[str, str] = field(factory=dict)  # no secrets: use headers_env
    headers_env: dict[str, str] = field(factory=dict)  # header name -> environment variable
    timeout: float = field(default=10.0, validator=_positive)
    max_response_bytes: int = field(default=65536, validator=_positive)
    parameters: dict[str, Any] = field(factory=dict)  # JSON Schema of the arguments
    # mcp: a server over stdio (command) or streamable HTTP (url)
    command: list[str] = field(factory=list)
    env: dict[str, str] = field(factory=dict)


# The tool checks a field's own validator cannot make (here, not with the tools, so that this
# module imports nothing else of raafd).
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # what OpenAI accepts as a function name
MISSING_EXTRA = "the mcp extra is not installed (pip install 'raafd[mcp]')"
_SCHEMA_MESSAGE_CHARS = 200  # characters of a schema problem shown


def mcp_installed() -> bool:
    """Whether the optional ``mcp`` package (the ``raafd[mcp]`` extra) can be imported."""
    try:
        return importlib.util.find_spec("mcp") is not None
    except (ImportError, ValueError):  # a broken install, or one blocked in sys.modules
        return False


def schema_validator(schema: Mapping[str, Any], where: str) -> Draft202012Validator:
    """A JSON Schema (draft 2020-12) validator for ``schema``; a schema that is itself invalid
    is a :class:`ConfigError` naming ``where`` (``tools.NAME.parameters``)."""
    from jsonschema import Draft202012Validator  # only tools with parameters pay its import
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(part) for part in exc.path)
        place = f"{where}.{at.replace('/', '.')}" if at else where
        message = exc.message
        if len(message) > _SCHEMA_MESSAGE_CHARS:
            message = message[:_SCHEMA_MESSAGE_CHARS] + "…"
        raise ConfigError([f"{place}: not a valid JSON Schema: {message}"]) from None
    return Draft202012Validator(schema)


def check_tool_configs(configs: Mapping[str, ToolConfig]) -> list[str]:
    """What the tool registry would refuse in ``configs``, one ``tools.NAME...: reason`` line
    each, without building or starting anything (for ``check-config`` and reload): tool names
    that are not valid function names, ``parameters`` that are not valid JSON Schemas, mcp
    tools without the ``mcp`` extra, names that clash with an mcp server's tools."""
    problems: list[str] = []
    servers = [name for name, config in configs.items() if config.type == "mcp"]
    for name, config in configs.items():
        if not FUNCTION_NAME.fullmatch(name):
            problems.append(
                f"tools.{name}: a tool name must be 1 to 64 letters, digits, _ or -"
                " (models see it as a function name)"
            )
            continue
        if config.type == "mcp":
            if not mcp_installed():
                problems.append(f"tools.{name}: {MISSING_EXTRA}")
            continue
        if config.type == "http":
            try:
                schema_validator(config.parameters, f"tools.{name}.parameters")
            except ConfigError as exc:
                problems.extend(exc.problems)
        problems.extend(
            f"tools.{name}: the name clashes with the tools of mcp server {server!r}"
            f" (named {server}__<tool>)"
            for server in servers
            if name.startswith(f"{server}__")
        )
    return problems


@frozen
class BreakerConfig:
    """``[breaker]``: the circuit breaker kept per provider."""

    failure_threshold: int = field(default=5, validator=_between(1, 1000))
    cooldown: float = field(default=30.0, validator=_positive)


@frozen
class SessionsConfig:
    """``[sessions]``: conversations kept across streams (``session`` ids), in the state dir."""

    max_messages: int = field(default=100, validator=_between(2, 100_000))
    max_tokens: int = field(default=8000, validator=_positive)  # approximate: 4 chars a token
    max_sessions: int = field(default=100_000, validator=_positive)


@frozen
class LoggingConfig:
    """``[logging]``: structlog output."""

    level: str = field(default="info", validator=_one_of(*LOG_LEVELS))
    format: str = field(default="auto", validator=_one_of("auto", "json", "console"))


@frozen
class AdminConfig:
    """``[admin]``: the unix-socket admin interface used by ``raafd ctl``."""

    enabled: bool = True
    socket: str = ""  # empty: <state.dir>/admin.sock


@frozen
class StateConfig:
    """``[state]``: where durable state lives."""

    dir: str = "./var"


AGENT_REPLY_MODES = ("mention", "every_message", "off")


@frozen
class RoomConfig:
    """``[rooms.NAME]``: one room's attributes (rooms made with ``room.create`` / ``POST
    /v1/rooms`` carry the same ones, kept in the store). ``restricted`` rooms admit only the
    principals in ``allow``; ``agent`` answers when mentioned (``@name``), after every message,
    or not at all (``agent_reply``)."""

    title: str = ""
    description: str = ""
    max_members: int = field(default=50, validator=_between(1, 100_000))
    history: int = field(default=500, validator=_between(1, 1_000_000))
    history_ttl: float = field(default=0.0, validator=_non_negative)  # seconds; 0: no expiry
    restricted: bool = False
    allow: list[str] = field(factory=list)
    agent: str = ""
    agent_reply: str = field(default="mention", validator=_one_of(*AGENT_REPLY_MODES))
    agent_cancel: bool = True  # a member may cancel the room's running reply
    offline_delivery: bool = False  # queue messages for members with no connection open
    max_message_length: int = field(default=4000, validator=_between(1, 1_000_000))
    rate_limit: int = field(default=60, validator=_between(1, 100_000))  # per member per minute


@frozen
class ChatConfig:
    """``[chat]``: presence, direct messages and per-user offline queues, rooms and typing."""

    # Presence: a connected user without activity (a command other than ping/ack) for this
    # long is `away`; a user whose last connection closed is `offline` after this linger (a
    # reconnect within it changes nothing, so a page reload does not flap).
    away_after: float = field(default=300.0, validator=_positive)
    offline_after: float = field(default=15.0, validator=_non_negative)
    # Users whose presence is remembered: the connected ones, plus offline ones with their
    # last_seen up to this many (the one offline longest is forgotten first).
    presence_max_users: int = field(default=100_000, validator=_positive)
    presence_meta_bytes: int = field(default=512, validator=_between(2, 65536))  # JSON size
    presence_watch_max: int = field(default=256, validator=_positive)  # watched per connection
    # Offline queues: messages kept per user (full: the oldest is dropped, and counted), in all
    # (full: dm.send is refused with `unavailable`), and for how long (seconds; expired ones are
    # never delivered).
    offline_max: int = field(default=1000, validator=_positive)
    offline_max_total: int = field(default=1_000_000, validator=_positive)
    offline_ttl: float = field(default=86400.0, validator=_positive)
    # Seconds a delivered message may stay unacknowledged before it is delivered again on the
    # same connection (it is always delivered again on the user's next connection).
    redeliver_after: float = field(default=30.0, validator=_positive)
    max_message_length: int = field(default=4000, validator=_positive)  # dm.send text
    # Rooms (a setting used when a room is set up applies to rooms loaded or made after a
    # reload: max_lag, history_max_bytes).
    max_rooms: int = field(default=1000, validator=_positive)
    max_rooms_per_user: int = field(default=100, validator=_positive)  # rooms a user is member of
    create_on_join: bool = False  # a join of an unknown room creates it (if the user may create)
    creators: list[str] = field(factory=lambda: ["*"])  # who may create rooms; "*": anyone
    typing_timeout: float = field(default=5.0, validator=_positive)
    max_meta_bytes: int = field(default=1024, validator=_between(2, 65536))  # encoded JSON
    history_max_bytes: int = field(default=4 << 20, validator=_positive)  # a room's live log
    max_lag: int = field(default=1024, validator=_positive)  # messages behind → close 4001
    send_queue: int = field(default=256, validator=_positive)  # sends waiting per room
    agent_queue: int = field(default=8, validator=_between(1, 1000))  # mentions waiting per room
    agent_context: int = field(default=20, validator=_between(1, 1000))  # messages the agent sees


STORE_BACKENDS = ("sqlite", "memory")


@frozen
class StoreConfig:
    """``[store]``: where sessions are kept. ``sqlite`` (durable, under ``state.dir``) or
    ``memory`` (tests and throwaway runs: nothing survives a restart)."""

    backend: str = field(default="sqlite", validator=_one_of(*STORE_BACKENDS))


def _default_restricted() -> dict[str, list[str]]:
    return {"connection.>": ["admin"], "breaker.>": ["admin"]}


@frozen
class EventsConfig:
    """``[events]``: the event bus. Its history (replay with ``since``, SSE ``Last-Event-ID``)
    keeps the newest ``history`` events within ``history_bytes``; a subscriber more than
    ``queue`` events behind skips ahead with an ``events.lagged`` notice. ``restricted`` maps a
    pattern to the roles that may see its subjects (everyone else is refused a subscription
    inside it, and never sees its subjects through a wider one)."""

    history: int = field(default=1000, validator=_between(1, 1_000_000))
    history_bytes: int = field(default=4 << 20, validator=_positive)
    queue: int = field(default=256, validator=_between(1, 1_000_000))
    restricted: dict[str, list[str]] = field(factory=_default_restricted)


@frozen
class WebhookConfig:
    """``[[webhooks]]``: bus events whose subject matches ``pattern`` are POSTed to ``url``,
    signed as Standard Webhooks with ``secret`` (or the secret in the environment variable
    ``secret_env``): ``whsec_`` and base64, as the spec writes it, or any other text, used
    as it is."""

    pattern: str = ""
    url: str = ""
    secret: str = field(default="", repr=False)
    secret_env: str = ""
    timeout: float = field(default=10.0, validator=_positive)
    max_attempts: int = field(default=6, validator=_between(1, 100))
    retry_base: float = field(default=1.0, validator=_positive)
    retry_max: float = field(default=300.0, validator=_positive)
    # Deliver to private, loopback and link-local addresses too (a hook on this host or LAN).
    allow_private: bool = False


@frozen
class JobsConfig:
    """``[jobs]``: durable background jobs and batches (see docs/operations.md)."""

    workers: int = field(default=4, validator=_between(1, 10_000))
    # Jobs not yet ended (scheduled, queued, running, waiting to retry); more are refused 503.
    max_active: int = field(default=100_000, validator=_positive)
    # Jobs of one agent / of one provider's agents running at once; 0: only `workers` limits.
    max_per_agent: int = field(default=0, validator=_non_negative)
    max_per_provider: int = field(default=0, validator=_non_negative)
    # Every `aging` seconds a queued job waits, its priority improves by one step (0 = off).
    aging: float = field(default=60.0, validator=_non_negative)
    # A running job's lease; renewed every lease / 3 seconds while its worker lives.
    lease: float = field(default=30.0, validator=_positive)
    max_attempts: int = field(default=3, validator=_between(1, 100))
    timeout: float = field(default=600.0, validator=_positive)  # per attempt, default
    max_timeout: float = field(default=86_400.0, validator=_positive)
    backoff: float = field(default=1.0, validator=_positive)  # seconds after the first failure
    backoff_max: float = field(default=300.0, validator=_positive)
    jitter: float = field(default=0.2, validator=_between(0.0, 1.0))
    idempotency_retention: float = field(default=86_400.0, validator=_positive)
    # Ended jobs (completed, dead, cancelled) are forgotten this long after they ended; 0 keeps
    # them until `raafd ctl jobs purge`.
    retention: float = field(default=604_800.0, validator=_non_negative)
    max_metadata_bytes: int = field(default=4096, validator=_positive)
    max_delay: float = field(default=31_536_000.0, validator=_positive)  # a year
    min_every: float = field(default=1.0, validator=_positive)
    max_wait: float = field(default=60.0, validator=_positive)  # longest ?wait= long poll
    max_batch: int = field(default=1000, validator=_positive)  # jobs in one batch
    # Callbacks (POST of the result to callback_url, signed as Standard Webhooks do).
    callback_secret_env: str = ""  # the *name* of the environment variable holding the secret
    callbacks_allow_private: bool = False  # loopback, private, link-local addresses allowed
    callback_attempts: int = field(default=5, validator=_between(1, 50))
    callback_timeout: float = field(default=10.0, validator=_positive)
    callback_backoff: float = field(default=1.0, validator=_positive)
    callback_concurrency: int = field(default=16, validator=_positive)


def _default_providers() -> dict[str, ProviderConfig]:
    return {"demo": ProviderConfig(type="demo")}


def _default_agents() -> dict[str, AgentConfig]:
    return {"assistant": AgentConfig(provider="demo")}


@frozen
class Config:
    """The whole configuration. Every section has defaults; an empty file is valid."""

    server: ServerConfig = field(factory=ServerConfig)
    http: HttpConfig = field(factory=HttpConfig)
    websocket: WebSocketConfig = field(factory=WebSocketConfig)
    auth: AuthConfig = field(factory=AuthConfig)
    limits: LimitsConfig = field(factory=LimitsConfig)
    streams: StreamsConfig = field(factory=StreamsConfig)
    providers: dict[str, ProviderConfig] = field(factory=_default_providers)
    agents: dict[str, AgentConfig] = field(factory=_default_agents)
    default_agent: str = "assistant"
    tools: dict[str, ToolConfig] = field(factory=dict)
    breaker: BreakerConfig = field(factory=BreakerConfig)
    sessions: SessionsConfig = field(factory=SessionsConfig)
    chat: ChatConfig = field(factory=ChatConfig)
    logging: LoggingConfig = field(factory=LoggingConfig)
    admin: AdminConfig = field(factory=AdminConfig)
    state: StateConfig = field(factory=StateConfig)
    store: StoreConfig = field(factory=StoreConfig)
    events: EventsConfig = field(factory=EventsConfig)
    webhooks: list[WebhookConfig] = field(factory=list)
    jobs: JobsConfig = field(factory=JobsConfig)
    rooms: dict[str, RoomConfig] = field(factory=dict)

    @property
    def admin_socket_path(self) -> Path:
        return Path(self.admin.socket) if self.admin.socket else Path(self.state.dir) / "admin.sock"


# Settings SIGHUP applies without a restart; everything else is reported as "needs restart".
RELOADABLE = (
    "logging",
    "http",
    "websocket.heartbeat_interval",
    "websocket.heartbeat_timeout",
    "websocket.auth_timeout",
    "websocket.max_frame",
    "auth",
    "limits",
    "streams",
    "server.shutdown_grace",
    "server.drain_delay",
    "server.max_connections",
    "providers",
    "agents",
    "default_agent",
    "tools",
    "breaker",
    "sessions",
    "chat",
    "events.restricted",
    "webhooks",
)


# --- structuring and messages -----------------------------------------------------------------

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _structure_strict(value: Any, t: type) -> Any:
    # cattrs' defaults coerce ("8080" -> 8080, 1 -> True); a config file should say what it means.
    if t is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {_describe(value)}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {_describe(value)}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {_describe(value)}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported type {t}")  # pragma: no cover


for _t in (bool, int, float, str):
    _converter.register_structure_hook(_t, _structure_strict)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"the string {value!r}"
    return repr(value)


def _fields_of(cls: Any) -> list[str]:
    return [a.name for a in attrs.fields(cls)] if attrs.has(cls) else []


def _class_at(path: list[str]) -> Any:
    """The attrs class at a dotted path of the tree (to offer did-you-mean suggestions)."""
    cls: Any = Config
    for part in path:
        if not attrs.has(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        t = hints[part]
        if typing.get_origin(t) is dict:
            t = typing.get_args(t)[1]
            cls = t
            continue
        cls = t
    return cls


def _flatten(exc: BaseException, path: list[str], out: list[str]) -> None:
    if isinstance(exc, ForbiddenExtraKeysError):
        known = _fields_of(exc.cl)
        for key in sorted(exc.extra_fields):
            where = ".".join([*path, key])
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            out.append(f"{where}: unknown key{hint}")
        return
    if isinstance(exc, ClassValidationError | IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            name = note.name if hasattr(note, "name") else getattr(note, "index", "?")
            _flatten(sub, [*path, str(name)], out)
        for sub in without:
            _flatten(sub, path, out)
        return
    if isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            _flatten(member, path, out)
        return
    where = ".".join(path) or "(top level)"
    if isinstance(exc, KeyError):
        out.append(f"{where}: required key missing")
    elif isinstance(exc, TypeError | ValueError):
        msg = str(exc)
        if "is not iterable" in msg or "object has no attribute" in msg:
            msg = "expected a table"
        out.append(f"{where}: {msg}")
    else:
        out.append(f"{where}: {exc}")


def _near(word: str, known: Any) -> str:
    near = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _cross_check(cfg: Config, environ: Mapping[str, str] | None) -> list[str]:
    problems: list[str] = cfg.auth.problems(environ)
    for name, agent in cfg.agents.items():
        if agent.provider not in cfg.providers:
            near = difflib.get_close_matches(agent.provider, list(cfg.providers), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(
                f"agents.{name}.provider: no provider named {agent.provider!r} is configured{hint}"
            )
        for i, fallback in enumerate(agent.fallback):
            if fallback not in cfg.providers:
                problems.append(
                    f"agents.{name}.fallback.{i}: no provider named {fallback!r} is configured"
                    + _near(fallback, cfg.providers)
                )
        tools = {*cfg.tools, *BUILTIN_TOOLS}
        for i, tool in enumerate(agent.tools):
            if tool not in tools:
                problems.append(
                    f"agents.{name}.tools.{i}: no tool named {tool!r} is configured"
                    + _near(tool, tools)
                )
        for i, target in enumerate(agent.handoffs):
            if target not in cfg.agents:
                problems.append(
                    f"agents.{name}.handoffs.{i}: no agent named {target!r} is configured"
                    + _near(target, cfg.agents)
                )
            elif target == name:
                problems.append(f"agents.{name}.handoffs.{i}: an agent cannot hand off to itself")
    for name, room in cfg.rooms.items():
        if not ROOM_NAME.fullmatch(name):
            problems.append(f"rooms.{name}: a room name is 1 to 64 letters, digits or _ . -")
        if room.agent and room.agent not in cfg.agents:
            problems.append(
                f"rooms.{name}.agent: no agent named {room.agent!r} is configured"
                + _near(room.agent, cfg.agents)
            )
    if len(cfg.rooms) > cfg.chat.max_rooms:
        problems.append(f"rooms: {len(cfg.rooms)} rooms configured, over chat.max_rooms")
    if cfg.default_agent not in cfg.agents:
        problems.append(f"default_agent: no agent named {cfg.default_agent!r} is configured")
    for name, tool_cfg in cfg.tools.items():
        if tool_cfg.type == "http" and not tool_cfg.url:
            problems.append(f"tools.{name}.url: required for an http tool")
        if tool_cfg.type == "mcp" and bool(tool_cfg.command) == bool(tool_cfg.url):
            problems.append(
                f"tools.{name}: an mcp tool needs exactly one of command (stdio) or url (HTTP)"
            )
        for header in tool_cfg.headers:
            if header.lower() == "authorization":
                problems.append(
                    f"tools.{name}.headers.{header}: put secrets in the environment and name"
                    " the variable in headers_env"
                )
    for name, prov in cfg.providers.items():
        if prov.type in ("openai", "anthropic", "ollama") and not prov.base_url:
            problems.append(f"providers.{name}.base_url: required for a {prov.type} provider")
        for hname in prov.headers:
            if hname.lower() == "authorization":
                problems.append(
                    f"providers.{name}.headers.{hname}: put secrets in the environment and name"
                    " the variable in api_key_env"
                )
    if not cfg.server.unix_socket:
        try:
            loopback = ipaddress.ip_address(cfg.server.host).is_loopback
        except ValueError:
            loopback = cfg.server.host == "localhost"
        # A source that yields nothing counts as no auth (and is reported on its own).
        has_auth = cfg.auth.enabled(environ)
        if not loopback and not has_auth and not cfg.server.allow_public_without_auth:
            problems.append(
                f"server.host: {cfg.server.host!r} is not a loopback address and [auth] has no"
                " tokens; configure tokens or set server.allow_public_without_auth = true"
            )
        elif not loopback and not has_auth and cfg.websocket.echo_path:
            problems.append(
                f"websocket.echo_path: never served on a non-loopback host ({cfg.server.host!r})"
                " without auth, whatever server.allow_public_without_auth says"
            )
    problems.extend(_events_problems(cfg, environ))
    if cfg.websocket.heartbeat_timeout <= cfg.websocket.heartbeat_interval:
        problems.append(
            "websocket.heartbeat_timeout: must be longer than websocket.heartbeat_interval"
        )
    return problems


def _events_problems(cfg: Config, environ: Mapping[str, str] | None) -> list[str]:
    from raafd.errors import BadRequest
    from raafd.protocol.subjects import compile_pattern

    problems: list[str] = []
    for pattern in cfg.events.restricted:
        try:
            compile_pattern(pattern)
        except BadRequest as exc:
            problems.append(f"events.restricted.{pattern}: {exc.message}")
    env = os.environ if environ is None else environ
    for i, hook in enumerate(cfg.webhooks):
        where = f"webhooks.{i}"
        try:
            compile_pattern(hook.pattern)
        except BadRequest as exc:
            problems.append(f"{where}.pattern: {exc.message}")
        if not hook.url.startswith(("http://", "https://")):
            problems.append(f"{where}.url: must be an http:// or https:// URL")
        if bool(hook.secret) == bool(hook.secret_env):
            problems.append(f"{where}: give exactly one of secret or secret_env")
        elif hook.secret.startswith("whsec_"):
            try:
                base64.b64decode(hook.secret[len("whsec_") :], validate=True)
            except ValueError:
                problems.append(f"{where}.secret: a whsec_ secret must be base64 after the prefix")
        elif hook.secret_env and not env.get(hook.secret_env, "").strip():
            problems.append(
                f"{where}.secret_env: the environment variable {hook.secret_env} is not set"
                " or empty"
            )
    return problems


def _validate_tree(obj: Any, path: list[str], out: list[str]) -> None:
    """Run every field validator, collecting all failures (attrs stops at the first)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _validate_tree(value, [*path, str(key)], out)
        return
    if isinstance(obj, list):  # tables in an array (an agent's filters)
        for i, value in enumerate(obj):
            _validate_tree(value, [*path, str(i)], out)
        return
    if not attrs.has(type(obj)):
        return
    for a in attrs.fields(type(obj)):
        value = getattr(obj, a.name)
        if a.validator is not None:
            try:
                a.validator(obj, a, value)
            except ValueError as exc:
                out.append(f"{'.'.join([*path, a.name])}: {exc}")
        _validate_tree(value, [*path, a.name], out)


def _validate_parts(data: Any, cls: Any, path: list[str], out: list[str]) -> None:
    """Run the field validators of every key of ``data`` (as ``cls``) that structures on its
    own, when the tree as a whole did not: a wrong type in one place must not hide the other
    problems of the file. Keys that do not structure are skipped (cattrs reported them)."""
    if not isinstance(data, dict) or not attrs.has(cls):
        return
    hints = typing.get_type_hints(cls)
    for a in attrs.fields(cls):
        if a.name not in data:
            continue
        value, t, where = data[a.name], hints[a.name], [*path, a.name]
        if attrs.has(t):
            _validate_parts(value, t, where, out)
            continue
        if typing.get_origin(t) is dict and attrs.has(typing.get_args(t)[1]):
            if isinstance(value, dict):
                for key, item in value.items():
                    _validate_parts(item, typing.get_args(t)[1], [*where, str(key)], out)
            continue
        try:
            structured = _converter.structure(value, t)
        except Exception:
            continue
        if a.validator is not None:
            try:
                a.validator(None, a, structured)
            except ValueError as exc:
                out.append(f"{'.'.join(where)}: {exc}")


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Structure a plain mapping (parsed TOML plus overrides) into :class:`Config`.
    ``environ`` (default ``os.environ``) is where ``auth.tokens_env`` is looked up."""
    problems: list[str] = []
    data = dict(data)
    # The built-in demo provider and assistant agent stay available beside configured ones.
    for section, defaults in (("providers", _default_providers), ("agents", _default_agents)):
        given = data.get(section)
        if isinstance(given, dict):
            data[section] = {
                **{k: _converter.unstructure(v) for k, v in defaults().items()},
                **given,
            }
    with attrs.validators.disabled():
        try:
            cfg = _converter.structure(data, Config)
        except Exception as exc:
            _flatten(exc, [], problems)
            _validate_parts(data, Config, [], problems)
            raise ConfigError(problems or [str(exc)]) from None
    _validate_tree(cfg, [], problems)
    if problems:
        raise ConfigError(problems)
    problems = _cross_check(cfg, environ) + check_tool_configs(cfg.tools)
    if problems:
        raise ConfigError(problems)
    return cfg


def _toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``RAAFD_<SECTION>__<KEY>`` overrides (keys lower-cased, ``__`` nests)."""
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            continue
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    [f"{'.'.join(parts)}: {name} overrides a value that is not a table"]
                )
            node = child
        node[parts[-1]] = _toml_value(raw)
    return data


def find_config_file(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read, by the lookup order; ``None`` means built-in defaults."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get("RAAFD_CONFIG"):
        return Path(env["RAAFD_CONFIG"])
    for candidate in DEFAULT_PATHS:
        if candidate.is_file():
            return candidate
    return None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read file: {exc.strerror or exc}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"], str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"], str(path)) from None


def load_config(
    explicit: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Config, Path | None]:
    """Find, read, override and validate; raise :class:`ConfigError` listing every problem."""
    env = os.environ if environ is None else environ
    path = find_config_file(explicit, env)
    data = read_toml(path) if path is not None else {}
    apply_env(data, env)
    try:
        return parse_config(data, env), path
    except ConfigError as exc:
        raise ConfigError(exc.problems, str(path) if path else "") from None


def diff_configs(old: Config, new: Config, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf that differs between two configs."""
    changed: list[str] = []
    for a in attrs.fields(type(old)):
        before, after = getattr(old, a.name), getattr(new, a.name)
        path = f"{prefix}{a.name}"
        if attrs.has(type(before)) and type(before) is type(after):
            changed.extend(diff_configs(before, after, path + "."))
        elif before != after:
            changed.append(path)
    return changed


def merge_reloadable(running: Any, new: Any, prefix: str = "") -> Any:
    """``running`` with every reloadable setting (see :data:`RELOADABLE`) taken from ``new``;
    the others keep their running value until a restart."""
    updates: dict[str, Any] = {}
    for a in attrs.fields(type(running)):
        path = f"{prefix}{a.name}"
        before, after = getattr(running, a.name), getattr(new, a.name)
        if is_reloadable(path):
            updates[a.name] = after
        elif attrs.has(type(before)):
            updates[a.name] = merge_reloadable(before, after, path + ".")
    return attrs.evolve(running, **updates)


def is_reloadable(path: str) -> bool:
    return any(path == r or path.startswith(r + ".") for r in RELOADABLE)
