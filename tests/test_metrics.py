"""The loop-only metric types and the collector's pause histogram, read back through the
registry as Prometheus would."""

from __future__ import annotations

import gc

import pytest

from raafd.metrics import Metrics, observing_gc


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_loop_counters_and_gauges_render_as_prometheus_ones() -> None:
    metrics = Metrics()
    metrics.count_event("content")
    metrics.count_event("content")
    metrics.count_event("start")
    metrics.events_sent.labels("websocket").inc(5)
    metrics.streams.labels("running").inc()
    metrics.streams.labels("running").inc()
    metrics.streams.labels("running").dec()
    metrics.streams_started.inc()
    assert sample(metrics, "raafd_stream_events_total", event="content") == 2
    assert sample(metrics, "raafd_stream_events_total", event="start") == 1
    assert sample(metrics, "raafd_events_sent_total", transport="websocket") == 5
    assert sample(metrics, "raafd_active_streams", status="running") == 1
    assert sample(metrics, "raafd_streams_started_total") == 1
    text = metrics.render().decode()
    assert "# TYPE raafd_stream_events_total counter" in text
    assert "# TYPE raafd_active_streams gauge" in text
    with pytest.raises(ValueError, match="takes labels"):
        metrics.events_sent.labels("websocket", "extra")


def test_loop_histogram_buckets_are_cumulative_and_inclusive() -> None:
    metrics = Metrics()
    for value in (0.0005, 0.0006, 0.003, 7.0, 100.0):  # 0.0005 sits exactly on a bound
        metrics.token_gap.observe(value)
    name = "raafd_inter_token_gap_seconds"
    assert sample(metrics, f"{name}_bucket", le="0.0005") == 1
    assert sample(metrics, f"{name}_bucket", le="0.001") == 2
    assert sample(metrics, f"{name}_bucket", le="0.005") == 3
    assert sample(metrics, f"{name}_bucket", le="10.0") == 4
    assert sample(metrics, f"{name}_bucket", le="+Inf") == 5
    assert sample(metrics, f"{name}_count") == 5
    assert sample(metrics, f"{name}_sum") == pytest.approx(107.0041)


def test_gc_pauses_are_timed_while_observed_and_not_after() -> None:
    metrics = Metrics()
    with observing_gc(metrics):
        gc.collect(2)
    first = sample(metrics, "raafd_gc_pause_seconds_count", generation="2")
    assert first is not None and first >= 1
    assert metrics._on_gc not in gc.callbacks
    gc.collect(2)
    assert sample(metrics, "raafd_gc_pause_seconds_count", generation="2") == first


def test_a_labelled_loop_counter_counts_only_through_its_labels() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="use labels"):
        metrics.events_sent.inc()
