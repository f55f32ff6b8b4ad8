"""What the HTTP adapters receive instead of the daemon: the services they use.

The daemon (the composition root) builds one of these and hands it to the routes and to the raw
streaming server; an adapter never sees the daemon object. A subsystem's routes take what they
need beside it (the session routes take the store, the workflow routes a starter), as its
gateway commands do (:mod:`raafd.gateway.table`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import frozen

from raafd.auth import TokenCheck
from raafd.config import Config
from raafd.metrics import Metrics
from raafd.net.delivery import Delivery, Framing, Sink
from raafd.security.guard import Guard

if TYPE_CHECKING:
    from raafd.core.feed import Subscription
    from raafd.streams import StreamManager

__all__ = ["HttpContext", "StreamingContext"]


@frozen
class HttpContext:
    """What every HTTP adapter reads. Getters, not values, where a reload or a drain changes
    the answer."""

    config: Callable[[], Config]  # the running configuration (reloadable sections change)
    metrics: Metrics
    authenticator: Callable[[], TokenCheck]  # whom tokens stand for now (reloadable)
    guard: Guard  # the role policy and the rate limits
    draining: Callable[[], bool]  # the daemon is draining: start nothing new


@frozen
class StreamingContext(HttpContext):
    """... and the stream manager: for the ``/v1/streams`` routes, the OpenAI-compatible API,
    the workflow routes and the raw streaming server."""

    streams: StreamManager

    def delivery(self, subscription: Subscription, framing: Framing, sink: Sink) -> Delivery:
        """A streaming response's :class:`~raafd.net.delivery.Delivery`: counted under the
        framing's transport, with the running config's heartbeat."""
        return Delivery(
            subscription,
            framing,
            sink,
            self.metrics.events_sent.labels(framing.transport),
            heartbeat=self.config().http.heartbeat_interval,
        )
