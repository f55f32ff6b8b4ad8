"""The offline queues in the shared SQLite database (component ``offline``).

Every write goes through :meth:`raafd.store.db.Database.write` (one writer thread, group commit,
fsynced before it returns), so an ``enqueue`` or ``ack`` that returned survives ``kill -9``;
reads go through :meth:`~raafd.store.db.Database.read`, never on the event loop. A write is one
savepoint: the insert, the drop of the oldest past ``max_queue`` and the ``client_id`` key all
land together or not at all. Rules and bounds: :mod:`raafd.store.offline`.

Ids are the ``offline_messages`` rowid (``AUTOINCREMENT``: never reused, even after the newest
was deleted), as decimal strings.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from raafd.store.db import Database
from raafd.store.offline import Enqueued, NewMessage, QueuedMessage, QueueFull

__all__ = ["MIGRATIONS", "SqliteOfflineStore"]

MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE offline_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL,           -- whose queue
        kind TEXT NOT NULL,           -- 'dm' or 'room'
        sender TEXT NOT NULL,
        room TEXT,
        text TEXT NOT NULL,
        ts REAL NOT NULL,             -- unix seconds
        expires_at REAL NOT NULL
    );
    CREATE INDEX offline_by_user ON offline_messages (user, id);
    CREATE INDEX offline_by_expiry ON offline_messages (expires_at);
    CREATE TABLE offline_client_ids (
        sender TEXT NOT NULL,
        client_id TEXT NOT NULL,
        message INTEGER NOT NULL,     -- the id the first send got (the message may be gone)
        user TEXT NOT NULL,
        kind TEXT NOT NULL,
        room TEXT,
        text TEXT NOT NULL,
        ts REAL NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (sender, client_id)
    );
    CREATE INDEX offline_client_ids_by_expiry ON offline_client_ids (expires_at);
    """,
    # 2: each queue's length, kept by every write, so an enqueue does not count its queue.
    """
    CREATE TABLE offline_depths (
        user TEXT PRIMARY KEY,
        depth INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO offline_depths SELECT user, count(*) FROM offline_messages GROUP BY user;
    """,
)

_COLUMNS = "id, kind, sender, text, ts, expires_at, room"


def _message(row: tuple[Any, ...]) -> QueuedMessage:
    return QueuedMessage(str(row[0]), row[1], row[2], row[3], row[4], row[5], row[6])


def _shorten(conn: sqlite3.Connection, user: str, by: int) -> None:
    """``user``'s queue lost ``by`` messages: keep its length (forget it at 0)."""
    if by:
        conn.execute("UPDATE offline_depths SET depth = depth - ? WHERE user = ?", (by, user))
        conn.execute("DELETE FROM offline_depths WHERE user = ? AND depth <= 0", (user,))


class SqliteOfflineStore:
    """:class:`~raafd.store.offline.OfflineStore` on the shared database. Make one with
    :meth:`open` (it counts what the file holds)."""

    def __init__(self, db: Database, total: int, keys: int) -> None:
        self.db = db
        self._total = total  # messages in all queues, kept by the writes
        self._keys = keys  # client_id keys

    @classmethod
    async def open(cls, db: Database) -> SqliteOfflineStore:
        def count(conn: sqlite3.Connection) -> tuple[int, int]:
            messages = conn.execute("SELECT count(*) FROM offline_messages").fetchone()[0]
            keys = conn.execute("SELECT count(*) FROM offline_client_ids").fetchone()[0]
            return int(messages), int(keys)

        total, keys = await db.read(count)
        return cls(db, total, keys)

    async def enqueue(
        self, user: str, message: NewMessage, *, max_queue: int, max_total: int
    ) -> Enqueued:
        full = self._total >= max_total

        def put(conn: sqlite3.Connection) -> tuple[Enqueued, int]:
            if message.client_id is not None:
                row = conn.execute(
                    "SELECT message, kind, sender, text, ts, expires_at, room"
                    " FROM offline_client_ids WHERE sender = ? AND client_id = ?",
                    (message.sender, message.client_id),
                ).fetchone()
                if row is not None:
                    return Enqueued(_message(row), duplicate=True), 0
            if full:
                raise QueueFull("the offline queues are full; try again later", retry_after=60)
            cursor = conn.execute(
                "INSERT INTO offline_messages (user, kind, sender, room, text, ts, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    user,
                    message.kind,
                    message.sender,
                    message.room,
                    message.text,
                    message.ts,
                    message.expires_at,
                ),
            )
            number = cursor.lastrowid
            assert number is not None
            depth = conn.execute(
                "INSERT INTO offline_depths VALUES (?, 1) ON CONFLICT (user)"
                " DO UPDATE SET depth = depth + 1 RETURNING depth",
                (user,),
            ).fetchone()[0]
            dropped = max(0, int(depth) - max_queue)
            if dropped:
                conn.execute(
                    "DELETE FROM offline_messages WHERE id IN (SELECT id FROM offline_messages"
                    " WHERE user = ? ORDER BY id LIMIT ?)",
                    (user, dropped),
                )
                _shorten(conn, user, dropped)
            keys = 0
            if message.client_id is not None:
                conn.execute(
                    "INSERT INTO offline_client_ids VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message.sender,
                        message.client_id,
                        number,
                        user,
                        message.kind,
                        message.room,
                        message.text,
                        message.ts,
                        message.expires_at,
                    ),
                )
                keys = 1
                if self._keys + 1 > max_total:
                    conn.execute(
                        "DELETE FROM offline_client_ids WHERE rowid IN (SELECT rowid FROM"
                        " offline_client_ids ORDER BY expires_at LIMIT ?)",
                        (self._keys + 1 - max_total,),
                    )
                    keys -= self._keys + 1 - max_total
            return Enqueued(message.stored(str(number)), dropped=dropped), keys

        result, keys = await self.db.write(put)
        if not result.duplicate:
            self._total += 1 - result.dropped
            self._keys += keys
        return result

    async def pending(self, user: str, now: float, limit: int) -> list[QueuedMessage]:
        def read(conn: sqlite3.Connection) -> list[QueuedMessage]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM offline_messages WHERE user = ? AND expires_at > ?"
                " ORDER BY id LIMIT ?",
                (user, now, limit),
            )
            return [_message(row) for row in rows]

        return await self.db.read(read)

    async def depth(self, user: str, now: float) -> int:
        def read(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(
                    "SELECT count(*) FROM offline_messages WHERE user = ? AND expires_at > ?",
                    (user, now),
                ).fetchone()[0]
            )

        return await self.db.read(read)

    async def ack(self, user: str, ids: Sequence[str]) -> int:
        numbers = [int(i) for i in ids if i.isdigit() and len(i) < 19]
        if not numbers:
            return 0

        def delete(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(numbers))
            cursor = conn.execute(
                f"DELETE FROM offline_messages WHERE user = ? AND id IN ({marks})",
                (user, *numbers),
            )
            _shorten(conn, user, cursor.rowcount)
            return cursor.rowcount

        deleted = await self.db.write(delete)
        self._total -= deleted
        return deleted

    async def expire(self, now: float, limit: int) -> int:
        def delete(conn: sqlite3.Connection) -> tuple[int, int]:
            expired = conn.execute(
                "SELECT id, user FROM offline_messages WHERE expires_at <= ?"
                " ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
            per_user: dict[str, int] = {}
            for number, user in expired:
                conn.execute("DELETE FROM offline_messages WHERE id = ?", (number,))
                per_user[user] = per_user.get(user, 0) + 1
            for user, count in per_user.items():
                _shorten(conn, user, count)
            messages = len(expired)
            keys = conn.execute(
                "DELETE FROM offline_client_ids WHERE rowid IN (SELECT rowid FROM"
                " offline_client_ids WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
                (now, limit),
            ).rowcount
            return messages, keys

        messages, keys = await self.db.write(delete)
        self._total -= messages
        self._keys -= keys
        return messages

    def total(self) -> int:
        return self._total
