"""A member's message rate in a room: a token bucket, as a pure function of time.

The rule: a member may send ``per_minute`` messages in a burst, and one more every
``60 / per_minute`` seconds after that. :func:`take` answers ``(state, retry_after)``:
``retry_after`` None means the message may go (a token was taken), otherwise it is how many
seconds until the next token (and the state is unchanged). The state is two floats, kept per
member (bounded by the room's ``max_members``).
"""

from __future__ import annotations

from attrs import frozen

__all__ = ["Bucket", "take"]


@frozen
class Bucket:
    tokens: float
    at: float  # when ``tokens`` was counted


def take(bucket: Bucket | None, per_minute: int, now: float) -> tuple[Bucket, float | None]:
    """Take one token at ``now`` from ``bucket`` (None: a full one)."""
    rate = per_minute / 60.0
    if bucket is None:
        tokens = float(per_minute)
    else:
        tokens = min(float(per_minute), bucket.tokens + (now - bucket.at) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), None
    return Bucket(tokens, now), round((1.0 - tokens) / rate, 3)
