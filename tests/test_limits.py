"""Token buckets, tested with exact times: the pure rule (raafd.security.limits) and the
limiter over the configuration (raafd.security.limiter)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raafd.config import LimitsConfig, parse_config
from raafd.errors import RateLimited
from raafd.metrics import Metrics
from raafd.security.limiter import ConnectionLimits, Limiter
from raafd.security.limits import Bucket, BucketMap, Rate, Strikes

TEN = Rate(10, 20)


def test_10_a_second_with_burst_20_lets_620_of_a_100_a_second_attacker_through_in_60s() -> None:
    bucket = Bucket(TEN, 0.0)
    accepted = 0
    for i in range(6000):  # 100/s for 60 s of fake time
        if bucket.take(TEN, i / 100) == 0.0:
            accepted += 1
    assert abs(accepted - 620) <= 1, accepted


def test_a_refusal_says_when_a_token_will_be_there_and_takes_nothing() -> None:
    rate = Rate(2, 1)
    bucket = Bucket(rate, 100.0)
    assert bucket.take(rate, 100.0) == 0.0
    assert bucket.take(rate, 100.0) == pytest.approx(0.5)
    assert bucket.take(rate, 100.25) == pytest.approx(0.25)  # the refusal took nothing
    assert bucket.take(rate, 100.5) == 0.0


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    bucket = Bucket(TEN, 0.0)
    for _ in range(20):
        assert bucket.take(TEN, 0.0) == 0.0
    # An hour idle refills to the burst, not to 36,000.
    results = [bucket.take(TEN, 3600.0) for _ in range(21)]
    assert results[:20] == [0.0] * 20 and results[20] > 0


def test_a_clock_that_goes_back_refills_nothing() -> None:
    rate = Rate(1, 1)
    bucket = Bucket(rate, 10.0)
    assert bucket.take(rate, 10.0) == 0.0
    assert bucket.take(rate, 5.0) > 0  # earlier than the last stamp
    assert bucket.take(rate, 11.0) == 0.0


@given(
    per_second=st.floats(0.1, 1000),
    burst=st.integers(1, 100),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=300),
)
def test_no_window_accepts_more_than_burst_plus_rate_times_its_length(
    per_second: float, burst: int, gaps: list[float]
) -> None:
    rate = Rate(per_second, burst)
    bucket = Bucket(rate, 0.0)
    now, times = 0.0, []
    for gap in gaps:
        now += gap
        if bucket.take(rate, now) == 0.0:
            times.append(now)
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + per_second * (times[j] - times[i]) + 1e-6


def test_the_bucket_map_forgets_the_least_recently_used_key_at_its_bound() -> None:
    rate = Rate(1, 1)
    buckets = BucketMap(bound=2)
    assert buckets.take("a", rate, 0.0) == 0.0
    assert buckets.take("b", rate, 0.0) == 0.0
    assert buckets.take("a", rate, 0.0) > 0  # a used again: b is now the oldest
    assert buckets.take("c", rate, 0.0) == 0.0  # b forgotten
    assert len(buckets) == 2
    assert buckets.take("a", rate, 0.0) > 0  # a kept its empty bucket
    assert buckets.take("b", rate, 0.0) == 0.0  # b starts full again: the documented cost


def test_full_buckets_are_forgotten_as_if_absent() -> None:
    rate = Rate(1, 2)
    buckets = BucketMap(bound=10)
    buckets.take("a", rate, 0.0)
    buckets.take("b", rate, 0.0)
    buckets.take("b", rate, 0.0)
    assert buckets.forget_full(rate, 1.0) == 1  # a is full again at 1.0, b at 2.0
    assert len(buckets) == 1


def test_strikes_close_at_the_hard_limit_and_an_accepted_action_starts_again() -> None:
    strikes = Strikes()
    assert not strikes.refused(3) and not strikes.refused(3)
    strikes.accepted()
    assert [strikes.refused(3) for _ in range(3)] == [False, False, True]
    assert not Strikes().refused(0)  # 0: never


def _limiter(clock: list[float], **limits: object) -> Limiter:
    cfg = parse_config({"limits": limits}, {}).limits
    return Limiter(lambda: cfg, Metrics(), clock=lambda: clock[0])


def test_the_limiter_refuses_past_the_connections_bucket_with_retry_after() -> None:
    now = [50.0]
    limiter = _limiter(now, connection={"stream_starts": {"rate": 1, "burst": 2}})
    conn = ConnectionLimits()
    limiter.check("stream_starts", conn, "anonymous")
    limiter.check("stream_starts", conn, "anonymous")
    with pytest.raises(RateLimited) as refused:
        limiter.check("stream_starts", conn, "anonymous")
    assert refused.value.retry_after == 1.0
    assert refused.value.to_dict()["code"] == "rate_limited"
    now[0] = 51.0
    limiter.check("stream_starts", conn, "anonymous")
    snapshot = limiter.metrics.snapshot()
    assert snapshot["raafd_rate_limited_total{limit=connection.stream_starts}"] == 1


def test_a_principal_is_limited_across_its_connections_but_anonymous_is_not_one() -> None:
    now = [0.0]
    limiter = _limiter(now, principal={"commands": {"rate": 1, "burst": 3}})
    conns = [ConnectionLimits() for _ in range(4)]
    for conn in conns[:3]:
        limiter.check("commands", conn, "alice")
    with pytest.raises(RateLimited):
        limiter.check("commands", conns[3], "alice")
    limiter.check("commands", conns[3], "bob")
    for conn in conns:
        limiter.check("commands", conn, "anonymous")
    # The refused action gave its connection's token back: bob's and anonymous's were taken.
    assert conns[3].buckets["commands"].tokens == pytest.approx(100 - 2)


def test_limits_read_at_each_check_so_a_reload_applies_at_once() -> None:
    now = [0.0]
    cfg = [parse_config({"limits": {"connection": {"typing": {"rate": 1, "burst": 1}}}}, {})]
    limiter = Limiter(lambda: cfg[0].limits, Metrics(), clock=lambda: now[0])
    conn = ConnectionLimits()
    limiter.check("typing", conn, "anonymous")
    with pytest.raises(RateLimited):
        limiter.check("typing", conn, "anonymous")
    cfg[0] = parse_config({"limits": {"connection": {"typing": {"rate": 0}}}}, {})
    limiter.check("typing", conn, "anonymous")  # rate 0: no limit


def test_per_ip_limits_are_off_by_default_and_count_when_on() -> None:
    now = [0.0]
    assert _limiter(now).check_ip("http_requests", "10.0.0.1") == 0.0
    limiter = _limiter(now, ip={"http_requests": {"rate": 2, "burst": 1}})
    assert limiter.check_ip("http_requests", "10.0.0.1") == 0.0
    assert limiter.check_ip("http_requests", "10.0.0.1") == pytest.approx(0.5)
    assert limiter.check_ip("http_requests", "10.0.0.2") == 0.0


def test_limits_config_problems_are_listed() -> None:
    from raafd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"limits": {"connection": {"commands": {"rate": -1, "burst": 0}}}}, {})
    assert err.value.problems == [
        "limits.connection.commands.rate: must be 0 or more, got -1.0",
        "limits.connection.commands.burst: must be greater than 0, got 0",
    ]
    assert LimitsConfig().connection.commands.burst == 100
