"""The daemon's rate limits, per connection, per principal and per IP address, over the pure
buckets of :mod:`raafd.security.limits`, read from ``[limits]`` at each check (so SIGHUP
applies at once) and counted in ``raafd_rate_limited_total{limit}``.

A refusal is a :class:`~raafd.errors.RateLimited` (``rate_limited`` with ``retry_after``;
HTTP 429 with ``Retry-After``). A WebSocket connection refused ``limits.hard_limit`` times in a
row is closed 4429 by the gateway (:class:`ConnectionLimits` counts them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from raafd.config import LimitsConfig, RateConfig
from raafd.errors import RateLimited
from raafd.metrics import Metrics
from raafd.security.limits import Bucket, BucketMap, Rate, Strikes

__all__ = ["ACTIONS", "ConnectionLimits", "Limiter"]

ACTIONS = ("commands", "stream_starts", "room_sends", "typing", "job_submits")
"""What is limited per connection and per principal (the keys of ``[limits.connection]``)."""

ANONYMOUS = "anonymous"  # everyone while auth is off: not limited as one principal


def _rate(cfg: RateConfig) -> Rate:
    return Rate(cfg.rate, cfg.burst)


class ConnectionLimits(Strikes):
    """One WebSocket connection's buckets (made on first use) and its refusals in a row."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        super().__init__()
        self.buckets: dict[str, Bucket] = {}


class Limiter:
    """Checks for every limited action; ``clock`` is trio's (the tests' autojump clock)."""

    def __init__(
        self,
        config: Callable[[], LimitsConfig],
        metrics: Metrics,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        bound = config().max_tracked
        self._principals = {action: BucketMap(bound) for action in ACTIONS}
        self._ips = {"connections": BucketMap(bound), "http_requests": BucketMap(bound)}

    def check(self, action: str, conn: ConnectionLimits | None, principal: str) -> None:
        """Raise ``rate_limited`` when ``action`` (one of :data:`ACTIONS`) is over the
        connection's limit (when ``conn`` is given) or the principal's; else take a token from
        each. The connection's strikes count refusals in a row."""
        cfg = self.config()
        now = self.clock()
        wait = 0.0
        limit = ""
        taken: Bucket | None = None  # the connection's bucket a token was taken from
        if conn is not None:
            rate = _rate(getattr(cfg.connection, action))
            if not rate.unlimited:
                bucket = conn.buckets.get(action)
                if bucket is None:
                    bucket = conn.buckets[action] = Bucket(rate, now)
                wait = bucket.take(rate, now)
                limit = f"connection.{action}"
                taken = None if wait else bucket
        if not wait and principal != ANONYMOUS:
            prate = _rate(getattr(cfg.principal, action))
            wait = self._principals[action].take(principal, prate, now)
            limit = f"principal.{action}"
            if wait and taken is not None:
                taken.tokens += 1  # given back: the action does not happen
        if not wait:
            return
        self.metrics.rate_limited.labels(limit).inc()
        raise RateLimited(
            f"too many {action.replace('_', ' ')}: slow down", retry_after=_ceil(wait)
        )

    def check_ip(self, kind: str, address: str) -> float:
        """For ``connections`` and ``http_requests`` per client address: 0.0 when allowed,
        else the seconds to wait (counted in the metrics)."""
        rate = _rate(getattr(self.config().ip, kind))
        if rate.unlimited:
            return 0.0
        wait = self._ips[kind].take(address, rate, self.clock())
        if wait:
            self.metrics.rate_limited.labels(f"ip.{kind}").inc()
        return wait

    def reload(self, config: LimitsConfig) -> None:
        """Apply a new ``max_tracked`` (rates are read at each check anyway)."""
        for buckets in (*self._principals.values(), *self._ips.values()):
            buckets.bound = config.max_tracked


def _ceil(seconds: float) -> float:
    # retry_after in whole milliseconds, rounded up: a client that waits it finds a token.
    return math.ceil(seconds * 1000) / 1000
