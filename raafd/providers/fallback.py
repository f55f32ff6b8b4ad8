"""Falling back to the next provider before the first delta, never after.

The rule of this module is the retry rule one level up: switching providers must be invisible
in the answer. A request goes to the agent's provider, then to each ``fallback`` provider in
order, and moves on only while nothing of the answer has been sent:

- a provider whose circuit is open (see ``breaker``) is skipped at once;
- a provider that fails before its first :class:`Delta`, after
  :func:`~raafd.providers.retry.stream_with_retry` spent its own retries, is left for the next.

Each move on sends a :class:`RetryNotice` (``retry_after`` 0: the next provider is tried now;
``reason`` says why the last one was left: ``circuit_open`` or the failure's reason) and counts
in ``upstream_retries``. Retry notices are numbered across the whole chain, so a client sees
``attempt`` 1, 2, 3... for one request. Once a delta went out, a failure is raised as it is.
When every provider failed, the error names them all (provider names and their errors'
client-safe messages, nothing else).

Every call let through a breaker reports back: success, failure, or no verdict (cancelled,
or a ``bad_request`` answer, which says the upstream is up and the request is at fault).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio

from raafd.logging import get_logger
from raafd.metrics import Metrics
from raafd.providers.base import Provider, ProviderError, ProviderRequest, RetryNotice, Sink
from raafd.providers.breaker import Breakers
from raafd.providers.retry import DeltaWatch, stream_with_retry

__all__ = ["default_model", "stream_with_fallback"]

log = get_logger("raafd.providers")

# Failures that say nothing about the upstream's health: no breaker verdict.
_NO_VERDICT = frozenset({"bad_request"})


def default_model(provider: Provider) -> str:
    """The model a provider uses when the agent names none: its configured ``model``, else the
    provider's name."""
    config = getattr(provider, "config", None)
    model = getattr(config, "model", "")
    return model if isinstance(model, str) and model else provider.name


async def stream_with_fallback(
    chain: Sequence[tuple[Provider, ProviderRequest]],
    send: Sink,
    *,
    breakers: Breakers,
    metrics: Metrics | None,
    rng: random.Random | None = None,
) -> None:
    """Stream the answer of the first provider of ``chain`` that gives one into ``send`` (see
    the module docstring). Each entry is a provider and the request for it (the model may
    differ per provider). Raises :class:`ProviderError`."""
    if not chain:
        raise ProviderError("no provider is available for this agent", reason="unavailable")
    relay = DeltaWatch(send)  # numbers retry notices across the chain; counts deltas
    failures: list[tuple[str, str]] = []  # (provider, what happened), for the final error
    last: ProviderError | None = None
    hints: list[float] = []  # retry_after hints of the failures, for the final error
    for position, (provider, request) in enumerate(chain):
        has_next = position + 1 < len(chain)
        breaker = breakers.get(provider.name)
        if not breaker.allow(trio.current_time()):
            retry_in = breaker.retry_in(trio.current_time())
            log.info("circuit open; provider skipped", provider=provider.name, retry_in=retry_in)
            failures.append((provider.name, "circuit open"))
            hints.append(retry_in)
            last = ProviderError(
                f"provider {provider.name!r} is unavailable (circuit open)",
                reason="circuit_open",
                retry_after=round(retry_in, 3) or None,
            )
            if has_next:
                await _move_on(relay, provider.name, "circuit_open", metrics)
            continue
        verdict = False
        try:
            await stream_with_retry(
                provider,
                request,
                relay,
                max_retries=provider.config.max_retries,
                base=provider.config.retry_base,
                cap=provider.config.retry_max,
                metrics=metrics,
                rng=rng,
            )
            breaker.record_success(trio.current_time())
            verdict = True
            return
        except ProviderError as exc:
            if exc.reason in _NO_VERDICT:
                breaker.release()
            else:
                breaker.record_failure(trio.current_time())
            verdict = True
            if relay.deltas:
                raise
            failures.append((provider.name, exc.message))
            if exc.retry_after is not None:
                hints.append(exc.retry_after)
            last = exc
            if has_next:
                log.info("provider failed; falling back", provider=provider.name, reason=exc.reason)
                await _move_on(relay, provider.name, exc.reason, metrics)
        finally:
            if not verdict:  # cancelled, or crashed: nothing learnt about the upstream
                breaker.release()
    assert last is not None
    if len(chain) == 1:
        raise last
    summary = "; ".join(f"{name}: {what}" for name, what in failures)
    raise ProviderError(
        f"every provider failed ({summary})",
        reason="all_failed",
        retry_after=round(min(hints), 3) if hints and min(hints) > 0 else None,
    )


async def _move_on(relay: DeltaWatch, provider: str, reason: str, metrics: Metrics | None) -> None:
    if metrics is not None:
        metrics.upstream_retries.labels(provider, reason).inc()
    await relay.send(RetryNotice(attempt=0, reason=reason, retry_after=0.0))
