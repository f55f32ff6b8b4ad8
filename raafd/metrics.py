"""Prometheus metrics. One :class:`Metrics` per daemon, on its own registry (so several daemons
can live in one test process); components receive it from the composition root."""

from __future__ import annotations

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

__all__ = ["Metrics"]

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
        self.streams = Gauge(
            "raafd_active_streams", "Streams in the manager, by status", ["status"], registry=r
        )
        self.streams_started = Counter("raafd_streams_started_total", "Streams started", registry=r)
        self.streams_ended = Counter(
            "raafd_streams_ended_total", "Streams ended, by terminal kind", ["kind"], registry=r
        )
        self.stream_events = Counter(
            "raafd_stream_events_total", "Stream events appended to logs", ["event"], registry=r
        )
        self.events_sent = Counter(
            "raafd_events_sent_total",
            "Stream events delivered to clients",
            ["transport"],
            registry=r,
        )
        self.ttft = Histogram(
            "raafd_time_to_first_token_seconds",
            "Stream start to first content or tool call",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_gap = Histogram(
            "raafd_inter_token_gap_seconds",
            "Gap between consecutive content events of a stream",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.subscriber_lag = Histogram(
            "raafd_subscriber_lag_events",
            "Events a subscriber was behind the log head when it read",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.slow_consumers = Counter(
            "raafd_slow_consumer_disconnects_total",
            "Subscribers disconnected for lagging past max_lag",
            registry=r,
        )
        self.coalesced = Counter(
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
        self.admin_requests = Counter(
            "raafd_admin_requests_total", "Admin commands", ["cmd", "ok"], registry=r
        )
        from raafd import __version__

        self.info.labels(__version__).set(1)
        # The per-event counter's children, one per event kind: ``labels()`` costs about three
        # times an ``inc()``, and this one is on every event's path.
        self._event_counters: dict[str, Any] = {}

    def count_event(self, kind: str) -> None:
        """Count one event appended to a stream log."""
        child = self._event_counters.get(kind)
        if child is None:
            child = self._event_counters[kind] = self.stream_events.labels(kind)
        child.inc()

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
