"""Retrying a provider before its first delta, never after.

The rule of this module: a retry must be invisible in the answer. Until the provider has sent
its first :class:`Delta`, nothing of the answer has reached anyone, so a retryable failure is
retried after a backoff, and the consumer only sees a :class:`RetryNotice` (a ``retry`` stream
event). Once a delta went out, retrying would repeat or contradict tokens already delivered, so
the failure is raised as it is.

Backoff is exponential with full jitter, ``uniform(0, min(cap, base * 2 ** (attempt - 1)))``,
but never shorter than the upstream's ``Retry-After``. A ``Retry-After`` longer than ``cap`` is
not waited for: the error is raised with its ``retry_after``, so the client hears when to come
back instead of holding a stream open for it.
"""

from __future__ import annotations

import random

import trio

from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.providers.base import (
    Delta,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    RetryNotice,
    Sink,
)

__all__ = ["DeltaWatch", "backoff_delay", "stream_with_retry"]

log = get_logger("raafd.providers")

_RNG = random.Random()  # jitter only; seeding a Random per call reads os.urandom every time


class DeltaWatch:
    """A sink that passes events on to ``inner``, counting the deltas that went out and
    numbering retry notices 1, 2, 3... in the order they pass.

    Retry and fallback both need to know whether a delta went out, and fallback numbers retries
    across its chain; one watch serves both (:func:`stream_with_retry` uses the sink it is given
    when that is a watch already), so a token passes through one wrapper, not two."""

    __slots__ = ("_inner", "deltas", "retries")

    def __init__(self, inner: Sink) -> None:
        self._inner = inner
        self.deltas = 0
        self.retries = 0

    async def send(self, value: ProviderEvent, /) -> None:
        if isinstance(value, RetryNotice):
            self.retries += 1
            value = RetryNotice(
                attempt=self.retries, reason=value.reason, retry_after=value.retry_after
            )
            await self._inner.send(value)
            return
        await self._inner.send(value)
        if isinstance(value, Delta):
            self.deltas += 1


def backoff_delay(
    attempt: int, *, base: float, cap: float, retry_after: float | None, rng: random.Random
) -> float:
    """Seconds to wait before retry number ``attempt`` (from 1)."""
    delay = rng.uniform(0.0, min(cap, base * 2.0 ** (attempt - 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


async def stream_with_retry(
    provider: Provider,
    request: ProviderRequest,
    send: Sink,
    *,
    max_retries: int,
    base: float,
    cap: float,
    metrics: Metrics | None,
    rng: random.Random | None = None,
) -> None:
    """Like ``provider.stream(request, send)``, retrying retryable failures that happen before
    the first delta up to ``max_retries`` times (see the module docstring). Every failure is
    counted in ``upstream_errors``, every retry in ``upstream_retries``, by provider and
    reason."""
    rng = rng if rng is not None else _RNG
    watch = send if isinstance(send, DeltaWatch) else DeltaWatch(send)
    attempt = 0
    while True:
        before = watch.deltas
        try:
            await provider.stream(request, watch)
            return
        except ProviderError as exc:
            if metrics is not None:
                metrics.upstream_errors.labels(provider.name, exc.reason).inc()
            if watch.deltas != before or not exc.retryable or attempt >= max_retries:
                raise
            if exc.retry_after is not None and exc.retry_after > cap:
                raise
            attempt += 1
            delay = backoff_delay(attempt, base=base, cap=cap, retry_after=exc.retry_after, rng=rng)
            if metrics is not None:
                metrics.upstream_retries.labels(provider.name, exc.reason).inc()
            log.info(
                "upstream_retry",
                provider=provider.name,
                attempt=attempt,
                reason=exc.reason,
                status=exc.status,
                delay=round(delay, 3),
            )
            await watch.send(RetryNotice(attempt=attempt, reason=exc.reason, retry_after=delay))
        await trio.sleep(delay)
