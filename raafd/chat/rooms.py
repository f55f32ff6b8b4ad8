"""Rooms: a shared feed per room whose seq is the room's durable message id.

The rules of this file:

1. **A message is acknowledged only once it is durable, and its id is its seq.** A send waits
   in its room's bounded queue; whoever holds the room's turn writes every queued message in
   one store append (group commit, one fsync for all of them), then appends each new one to the
   room's :class:`~raafd.core.feed.Feed` in id order. So the feed's seq *is* the message id,
   every member sees the messages in the same order with no gap, and a message is fanned out
   (encoded once) only after the store has it. A failed write appends nothing: no gap.
2. **A join gets the exact remainder, with neither gap nor duplicate.** The feed holds the
   newest messages (``history`` of them, ``chat.history_max_bytes``); older ones are read from
   the store, page by page, until the store's answer reaches what the feed still holds. The
   rest is taken from the feed and the subscription opened at its head *in the same
   synchronous step* (:meth:`Joining.finish`): nothing can be appended between the two.
3. **One member never slows another.** The feed is ``NEVER_WAITS``: a member too far behind is
   dropped (close 4001) and rejoins with ``after``. Typing and membership notices are
   never waited for: queued on a member's connection at once, and a connection whose queue is
   full is closed with 4001 like a lagging member (:meth:`Member.signal`).
4. **Rules are pure.** Typing (:mod:`raafd.chat.typing`) and the message rate
   (:mod:`raafd.chat.ratelimit`) are functions of (state, event, now); this file only keeps
   their states (bounded by the room's members) and arms their timers.

Agents in rooms: a message that mentions the room's agent (``@name``), or any message when the
room has ``agent_reply = "every_message"``, queues a reply (bounded by ``chat.agent_queue``,
full → ``rate_limited``). One reply runs at a time per room, in the service's nursery: an
ordinary stream of the stream manager, its context the room's recent messages with each
speaker's name, attached to every member's connection; the agent is shown typing meanwhile, and
its final answer is stored as a room message from ``agent:NAME`` carrying the stream id. A
``handoff`` in the reply makes the agent handed to the one that answers next.

Bounds: ``chat.max_rooms`` rooms; per room ``max_members`` members, ``chat.send_queue`` queued
sends, ``chat.agent_queue`` queued replies, the feed's ``history`` messages; per member a rate
bucket and a typing state; ``chat.max_rooms_per_user`` memberships per user.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import orjson
import trio

from raafd.chat.ratelimit import Bucket, take
from raafd.chat.typing import TypingState, step
from raafd.config import Config, RoomConfig
from raafd.core.feed import Backpressure, Feed, FeedLimits, Subscription
from raafd.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    RaafdError,
    RateLimited,
    TooLarge,
    Unavailable,
)
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.protocol.events import StreamEvent
from raafd.protocol.rooms import MAX_PAGE
from raafd.store.chat import ChatStore, NewMessage, RoomState, StoredMessage, StoredRoom
from raafd.timers import Timers

if TYPE_CHECKING:
    from raafd.streams import Stream, StreamManager

__all__ = ["Emit", "Joining", "Member", "Room", "Rooms", "feed_id"]

log = get_logger("raafd.rooms")

Emit = Callable[[str, dict[str, Any]], None]
"""Publishes an event on the bus (non-blocking): ``emit(subject, data)``."""

_PAGE = 500  # messages per store read while a join catches up


def _no_emit(subject: str, data: dict[str, Any]) -> None:
    pass


def feed_id(room: str) -> str:
    """The id of a room's feed (a connection's attachment key)."""
    return "room:" + room


def agent_user(agent: str) -> str:
    """An agent speaking in a room is the user ``agent:NAME``."""
    return "agent:" + agent


class Member(Protocol):
    """One connection joined to a room, as the room sees it (the gateway adapts its
    connection)."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> str: ...

    def signal(self, message: dict[str, Any]) -> None:
        """Send a notice (typing, membership) without waiting: written or queued at once; a
        connection whose queue is full is closed with 4001 (it rejoins with ``after``)."""
        ...

    def detach(self) -> None:
        """Stop delivering the room on this connection (idempotent)."""
        ...

    def attach_reply(self, stream_id: str, agent: str) -> None:
        """Deliver the agent stream ``stream_id`` (a reply in this room) on this connection."""
        ...


def _build(room_feed: str, seq: int, kind: str, fields: dict[str, Any]) -> StreamEvent:
    """A room message as a feed event: its JSON is the ``room.message`` body (without
    ``type``), encoded once for every member."""
    if fields.get("id") != seq:
        raise ValueError(f"room message id {fields.get('id')} appended as seq {seq}")
    return StreamEvent(room_feed, seq, kind, fields, orjson.dumps(fields))


@attrs.define(eq=False)
class _Send:
    message: NewMessage
    done: bool = False
    result: StoredMessage | None = None
    error: BaseException | None = None


@attrs.define(eq=False)
class _Online:
    member: Member
    subscription: Subscription


class _Typist:
    """One user's typing state in one room, armed in the service's timer heap."""

    __slots__ = ("_timer_at", "room", "state", "user")

    def __init__(self, room: Room, user: str) -> None:
        self.room = room
        self.user = user
        self.state = TypingState()
        self._timer_at = math.inf

    def _on_timer(self, now: float) -> None:
        self.room.rooms._typing_step(self, "tick", now)


class Room:
    """One room: attributes, its feed, members, rates, typing and its agent's replies."""

    def __init__(
        self,
        rooms: Rooms,
        name: str,
        settings: RoomConfig,
        *,
        head: int,
        oldest: int,
        members: dict[str, float],
        created_by: str = "",
        created_at: float = 0.0,
        configured: bool = False,
    ) -> None:
        chat = rooms.config().chat
        self.rooms = rooms
        self.name = name
        self.settings = settings
        self.created_by = created_by
        self.created_at = created_at
        self.configured = configured
        self.feed = Feed(
            feed_id(name),
            FeedLimits(
                max_events=settings.history,
                max_bytes=chat.history_max_bytes,
                subscriber_buffer=rooms.config().streams.subscriber_buffer,
                max_lag=chat.max_lag,
            ),
            metrics=rooms.metrics,
            policy=Backpressure.NEVER_WAITS,
            build=_build,
            on_subscribers=self._subscribers_changed,
            start=head,
        )
        self.oldest = oldest  # the oldest id the store keeps (head + 1: none)
        self.members = members  # user → joined at (unix time), durable
        self.online: dict[str, _Online] = {}  # connection id → its delivery, while joined
        self.buckets: dict[str, Bucket] = {}  # user → message rate
        self.typists: dict[str, _Typist] = {}  # user → typing state
        self._pending: collections.deque[_Send] = collections.deque()
        self._turn = trio.Lock()
        self.messages = 0  # sent since start
        # Messages per minute, for operators: the count of the current minute and the last.
        self._minute = 0.0
        self._this_minute = 0
        self._last_minute = 0
        # Agents: the one answering next (after a handoff), the running reply, queued ones.
        self.agent = settings.agent
        self.reply: Stream | None = None
        self.reply_agent = ""
        self.mentions = 0  # replies waiting
        self._replying = False

    @property
    def head(self) -> int:
        return self.feed.head

    def _subscribers_changed(self, count: int) -> None:
        # A connection left (room.leave, its close, or dropped as too slow): forget it.
        if len(self.online) > count:
            for conn, entry in [*self.online.items()]:
                if not entry.subscription.registered:
                    del self.online[conn]

    def counted(self, now: float) -> None:
        """One more message at ``now`` (trio time) for :meth:`per_minute`."""
        self.per_minute(now)
        self._this_minute += 1

    def per_minute(self, now: float) -> int:
        """Messages in the last whole minute, or in the current one if that is more."""
        minute = now // 60
        if minute != self._minute:
            self._last_minute = self._this_minute if minute == self._minute + 1 else 0
            self._this_minute, self._minute = 0, minute
        return max(self._last_minute, self._this_minute)

    def online_users(self) -> set[str]:
        return {entry.member.user for entry in self.online.values()}

    def may_enter(self, user: str) -> bool:
        return not self.settings.restricted or user in self.settings.allow

    def broadcast(self, message: dict[str, Any], *, skip_user: str | None = None) -> None:
        """A notice to every connection joined now (but ``skip_user``'s)."""
        for entry in [*self.online.values()]:
            if entry.member.user != skip_user:
                entry.member.signal(message)

    def describe(self) -> dict[str, Any]:
        """For ``GET /v1/rooms/{room}``, ``raafd ctl room``."""
        online = self.online_users()
        presence = self.rooms.presence_of
        members = [
            {"user": u, "online": u in online, **(presence(u) if presence is not None else {})}
            for u in sorted(self.members)
        ]
        if self.settings.agent:
            members.append({"user": agent_user(self.agent), "online": True, "agent": True})
        return {
            "room": self.name,
            "title": self.settings.title,
            "description": self.settings.description,
            "restricted": self.settings.restricted,
            "agent": self.settings.agent or None,
            "agent_reply": self.settings.agent_reply,
            "head": self.head,
            "oldest": self.oldest,
            "members": members,
            "member_count": len(self.members),
            "connections": len(self.online),
            "messages_since_start": self.messages,
            "messages_per_minute": self.per_minute(trio.current_time()),
            "reply": self.reply.id if self.reply is not None else None,
            "queued_replies": self.mentions,
            "created_by": self.created_by or None,
            "configured": self.configured,
        }


@attrs.define
class Joining:
    """A join's first half (the history the store had to give); :meth:`finish` does the rest
    synchronously. See rule 2 of the module docstring."""

    room: Room
    messages: list[Any]  # wire dicts (from the store)
    cursor: int  # the last id in ``messages`` (or where the feed's part starts)
    user: str

    def finish(
        self, member: Member, ref: str | None
    ) -> tuple[dict[str, Any], Callable[[], Subscription]]:
        """The ``room.joined`` reply and the subscription's opener, taken in one synchronous
        step (pass both to the connection's ``attach`` at once). Raises ``gone`` if the feed
        evicted what the store read stopped at (a join slower than ``history`` messages)."""
        room = self.room
        feed = room.feed
        tail = feed.log.after(self.cursor) if self.cursor < feed.head else []
        head = feed.head
        members = room.describe()["members"]
        for entry in members:
            if entry["user"] == self.user:
                entry["online"] = True  # joined with this reply
        reply = {
            "type": "room.joined",
            "ref": ref,
            "room": room.name,
            "head": head,
            "members": members,
            "messages": [*self.messages, *(orjson.Fragment(e.json) for e in tail)],
        }
        if room.reply is not None and not room.reply.finished:
            reply["reply"] = {"stream": room.reply.id, "agent": room.reply_agent}

        def subscribe() -> Subscription:
            sub = feed.subscribe(head, context={"conn": member.id, "room": room.name})
            room.online[member.id] = _Online(member, sub)
            return sub

        return reply, subscribe


_MENTION = re.compile(r"@([A-Za-z0-9_.:-]+)")


class Rooms:
    """Every room of the daemon. ``run`` loads them and owns the agents' replies and the
    typing timers; the gateway and HTTP adapters call the rest."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Callable[[], ChatStore | None],
        metrics: Metrics,
        streams: StreamManager | None = None,
        *,
        emit: Emit = _no_emit,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._store = store
        self.metrics = metrics
        self.streams = streams
        self.emit = emit
        self.clock = clock  # unix time, for message timestamps
        self.rooms: dict[str, Room] = {}
        self.timers = Timers()
        self._nursery: trio.Nursery | None = None
        self._memberships: collections.Counter[str] = collections.Counter()  # user → rooms
        # Set by the daemon: a user's presence for member lists ({status, last_seen, meta};
        # raafd.chat.presence), and the offline queues a message of a room with
        # offline_delivery goes to for its members with no connection (raafd.chat.offline).
        self.presence_of: Callable[[str], dict[str, Any]] | None = None
        self.offline_delivery: Callable[[str, list[str], str, str, float], object] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def store(self) -> ChatStore:
        store = self._store()
        if store is None:
            raise Unavailable("the chat store is not open yet")
        return store

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the rooms (configured and stored), then keep the typing timers and the agents'
        replies until cancelled."""
        await self.load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.timers.run)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def load(self) -> None:
        cfg = self.config()
        store = self.store
        made = {room.name: room for room in await store.rooms()}
        names = [*cfg.rooms, *(n for n in made if n not in cfg.rooms)]
        for name in names[: cfg.chat.max_rooms]:
            state = await store.state(name)
            stored = made.get(name)
            if name in cfg.rooms:
                settings, by, at, configured = cfg.rooms[name], "", 0.0, True
            else:
                assert stored is not None
                try:
                    settings = RoomConfig(**stored.settings)
                except (TypeError, ValueError) as exc:
                    log.error("a stored room's attributes are not valid", room=name, error=exc)
                    continue
                by, at, configured = stored.created_by, stored.created_at, False
            self._open(state, settings, by, at, configured=configured)
            self._memberships.update(state.members)
        log.info("rooms loaded", rooms=len(self.rooms))

    def _open(
        self,
        state: RoomState,
        settings: RoomConfig,
        by: str,
        at: float,
        *,
        configured: bool = False,
    ) -> Room:
        room = self.rooms[state.name] = Room(
            self,
            state.name,
            settings,
            head=state.head,
            oldest=state.oldest,
            members=state.members,
            created_by=by,
            created_at=at,
            configured=configured,
        )
        return room

    # --- rooms --------------------------------------------------------------------------------

    def get(self, name: str, user: str | None = None) -> Room:
        """The room, if ``user`` (None: an operator) may see it: ``not_found``, ``forbidden``."""
        room = self.rooms.get(name)
        if room is None:
            raise NotFound(f"no room {name!r}", field="room")
        if user is not None and not room.may_enter(user):
            raise Forbidden(f"room {name!r} is restricted", field="room")
        return room

    def presence_changed(self, user: str, presence: dict[str, Any]) -> None:
        """``user``'s presence changed (:mod:`raafd.chat.presence`, after its linger): tell
        the connections joined to each room they are a member of, with ``room.member``
        {``event: "update"``, ``status``, ``last_seen``, ``meta``}. At most ``chat.max_rooms``
        rooms are looked at; never waits (``signal``)."""
        for room in self.rooms.values():
            if user in room.members:
                message = {
                    "type": "room.member",
                    "room": room.name,
                    "user": user,
                    "event": "update",
                    **presence,
                }
                room.broadcast(message)

    def visible(self, user: str | None) -> list[Room]:
        return [r for r in self.rooms.values() if user is None or r.may_enter(user)]

    def may_create(self, user: str) -> bool:
        creators = self.config().chat.creators
        return "*" in creators or user in creators

    async def create(self, name: str, settings: dict[str, Any], user: str) -> Room:
        """A new room made by ``user`` (``room.create``, ``POST /v1/rooms``, or a join with
        ``chat.create_on_join``): ``forbidden`` unless ``chat.creators`` lets them,
        ``conflict`` when it exists, ``too_large`` past ``chat.max_rooms``."""
        cfg = self.config()
        if not self.may_create(user):
            raise Forbidden("you may not create rooms", field="room")
        if name in self.rooms:
            raise Conflict(f"room {name!r} exists", field="room")
        if len(self.rooms) >= cfg.chat.max_rooms:
            raise TooLarge(f"there are {cfg.chat.max_rooms} rooms already (chat.max_rooms)")
        if settings.get("restricted") and user not in settings.get("allow", []):
            settings = {**settings, "allow": [*settings.get("allow", []), user]}
        try:
            room_cfg = RoomConfig(**settings)
        except ValueError as exc:
            raise BadRequest(f"room attributes: {exc}") from None
        if room_cfg.agent and room_cfg.agent not in cfg.agents:
            raise NotFound(f"no agent named {room_cfg.agent!r}", field="agent")
        now = self.clock()
        stored = StoredRoom(name, user, now, attrs.asdict(room_cfg))
        if not await self.store.create_room(stored):
            raise Conflict(f"room {name!r} exists", field="room")
        if name in self.rooms:  # made meanwhile (the store said no, but to be sure)
            raise Conflict(f"room {name!r} exists", field="room")
        room = self._open(await self.store.state(name), room_cfg, user, now)
        self.emit("room.created", {"room": name, "by": user})
        log.info("room created", room=name, by=user)
        return room

    # --- joining ------------------------------------------------------------------------------

    async def join(
        self, name: str, user: str, *, after: int | None = None, limit: int | None = None
    ) -> Joining:
        """The first half of a join: access, membership (durable), and the history the feed
        no longer holds, read from the store. Finish with :meth:`Joining.finish`."""
        room = self.rooms.get(name)
        if room is None and self.config().chat.create_on_join and self.may_create(user):
            try:
                room = await self.create(name, {}, user)
            except Conflict:
                room = self.rooms.get(name)
        if room is None:
            raise NotFound(f"no room {name!r}", field="room")
        if not room.may_enter(user):
            raise Forbidden(f"room {name!r} is restricted", field="room")
        await self._add_member(room, user)
        head = room.head
        if after is not None:
            if after > head:
                raise BadRequest(
                    f"after is {after} but the room's last message is {head}", field="after"
                )
            if after + 1 < room.oldest and after < head:
                raise Gone(
                    f"messages after {after} are no longer kept; the oldest kept is {room.oldest}",
                    field="after",
                )
            cursor = after
        else:
            count = limit if limit is not None else min(room.settings.history, MAX_PAGE)
            cursor = max(head - count, room.oldest - 1, 0)
        messages: list[Any] = []
        while cursor + 1 < room.feed.log.oldest:
            upto = room.feed.log.oldest
            page = await self.store.messages(
                name, after=cursor, before=upto, limit=min(_PAGE, upto - cursor)
            )
            if not page:  # trimmed meanwhile (ttl): what is left starts in the feed
                cursor = max(cursor, upto - 1)
                break
            messages.extend(m.to_wire() for m in page)
            cursor = page[-1].id
        return Joining(room, messages, cursor, user)

    async def _add_member(self, room: Room, user: str) -> None:
        if user in room.members:
            return
        cfg = self.config().chat
        if len(room.members) >= room.settings.max_members:
            raise Conflict(
                f"room {room.name!r} is full ({room.settings.max_members} members)", field="room"
            )
        if self._memberships[user] >= cfg.max_rooms_per_user:
            raise TooLarge(
                f"you are a member of {cfg.max_rooms_per_user} rooms already; leave one first",
                field="room",
            )
        now = self.clock()
        await self.store.add_member(room.name, user, now)
        if user in room.members:  # joined meanwhile from another connection
            return
        room.members[user] = now
        self._memberships[user] += 1
        self._member_event(room, user, "join")

    def _member_event(self, room: Room, user: str, event: str) -> None:
        message = {"type": "room.member", "room": room.name, "user": user, "event": event}
        room.broadcast(message)
        self.emit("room.member", {"room": room.name, "user": user, "event": event})

    async def leave(self, name: str, user: str) -> None:
        """End ``user``'s membership: every connection of theirs stops receiving the room."""
        room = self.get(name)
        for entry in [*room.online.values()]:
            if entry.member.user == user:
                entry.member.detach()
        if user not in room.members:
            return
        await self.store.remove_member(name, user)
        if room.members.pop(user, None) is not None:
            self._memberships[user] -= 1
            if self._memberships[user] <= 0:
                del self._memberships[user]
            room.buckets.pop(user, None)
            self._member_event(room, user, "leave")

    async def kick(self, name: str, user: str) -> bool:
        """An operator removes ``user`` from the room (``raafd ctl kick --room``)."""
        room = self.get(name)
        found = user in room.members or any(e.member.user == user for e in room.online.values())
        await self.leave(name, user)
        return found

    # --- sending ------------------------------------------------------------------------------

    async def send(
        self,
        name: str,
        user: str,
        text: str,
        *,
        client_id: str | None = None,
        meta: dict[str, Any] | None = None,
        member: bool = True,
    ) -> StoredMessage:
        """Store a message and fan it out; returns it once durable (rule 1). ``member``: the
        sender must be a member (WebSocket); False for a service publishing over HTTP."""
        room = self.get(name, user)
        cfg = self.config().chat
        if member and user not in room.members:
            raise Forbidden(f"join room {name!r} before sending to it", field="room")
        limit = room.settings.max_message_length
        if len(text) > limit:
            raise TooLarge(f"a message is at most {limit} characters", field="text")
        if not text.strip():
            raise BadRequest("a message needs some text", field="text")
        if meta is not None and len(orjson.dumps(meta)) > cfg.max_meta_bytes:
            raise TooLarge(f"meta is at most {cfg.max_meta_bytes} bytes of JSON", field="meta")
        wants_reply = self._wants_reply(room, user, text)
        if wants_reply and room.mentions >= cfg.agent_queue:
            raise RateLimited(
                f"{room.mentions} replies are waiting for the agent; try again later",
                retry_after=5.0,
            )
        now = trio.current_time()
        bucket, retry_after = take(room.buckets.get(user), room.settings.rate_limit, now)
        if retry_after is not None:
            raise RateLimited(
                f"at most {room.settings.rate_limit} messages a minute in {name!r}",
                retry_after=retry_after,
            )
        room.buckets[user] = bucket
        stored = await self._append(room, NewMessage(user, text, self.clock(), meta, client_id))
        if wants_reply and not stored.duplicate:
            self._queue_reply(room)
        return stored

    async def _append(self, room: Room, message: NewMessage) -> StoredMessage:
        if len(room._pending) >= self.config().chat.send_queue:
            raise Unavailable(f"room {room.name!r} is overloaded; try again", retry_after=1)
        item = _Send(message)
        room._pending.append(item)
        try:
            async with room._turn:
                if not item.done:
                    await self._write_batch(room)
        finally:
            if not item.done and item in room._pending:  # cancelled before its batch
                room._pending.remove(item)
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    async def _write_batch(self, room: Room) -> None:
        batch = [*room._pending]
        room._pending.clear()
        try:
            # Taken: the senders were promised their messages are written (or fail) whole.
            with trio.CancelScope(shield=True):
                stored = await self.store.append(
                    room.name,
                    room.head,
                    [item.message for item in batch],
                    room.settings.history,
                    room.settings.history_ttl,
                    self.clock(),
                )
        except BaseException as exc:
            for item in batch:
                item.error = (
                    exc
                    if isinstance(exc, RaafdError)
                    else Unavailable("the message could not be stored")
                )
                item.done = True
            if not isinstance(exc, Exception):
                raise
            log.error("room messages not stored", room=room.name, exc_info=exc)
            return
        for item, message in zip(batch, stored, strict=True):
            if not message.duplicate:
                wire = message.to_wire()
                room.feed.append("room.message", wire)
                room.messages += 1
                room.counted(trio.current_time())
                self.metrics.room_messages.inc()
                # A restricted room's text stays among its members (the bus has no room ACL).
                self.emit(
                    "room.message",
                    {k: wire[k] for k in ("room", "id", "from", "ts")}
                    if room.settings.restricted
                    else wire,
                )
                if room.settings.offline_delivery and self.offline_delivery is not None:
                    members = list(room.members)
                    self.offline_delivery(
                        room.name, members, wire["from"], wire["text"], wire["ts"]
                    )
            item.result = message
            item.done = True
        keep = room.settings.history
        room.oldest = max(room.oldest, room.head - keep + 1)

    async def history(
        self,
        name: str,
        user: str | None,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[StoredMessage]:
        """Kept messages (``room.history``, ``GET /v1/rooms/{room}/messages``)."""
        self.get(name, user)
        return await self.store.messages(name, after=after, before=before, limit=limit)

    # --- typing -------------------------------------------------------------------------------

    def typing(self, name: str, user: str, conn: str, state: str) -> None:
        """``typing {room, state}`` from a connection joined to the room."""
        room = self.get(name, user)
        if conn not in room.online:
            raise Forbidden(f"join room {name!r} before typing in it", field="room")
        typist = room.typists.get(user)
        if typist is None:
            if state == "stop":
                return
            typist = room.typists[user] = _Typist(room, user)
        self._typing_step(typist, "start" if state == "start" else "stop", trio.current_time())

    def _typing_step(self, typist: _Typist, event: Any, now: float) -> None:
        room = typist.room
        timeout = self.config().chat.typing_timeout
        typist.state, relay, due = step(typist.state, event, now, timeout)
        if relay is not None:
            message = {"type": "typing", "room": room.name, "user": typist.user, "state": relay}
            room.broadcast(message, skip_user=typist.user)
            self.metrics.typing_relays.inc()
            self.emit("typing", {"room": room.name, "user": typist.user, "state": relay})
        self.timers.disarm(typist)
        if due is not None:
            self.timers.arm(typist, due)
        elif typist.state.idle and room.typists.get(typist.user) is typist:
            del room.typists[typist.user]

    # --- agents -------------------------------------------------------------------------------

    def _wants_reply(self, room: Room, user: str, text: str) -> bool:
        mode = room.settings.agent_reply
        if not room.settings.agent or mode == "off" or user.startswith("agent:"):
            return False
        if mode == "every_message":
            return True
        names = {room.settings.agent.lower(), room.agent.lower()}
        return any(m.lower() in names for m in _MENTION.findall(text))

    def _queue_reply(self, room: Room) -> None:
        room.mentions += 1
        if not room._replying and self._nursery is not None and self.streams is not None:
            room._replying = True
            self._nursery.start_soon(self._replies, room, name=f"room:{room.name}:agent")

    async def _replies(self, room: Room) -> None:
        try:
            while room.mentions > 0:
                room.mentions -= 1
                try:
                    await self._reply(room)
                except RaafdError as err:
                    log.warning("agent reply not started", room=room.name, error=err.message)
                    room.broadcast({"type": "error", "room": room.name, **err.to_dict()})
        finally:
            room._replying = False

    def _context(self, room: Room) -> list[dict[str, Any]]:
        count = self.config().chat.agent_context
        events = room.feed.log.after(max(room.feed.log.oldest - 1, room.head - count))
        out: list[dict[str, Any]] = []
        for event in events:
            m = orjson.loads(event.json)  # a room message's JSON, not a stream event's
            if m["from"].startswith("agent:"):
                out.append({"role": "assistant", "content": m["text"]})
            else:
                out.append({"role": "user", "content": f"{m['from']}: {m['text']}"})
        return out or [{"role": "user", "content": "(the room is quiet)"}]

    async def _reply(self, room: Room) -> None:
        assert self.streams is not None
        agent = room.agent if room.agent in self.config().agents else room.settings.agent
        stream = self.streams.start(
            agent=agent, messages=self._context(room), detach_grace=math.inf
        )
        room.reply, room.reply_agent = stream, agent
        self.metrics.room_replies.inc()
        who = agent_user(agent)
        room.broadcast({"type": "typing", "room": room.name, "user": who, "state": "start"})
        for entry in [*room.online.values()]:
            try:
                entry.member.attach_reply(stream.id, agent)
            except RaafdError as err:  # its attachments are full: it misses this reply
                log.info(
                    "reply not attached", room=room.name, conn=entry.member.id, error=err.message
                )
        answered_by = agent
        try:
            async with stream.subscribe(0, context={"room": room.name}) as sub:
                async for batch in sub:
                    for event in batch:
                        if event.kind == "handoff":
                            answered_by = event.fields["to_agent"]
                            room.agent = answered_by
        finally:
            room.broadcast({"type": "typing", "room": room.name, "user": who, "state": "stop"})
            room.reply = None
        terminal = stream.terminal
        if terminal is not None and terminal.kind == "complete":
            text = str(terminal.fields.get("final_response") or "")
            if text:
                limit = room.settings.max_message_length
                await self._append(
                    room,
                    NewMessage(
                        agent_user(answered_by), text[:limit], self.clock(), None, None, stream.id
                    ),
                )

    def cancel_reply(self, name: str, user: str) -> str:
        """``room.cancel``: end the running reply (reason ``client``) if the room lets
        members; its id."""
        room = self.get(name, user)
        if user not in room.members:
            raise Forbidden(f"join room {name!r} first", field="room")
        if not room.settings.agent_cancel:
            raise Forbidden(f"replies in room {name!r} cannot be cancelled", field="room")
        reply = room.reply
        if reply is None or reply.finished:
            raise NotFound(f"no reply is running in room {name!r}", field="room")
        reply.cancel("client")
        return reply.id

    # --- figures ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        rooms = list(self.rooms.values())
        return {
            "rooms": len(rooms),
            "members": sum(len(r.members) for r in rooms),
            "connections": sum(len(r.online) for r in rooms),
            "messages_since_start": sum(r.messages for r in rooms),
            "replies_running": sum(1 for r in rooms if r.reply is not None),
            "by_room": {
                r.name: {
                    "members": len(r.members),
                    "online": len(r.online),
                    "head": r.head,
                    "messages_since_start": r.messages,
                }
                for r in rooms
            },
        }

    def listing(self, user: str | None) -> list[dict[str, Any]]:
        return [
            {
                "room": r.name,
                "title": r.settings.title,
                "restricted": r.settings.restricted,
                "agent": r.settings.agent or None,
                "members": len(r.members),
                "online": len(r.online),
                "head": r.head,
            }
            for r in self.visible(user)
        ]
