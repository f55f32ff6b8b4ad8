"""Webhooks: Standard Webhooks signatures, the SSRF guard, the retry rules, and a daemon
delivering bus events to a real HTTP receiver (signed, verified, retried, refused)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from raafd.bus.webhooks import retry_delay, verdict
from raafd.config import ConfigError, WebhookConfig, parse_config
from raafd.errors import Forbidden
from raafd.net.webhooks import check_public, secret_bytes, sign, signed_headers, verify
from tests.waiting import wait_until

# The example of the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_signature_is_the_specs() -> None:
    key = secret_bytes(SPEC_SECRET)
    assert sign(key, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    headers = signed_headers(key, SPEC_ID, SPEC_TS, SPEC_BODY)
    assert verify(key, headers, SPEC_BODY, now=SPEC_TS + 10)
    assert not verify(key, headers, SPEC_BODY + b" ", now=SPEC_TS)  # tampered body
    assert not verify(key, headers, SPEC_BODY, now=SPEC_TS + 301)  # too old
    assert not verify(b"other", headers, SPEC_BODY, now=SPEC_TS)
    rotated = {**headers, "webhook-signature": "v1,bm9wZQ== " + headers["webhook-signature"]}
    assert verify(key, rotated, SPEC_BODY, now=SPEC_TS)
    assert secret_bytes("plain text") == b"plain text"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fc00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_the_ssrf_guard_refuses_non_public_addresses(address: str) -> None:
    with pytest.raises(Forbidden):
        check_public(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_the_ssrf_guard_lets_public_addresses_through(address: str) -> None:
    check_public(address)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (None, "retry"),
        (408, "retry"),
        (429, "retry"),
        (500, "retry"),
        (503, "retry"),
        (301, "refused"),
        (400, "refused"),
        (404, "refused"),
    ],
)
def test_verdicts(status: int | None, expected: str) -> None:
    assert verdict(status) == expected


def test_retry_delays_double_up_to_the_maximum_and_end_at_max_attempts() -> None:
    hook = WebhookConfig(retry_base=1.0, retry_max=5.0, max_attempts=5)
    assert [retry_delay(hook, n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, None]


def test_webhook_config_problems_are_listed() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "webhooks": [
                    {"pattern": "a.>.b", "url": "ftp://x", "secret": "s", "secret_env": "E"},
                    {"pattern": "a", "url": "https://x", "secret": "whsec_!!"},
                    {"pattern": "a", "url": "https://x", "secret_env": "MISSING"},
                ],
                "events": {"restricted": {"x.>.y": ["admin"]}},
            },
            {},
        )
    problems = "\n".join(caught.value.problems)
    for expected in [
        "webhooks.0.pattern: pattern 'a.>.b'",
        "webhooks.0.url: must be an http:// or https:// URL",
        "webhooks.0: give exactly one of secret or secret_env",
        "webhooks.1.secret: a whsec_ secret must be base64",
        "webhooks.2.secret_env: the environment variable MISSING is not set",
        "events.restricted.x.>.y: pattern 'x.>.y'",
    ]:
        assert expected in problems


class Receiver:
    """A webhook endpoint: answers each request with the next scripted status (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.fail_after(10):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                line, *fields = head.decode().split("\r\n")
                pairs = (f.split(":", 1) for f in fields)
                headers = {k.strip().lower(): v.strip() for k, v in pairs}
                while len(body) < int(headers.get("content-length", "0")):
                    body += await stream.receive_some(65536)
                self.requests.append((line, headers, body))
                status = self.statuses.pop(0) if self.statuses else 200
                await stream.send_all(
                    b"HTTP/1.1 %d X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % status
                )


def _hook(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {
        "pattern": "job.*",
        "url": f"http://localhost:{receiver.port}/hooks/raafd?x=1",
        "secret": SPEC_SECRET,
        "allow_private": True,
        "retry_base": 0.01,
        "retry_max": 0.05,
        **extra,
    }


async def test_a_webhook_is_signed_verified_and_retried_until_delivered(
    nursery: trio.Nursery, start_daemon: Any
) -> None:
    receiver = Receiver([503, 500])
    await nursery.start(receiver.serve)
    rd = await start_daemon(webhooks=[_hook(receiver)])
    bus = rd.daemon.bus
    bus.emit("stream.started", {"ignored": True})
    bus.emit("job.completed", {"job": "j1"})
    metrics = rd.daemon.metrics.registry
    with trio.fail_after(20):
        await wait_until(lambda: len(receiver.requests) == 3)
        await wait_until(
            lambda: (
                metrics.get_sample_value("raafd_webhook_deliveries_total", {"outcome": "delivered"})
                == 1
            )
        )
    key = secret_bytes(SPEC_SECRET)
    ids = set()
    for line, headers, body in receiver.requests:
        assert line == "POST /hooks/raafd?x=1 HTTP/1.1"
        assert headers["host"] == f"localhost:{receiver.port}"
        assert verify(key, headers, body, now=int(headers["webhook-timestamp"]))
        assert body == bus.feed.log.after(1)[0].json  # the event's own JSON
        ids.add(headers["webhook-id"])
    assert len(ids) == 1  # one message, three attempts
    assert metrics.get_sample_value("raafd_webhook_retries_total") == 2


async def test_a_webhook_gives_up_after_max_attempts_and_on_a_final_answer(
    nursery: trio.Nursery, start_daemon: Any
) -> None:
    receiver = Receiver([500, 500, 404])
    await nursery.start(receiver.serve)
    rd = await start_daemon(webhooks=[_hook(receiver, max_attempts=2)])
    rd.daemon.bus.emit("job.failed", {"n": 1})  # 500, 500: attempts used up
    rd.daemon.bus.emit("job.failed", {"n": 2})  # 404: final
    rd.daemon.bus.emit("job.failed", {"n": 3})  # 200
    metrics = rd.daemon.metrics.registry

    def count(outcome: str) -> float | None:
        return metrics.get_sample_value("raafd_webhook_deliveries_total", {"outcome": outcome})

    with trio.fail_after(20):
        await wait_until(lambda: count("delivered") == 1)
    assert (count("failed"), count("refused")) == (1, 1)
    assert [b'"n":3' in body for _, _, body in receiver.requests] == [False] * 3 + [True]


async def test_the_ssrf_guard_refuses_a_private_address_before_sending(
    nursery: trio.Nursery, start_daemon: Any
) -> None:
    receiver = Receiver([])
    await nursery.start(receiver.serve)
    rd = await start_daemon(webhooks=[_hook(receiver, allow_private=False)])
    rd.daemon.bus.emit("job.queued", {})
    metrics = rd.daemon.metrics.registry
    with trio.fail_after(20):
        await wait_until(
            lambda: (
                metrics.get_sample_value("raafd_webhook_deliveries_total", {"outcome": "refused"})
                == 1
            )
        )
    assert receiver.requests == []


async def test_a_reload_replaces_the_hooks_without_missing_an_event(
    nursery: trio.Nursery, start_daemon: Any, make_config: Any
) -> None:
    first, second = Receiver([]), Receiver([])
    await nursery.start(first.serve)
    await nursery.start(second.serve)
    rd = await start_daemon(webhooks=[_hook(first)])
    rd.daemon.bus.emit("job.a", {})
    with trio.fail_after(20):
        await wait_until(lambda: len(first.requests) == 1)
        rd.daemon.reload(make_config(webhooks=[_hook(second, pattern="config.*")]))
        rd.daemon.bus.emit("job.b", {})
        await wait_until(lambda: len(second.requests) == 1)  # config.reloaded
    assert b"config.reloaded" in second.requests[0][2]
    assert len(first.requests) == 1
