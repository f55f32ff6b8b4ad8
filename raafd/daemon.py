"""The composition root: builds every component and runs them in one nursery, in order.

Task tree (docs/architecture.md has the picture)::

    Daemon.run
    ├── admin server            (unix socket; refuses to start if another daemon owns it)
    ├── sd_notify watchdog      (when systemd asked for one)
    ├── stream manager          (every stream's task; streams outlive connections)
    └── public listener         (WebSocket via the gateway, SSE/NDJSON streams via the raw
        │                         HTTP server, the rest of HTTP via hypercorn)
        └── one task per connection, each with its own nursery

Stopping is a drain: readiness goes 503, the listener stops accepting after ``drain_delay``,
in-flight work gets ``shutdown_grace`` seconds, then everything left is cancelled.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from raafd import __version__
from raafd.admin.events import events_handler
from raafd.admin.jobs import job_admin_commands
from raafd.admin.rooms import room_admin_commands
from raafd.admin.server import AdminServer
from raafd.agents.bodies import AgentBodies
from raafd.agents.runner import AgentLoop
from raafd.agents.tools import ToolRegistry
from raafd.agents.workflows import start_workflow
from raafd.bus import Bus
from raafd.bus.webhooks import Webhooks
from raafd.chat.offline import OfflineQueues
from raafd.chat.presence import PresenceService
from raafd.chat.rooms import Rooms
from raafd.config import (
    Config,
    ConfigError,
    WebhookConfig,
    diff_configs,
    is_reloadable,
    load_config,
    merge_reloadable,
)
from raafd.errors import BadRequest, NotFound
from raafd.gateway.commands import add_stream_commands
from raafd.gateway.dm_commands import add_dm_commands
from raafd.gateway.event_commands import add_event_commands
from raafd.gateway.gateway import Gateway
from raafd.gateway.job_commands import add_job_commands
from raafd.gateway.presence_commands import add_presence_commands
from raafd.gateway.room_commands import add_room_commands
from raafd.gateway.table import Peer
from raafd.http.anthropic_api import add_anthropic_routes
from raafd.http.app import build_app
from raafd.http.context import StreamingContext
from raafd.http.events_bus import add_event_routes
from raafd.http.jobs import add_job_routes
from raafd.http.offline import add_offline_routes
from raafd.http.openai_compat import add_openai_routes
from raafd.http.presence import add_presence_routes, add_room_member_routes
from raafd.http.raw import RawHttpServer
from raafd.http.responses import add_responses_routes
from raafd.http.rooms import add_room_routes
from raafd.http.sessions import add_session_routes
from raafd.http.streams import add_stream_routes
from raafd.http.ui_chat import add_ui_chat_routes
from raafd.http.web import add_web_routes
from raafd.http.workflows import add_workflow_routes
from raafd.jobs import Jobs
from raafd.jobs.callbacks import Post
from raafd.logging import get_level, get_logger, set_level, set_secrets
from raafd.metrics import Metrics
from raafd.net.listener import PublicListener
from raafd.net.webhooks import post_signed, secret_bytes
from raafd.protocol.commands import WorkflowStart
from raafd.providers.base import Provider
from raafd.providers.breaker import Breakers
from raafd.providers.registry import build_providers, open_http_client, open_upstream_client
from raafd.sdnotify import SdNotifier
from raafd.security.authenticator import Authenticator, build_authenticator
from raafd.security.guard import Guard
from raafd.security.limiter import Limiter
from raafd.security.secrets import config_secrets
from raafd.store import SessionBackend, Stores, open_stores
from raafd.store.jobs import Job
from raafd.streams import Stream, StreamManager
from raafd.streams.filters import build_filters

__all__ = ["Daemon"]

log = get_logger("raafd.daemon")
audit = get_logger("raafd.audit")

# Draining: after the streams' grace, how long connections have to send the terminal events of
# the streams cancelled at its end, and close, before everything left is cancelled.
_FLUSH_SECONDS = 1.0


class Daemon:
    """One raafd process's worth of components."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        # Auth fails closed: a token source that yields nothing, or a key that does not load,
        # is a ConfigError listing every problem, never "auth off".
        self._authenticator = build_authenticator(config.auth, environ)
        set_secrets(config_secrets(config, environ))
        self.config = config
        self.config_path = config_path
        self.environ = environ
        self.metrics = Metrics()
        self.limiter = Limiter(lambda: self.config.limits, self.metrics)
        self.guard = Guard(self.authenticator, self.limiter, self.metrics)
        self.notifier = SdNotifier.from_environ(environ)
        self.started_at = time.time()
        self.frozen_objects = 0  # moved out of the collector's sight at start (raafd serve)
        self.draining = False
        self._drain_requested = trio.Event()
        self.address: str | None = None
        self.providers: dict[str, Provider] = {}
        self.tools: ToolRegistry | None = None  # built in run(): it needs the HTTP client
        self.stores: Stores | None = None  # opened in run() ([store] backend)
        self.sessions: SessionBackend | None = None  # = stores.sessions
        self.jobs: Jobs | None = None  # built in run(), on the open job store
        # The event bus: every component that has events gets its emit.
        self.bus = Bus(config.events, self.metrics)
        emit = self.bus.emit
        self.webhooks = Webhooks(
            self.bus, lambda: self.config.webhooks, self._post_webhook, self.metrics
        )
        self.breakers = Breakers(config.breaker, emit=emit)
        self.agents = AgentLoop(
            config.agents, {}, self.breakers, None, self.metrics, config.streams
        )
        self.bodies = AgentBodies(self.agents)  # sessions kept once the store is open
        # ConfigError when a filter cannot be built (check-config says the same)
        self.bodies.filters = filters = build_filters(config.agents)
        self.streams = StreamManager(
            config.streams,
            config.agents,
            {},
            self.metrics,
            config.default_agent,
            bodies=self.bodies,
            filters=filters,
            emit=emit,
        )
        self.gateway = Gateway(
            lambda: self.config, self.metrics, self.authenticator, self.guard, emit=emit
        )
        add_stream_commands(
            self.gateway.commands,
            self.streams,
            self.start_workflow,
            self.guard,
            lambda: self.config.default_agent,
        )
        add_job_commands(
            self.gateway.commands,
            lambda: self.jobs,
            self.streams,
            self.guard,
            lambda: self.config.default_agent,
        )
        self.presence = PresenceService(lambda: self.config.chat, self.metrics, emit=emit)
        add_presence_commands(self.gateway.commands, self.presence, self._room_members)
        self.offline = OfflineQueues(lambda: self.config.chat, self.presence, self.metrics)
        add_dm_commands(self.gateway.commands, self.offline)
        # Presence first: a user is online before their queue is delivered.
        self.gateway.observers.append(self.presence)
        self.gateway.observers.append(self.offline)
        add_event_commands(self.gateway.commands, self.bus, self.guard, self._restricted_events)
        self.rooms = Rooms(
            lambda: self.config,
            lambda: self.stores.chat if self.stores is not None else None,
            self.metrics,
            self.streams,
            emit=emit,
        )
        add_room_commands(self.gateway.commands, self.rooms, self.guard)
        # Rooms and presence: member lists carry each member's presence, a change is a
        # `room.member` update in their rooms, and rooms with offline_delivery queue their
        # messages for members with no connection.
        self.rooms.presence_of = lambda user: self.presence.get([user])[0].state()
        self.rooms.offline_delivery = self.offline.room_message
        self.presence.listeners.append(
            lambda view: self.rooms.presence_changed(view.user, view.state())
        )
        # The HTTP adapters get the services they use, never the daemon.
        http = StreamingContext(
            config=lambda: self.config,
            metrics=self.metrics,
            authenticator=self.authenticator,
            guard=self.guard,
            draining=lambda: self.draining,
            streams=self.streams,
        )
        app = build_app(http, stats=self.stats, refresh_gauges=self.refresh_gauges)
        add_stream_routes(app, http)
        add_openai_routes(app, http)
        add_ui_chat_routes(app, http)
        add_session_routes(app, lambda: self.sessions)
        add_workflow_routes(app, http, self.start_workflow)
        add_presence_routes(app, self.presence)
        add_room_member_routes(app, self.rooms, self.guard)
        add_room_routes(app, self.rooms, self.guard)
        add_responses_routes(app, http, lambda: self.sessions)
        add_offline_routes(app, self.offline, self.guard)
        add_web_routes(app, lambda: self.config)
        add_event_routes(app, http, self.bus, self._restricted_events)
        add_job_routes(app, http, lambda: self.jobs)
        add_anthropic_routes(app, http)
        self.raw_http = RawHttpServer(http)
        self.listener = PublicListener(
            config.server,
            app,
            self.metrics,
            self.gateway.handle,
            http_handler=self.raw_http,
            admit=partial(self.limiter.check_ip, "connections"),
            websocket_paths=frozenset({"/v1/ws", config.websocket.echo_path} - {""}),
        )
        self.admin = AdminServer(
            config.admin_socket_path,
            {
                "stats": self._admin_stats,
                "reload": self._admin_reload,
                "drain": self._admin_drain,
                "log-level": self._admin_log_level,
                "connections": self._admin_connections,
                "streams": self._admin_streams,
                "kick": self._admin_kick,
                "cancel": self._admin_cancel,
                "events": events_handler(self.bus),
                **job_admin_commands(lambda: self.jobs),
                **room_admin_commands(self.rooms),
            },
            metrics=self.metrics,
        )

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start everything; ``started`` with the public address; return after a drain."""
        os.makedirs(self.config.state.dir, exist_ok=True)
        async with (
            open_upstream_client() as upstream_client,
            open_http_client() as http_client,
            open_stores(self.config) as stores,
            trio.open_nursery() as nursery,
        ):
            self._upstream_client = upstream_client
            self._http_client = http_client
            self.stores = stores
            self.sessions = store = stores.sessions
            self.offline.store = stores.offline
            self.providers = build_providers(self.config.providers, upstream_client, **self._env())
            self.tools = ToolRegistry(
                self.config.tools, http_client, metrics=self.metrics, **self._env()
            )
            self.agents.reload(providers=self.providers, tools=self.tools)
            self.bodies.sessions = store
            self.streams.reload(providers=self.providers)
            if self.config.admin.enabled:
                await nursery.start(self.admin.run)
            await nursery.start(self.tools.run)  # MCP servers live in the registry's nursery
            if self.notifier.watchdog_interval() is not None:
                await nursery.start(self.notifier.run_watchdog)
            await nursery.start(self.streams.run)
            self.jobs = Jobs(
                lambda: self.config,
                stores.jobs,
                self.metrics,
                start_stream=self._start_job_stream,
                emit=self.bus.emit,
                post=self._callback_post(http_client),
            )
            await nursery.start(self.jobs.run)  # after the streams: it recovers and runs jobs
            await nursery.start(self.rooms.run)  # agents' replies in rooms, typing timers
            await nursery.start(self.gateway.run)  # the connections' heartbeats
            await nursery.start(self.presence.run)  # away and offline timers
            await nursery.start(self.offline.run)  # redeliveries, expiry
            await nursery.start(self.webhooks.run)  # one task per [[webhooks]] entry
            self.address = await nursery.start(self.listener.run)
            self.notifier.ready()
            self.notifier.status(f"serving on {self.address}")
            log.info("raafd ready", version=__version__, address=self.address)
            server = self.config.server
            if server.allow_public_without_auth and not self._authenticator.enabled:
                # The one way to serve a public address without auth: never a quiet one.
                log.critical(
                    "SERVING WITHOUT AUTHENTICATION: server.allow_public_without_auth is true"
                    " and [auth] has no token or key; anyone who reaches"
                    f" {self.address} may run agents",
                    host=server.host,
                )
            task_status.started(self.address)
            await self._drain_requested.wait()
            await self._drain()
            nursery.cancel_scope.cancel()
        log.info("raafd stopped")

    def request_drain(self) -> None:
        """Begin a graceful stop (SIGTERM, first SIGINT, admin ``drain``)."""
        self._drain_requested.set()

    async def _drain(self) -> None:
        cfg = self.config.server
        self.draining = True
        self.listener.draining = True
        self.metrics.draining.set(1)
        self.notifier.stopping()
        log.info("draining", drain_delay=cfg.drain_delay, shutdown_grace=cfg.shutdown_grace)
        # Load balancers see /readyz turn 503 while we still answer.
        await trio.sleep(cfg.drain_delay)
        await self.listener.stop_accepting()
        self.gateway.shutdown(reconnect_after=1.0)
        with trio.move_on_after(cfg.shutdown_grace + _FLUSH_SECONDS) as grace:
            # Streams get the grace, then are cancelled (reason `drain`); connections close
            # once their streams have ended (WebSocket: 1001; HTTP streaming responses end with
            # the terminal event). A scope of the grace alone would end together with the
            # streams' own, before their connections could send that terminal event.
            # Job workers take no more jobs; a running job whose stream the drain cancels
            # goes back to queued (written before the nursery is cancelled).
            async with trio.open_nursery() as draining:
                if self.jobs is not None:
                    draining.start_soon(self.jobs.drain)
                draining.start_soon(self.streams.drain, cfg.shutdown_grace)
            await self.listener.wait_idle()
        if grace.cancelled_caught:
            log.warning(
                "shutdown grace over; cancelling what is left",
                connections=self.listener.open_connections,
            )

    # --- reload -------------------------------------------------------------------------------

    def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply what can change at run time; report what would need a restart. Raises
        :class:`ConfigError` and changes nothing when ``new``'s auth would not work (a token
        source that yields nothing, a key that does not load: the running auth stays)."""
        try:
            authenticator = build_authenticator(new.auth, self.environ)
        except ConfigError as err:
            log.warning("reload rejected; the running configuration stays", problems=err.problems)
            audit.audit("configuration reload rejected", problems=err.problems)
            raise
        try:
            filters = build_filters(new.agents)  # before anything changes
        except ConfigError as err:
            log.warning("reload rejected; the running configuration stays", problems=err.problems)
            raise
        changed = diff_configs(self.config, new)
        applied = [p for p in changed if is_reloadable(p)]
        restart = [p for p in changed if not is_reloadable(p)]
        if new.logging.level != get_level():
            set_level(new.logging.level)
        # Components read their section through the daemon's config on each use, so replacing
        # the reloadable sections is enough; the rest keeps its running value until restart.
        self.config = merge_reloadable(self.config, new)
        cfg = self.config
        self._authenticator = authenticator
        set_secrets(config_secrets(cfg, self.environ))
        self.limiter.reload(cfg.limits)
        self.listener.config = cfg.server
        if any(p.startswith("providers") for p in applied):
            self.providers = build_providers(cfg.providers, self._upstream_client, **self._env())
        tools = [p for p in applied if p.startswith("tools")]
        if tools:
            # The registry owns MCP processes and connections; it is rebuilt at start only.
            log.warning("tool changes apply after a restart", changed=tools)
        self.breakers.reload(cfg.breaker, providers=self.providers)
        self.agents.reload(agents=cfg.agents, providers=self.providers, streams=cfg.streams)
        self.streams.reload(
            config=cfg.streams,
            agents=cfg.agents,
            providers=self.providers,
            default_agent=cfg.default_agent,
            filters=filters,
        )
        self.bodies.filters = filters
        if self.sessions is not None:
            self.sessions.reload(cfg.sessions)
        if any(p.startswith("webhooks") for p in applied):
            self.webhooks.reload()
        log.info("configuration reloaded", applied=applied, needs_restart=restart)
        audit.audit("configuration reloaded", applied=applied, needs_restart=restart)
        self.bus.emit("config.reloaded", {"applied": applied, "needs_restart": restart})
        return {"applied": applied, "needs_restart": restart}

    def reload_from_file(self) -> dict[str, list[str]]:
        """Re-read the config file (SIGHUP, admin ``reload``); raises ConfigError and keeps the
        running config when the file is bad."""
        self.notifier.reloading()
        try:
            new, _ = load_config(str(self.config_path) if self.config_path else None, self.environ)
        except ConfigError as err:
            log.warning("reload rejected; the running configuration stays", problems=err.problems)
            raise
        finally:
            self.notifier.ready()
        return self.reload(new)

    def authenticator(self) -> Authenticator:
        """Whom tokens stand for now (``[auth]``, built at start and at each accepted
        reload); ``enabled`` is false with auth off."""
        return self._authenticator

    def _restricted_events(self) -> Mapping[str, list[str]]:
        """``events.restricted`` now (reloadable)."""
        return self.config.events.restricted

    async def _post_webhook(
        self, hook: WebhookConfig, msg_id: str, timestamp: int, body: bytes
    ) -> int:
        """One signed attempt of a ``[[webhooks]]`` entry (the secret read now: a rotated
        environment variable applies at the next event)."""
        env = os.environ if self.environ is None else self.environ
        secret = hook.secret or env.get(hook.secret_env, "")
        return await post_signed(
            self._http_client,
            hook.url,
            secret_bytes(secret),
            msg_id,
            timestamp,
            body,
            allow_private=hook.allow_private,
        )

    def _room_members(self, conn: Peer, room: str) -> list[str]:
        """``presence.get {room}``: the members of a room ``conn`` may join."""
        self.guard.require(conn.principal, "room.join", room, "room")
        return sorted(self.rooms.get(room, conn.user).members)

    def start_workflow(self, cmd: WorkflowStart, owner: str, principal: str = "") -> Stream:
        """Start a workflow's stream, checked against the agents configured now."""
        return start_workflow(
            self.streams, cmd, self.config.agents, owner=owner, principal=principal
        )

    def _callback_post(self, client: httpx.AsyncClient) -> Post | None:
        """Job and batch callbacks: signed with the secret in ``jobs.callback_secret_env``
        (read at start) and POSTed to an address the SSRF guard allows
        (:func:`~raafd.net.webhooks.post_signed`). None without a secret: jobs then refuse a
        ``callback_url``."""
        name = self.config.jobs.callback_secret_env
        env = os.environ if self.environ is None else self.environ
        secret = env.get(name, "") if name else ""
        if not secret:
            if name:
                log.warning("jobs.callback_secret_env names an empty variable: no callbacks")
            return None
        key = secret_bytes(secret)

        async def post(url: str, msg_id: str, body: bytes) -> int:
            return await post_signed(
                client,
                url,
                key,
                msg_id,
                int(time.time()),
                body,
                allow_private=self.config.jobs.callbacks_allow_private,
            )

        return post

    def _start_job_stream(self, job: Job, stream_id: str) -> Stream:
        """The stream of one attempt of a job: its agent on its messages, watched by nobody
        (no detach grace; the job's own timeout bounds it). A workflow job runs its workflow
        on its input."""
        if job.workflow is not None:
            cmd = WorkflowStart(
                mode=job.workflow["mode"],
                agents=job.workflow["agents"],
                input=job.messages[-1]["content"],
                synthesizer=job.workflow.get("synthesizer"),
                stream=stream_id,
            )
            return start_workflow(
                self.streams,
                cmd,
                self.config.agents,
                owner=f"job:{job.id}",
                detach_grace=math.inf,
            )
        return self.streams.start(
            agent=job.agent,
            messages=job.messages,
            stream_id=stream_id,
            owner=f"job:{job.id}",
            session=job.session,
            detach_grace=math.inf,
        )

    def _env(self) -> dict[str, Any]:
        return {} if self.environ is None else {"environ": self.environ}

    # --- introspection ------------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        """Set the gauges that mirror component state (read at scrape time)."""
        levels = {"closed": 0, "half_open": 1, "open": 2}
        for provider, breaker in self.breakers.snapshot().items():
            self.metrics.breaker_state.labels(provider).set(levels.get(breaker["state"], 2))
        self.offline.refresh_gauges()
        if self.jobs is not None:
            self.jobs.refresh_gauges()
        rooms = self.rooms.rooms.values()
        self.metrics.rooms.set(len(rooms))
        self.metrics.room_members.set(sum(len(r.members) for r in rooms))
        self.metrics.room_connections.set(sum(len(r.online) for r in rooms))

    def stats(self) -> dict[str, Any]:
        self.refresh_gauges()
        snap = self.metrics.snapshot()
        return {
            "version": __version__,
            "uptime": round(time.time() - self.started_at, 3),
            "draining": self.draining,
            "address": self.address,
            "connections": {
                "open": self.listener.open_connections,
                "websocket": len(self.gateway.connections),
            },
            "streams": self.streams.stats(),
            "presence": self.presence.stats(),
            "offline": self.offline.stats(),
            "jobs": self.jobs.stats() if self.jobs is not None else {},
            "rooms": self.rooms.stats(),
            "breakers": self.breakers.snapshot(),
            "store": self._store_stats(),
            "events": self.bus.stats(),
            "tools": self.tools.snapshot() if self.tools is not None else {},
            "process": {
                "rss_bytes": snap.get("process_resident_memory_bytes"),
                "open_fds": snap.get("process_open_fds"),
                "gc_thresholds": list(gc.get_threshold()),
                "gc_counts": list(gc.get_count()),
                "gc_frozen": self.frozen_objects,
                "tasks": _count_tasks(),
            },
            "log_level": get_level(),
        }

    def _store_stats(self) -> dict[str, Any]:
        db = self.stores.db if self.stores is not None else None
        return {"backend": self.config.store.backend, **(db.stats() if db is not None else {})}

    # --- admin commands -----------------------------------------------------------------------

    async def _admin_stats(self, args: dict[str, Any]) -> Any:
        return self.stats()

    async def _admin_reload(self, args: dict[str, Any]) -> Any:
        try:
            return self.reload_from_file()
        except ConfigError as err:
            raise BadRequest("configuration rejected: " + "; ".join(err.problems)) from None

    async def _admin_drain(self, args: dict[str, Any]) -> Any:
        self.request_drain()
        return {"draining": True}

    async def _admin_connections(self, args: dict[str, Any]) -> Any:
        return self.gateway.describe()

    async def _admin_streams(self, args: dict[str, Any]) -> Any:
        return self.streams.list_streams()

    async def _admin_kick(self, args: dict[str, Any]) -> Any:
        conn = args.get("id") or args.get("conn")
        if not isinstance(conn, str):
            raise BadRequest("give the connection id to kick", field="id")
        if not self.gateway.kick(conn):
            raise NotFound(f"no connection {conn}", field="id")
        return {"kicked": conn}

    async def _admin_cancel(self, args: dict[str, Any]) -> Any:
        stream = args.get("id") or args.get("stream")
        if not isinstance(stream, str):
            raise BadRequest("give the stream id to cancel", field="id")
        self.streams.cancel(stream, "admin")
        return {"cancelled": stream}

    async def _admin_log_level(self, args: dict[str, Any]) -> Any:
        level = args.get("level")
        if not isinstance(level, str):
            raise BadRequest("give the level to set", field="level")
        try:
            set_level(level)
        except ValueError as err:
            raise BadRequest(str(err), field="level") from None
        log.info("log level changed", level=level)
        return {"level": level}


def _count_tasks() -> int:
    """The trio tasks alive in this run (0 outside one); bench/soak.py watches it come back to
    its baseline after many stream starts and cancels."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0
    count, pending = 0, [root] if root is not None else []
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count
