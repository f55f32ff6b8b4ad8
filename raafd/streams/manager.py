"""The stream manager: starts streams, owns their tasks, finds them again, and forgets them.

Streams outlive the connection that started them (a client reconnects and resumes from its last
seq), so their tasks do not live in the connection's nursery but in the manager's, opened by
:meth:`StreamManager.run`. The same nursery holds the retention reaper and the one task that
runs every stream's timers (:class:`~raafd.timers.Timers`).

Bounds (DESIGN invariant 2):

- at most ``max_streams`` streams running at once, at most ``max_streams_per_connection``
  per non-empty ``owner`` and at most ``max_streams_per_principal`` per non-empty
  ``principal``: :meth:`StreamManager.start` refuses more with ``TooManyStreams``;
- a finished stream stays retrievable (replay, status) for ``retention`` seconds after its
  terminal event; at most ``max_streams`` finished streams are retained, and beyond that the
  one that ended first is forgotten early;
- every stream's log and subscribers are bounded by the stream itself (see ``stream.py``).

A normal stream's body comes from the :class:`~raafd.streams.body.BodyFactory` the manager is
given (the daemon gives :class:`~raafd.agents.bodies.AgentBodies`: the agent run, its session
kept); the manager never imports the agent loop. When the factory keeps sessions, one session
has at most one normal stream running at a time (another start is a ``Conflict``), so two runs
never interleave one conversation. Other code (workflows) starts streams with a body of its own
through ``start(body=...)``.

The output filters of the stream's agent (for a workflow, the agent its ``start`` event names)
wrap its body (:mod:`raafd.streams.filters`): what they make of its events is what the log
receives.

Events on the bus (through ``emit``, see docs/protocol.md): ``stream.started`` when a stream
starts, and ``stream.completed`` / ``stream.failed`` / ``stream.cancelled`` at its terminal
event.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import structlog
import trio

from raafd.config import AgentConfig, StreamsConfig
from raafd.errors import BadRequest, Conflict, NotFound, TooManyStreams, Unavailable
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.providers.base import Provider
from raafd.providers.fallback import default_model
from raafd.streams.body import Body, BodyFactory
from raafd.streams.filters import FilterChain
from raafd.streams.stream import STATUSES, Stream, Subscription
from raafd.timers import Timers

__all__ = ["StreamManager"]

log = get_logger("raafd.streams")

_STREAM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ENDED_SUBJECTS = {
    "complete": "stream.completed",
    "error": "stream.failed",
    "cancelled": "stream.cancelled",
}


def _no_emit(subject: str, data: dict[str, Any]) -> None:
    pass


class StreamManager:
    """See the module docstring. Run it with ``await nursery.start(manager.run)``.

    ``bodies`` builds the body of every normal stream (``agents`` and ``providers`` only check
    the agent and label the ``start`` event); it is the caller's to reload."""

    def __init__(
        self,
        config: StreamsConfig,
        agents: Mapping[str, AgentConfig],
        providers: Mapping[str, Provider],
        metrics: Metrics,
        default_agent: str,
        *,
        bodies: BodyFactory,
        filters: Mapping[str, FilterChain] | None = None,
        emit: Callable[[str, dict[str, Any]], None] = _no_emit,
    ) -> None:
        self._config = config
        self._emit = emit
        self._agents = agents
        self._providers = providers
        self._metrics = metrics
        self._default_agent = default_agent
        self._bodies = bodies
        self._filters: Mapping[str, FilterChain] = filters or {}
        self._session_streams: dict[str, str] = {}  # session → its running stream (bounded)
        self._nursery: trio.Nursery | None = None
        self._timers = Timers()
        self._draining = False
        self._streams: dict[str, Stream] = {}  # running and retained
        self._running: dict[str, Stream] = {}
        self._per_owner: Counter[str] = Counter()
        self._per_principal: Counter[str] = Counter()
        self._principal_of: dict[str, str] = {}  # running stream → the principal counted
        self._ended: OrderedDict[str, float] = OrderedDict()  # id → trio clock at its end
        self._ended_lot = trio.lowlevel.ParkingLot()  # the reaper and drain wait here

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every stream's task and the retention reaper; never returns.

        Cancelling it cancels every running stream (each ends with ``cancelled`` {drain});
        call :meth:`drain` first for a graceful stop."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reap)
                await nursery.start(self._timers.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def reload(
        self,
        *,
        config: StreamsConfig | None = None,
        agents: Mapping[str, AgentConfig] | None = None,
        providers: Mapping[str, Provider] | None = None,
        default_agent: str | None = None,
        filters: Mapping[str, FilterChain] | None = None,
    ) -> None:
        """Apply a reloaded configuration to streams started from now on."""
        if filters is not None:
            self._filters = filters
        if config is not None:
            self._config = config
        if agents is not None:
            self._agents = agents
        if providers is not None:
            self._providers = providers
        if default_agent is not None:
            self._default_agent = default_agent

    @property
    def bodies(self) -> BodyFactory:
        """The factory of normal streams' bodies (workflows run agents with its runner)."""
        return self._bodies

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, grace: float) -> None:
        """Refuse new streams, let running ones finish for up to ``grace`` seconds, then cancel
        the rest with reason ``drain``."""
        self._draining = True
        with trio.move_on_after(grace):
            while self._running:
                await self._ended_lot.park()
        for stream in list(self._running.values()):
            stream.cancel("drain")

    # --- starting and finding -----------------------------------------------------------------

    def start(
        self,
        *,
        agent: str | None,
        messages: list[dict[str, Any]] | None = None,
        stream_id: str | None = None,
        owner: str = "",
        principal: str = "",
        session: str | None = None,
        detach_grace: float | None = None,
        body: Body | None = None,
        model: str | None = None,
    ) -> Stream:
        """Start a stream and return it at once (synchronous: checks and registration happen
        atomically). Its first event, ``start``, is already in its log; a subscriber attaching
        with ``after=0`` sees everything.

        ``agent`` None means the default agent. ``owner`` is opaque (a connection id); with a
        non-empty owner, ``max_streams_per_connection`` applies; with a non-empty ``principal``
        (a user name), ``max_streams_per_principal``. ``detach_grace`` overrides the
        configured grace for this stream (``math.inf`` for a run nobody watches).

        Without ``body`` the stream runs ``agent`` on ``messages`` (see the module docstring).
        With ``body`` the stream runs that instead, and ``messages`` is not used: the body
        writes its events and its terminal event itself (a body that returns without one ends
        the stream with ``error`` {internal}). ``agent`` and ``model`` then only label the
        ``start`` event (``model`` defaults to the agent's model when ``agent`` is configured).

        Raises ``NotFound`` (agent), ``BadRequest``/``Conflict`` (stream id),
        ``Conflict`` (the session has a running stream), ``TooManyStreams``, ``Unavailable``
        (draining or not running).
        """
        cfg = self._config
        if self._draining:
            raise Unavailable("the server is draining; no new streams are started")
        if self._nursery is None:
            raise Unavailable("the stream manager is not running")
        name = agent or self._default_agent
        agent_cfg = self._agents.get(name)
        if body is None:
            if agent_cfg is None:
                raise NotFound(f"no agent named {name!r}", field="agent")
            provider = self._providers.get(agent_cfg.provider)
            if provider is None:
                raise Unavailable(
                    f"agent {name!r} uses provider {agent_cfg.provider!r}, which is not available",
                    field="agent",
                )
            model = model or agent_cfg.model or default_model(provider)
        elif model is None:
            provider = self._providers.get(agent_cfg.provider) if agent_cfg else None
            model = (agent_cfg.model if agent_cfg else "") or (
                default_model(provider) if provider else ""
            )
        if stream_id is not None:
            if not _STREAM_ID.fullmatch(stream_id):
                raise BadRequest(
                    "a stream id is 1 to 128 letters, digits or _ . : -", field="stream"
                )
            if stream_id in self._streams:
                raise Conflict(f"stream {stream_id!r} already exists", field="stream")
        # The session whose conversation this stream loads and saves (normal streams only).
        kept = session if body is None and self._bodies.keeps_sessions else None
        if kept is not None and kept in self._session_streams:
            raise Conflict(
                f"session {kept!r} already has a running stream"
                f" ({self._session_streams[kept]}); wait for it to end",
                field="session",
            )
        if len(self._running) >= cfg.max_streams:
            raise TooManyStreams(f"{cfg.max_streams} streams are running; try again later")
        if owner and self._per_owner[owner] >= cfg.max_streams_per_connection:
            raise TooManyStreams(
                f"this connection already runs {cfg.max_streams_per_connection} streams"
            )
        if principal and self._per_principal[principal] >= cfg.max_streams_per_principal:
            raise TooManyStreams(
                f"{principal} already runs {cfg.max_streams_per_principal} streams"
                " (streams.max_streams_per_principal); wait for one to end"
            )

        stream = Stream(
            agent=name,
            model=model,
            config=cfg,
            metrics=self._metrics,
            timers=self._timers,
            stream_id=stream_id,
            owner=owner,
            session=session,
            detach_grace=detach_grace,
            on_finish=self._stream_ended,
        )
        if body is None:
            body = self._bodies(name, list(messages or []), kept)
        chain = self._filters.get(name)
        if chain is not None:  # the agent's output filters (none: the body runs as it is)
            body = chain.wrap(body, stream.id, name)
        self._streams[stream.id] = stream
        self._running[stream.id] = stream
        if owner:
            self._per_owner[owner] += 1
        if principal:
            self._per_principal[principal] += 1
            self._principal_of[stream.id] = principal
        if kept is not None:
            self._session_streams[kept] = stream.id
        self._metrics.streams_started.inc()
        self._nursery.start_soon(self._run_stream, stream, body, name=stream.id)
        self._emit(
            "stream.started",
            {
                "stream": stream.id,
                "agent": stream.agent,
                "model": stream.model,
                "owner": owner,
                "session": session,
            },
        )
        return stream

    def get(self, stream_id: str) -> Stream:
        """The stream, running or retained; ``NotFound`` otherwise."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise NotFound(f"no stream {stream_id!r}", field="stream")
        return stream

    def session_stream(self, session: str) -> Stream | None:
        """The normal stream running for ``session`` now, if any (only when bodies keep
        sessions: otherwise a session is only a label and this is always None)."""
        stream_id = self._session_streams.get(session)
        return self._streams.get(stream_id) if stream_id is not None else None

    def subscribe(self, stream_id: str, after: int = 0, *, snapshot: bool = False) -> Subscription:
        """An async context manager (and, inside it, async iterator) delivering the events of
        ``stream_id`` after seq ``after`` (with ``snapshot`` and ``after`` 0: a ``snapshot``
        event first, see :meth:`Stream.subscribe`); unregistered on exit. Raises ``NotFound``,
        ``Gone`` (evicted), ``BadRequest`` (``after`` out of range)."""
        return self.get(stream_id).subscribe(after, snapshot=snapshot)

    def cancel(self, stream_id: str, reason: str = "client") -> bool:
        """Cancel a stream; False when it had already ended."""
        return self.get(stream_id).cancel(reason)

    def pause(self, stream_id: str) -> bool:
        return self.get(stream_id).pause()

    def resume(self, stream_id: str) -> bool:
        return self.get(stream_id).resume()

    # --- figures ------------------------------------------------------------------------------

    def running_count(self) -> int:
        """Streams without a terminal event (running or paused)."""
        return len(self._running)

    def stats(self) -> dict[str, Any]:
        """Counts for ``raafd ctl stats`` and ``/v1/stats``."""
        by_status = dict.fromkeys(STATUSES, 0)
        subscribers = 0
        for stream in self._streams.values():
            by_status[stream.status] += 1
            subscribers += stream.subscribers
        return {
            "running": len(self._running),
            "retained": len(self._streams) - len(self._running),
            "by_status": by_status,
            "subscribers": subscribers,
            "draining": self._draining,
            "max_streams": self._config.max_streams,
        }

    def list_streams(self) -> list[dict[str, Any]]:
        """One summary per stream (id, agent, model, status, seq, subscribers, age, ...),
        newest first, for the admin ``streams`` command."""
        return [s.info() for s in reversed(self._streams.values())]

    # --- internals ----------------------------------------------------------------------------

    async def _run_stream(self, stream: Stream, body: Body) -> None:
        # The task was spawned from a request's or connection's context, which trio copied;
        # the stream outlives both, so it logs under its own id only (`owner` says who).
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(stream=stream.id)
        log.info("stream started", agent=stream.agent, model=stream.model, owner=stream.owner)
        try:
            await stream.run(body)
        finally:
            log.info("stream ended", status=stream.status, seq=stream.head)

    def _stream_ended(self, stream: Stream) -> None:
        # Called synchronously from the stream's terminal append, in whatever task caused it.
        if self._running.pop(stream.id, None) is None:
            return
        if stream.session is not None and self._session_streams.get(stream.session) == stream.id:
            del self._session_streams[stream.session]
        if stream.owner:
            self._per_owner[stream.owner] -= 1
            if self._per_owner[stream.owner] <= 0:
                del self._per_owner[stream.owner]
        principal = self._principal_of.pop(stream.id, "")
        if principal:
            self._per_principal[principal] -= 1
            if self._per_principal[principal] <= 0:
                del self._per_principal[principal]
        self._ended[stream.id] = stream.ended_clock or trio.current_time()
        while len(self._ended) > self._config.max_streams:
            oldest, _ = self._ended.popitem(last=False)
            self._forget(oldest)
        self._ended_lot.unpark_all()
        self._emit_ended(stream)

    def _emit_ended(self, stream: Stream) -> None:
        terminal = stream.terminal
        subject = _ENDED_SUBJECTS.get(terminal.kind) if terminal is not None else None
        if terminal is None or subject is None:
            return
        data: dict[str, Any] = {"stream": stream.id, "agent": stream.agent, "seq": terminal.seq}
        fields = terminal.fields
        if terminal.kind == "complete":
            data["finish_reason"] = fields.get("finish_reason")
            data["usage"] = fields.get("usage")
        elif terminal.kind == "error":
            error = fields.get("error")
            data["code"] = error.get("code") if isinstance(error, dict) else None
        else:
            data["reason"] = fields.get("reason")
        self._emit(subject, data)

    def _forget(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._metrics.streams.labels(stream.status).dec()

    async def _reap(self) -> None:
        """Forget each finished stream ``retention`` seconds after its terminal event. Ends are
        recorded in time order, so the first one is always the next due."""
        while True:
            while not self._ended:
                await self._ended_lot.park()
            _, ended = next(iter(self._ended.items()))
            await trio.sleep_until(ended + self._config.retention)
            now = trio.current_time()
            while self._ended:
                stream_id, ended = next(iter(self._ended.items()))
                if ended + self._config.retention > now:
                    break
                del self._ended[stream_id]
                self._forget(stream_id)
