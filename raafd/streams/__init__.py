"""The stream engine: a stream per agent run, its event log with replay, the manager that owns
their tasks, and the runner that turns a provider's output into stream events.

- ``log``: :class:`EventLog`, the bounded, pure log of one stream;
- ``stream``: :class:`Stream` (one run, its controls and timers) and :class:`Subscription`
  (a cursor into the log with backpressure, coalescing and :class:`SlowConsumer`);
- ``manager``: :class:`StreamManager`, limits, lookup, retention, drain.
"""

from raafd.streams.log import EventLog
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
