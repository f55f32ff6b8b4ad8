"""Webhooks: bus events matching a configured pattern, POSTed to a URL, signed, retried.

The rules:

- One task per ``[[webhooks]]`` entry, reading its own bus subscription: events are delivered
  one at a time, in seq order. The body is the event's JSON (``{"seq", "subject", "ts",
  "data"}``), signed as Standard Webhooks by the injected ``post`` (the daemon's:
  :mod:`raafd.net.webhooks`, which also applies the SSRF guard); ``webhook-id`` is the same on
  every attempt of one event and never reused across daemon runs.
- An attempt ends in :func:`verdict`: a 2xx is delivered; a network failure, a timeout
  (``timeout`` seconds), 408, 429 or 5xx is retried after :func:`retry_delay` (``retry_base``
  doubled at each attempt, at most ``retry_max``) until ``max_attempts``; any other answer, or
  a refusal before sending (an address the SSRF guard refuses, a bad secret), is final. An
  event that is not delivered is logged and counted, and the hook goes on with the next one.
- While a hook waits on a slow or failing endpoint its subscription falls behind; past
  ``events.queue`` events it skips ahead (the bus's ``events.lagged``): the skipped events are
  logged and counted as missed, never delivered late. So a hook holds at most its subscription
  and the one event in flight.
- A reload replaces the hooks: the new ones subscribe at once (nothing emitted after the reload
  is missed), then the old ones are cancelled, an event in its retries included.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import trio

from raafd.bus.bus import EVENT, Bus
from raafd.config import WebhookConfig
from raafd.core.feed import Subscription
from raafd.errors import RaafdError
from raafd.logging import get_logger
from raafd.metrics import Metrics

__all__ = ["Post", "Verdict", "Webhooks", "retry_delay", "verdict"]

log = get_logger("raafd.webhooks")

Post = Callable[[WebhookConfig, str, int, bytes], Awaitable[int]]
"""Send one signed attempt: ``(hook, webhook_id, timestamp, body)`` → the HTTP status. Raises
:class:`~raafd.errors.RaafdError` for a final refusal before sending (SSRF guard), anything
else (``OSError``, httpx's errors) for a failure worth retrying."""

Verdict = Literal["delivered", "retry", "refused"]


def verdict(status: int | None) -> Verdict:
    """What an attempt's answer (None: no answer, a network failure or a timeout) means."""
    if status is None or status in (408, 429) or status >= 500:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    return "refused"


def retry_delay(hook: WebhookConfig, attempt: int) -> float | None:
    """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one; None
    when it was the last."""
    if attempt >= hook.max_attempts:
        return None
    return float(min(hook.retry_max, hook.retry_base * 2 ** (attempt - 1)))


class Webhooks:
    """See the module docstring. ``hooks()`` is the ``[[webhooks]]`` list now; ``post`` sends
    one attempt. Run it in the daemon's nursery; :meth:`reload` after a configuration change."""

    def __init__(
        self,
        bus: Bus,
        hooks: Callable[[], Sequence[WebhookConfig]],
        post: Post,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bus = bus
        self._hooks = hooks
        self._post = post
        self._metrics = metrics
        self._clock = clock
        self._boot = secrets.token_hex(6)  # webhook-ids are unique across daemon runs
        self._next: list[tuple[WebhookConfig, Subscription]] = self._subscribe()
        self._scope: trio.CancelScope | None = None
        self._changed = trio.Event()

    def _subscribe(self) -> list[tuple[WebhookConfig, Subscription]]:
        out = []
        for hook in self._hooks():
            subscription = self._bus.subscribe(hook.pattern, context={"webhook": hook.url})
            subscription.open()
            out.append((hook, subscription))
        return out

    def reload(self) -> None:
        """Take the hooks configured now (see the module docstring)."""
        for _, old in self._next:
            old.close()
        self._next = self._subscribe()
        if self._scope is not None:
            self._scope.cancel()
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        task_status.started()
        while True:
            current, self._next = self._next, []
            self._changed = trio.Event()
            try:
                with trio.CancelScope() as self._scope:
                    async with trio.open_nursery() as nursery:
                        for hook, subscription in current:
                            nursery.start_soon(self._serve, hook, subscription)
                        await self._changed.wait()
                        nursery.cancel_scope.cancel()
            finally:
                self._scope = None
                for _, subscription in current:
                    subscription.close()

    async def _serve(self, hook: WebhookConfig, subscription: Subscription) -> None:
        async for batch in subscription:
            for event in batch:
                if event.kind != EVENT:
                    missed = event.fields["missed_to"] - event.fields["missed_from"] + 1
                    self._count("missed", missed)
                    log.warning(
                        "webhook fell behind; events skipped",
                        url=hook.url,
                        missed_from=event.fields["missed_from"],
                        missed_to=event.fields["missed_to"],
                    )
                    continue
                await self._deliver(hook, f"msg_{self._boot}_{event.seq}", event.json, event.seq)

    async def _deliver(self, hook: WebhookConfig, msg_id: str, body: bytes, seq: int) -> None:
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            error = ""
            with trio.move_on_after(hook.timeout):
                try:
                    status = await self._post(hook, msg_id, int(self._clock()), body)
                except RaafdError as err:
                    self._count("refused")
                    log.warning("webhook refused", url=hook.url, seq=seq, reason=err.message)
                    return
                except Exception as exc:  # a network failure: worth another attempt
                    error = type(exc).__name__
            outcome = verdict(status)
            if outcome == "delivered":
                self._count("delivered")
                return
            if outcome == "refused":
                self._count("refused")
                log.warning("webhook answered a final error", url=hook.url, seq=seq, status=status)
                return
            delay = retry_delay(hook, attempt)
            if delay is None:
                self._count("failed")
                log.warning(
                    "webhook not delivered; attempts used up",
                    url=hook.url,
                    seq=seq,
                    attempts=attempt,
                    status=status,
                    error=error or None,
                )
                return
            self._metrics.webhook_retries.inc()
            log.info("webhook attempt failed; retrying", url=hook.url, seq=seq, delay=delay)
            await trio.sleep(delay)

    def _count(self, outcome: str, n: int = 1) -> None:
        self._metrics.webhook_deliveries.labels(outcome).inc(n)
