"""The offline queues in memory: the SQLite store's behaviour without a disk or a thread.

For tests (an autojump clock sees all of its work) and throwaway runs: **nothing survives a
restart.** Every call checks for cancellation, does all of its work synchronously, then yields,
so a cancelled call changed nothing and a returned one is whole. Bounds and rules: see
:mod:`raafd.store.offline`.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import trio

from raafd.store.offline import Enqueued, NewMessage, QueuedMessage, QueueFull

__all__ = ["MemoryOfflineStore"]


class MemoryOfflineStore:
    """:class:`~raafd.store.offline.OfflineStore` in memory."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        # user → id number → message, oldest first (ids increase)
        self._queues: dict[str, OrderedDict[int, QueuedMessage]] = {}
        # (sender, client_id) → (recipient, message), oldest first
        self._keys: OrderedDict[tuple[str, str], QueuedMessage] = OrderedDict()
        self._total = 0

    async def enqueue(
        self, user: str, message: NewMessage, *, max_queue: int, max_total: int
    ) -> Enqueued:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            if message.client_id is not None:
                first = self._keys.get((message.sender, message.client_id))
                if first is not None:
                    return Enqueued(first, duplicate=True)
            if self._total >= max_total:
                raise QueueFull("the offline queues are full; try again later", retry_after=60)
            number = next(self._ids)
            stored = message.stored(str(number))
            queue = self._queues.setdefault(user, OrderedDict())
            queue[number] = stored
            self._total += 1
            dropped = 0
            while len(queue) > max_queue:
                queue.popitem(last=False)
                self._total -= 1
                dropped += 1
            if message.client_id is not None:
                self._keys[(message.sender, message.client_id)] = stored
                while len(self._keys) > max_total:
                    self._keys.popitem(last=False)
            return Enqueued(stored, dropped=dropped)
        finally:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def pending(self, user: str, now: float, limit: int) -> list[QueuedMessage]:
        await trio.lowlevel.checkpoint()
        found: list[QueuedMessage] = []
        for message in self._queues.get(user, OrderedDict()).values():
            if message.expires_at > now:
                found.append(message)
                if len(found) >= limit:
                    break
        return found

    async def depth(self, user: str, now: float) -> int:
        await trio.lowlevel.checkpoint()
        return sum(1 for m in self._queues.get(user, {}).values() if m.expires_at > now)

    async def ack(self, user: str, ids: Sequence[str]) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        queue = self._queues.get(user)
        deleted = 0
        if queue is not None:
            for id_ in ids:
                if id_.isdigit() and queue.pop(int(id_), None) is not None:
                    deleted += 1
            if not queue:
                del self._queues[user]
        self._total -= deleted
        await trio.lowlevel.cancel_shielded_checkpoint()
        return deleted

    async def expire(self, now: float, limit: int) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        deleted = 0
        for user in list(self._queues):
            queue = self._queues[user]
            for number in [n for n, m in queue.items() if m.expires_at <= now]:
                if deleted >= limit:
                    break
                del queue[number]
                deleted += 1
            if not queue:
                del self._queues[user]
        self._total -= deleted
        for key in [k for k, m in self._keys.items() if m.expires_at <= now]:
            del self._keys[key]
        await trio.lowlevel.cancel_shielded_checkpoint()
        return deleted

    def total(self) -> int:
        return self._total
