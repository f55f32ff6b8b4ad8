"""The gateway commands of direct messages and offline queues: ``dm.send`` → ``dm.sent``
(after the commit) and ``ack`` → ``acked`` (after the commit), given the offline queues (the
daemon registers them, and adds the queues to the gateway's connection observers, which
deliver each user's queue as ``queued`` frames)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raafd.gateway.table import CommandTable, Peer
from raafd.protocol.commands import Ack
from raafd.protocol.presence import DmSend

if TYPE_CHECKING:
    from raafd.chat.offline import OfflineQueues

__all__ = ["add_dm_commands"]


def add_dm_commands(table: CommandTable, queues: OfflineQueues) -> None:
    async def send(conn: Peer, cmd: DmSend) -> None:
        message = await queues.send_dm(conn.user, cmd.to, cmd.text, cmd.client_id)
        await conn.send_json(
            {"type": "dm.sent", "ref": cmd.ref, "id": message.id, "to": cmd.to, "ts": message.ts}
        )

    async def ack(conn: Peer, cmd: Ack) -> None:
        deleted = await queues.ack(conn.user, cmd.ids)
        await conn.send_json({"type": "acked", "ref": cmd.ref, "ids": cmd.ids, "deleted": deleted})

    table.add("dm.send", DmSend, send)
    table.add("ack", Ack, ack)
