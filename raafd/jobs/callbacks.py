"""Callbacks: when a job (or a whole batch) ends, its result is POSTed to its ``callback_url``.

The rule of this file: **a job owed a callback says so in the store** (``callback_state``
``pending``, written with its final state), **and every delivery attempt is recorded on it**,
until one is answered 2xx (``delivered``) or ``jobs.callback_attempts`` have failed
(``failed``). So a delivery interrupted by a crash is made again after the next start
(at-least-once; the receiver tells a repeat by its ``webhook-id``, the same on every attempt).

The body is ``{"type": "job.<state>" | "batch.<state>", "timestamp", "data": <the job or
batch as GET answers it>}``, signed as Standard Webhooks do (:mod:`raafd.net.webhooks`, given
as ``post``). A failed attempt (a transport error, a timeout, an answer that is not 2xx) waits
``callback_backoff * 2^(n-1)`` seconds before the next; a refused address (the SSRF guard)
is not retried. At most ``callback_concurrency`` deliveries run at once; ``MAX_WAITING`` more
wait in a queue, and past it a delivery is left ``pending`` in the store for the next start.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import orjson
import trio

from raafd.config import JobsConfig
from raafd.errors import BadRequest, Forbidden
from raafd.logging import get_logger
from raafd.store.jobs import Batch, Job, JobStore, bump

__all__ = ["MAX_WAITING", "Callbacks", "Post"]

log = get_logger("raafd.jobs")

Post = Callable[[str, str, bytes], Awaitable[int]]
"""Sends one delivery: (url, webhook id, body) → the answer's status; raises ``forbidden``
for an address the SSRF guard refuses, anything else for a transport failure."""

MAX_WAITING: Final = 10_000
_RECORD_TRIES: Final = 5


class Callbacks:
    """Deliveries of job and batch callbacks; run with ``await nursery.start(callbacks.run)``."""

    def __init__(
        self,
        config: JobsConfig,
        store: JobStore,
        post: Post,
        *,
        on_failure: Callable[[], None],
        describe_batch: Callable[[Batch], Awaitable[dict[str, Any]]],
        now: Callable[[], float],
    ) -> None:
        self._now = now
        self._config = config
        self._store = store
        self._post = post
        self._on_failure = on_failure
        self._describe_batch = describe_batch
        self._send, self._receive = trio.open_memory_channel[Job | Batch](MAX_WAITING)

    def deliver(self, item: Job | Batch) -> None:
        """Queue the callback of an ended job or batch (never blocks)."""
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            log.warning("callback queue full; left pending for the next start", id=item.id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The delivery tasks, and the deliveries a previous run left pending."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._config.callback_concurrency):
                nursery.start_soon(self._deliveries)
            for job in await self._store.pending_callbacks():
                self.deliver(job)
            task_status.started()

    async def _deliveries(self) -> None:
        async for item in self._receive:
            await self._deliver(item)

    async def _deliver(self, item: Job | Batch) -> None:
        cfg = self._config
        url = item.callback_url
        if url is None:  # pragma: no cover - only items with a URL are queued
            return
        if isinstance(item, Job):
            kind, data = "job", item.public()
        else:
            kind, data = "batch", await self._describe_batch(item)
        msg_id = f"{item.id}.{item.state}"
        body = orjson.dumps(
            {
                "type": f"{kind}.{item.state}",
                "timestamp": datetime.now(UTC).isoformat(),
                "data": data,
            }
        )
        for attempt in range(1, cfg.callback_attempts + 1):
            entry: dict[str, Any] = {"attempt": attempt, "at": self._now()}
            retry = True
            try:
                with trio.fail_after(cfg.callback_timeout):
                    status = await self._post(url, msg_id, body)
                entry["status"] = status
                ok = 200 <= status < 300
            except (Forbidden, BadRequest) as exc:
                entry["error"] = exc.message
                ok, retry = False, False
            except trio.TooSlowError:
                entry["error"] = f"no answer within {cfg.callback_timeout} s"
                ok = False
            except Exception as exc:  # a transport failure of any kind: recorded, retried
                entry["error"] = f"{type(exc).__name__}: {exc}"
                ok = False
            last = ok or not retry or attempt == cfg.callback_attempts
            state = "delivered" if ok else ("failed" if last else "pending")
            await self._record(item, entry, state)
            if ok:
                return
            self._on_failure()
            log.info("callback delivery failed", id=item.id, **entry)
            if last:
                return
            await trio.sleep(cfg.callback_backoff * math.pow(2, attempt - 1))

    async def _record(self, item: Job | Batch, entry: dict[str, Any], state: str) -> None:
        for _ in range(_RECORD_TRIES):
            if isinstance(item, Job):
                job = await self._store.get(item.id)
                if job is None:
                    return  # purged
                new = bump(job, callbacks=[*job.callbacks, entry], callback_state=state)
                if await self._store.update(new):
                    return
            else:
                batch = await self._store.get_batch(item.id)
                if batch is None:
                    return
                newer = attrs.evolve(
                    batch, callbacks=[*batch.callbacks, entry], version=batch.version + 1
                )
                if await self._store.update_batch(newer):
                    return
