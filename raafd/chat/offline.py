"""Offline queues with acknowledgements, and direct messages (``dm.send``) through them.

The rule of this file: **a queued message leaves its queue only by an ``ack`` that committed,
by expiry, or by being the oldest of a full queue; until then every connection of its user
gets it, and gets it again if it does not acknowledge it in time.**

- A direct message is stored in the recipient's queue (:mod:`raafd.store.offline`) and
  ``dm.sent`` answered only after that commit. It is then pushed at once, as a ``queued``
  frame, to each connection the recipient has open.
- Each connection of a user has an :class:`_Inbox`: the ids sent to it, and when. When the
  connection opens (the gateway's connection hook, right after ``welcome``) its user's whole
  queue is sent, oldest first, in ``queued`` frames. A message sent to a connection and not
  acknowledged within ``chat.redeliver_after`` is sent to it again (counted as a
  redelivery); a new connection gets everything not acknowledged. A connection is sent at
  most the first 1,000 messages of its queue at a time; the next ones follow its acks.
- ``ack {ids}`` deletes the user's own messages with those ids (durably) and answers ``acked``
  after the commit; its other connections forget them too.
- Expired messages (older than ``chat.offline_ttl``) are never sent (the store does not return
  them) and are deleted by a reaper.

Tasks: one timer heap and one worker task for every connection's redelivery (the timer only
marks an inbox due; the worker reads the store and sends), and one reaper; all in
:meth:`OfflineQueues.run`'s nursery. Sending never waits: ``send_nowait`` closes a connection
too far behind to take a frame (4001), and what it missed it gets on its next connection.
A sync and a push racing for one inbox cannot lose a message: a push that finds the inbox
syncing marks it dirty, and the sync reads the store again.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import trio

from raafd.chat.presence import Client, PresenceService
from raafd.chat.wallclock import WallClock
from raafd.config import ChatConfig
from raafd.errors import RaafdError, TooLarge
from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.store.base import StoreUnavailable
from raafd.store.offline import NewMessage, OfflineStore, QueuedMessage
from raafd.timers import Timers

__all__ = ["OfflineQueues"]

log = get_logger("raafd.chat")

# A `queued` frame holds at most this many messages or (roughly) bytes of text, so a long
# queue reaches a client in frames it can take (trio-websocket's default limit is 1 MiB).
_FRAME_MESSAGES: Final = 100
_FRAME_BYTES: Final = 256 * 1024
# A sync sends at most the first this many messages of a queue; the next ones follow acks
# (flow control: a connection's send queue holds a few frames, not a whole long queue).
_WINDOW: Final = 1000
_ROOM_BACKLOG: Final = 1000  # room messages waiting to be queued for offline members
_REAP_EVERY: Final = 60.0  # seconds between deletions of expired messages
_REAP_BATCH: Final = 1000


class _Inbox:
    """One connection's deliveries: message id → when it was last sent (trio time)."""

    __slots__ = ("_queues", "_timer_at", "client", "dirty", "more", "sent", "syncing")

    def __init__(self, queues: OfflineQueues, client: Client) -> None:
        self._queues = queues
        self._timer_at = math.inf
        self.client = client
        self.sent: dict[str, float] = {}
        self.syncing = False
        self.dirty = False
        self.more = False  # the last sync saw a full window: more follow acks

    def _on_timer(self, now: float) -> None:
        self._queues._timer_fired(self, now)


class OfflineQueues:
    """See the module docstring. :attr:`store` is set by the daemon once its stores are open;
    :meth:`run` must run for redeliveries and expiry."""

    def __init__(
        self,
        config: Callable[[], ChatConfig],
        presence: PresenceService,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.presence = presence
        self.metrics = metrics
        self.store: OfflineStore | None = None
        self._inboxes: dict[str, dict[str, _Inbox]] = {}  # user → conn id → inbox
        self._timers = Timers()
        self._due: dict[int, _Inbox] = {}  # inboxes whose redelivery is due, in order
        self._wake = trio.lowlevel.ParkingLot()
        self._rooms: deque[tuple[list[str], NewMessage]] = deque()  # to queue, oldest first
        self._room_wake = trio.lowlevel.ParkingLot()

    @property
    def clock(self) -> WallClock:
        return self.presence.clock

    def _store(self) -> OfflineStore:
        if self.store is None:
            raise StoreUnavailable("the offline store is not open yet")
        return self.store

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Redeliver and expire until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._timers.run)
            nursery.start_soon(self._redeliver)
            nursery.start_soon(self._reap)
            nursery.start_soon(self._queue_room_messages)
            task_status.started()

    # --- direct messages ----------------------------------------------------------------------

    async def send_dm(
        self, sender: str, to: str, text: str, client_id: str | None
    ) -> QueuedMessage:
        """Queue a direct message for ``to`` (durable when this returns) and push it to their
        open connections. A resend with the same ``client_id`` returns the first message."""
        cfg = self.config()
        if len(text) > cfg.max_message_length:
            raise TooLarge(f"text is over {cfg.max_message_length} characters", field="text")
        now = self.clock()
        message = NewMessage(
            kind="dm",
            sender=sender,
            text=text,
            ts=now,
            expires_at=now + cfg.offline_ttl,
            client_id=client_id,
        )
        done = await self._store().enqueue(
            to, message, max_queue=cfg.offline_max, max_total=cfg.offline_max_total
        )
        if done.duplicate:
            return done.message
        self.metrics.offline_queued.labels("dm").inc()
        if done.dropped:
            self.metrics.offline_dropped.inc(done.dropped)
            log.info("offline queue full: oldest dropped", user=to, dropped=done.dropped)
        self._push(to, done.message)
        return done.message

    # --- room messages for offline members --------------------------------------------------

    def room_message(
        self, room: str, members: Iterable[str], sender: str, text: str, ts: float
    ) -> int:
        """A room message is stored (its room has ``offline_delivery``): queue it for each of
        ``members`` (the sender excepted) with no connection open now; how many those are.
        Never waits: the queueing happens in the service's task, after the room's own answer
        (the room's history has the message durably already). At most ``_ROOM_BACKLOG``
        messages wait for it; past that the oldest waiting is dropped (counted)."""
        offline = [u for u in members if u != sender and not self.presence.connections(u)]
        if not offline:
            return 0
        cfg = self.config()
        message = NewMessage(
            kind="room",
            sender=sender,
            text=text,
            ts=ts,
            expires_at=ts + cfg.offline_ttl,
            room=room,
        )
        self._rooms.append((offline, message))
        if len(self._rooms) > _ROOM_BACKLOG:
            lost, _ = self._rooms.popleft()
            self.metrics.offline_dropped.inc(len(lost))
            log.warning("room messages for offline members dropped", room=room, users=len(lost))
        self._room_wake.unpark_all()
        return len(offline)

    async def _queue_room_messages(self) -> None:
        """The one task that puts room messages in offline members' queues: each message's
        queues written concurrently, so the store's group commit makes them one commit."""
        while True:
            while not self._rooms:
                await self._room_wake.park()
            users, message = self._rooms.popleft()
            async with trio.open_nursery() as nursery:
                for user in users:
                    nursery.start_soon(self._put_room_message, user, message)

    async def _put_room_message(self, user: str, message: NewMessage) -> None:
        cfg = self.config()
        try:
            done = await self._store().enqueue(
                user, message, max_queue=cfg.offline_max, max_total=cfg.offline_max_total
            )
        except RaafdError as err:  # full, or the store is unavailable
            self.metrics.offline_dropped.inc()
            log.warning("room message not queued", user=user, error=err.message)
            return
        self.metrics.offline_queued.labels("room").inc()
        self.metrics.offline_dropped.inc(done.dropped)
        self._push(user, done.message)  # connected meanwhile

    # --- acknowledgements ---------------------------------------------------------------------

    async def ack(self, user: str, ids: Sequence[str]) -> int:
        """Delete ``user``'s messages ``ids`` (durable when this returns); how many there
        were."""
        deleted = await self._store().ack(user, ids)
        self.metrics.offline_acked.inc(deleted)
        for inbox in self._inboxes.get(user, {}).values():
            for id_ in ids:
                inbox.sent.pop(id_, None)
            self._arm(inbox)
            if inbox.more and deleted:
                self._schedule(inbox)  # room in the window: the next ones
        return deleted

    async def listing(self, user: str, limit: int) -> tuple[int, list[QueuedMessage]]:
        """For operators: how many messages wait for ``user`` and the first ``limit``."""
        store = self._store()
        now = self.clock()
        return await store.depth(user, now), await store.pending(user, now, limit)

    def stats(self) -> dict[str, Any]:
        return {
            "depth": self.store.total() if self.store is not None else 0,
            "connections": sum(len(inboxes) for inboxes in self._inboxes.values()),
        }

    def refresh_gauges(self) -> None:
        if self.store is not None:
            self.metrics.offline_depth.labels().set(self.store.total())

    # --- the gateway's connection hooks -------------------------------------------------------

    async def connected(self, client: Client) -> None:
        inbox = _Inbox(self, client)
        self._inboxes.setdefault(client.user, {})[client.id] = inbox
        try:
            await self._sync(inbox)
        except RaafdError as err:  # the store is unavailable: the worker tries again later
            log.warning("offline queue delivery failed", user=client.user, error=err.message)
            self._timers.arm(inbox, trio.current_time() + self.config().redeliver_after)

    def activity(self, client: Client, kind: str) -> None:
        pass

    def disconnected(self, client: Client) -> None:
        inboxes = self._inboxes.get(client.user)
        if inboxes is None:
            return
        inbox = inboxes.pop(client.id, None)
        if not inboxes:
            del self._inboxes[client.user]
        if inbox is not None:
            self._timers.disarm(inbox)
            self._due.pop(id(inbox), None)

    # --- delivery -----------------------------------------------------------------------------

    def _registered(self, inbox: _Inbox) -> bool:
        return self._inboxes.get(inbox.client.user, {}).get(inbox.client.id) is inbox

    def _push(self, user: str, message: QueuedMessage) -> None:
        for inbox in list(self._inboxes.get(user, {}).values()):
            if inbox.syncing:
                inbox.dirty = True  # the sync reads the store again: it gets this one
                continue
            self._send(inbox, [message], redelivered=0)

    def _send(self, inbox: _Inbox, messages: list[QueuedMessage], redelivered: int) -> None:
        now = trio.current_time()
        for message in messages:
            inbox.sent[message.id] = now
        frame: list[dict[str, Any]] = []
        size = 0
        for message in messages:
            frame.append(message.to_wire())
            size += len(message.text) + 64
            if len(frame) >= _FRAME_MESSAGES or size >= _FRAME_BYTES:
                inbox.client.send_nowait({"type": "queued", "messages": frame})
                frame, size = [], 0
        if frame:
            inbox.client.send_nowait({"type": "queued", "messages": frame})
        self.metrics.offline_delivered.inc(len(messages))
        self.metrics.offline_redelivered.inc(redelivered)
        self._arm(inbox)

    async def _sync(self, inbox: _Inbox) -> None:
        """Send ``inbox`` every queued message it has not been sent, or was sent more than
        ``redeliver_after`` ago; forget what left the queue."""
        if inbox.syncing:
            inbox.dirty = True
            return
        inbox.syncing = True
        try:
            while True:
                inbox.dirty = False
                cfg = self.config()
                window = min(cfg.offline_max, _WINDOW)
                messages = await self._store().pending(inbox.client.user, self.clock(), window)
                if not self._registered(inbox):
                    return  # the connection closed while the store was read
                inbox.more = len(messages) >= window
                now = trio.current_time()
                live = {m.id for m in messages}
                for id_ in [i for i in inbox.sent if i not in live]:
                    del inbox.sent[id_]
                send = []
                redelivered = 0
                for message in messages:
                    sent_at = inbox.sent.get(message.id)
                    if sent_at is None:
                        send.append(message)
                    elif sent_at + cfg.redeliver_after <= now:
                        send.append(message)
                        redelivered += 1
                if send:
                    self._send(inbox, send, redelivered)
                else:
                    self._arm(inbox)
                if not inbox.dirty:
                    return
        finally:
            inbox.syncing = False

    def _arm(self, inbox: _Inbox) -> None:
        if not inbox.sent or not self._registered(inbox):
            self._timers.disarm(inbox)
            return
        due = min(inbox.sent.values()) + self.config().redeliver_after
        self._timers.arm(inbox, due)

    def _timer_fired(self, inbox: _Inbox, now: float) -> None:
        if not self._registered(inbox):
            return
        if inbox.sent:  # (empty: a sync that failed is tried again)
            due = min(inbox.sent.values()) + self.config().redeliver_after
            if due > now:  # acknowledged or sent again since it was armed
                self._timers.arm(inbox, due)
                return
        self._schedule(inbox)

    def _schedule(self, inbox: _Inbox) -> None:
        self._due[id(inbox)] = inbox
        self._wake.unpark_all()

    async def _redeliver(self) -> None:
        """The one worker that syncs inboxes whose redelivery is due, one at a time."""
        while True:
            while not self._due:
                await self._wake.park()
            key = next(iter(self._due))
            inbox = self._due.pop(key)
            try:
                await self._sync(inbox)
            except RaafdError as err:  # the store is unavailable: try again later
                log.warning("redelivery failed", user=inbox.client.user, error=err.message)
                self._timers.arm(inbox, trio.current_time() + self.config().redeliver_after)

    async def _reap(self) -> None:
        """Delete expired messages every minute."""
        while True:
            await trio.sleep(_REAP_EVERY)
            if self.store is None:
                continue
            try:
                while True:
                    deleted = await self.store.expire(self.clock(), _REAP_BATCH)
                    self.metrics.offline_expired.inc(deleted)
                    if deleted < _REAP_BATCH:
                        break
            except RaafdError as err:
                log.warning("deleting expired offline messages failed", error=err.message)
