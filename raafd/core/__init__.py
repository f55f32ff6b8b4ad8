"""The feed core: transport-free, provider-free.

- ``log``: :class:`EventLog`, a feed's bounded, pure event log;
- ``feed``: :class:`Feed` (the log, fan-out, a backpressure policy, guarded pushes) and
  :class:`Subscription` (a cursor into the log).

Agent streams (:mod:`raafd.streams`) are a run lifecycle around a feed; rooms, jobs' output and
the event bus are feeds too, and every transport delivers any of them through
:mod:`raafd.net.delivery`.
"""

from raafd.core.feed import (
    Backpressure,
    Feed,
    FeedLimits,
    SlowConsumer,
    SubscriberFailed,
    Subscription,
)
from raafd.core.log import EventLog

__all__ = [
    "Backpressure",
    "EventLog",
    "Feed",
    "FeedLimits",
    "SlowConsumer",
    "SubscriberFailed",
    "Subscription",
]
