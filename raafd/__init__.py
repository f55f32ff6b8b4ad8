"""raafd: a Trio daemon that streams AI-agent output to real-time clients.

The public Python API is what this package exports (``__all__``):

- configuration: :func:`load_config`, :func:`parse_config`, :class:`Config`,
  :class:`ConfigError`;
- errors: :class:`RaafdError` and its family, each with a stable ``code``
  (:class:`ErrorCode`, the wire protocol's error codes);
- the Python client: :func:`open_client`, :class:`RaafdClient`, :class:`StreamHandle`,
  :class:`ClientError`;
- the stream event: :class:`StreamEvent`.

Import them from here (``from raafd import open_client``). Every other module is internal: it
stays importable, but may change in any release. The exports are loaded on first use, so
``import raafd`` imports nothing else of raafd.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raafd.client.client import ClientError, RaafdClient, StreamHandle, open_client
    from raafd.config import Config, ConfigError, load_config, parse_config
    from raafd.errors import (
        BadRequest,
        Conflict,
        Forbidden,
        Gone,
        Internal,
        MaxTurns,
        MethodNotAllowed,
        NotFound,
        RaafdError,
        RateLimited,
        RequestTimeout,
        Timeout,
        TooLarge,
        TooManyStreams,
        Unauthorized,
        Unavailable,
        UpstreamError,
    )
    from raafd.protocol.codes import ErrorCode
    from raafd.protocol.events import StreamEvent

__version__ = "0.1.0"

# Each export and the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Config", "ConfigError", "load_config", "parse_config"], "raafd.config"),
    **dict.fromkeys(
        [
            "BadRequest",
            "Conflict",
            "Forbidden",
            "Gone",
            "Internal",
            "MaxTurns",
            "MethodNotAllowed",
            "NotFound",
            "RaafdError",
            "RateLimited",
            "RequestTimeout",
            "Timeout",
            "TooLarge",
            "TooManyStreams",
            "Unauthorized",
            "Unavailable",
            "UpstreamError",
        ],
        "raafd.errors",
    ),
    "ErrorCode": "raafd.protocol.codes",
    **dict.fromkeys(
        ["ClientError", "RaafdClient", "StreamHandle", "open_client"], "raafd.client.client"
    ),
    "StreamEvent": "raafd.protocol.events",
}

__all__ = [
    "BadRequest",
    "ClientError",
    "Config",
    "ConfigError",
    "Conflict",
    "ErrorCode",
    "Forbidden",
    "Gone",
    "Internal",
    "MaxTurns",
    "MethodNotAllowed",
    "NotFound",
    "RaafdClient",
    "RaafdError",
    "RateLimited",
    "RequestTimeout",
    "StreamEvent",
    "StreamHandle",
    "Timeout",
    "TooLarge",
    "TooManyStreams",
    "Unauthorized",
    "Unavailable",
    "UpstreamError",
    "__version__",
    "load_config",
    "open_client",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raafd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
