"""The stream engine: a stream per agent run, its event log with replay, the manager that owns
their tasks, and the runner that turns a provider's output into stream events.

- ``stream``: :class:`Stream` (one run, its controls and timers around a
  :class:`~raafd.core.feed.Feed`; :class:`Subscription` and :class:`SlowConsumer` are the
  feed's, re-exported);
- ``manager``: :class:`StreamManager`, limits, lookup, retention, drain.
"""

from raafd.core.log import EventLog
from raafd.streams.manager import StreamManager
from raafd.streams.stream import (
    STATUSES,
    Body,
    SlowConsumer,
    Status,
    Stream,
    StreamWriter,
    Subscription,
    new_stream_id,
)

__all__ = [
    "STATUSES",
    "Body",
    "EventLog",
    "SlowConsumer",
    "Status",
    "Stream",
    "StreamManager",
    "StreamWriter",
    "Subscription",
    "new_stream_id",
]
