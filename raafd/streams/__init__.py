"""Agent runs: a stream per run (a lifecycle around a :class:`~raafd.core.feed.Feed`) and the
manager that owns their tasks.

- ``body``: :class:`StreamWriter`, :class:`Body` and :class:`BodyFactory`, what a run's body
  writes through and how the manager gets one (the daemon gives it the agent loop's);
- ``stream``: :class:`Stream` (one run, its controls and timers around a
  :class:`~raafd.core.feed.Feed`; :class:`Subscription` and :class:`SlowConsumer` are the
  feed's, re-exported);
- ``manager``: :class:`StreamManager`, limits, lookup, retention, drain.
"""

from raafd.core.log import EventLog
from raafd.streams.body import Body, BodyFactory, StreamWriter
from raafd.streams.manager import StreamManager
from raafd.streams.stream import (
    STATUSES,
    SlowConsumer,
    Status,
    Stream,
    Subscription,
    new_stream_id,
)

__all__ = [
    "STATUSES",
    "Body",
    "BodyFactory",
    "EventLog",
    "SlowConsumer",
    "Status",
    "Stream",
    "StreamManager",
    "StreamWriter",
    "Subscription",
    "new_stream_id",
]
