"""Rate limits as token buckets: pure rules over (bucket, now), no clock read here.

The rule of this file: a bucket of ``burst`` tokens refills at ``rate`` tokens a second up to
``burst``; an action that finds a whole token takes it and goes on, one that does not is refused
with the seconds until a token will be there (``retry_after``) and takes nothing. So over any
window of ``t`` seconds at most ``burst + rate * t`` actions are accepted, whatever the attacker
sends. The rate is passed at each check, not kept in the bucket: a reload (SIGHUP) applies to
every bucket at once, and a bucket is two floats (``__slots__``), cheap on the hot path.

Buckets keyed by client input (a principal, an IP address) live in a :class:`BucketMap` with a
bound: at the bound the least recently used key is forgotten, which gives that key a full
bucket again the next time (documented behaviour at the bound, docs/operations.md).
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import frozen

__all__ = ["Bucket", "BucketMap", "Rate", "Strikes"]


@frozen
class Rate:
    """``per_second`` tokens a second, at most ``burst`` saved up. ``per_second == 0`` means
    no limit (every check passes, no bucket is kept)."""

    per_second: float
    burst: float

    @property
    def unlimited(self) -> bool:
        return self.per_second <= 0


class Bucket:
    """One token bucket: its tokens at ``stamp`` (a trio clock reading)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self.tokens = rate.burst
        self.stamp = now

    def take(self, rate: Rate, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: ``0.0`` when taken, else the seconds until they would be
        there (nothing taken). A clock that went back refills nothing."""
        elapsed = now - self.stamp
        tokens = self.tokens
        if elapsed > 0:
            tokens = min(rate.burst, tokens + elapsed * rate.per_second)
            self.stamp = now
        if tokens >= cost:
            self.tokens = tokens - cost
            return 0.0
        self.tokens = tokens
        return (cost - tokens) / rate.per_second

    def full_at(self, rate: Rate) -> float:
        """When this bucket is full again (so forgetting it would change nothing)."""
        return self.stamp + (rate.burst - self.tokens) / rate.per_second


class BucketMap:
    """Buckets per key (a principal, an IP address, …), at most ``bound`` of them: the least
    recently used is forgotten at the bound."""

    __slots__ = ("_buckets", "bound")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, rate: Rate, now: float, cost: float = 1.0) -> float:
        """:meth:`Bucket.take` on ``key``'s bucket (a new key starts full)."""
        if rate.unlimited:
            return 0.0
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            while len(buckets) >= self.bound:
                buckets.popitem(last=False)
            bucket = buckets[key] = Bucket(rate, now)
        else:
            buckets.move_to_end(key)
        return bucket.take(rate, now, cost)

    def forget_full(self, rate: Rate, now: float) -> int:
        """Drop the buckets that are full by ``now`` (equivalent to absent); how many."""
        if rate.unlimited:
            n = len(self._buckets)
            self._buckets.clear()
            return n
        full = [key for key, b in self._buckets.items() if b.full_at(rate) <= now]
        for key in full:
            del self._buckets[key]
        return len(full)


class Strikes:
    """Refusals in a row of one connection: the ``limit``-th closes it (4429). An accepted
    action starts the count again."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def refused(self, limit: int) -> bool:
        """Count a refusal; True when this one reaches ``limit`` (0: never)."""
        self.count += 1
        return 0 < limit <= self.count

    def accepted(self) -> None:
        self.count = 0
