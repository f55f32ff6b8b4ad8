"""Prometheus metrics. One :class:`Metrics` per daemon, on its own registry (so several daemons
can live in one test process); components receive it from the composition root.

The metrics touched for every token (events appended and sent, the token-gap histogram) and for
every stream are :class:`LoopCounter`, :class:`LoopGauge` and :class:`LoopHistogram`: plain
float additions, read by the registry when it renders. prometheus_client's own take a lock and
walk their buckets on every update, about 1.5 µs each, several per token. They may be updated
only from the daemon's trio thread (every caller of them is), which is what makes the lock
unnecessary; the rest keep prometheus_client's types.
"""

from __future__ import annotations

import gc
import math
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["LoopCounter", "LoopGauge", "LoopHistogram", "Metrics", "observing_gc"]


class LoopValue:
    """One labelled child of a :class:`LoopCounter` or :class:`LoopGauge`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class LoopCounter:
    """A counter updated from the trio thread only (see the module docstring). ``labels(...)``
    returns the child for those label values, made once and kept."""

    _family: type[CounterMetricFamily] | type[GaugeMetricFamily] = CounterMetricFamily

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], LoopValue] = {}
        if not self._labelnames:
            self._children[()] = LoopValue()
        registry.register(self)

    def labels(self, *values: str) -> LoopValue:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}")
            child = self._children[values] = LoopValue()
        return child

    def inc(self, amount: float = 1.0) -> None:
        """Add to an unlabelled counter (a labelled one counts through ``labels(...)``)."""
        if self._labelnames:
            raise ValueError(f"{self._name} takes labels {self._labelnames}: use labels()")
        self._children[()].value += amount

    def describe(self) -> list[Metric]:
        return [self._family(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = self._family(self._name, self._doc, labels=self._labelnames)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family


class LoopGauge(LoopCounter):
    """A gauge updated from the trio thread only."""

    _family = GaugeMetricFamily


class LoopHistogram:
    """A histogram updated from the trio thread only: ``observe`` is a bisection and two adds."""

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._doc)]

    def collect(self) -> Iterator[Metric]:
        total = 0.0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*self._bounds, math.inf], self._counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), total))
        yield HistogramMetricFamily(self._name, self._doc, buckets=buckets, sum_value=self._sum)


_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
_LAG_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
_GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # RSS, open fds, CPU seconds
        PlatformCollector(registry=r)
        self.info = Gauge("raafd_info", "Build information", ["version"], registry=r)
        self.draining = Gauge("raafd_draining", "1 while the daemon drains", registry=r)
        self.connections = Gauge(
            "raafd_open_connections", "Open client connections", ["transport"], registry=r
        )
        self.connections_total = Counter(
            "raafd_connections_total", "Accepted client connections", ["transport"], registry=r
        )
        self.connections_refused = Counter(
            "raafd_connections_refused_total",
            "Connections refused before upgrade",
            ["reason"],
            registry=r,
        )
        self.http_requests = Counter(
            "raafd_http_requests_total", "HTTP requests by status", ["method", "status"], registry=r
        )
        self.streams = LoopGauge(
            "raafd_active_streams", "Streams in the manager, by status", ["status"], registry=r
        )
        self.streams_started = LoopCounter(
            "raafd_streams_started_total", "Streams started", registry=r
        )
        self.streams_ended = LoopCounter(
            "raafd_streams_ended_total", "Streams ended, by terminal kind", ["kind"], registry=r
        )
        self.stream_events = LoopCounter(
            "raafd_stream_events_total", "Stream events appended to logs", ["event"], registry=r
        )
        self.events_sent = LoopCounter(
            "raafd_events_sent_total",
            "Stream events delivered to clients",
            ["transport"],
            registry=r,
        )
        self.ttft = LoopHistogram(
            "raafd_time_to_first_token_seconds",
            "Stream start to first content or tool call",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_gap = LoopHistogram(
            "raafd_inter_token_gap_seconds",
            "Gap between consecutive content events of a stream",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.subscriber_lag = LoopHistogram(
            "raafd_subscriber_lag_events",
            "Events a subscriber was behind the log head when it read",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.slow_consumers = LoopCounter(
            "raafd_slow_consumer_disconnects_total",
            "Subscribers disconnected for lagging past max_lag",
            registry=r,
        )
        self.bus_events = LoopCounter(
            "raafd_bus_events_total", "Events emitted on the event bus", registry=r
        )
        self.webhook_deliveries = LoopCounter(
            "raafd_webhook_deliveries_total",
            "Event-bus webhook deliveries by outcome: delivered, failed (attempts used up),"
            " refused (a final answer or the SSRF guard), missed (skipped while behind)",
            ["outcome"],
            registry=r,
        )
        self.webhook_retries = LoopCounter(
            "raafd_webhook_retries_total",
            "Webhook attempts that failed and were retried",
            registry=r,
        )
        self.lag_skips = LoopCounter(
            "raafd_subscriber_lag_skips_total",
            "Subscribers (of the event bus) that fell past their bound and skipped ahead with a"
            " lagged notice",
            registry=r,
        )
        self.subscriber_failures = LoopCounter(
            "raafd_subscriber_failures_total",
            "Subscribers dropped because their own code raised taking an event (the feed went on)",
            registry=r,
        )
        self.coalesced = LoopCounter(
            "raafd_coalesced_events_total",
            "Content events merged for lagging subscribers",
            registry=r,
        )
        self.upstream_retries = Counter(
            "raafd_upstream_retries_total", "Upstream retries", ["provider", "reason"], registry=r
        )
        self.upstream_errors = Counter(
            "raafd_upstream_errors_total", "Upstream failures", ["provider", "reason"], registry=r
        )
        self.errors = Counter(
            "raafd_client_errors_total", "Error replies sent to clients", ["code"], registry=r
        )
        self.breaker_state = Gauge(
            "raafd_breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open",
            ["provider"],
            registry=r,
        )
        self.gc_pause = Histogram(
            "raafd_gc_pause_seconds",
            "Garbage-collector pauses (the whole process stops), by generation",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=r,
        )
        # Chat: presence, direct messages, offline queues (raafd.chat).
        self.presence_users = LoopGauge(
            "raafd_presence_users",
            "Users by presence status (offline: those whose last_seen is still remembered)",
            ["status"],
            registry=r,
        )
        self.presence_changes = LoopCounter(
            "raafd_presence_changes_total",
            "Presence changes announced, by new status",
            ["status"],
            registry=r,
        )
        self.offline_queued = LoopCounter(
            "raafd_offline_queued_total",
            "Messages put in offline queues (committed), by kind",
            ["kind"],
            registry=r,
        )
        self.offline_depth = LoopGauge(
            "raafd_offline_queue_depth", "Messages in all offline queues", registry=r
        )
        self.offline_delivered = LoopCounter(
            "raafd_offline_delivered_total",
            "Queued messages sent to a connection (redeliveries included)",
            registry=r,
        )
        self.offline_redelivered = LoopCounter(
            "raafd_offline_redelivered_total",
            "Queued messages sent again to a connection that had not acknowledged them",
            registry=r,
        )
        self.offline_acked = LoopCounter(
            "raafd_offline_acked_total", "Queued messages acknowledged and deleted", registry=r
        )
        self.offline_expired = LoopCounter(
            "raafd_offline_expired_total",
            "Queued messages deleted unacknowledged after chat.offline_ttl",
            registry=r,
        )
        self.offline_dropped = LoopCounter(
            "raafd_offline_dropped_total",
            "Queued messages dropped, oldest first, from a queue full at chat.offline_max",
            registry=r,
        )
        self.rate_limited = Counter(
            "raafd_rate_limited_total",
            "Actions refused by a rate limit, by limit (connection.commands, ip.http_requests …)",
            ["limit"],
            registry=r,
        )
        self.auth_failures = Counter(
            "raafd_auth_failures_total",
            "Refused authentications, by transport",
            ["transport"],
            registry=r,
        )
        self.permission_refusals = Counter(
            "raafd_permission_refusals_total",
            "Actions refused by the policy",
            ["action"],
            registry=r,
        )
        self.admin_requests = Counter(
            "raafd_admin_requests_total", "Admin commands", ["cmd", "ok"], registry=r
        )
        # Background jobs (raafd/jobs): gauges set from the service at scrape time.
        self.jobs = LoopGauge("raafd_jobs", "Jobs not yet ended, by state", ["state"], registry=r)
        self.jobs_queued = LoopGauge(
            "raafd_jobs_queued",
            "Queued jobs, by priority (0 most urgent)",
            ["priority"],
            registry=r,
        )
        self.jobs_submitted = LoopCounter(
            "raafd_jobs_submitted_total", "Jobs accepted (durable)", registry=r
        )
        self.jobs_ended = LoopCounter(
            "raafd_jobs_ended_total",
            "Job attempts' ends, by the state they led to (failed: a retry follows)",
            ["state"],
            registry=r,
        )
        self.job_lease_recoveries = LoopCounter(
            "raafd_job_lease_recoveries_total",
            "Running jobs whose worker died, put back to queued (or dead) at startup",
            registry=r,
        )
        self.job_callback_failures = LoopCounter(
            "raafd_job_callback_failures_total",
            "Callback deliveries that failed (each attempt)",
            registry=r,
        )
        self.job_queue_latency = LoopHistogram(
            "raafd_job_queue_seconds",
            "Job queued (or due) to its attempt started",
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        self.job_run_latency = LoopHistogram(
            "raafd_job_run_seconds",
            "Job attempt started to finished",
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        # Rooms (raafd/chat/rooms.py): gauges set from the rooms at scrape time.
        self.rooms = Gauge("raafd_rooms", "Rooms", registry=r)
        self.room_members = Gauge("raafd_room_members", "Room memberships (durable)", registry=r)
        self.room_connections = Gauge(
            "raafd_room_connections", "Connections joined to a room now", registry=r
        )
        self.room_messages = LoopCounter(
            "raafd_room_messages_total", "Room messages stored and fanned out", registry=r
        )
        self.typing_relays = LoopCounter(
            "raafd_typing_relays_total", "Typing changes relayed to a room's members", registry=r
        )
        self.room_replies = LoopCounter(
            "raafd_room_agent_replies_total", "Agent replies started in rooms", registry=r
        )
        from raafd import __version__

        self.info.labels(__version__).set(1)
        self._gc_started: float | None = None

    def count_event(self, kind: str) -> None:
        """Count one event appended to a stream log."""
        self.stream_events.labels(kind).value += 1

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pause.labels(str(info.get("generation"))).observe(
                time.perf_counter() - self._gc_started
            )
            self._gc_started = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """Every sample as ``{name{labels}: value}``; the JSON twin of ``/metrics``."""
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out


@contextmanager
def observing_gc(metrics: Metrics) -> Iterator[None]:
    """Time every garbage collection into ``raafd_gc_pause_seconds`` while the block runs. The
    collector's callbacks are process-wide: the daemon's process (``raafd serve``) installs
    this once."""
    gc.callbacks.append(metrics._on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(metrics._on_gc)
