"""The presence service: every user's presence, fed by the gateway's connection hooks.

The rules live in :mod:`raafd.chat.presence_rules` (pure); this module feeds them events and
times and tells others what changed:

- the gateway calls :meth:`PresenceService.connected` / :meth:`activity` /
  :meth:`disconnected` for every authenticated connection (it is one of the gateway's
  connection observers);
- timers (the away deadline, the offline linger) are entries of one
  :class:`~raafd.timers.Timers` heap fired by one task, :meth:`PresenceService.run`, in the
  daemon's nursery: never a task per user. A deadline that moves later (every command moves
  the away deadline) costs a float store: the old entry fires, finds nothing due, and arms the
  new time;
- a change is sent as a ``presence`` frame to every connection watching that user
  (``presence.get`` with ``watch``), emitted on the event bus as ``presence.changed``, and
  passed to :attr:`PresenceService.listeners` (rooms). Sends never wait: a connection too far
  behind to take one is closed with 4001 by its own ``send_nowait`` and asks again when it
  reconnects.

Bounds: the users map holds the connected users (bounded by the listener's connections) plus
at most ``chat.presence_max_users`` offline ones (the one offline longest is forgotten first,
and reads as offline with no ``last_seen``); a connection watches at most
``chat.presence_watch_max`` users.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, Protocol

import orjson
import trio
from attrs import frozen

from raafd.chat.presence_rules import (
    Activity,
    Change,
    Connected,
    Disconnected,
    Event,
    PresenceRules,
    SetStatus,
    Status,
    Tick,
    UserPresence,
    due,
    step,
)
from raafd.chat.wallclock import WallClock
from raafd.config import ChatConfig
from raafd.errors import TooLarge
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.timers import Timers

__all__ = [
    "PASSIVE_COMMANDS",
    "Client",
    "Emit",
    "Presence",
    "PresenceListener",
    "PresenceService",
    "no_emit",
]

log = get_logger("raafd.chat")

# Commands a client sends by itself (keep-alives, acknowledgements, reads): not activity, so a
# tab left open becomes `away`. (`presence.set` is activity, applied with the new status as one
# change.)
PASSIVE_COMMANDS: Final = frozenset(
    {"hello", "ping", "ack", "presence.get", "presence.unwatch", "presence.set"}
)

Emit = Callable[[str, dict[str, Any]], None]
"""Publish an event on the bus (non-blocking): subject, data."""


def no_emit(subject: str, data: dict[str, Any]) -> None:
    """The default :data:`Emit`: no bus."""


class Client(Protocol):
    """A connection, as chat sees it (the gateway's ``Peer`` is one)."""

    id: str
    user: str

    def send_nowait(self, message: dict[str, Any]) -> None:
        """Send a frame without waiting; a connection that cannot take it closes itself."""
        ...


@frozen
class Presence:
    """One user's presence as clients see it (``last_seen``: unix seconds, or None)."""

    user: str
    status: Status
    last_seen: float | None
    meta: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, **self.state()}

    def state(self) -> dict[str, Any]:
        """``{status, last_seen, meta}``: as a room's member list carries it."""
        return {
            "status": self.status,
            "last_seen": None if self.last_seen is None else round(self.last_seen, 3),
            "meta": self.meta,
        }


PresenceListener = Callable[[Presence], None]
"""Told every change (synchronously, in the task that caused it); must not block."""


class _Tracked:
    """One user's state, and their entry in the timer heap."""

    __slots__ = ("_service", "_timer_at", "state", "user")

    def __init__(self, service: PresenceService, user: str) -> None:
        self._service = service
        self._timer_at = math.inf
        self.user = user
        self.state = UserPresence()

    def _on_timer(self, now: float) -> None:
        self._service._apply(self, Tick())


class PresenceService:
    """See the module docstring. :meth:`run` must run for the away and offline timers."""

    def __init__(
        self,
        config: Callable[[], ChatConfig],
        metrics: Metrics,
        *,
        emit: Emit = no_emit,
        clock: WallClock | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.emit = emit
        self._clock = clock
        self._timers = Timers()
        self._users: dict[str, _Tracked] = {}
        self._offline: OrderedDict[str, None] = OrderedDict()  # oldest offline first
        self._conns: dict[str, dict[str, Client]] = {}  # user → conn id → client
        self._watchers: dict[str, dict[str, Client]] = {}  # watched user → conn id → client
        self._watching: dict[str, set[str]] = {}  # conn id → users it watches
        self._counts: dict[Status, int] = {"online": 0, "away": 0, "offline": 0}
        self.listeners: list[PresenceListener] = []

    @property
    def clock(self) -> WallClock:
        if self._clock is None:
            self._clock = WallClock()
        return self._clock

    def _rules(self) -> PresenceRules:
        cfg = self.config()
        return PresenceRules(away_after=cfg.away_after, offline_after=cfg.offline_after)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire the users' away and offline timers until cancelled."""
        _ = self.clock  # anchored before the first timer
        await self._timers.run(task_status=task_status)

    # --- the gateway's connection hooks -------------------------------------------------------

    async def connected(self, client: Client) -> None:
        self._conns.setdefault(client.user, {})[client.id] = client
        tracked = self._users.get(client.user)
        if tracked is None:
            tracked = self._users[client.user] = _Tracked(self, client.user)
        self._apply(tracked, Connected())

    def activity(self, client: Client, kind: str) -> None:
        if kind in PASSIVE_COMMANDS:
            return
        tracked = self._users.get(client.user)
        if tracked is not None:
            self._apply(tracked, Activity())

    def disconnected(self, client: Client) -> None:
        conns = self._conns.get(client.user)
        if conns is None or conns.pop(client.id, None) is None:
            return  # never announced as connected
        if not conns:
            del self._conns[client.user]
        self.unwatch(client, list(self._watching.get(client.id, ())))
        tracked = self._users.get(client.user)
        if tracked is not None:
            self._apply(tracked, Disconnected())

    # --- queries and commands -----------------------------------------------------------------

    def connections(self, user: str) -> list[Client]:
        """The user's open connections (announced by :meth:`connected`)."""
        return list(self._conns.get(user, {}).values())

    def set(self, user: str, status: Literal["online", "away"], meta: Any) -> Presence:
        """``presence.set`` from one of the user's connections; ``meta`` (a JSON object or
        None) must fit ``chat.presence_meta_bytes`` encoded (else ``too_large``)."""
        limit = self.config().presence_meta_bytes
        if meta is not None and len(orjson.dumps(meta)) > limit:
            raise TooLarge(f"meta must encode to at most {limit} bytes of JSON", field="meta")
        tracked = self._users.get(user)
        if tracked is None:
            tracked = self._users[user] = _Tracked(self, user)
        self._apply(tracked, SetStatus(status, meta))
        return self._view(user)

    def get(self, users: Iterable[str]) -> list[Presence]:
        """Each user's presence, in the order asked (unknown users: offline, no last_seen)."""
        return [self._view(user) for user in users]

    def present(self, limit: int) -> list[Presence]:
        """Users online or away, by name, at most ``limit``."""
        users = sorted(u for u, t in self._users.items() if t.state.status != "offline")
        return [self._view(user) for user in users[:limit]]

    def watch(self, client: Client, users: Iterable[str]) -> None:
        """Send ``client`` a ``presence`` frame at every change of these users (until it
        disconnects or unwatches them); ``too_large`` past ``chat.presence_watch_max``."""
        watching = self._watching.get(client.id, set())
        new = set(users) - watching
        limit = self.config().presence_watch_max
        if len(watching) + len(new) > limit:
            raise TooLarge(f"a connection watches at most {limit} users", field="users")
        if client.id not in self._conns.get(client.user, {}):
            return  # not connected (any more): nothing to send to
        self._watching[client.id] = watching | new
        for user in new:
            self._watchers.setdefault(user, {})[client.id] = client

    def unwatch(self, client: Client, users: Iterable[str]) -> None:
        watching = self._watching.get(client.id)
        if watching is None:
            return
        for user in users:
            watching.discard(user)
            watchers = self._watchers.get(user)
            if watchers is not None:
                watchers.pop(client.id, None)
                if not watchers:
                    del self._watchers[user]
        if not watching:
            del self._watching[client.id]

    def stats(self) -> dict[str, Any]:
        return {
            "online": self._counts["online"],
            "away": self._counts["away"],
            "offline_known": self._counts["offline"],
            "connected_users": len(self._conns),
            "watches": sum(len(w) for w in self._watching.values()),
        }

    # --- the rules, applied -------------------------------------------------------------------

    def _view(self, user: str) -> Presence:
        tracked = self._users.get(user)
        if tracked is None:
            return Presence(user, "offline", None, None)
        state = tracked.state
        return Presence(user, state.status, state.last_seen, state.meta)

    def _apply(self, tracked: _Tracked, event: Event) -> None:
        before = tracked.state
        after, change = step(before, event, self.clock(), self._rules())
        tracked.state = after
        if change is not None:
            self._announce(tracked, before, change)
        when = due(after, self._rules())
        if when is None:
            self._timers.disarm(tracked)
        else:
            self._timers.arm(tracked, self.clock.deadline(when))

    def _announce(self, tracked: _Tracked, before: UserPresence, change: Change) -> None:
        user = tracked.user
        if before.status != change.status:
            if before.status != "offline" or user in self._offline:
                self._counts[before.status] -= 1
            self._counts[change.status] += 1
            self.metrics.presence_changes.labels(change.status).inc()
            if change.status == "offline":
                self._offline[user] = None
                self._forget_oldest_offline()
            else:
                self._offline.pop(user, None)
            for status, count in self._counts.items():
                self.metrics.presence_users.labels(status).set(count)
        view = Presence(user, change.status, change.last_seen, change.meta)
        data = view.to_dict()
        frame = {"type": "presence", **data}
        for client in list(self._watchers.get(user, {}).values()):
            client.send_nowait(frame)
        self.emit("presence.changed", data)
        for listener in self.listeners:
            try:
                listener(view)
            except Exception:
                # A listener's bug must not stop the others, nor the change itself.
                log.exception("presence listener failed", user=user)

    def _forget_oldest_offline(self) -> None:
        limit = self.config().presence_max_users
        while len(self._offline) > limit:
            user, _ = self._offline.popitem(last=False)
            tracked = self._users.pop(user, None)
            if tracked is not None:
                self._timers.disarm(tracked)
            self._counts["offline"] -= 1
