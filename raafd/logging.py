"""structlog setup: JSON lines for machines, console lines for people, level changeable live.

Ids (``conn``, ``stream``, ``req``, ``job``) are bound with
``structlog.contextvars.bind_contextvars`` at the top of the task that owns them; trio copies
the context into child tasks, so they stay with the task tree they belong to.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["Logger", "configure_logging", "get_level", "get_logger", "set_level"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_state = {"level": 20}


def _filter_by_level(
    _: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _LEVELS.get(method, 20) < _state["level"]:
        raise structlog.DropEvent
    return event


def set_level(level: str) -> None:
    """Change the level at run time (admin ``log-level``, SIGHUP reload)."""
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    _state["level"] = _LEVELS[level]


def get_level() -> str:
    return next(name for name, value in _LEVELS.items() if value == _state["level"])


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog once per process. ``fmt``: ``auto`` (console on a TTY), ``json``,
    ``console``."""
    out = stream or sys.stderr
    set_level(level)
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            _filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.BoundLogger,
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(name)s: %(message)s")


class Logger:
    """A structlog logger that checks the level before anything else: a call below it returns
    at once, where structlog would build a bound logger, run the first processor and raise
    ``DropEvent`` (several µs, on paths taken per stream). Calls at or above the level go to
    structlog unchanged (so ``structlog.testing.capture_logs`` still sees them)."""

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = structlog.get_logger(name)

    def debug(self, event: str, **fields: Any) -> None:
        if _state["level"] <= 10:
            self._logger.debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        if _state["level"] <= 20:
            self._logger.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        if _state["level"] <= 30:
            self._logger.warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        if _state["level"] <= 40:
            self._logger.error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """``error`` with the exception being handled, traceback included (structlog's
        ``PrintLogger.exception`` is a plain ``msg``: it would drop the traceback)."""
        if _state["level"] <= 40:
            fields.setdefault("exc_info", True)
            self._logger.error(event, **fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._logger.critical(event, **fields)


def get_logger(name: str = "raafd") -> Logger:
    return Logger(name)
