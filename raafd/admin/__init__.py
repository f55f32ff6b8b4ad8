"""The unix-socket admin interface: server, client, and the ``raafd ctl`` command.

The wire protocol (newline-delimited JSON, one answer per request line) lives in
:mod:`raafd.admin.protocol`; ``raafd ctl`` in :mod:`raafd.admin.ctl`.
"""

from raafd.admin.client import (
    AdminPermissionDenied,
    DaemonNotRunning,
    admin_call,
    admin_call_sync,
)
from raafd.admin.protocol import COMMAND_ARGS, MAX_LINE
from raafd.admin.server import AdminServer, AdminSocketInUse, Handler

__all__ = [
    "COMMAND_ARGS",
    "MAX_LINE",
    "AdminPermissionDenied",
    "AdminServer",
    "AdminSocketInUse",
    "DaemonNotRunning",
    "Handler",
    "admin_call",
    "admin_call_sync",
]
