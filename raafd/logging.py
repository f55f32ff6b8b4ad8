"""structlog setup: JSON lines for machines, console lines for people, level changeable live.

Ids (``conn``, ``stream``, ``req``, ``job``) are bound with
``structlog.contextvars.bind_contextvars`` at the top of the task that owns them; trio copies
the context into child tasks, so they stay with the task tree they belong to.

Secrets never reach a log line: every line passes :func:`redact` last before rendering. It
replaces the value of a field whose name says secret (``token``, ``authorization``,
``api_key``, ``secret``, ``password`` …) and every occurrence of a secret this process knows
(:func:`set_secrets`: the auth tokens, HMAC secrets, provider keys and tool header values of the
running configuration) anywhere in any string, the traceback included, by ``[redacted]``.
Error messages to clients go through :func:`redact_text` too (:mod:`raafd.errors`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = [
    "REDACTED",
    "Logger",
    "configure_logging",
    "get_level",
    "get_logger",
    "redact",
    "redact_text",
    "set_level",
    "set_secrets",
]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_state = {"level": 20}


def _filter_by_level(
    _: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _LEVELS.get(method, 20) < _state["level"] and event.get("audit") is not True:
        raise structlog.DropEvent  # audit lines are written at every level
    return event


REDACTED = "[redacted]"
_SECRET_FIELDS = ("token", "authorization", "api_key", "apikey", "secret", "password", "cookie")
_MIN_SECRET = 6  # shorter values would redact ordinary words; config refuses nothing shorter
_secrets: list[str] = []  # longest first, so a secret containing another goes whole


def set_secrets(values: set[str] | frozenset[str]) -> None:
    """The secrets of the running configuration (replaced at each accepted reload)."""
    _secrets[:] = sorted((v for v in values if len(v) >= _MIN_SECRET), key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with every known secret replaced by ``[redacted]``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _secret_field(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_FIELDS) and not lowered.endswith(
        ("_env", "_tokens", "tokens")  # names of variables, and token counts
    )


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if _secret_field(str(k)) else _redact_value(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(repr(value))
    return value


def redact(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The structlog processor (see the module docstring); after ``format_exc_info``."""
    for key, value in event.items():
        if _secret_field(key) and value is not None:
            event[key] = REDACTED
        elif value is not None and not isinstance(value, int | float | bool):
            event[key] = _redact_value(value)
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
            redact,
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

    def audit(self, event: str, **fields: Any) -> None:
        """An audit line (``"audit": true``): written whatever the level."""
        self._logger.info(event, audit=True, **fields)


def get_logger(name: str = "raafd") -> Logger:
    return Logger(name)
