"""The level gate in front of structlog: a call below the level never reaches structlog."""

from __future__ import annotations

import structlog

from raafd.logging import get_level, get_logger, set_level


def test_calls_below_the_level_are_dropped_before_structlog() -> None:
    log = get_logger("raafd.test")
    before = get_level()
    try:
        set_level("warning")
        with structlog.testing.capture_logs() as logs:  # captures whatever reaches structlog
            log.debug("d")
            log.info("i")
            log.warning("w", k=1)
            log.error("e")
        assert [(e["event"], e["log_level"]) for e in logs] == [("w", "warning"), ("e", "error")]
        set_level("debug")
        with structlog.testing.capture_logs() as logs:
            log.debug("d")
        assert [e["event"] for e in logs] == ["d"]
    finally:
        set_level(before)
