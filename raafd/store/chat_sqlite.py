"""The chat store in the daemon's SQLite database (:mod:`raafd.store.db`).

The rule of this file: **a returned write is on disk** (the database's group commit: WAL,
``synchronous = FULL``, the answer after the fsync), and **a room's ids have no gap**: an
append numbers its new messages from the ``head`` it is given, inside its own savepoint, and
the primary key ``(room, id)`` refuses anything else. ``client_id`` idempotency is the unique
index ``(room, sender, client_id)``: a resend finds the stored message and stores nothing.

Tables (component ``chat``, :data:`MIGRATIONS`): ``chat_rooms`` (rooms made at run time and
their attributes as JSON), ``chat_messages`` (history), ``chat_members`` (membership). History
is trimmed in the append's own write (``keep`` and ``ttl``), so it never outgrows its bound.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Final

import orjson

from raafd.store.chat import NewMessage, RoomState, StoredMessage, StoredRoom

if TYPE_CHECKING:
    from raafd.store.db import Database

__all__ = ["MIGRATIONS", "SqliteChatStore"]

MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE chat_rooms (
        name TEXT PRIMARY KEY,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        settings BLOB NOT NULL          -- the room's attributes, JSON
    );
    CREATE TABLE chat_messages (
        room TEXT NOT NULL,
        id INTEGER NOT NULL,            -- 1, 2, 3 ... per room, no gap
        sender TEXT NOT NULL,
        text TEXT NOT NULL,
        ts REAL NOT NULL,               -- server unix time
        meta BLOB,                      -- JSON object or NULL
        client_id TEXT,
        stream TEXT,                    -- the agent stream of a reply
        PRIMARY KEY (room, id)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX chat_messages_client ON chat_messages (room, sender, client_id)
        WHERE client_id IS NOT NULL;
    CREATE TABLE chat_heads (
        room TEXT PRIMARY KEY,
        head INTEGER NOT NULL           -- the last id given (kept when history is trimmed)
    );
    CREATE TABLE chat_members (
        room TEXT NOT NULL,
        user TEXT NOT NULL,
        joined_at REAL NOT NULL,
        PRIMARY KEY (room, user)
    ) WITHOUT ROWID;
    """,
)

_COLUMNS: Final = "room, id, sender, text, ts, meta, client_id, stream"


def _message(row: tuple[Any, ...], duplicate: bool = False) -> StoredMessage:
    room, id_, sender, text, ts, meta, client_id, stream = row
    return StoredMessage(
        room,
        id_,
        sender,
        text,
        ts,
        orjson.loads(meta) if meta is not None else None,
        client_id,
        stream,
        duplicate,
    )


class SqliteChatStore:
    """:class:`~raafd.store.chat.ChatStore` on the shared :class:`~raafd.store.db.Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def rooms(self) -> list[StoredRoom]:
        def read(conn: sqlite3.Connection) -> list[StoredRoom]:
            rows = conn.execute(
                "SELECT name, created_by, created_at, settings FROM chat_rooms ORDER BY created_at"
            ).fetchall()
            return [StoredRoom(n, by, at, orjson.loads(s)) for n, by, at, s in rows]

        return await self._db.read(read)

    async def create_room(self, room: StoredRoom) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO chat_rooms VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (room.name, room.created_by, room.created_at, orjson.dumps(room.settings)),
            )
            return cur.rowcount == 1

        return await self._db.write(write)

    async def delete_room(self, name: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            found = conn.execute("DELETE FROM chat_rooms WHERE name = ?", (name,)).rowcount
            for table in ("chat_messages", "chat_heads", "chat_members"):
                conn.execute(f"DELETE FROM {table} WHERE room = ?", (name,))
            return found == 1

        return await self._db.write(write)

    async def state(self, name: str) -> RoomState:
        def read(conn: sqlite3.Connection) -> RoomState:
            row = conn.execute("SELECT head FROM chat_heads WHERE room = ?", (name,)).fetchone()
            head = int(row[0]) if row else 0
            oldest = conn.execute(
                "SELECT MIN(id) FROM chat_messages WHERE room = ?", (name,)
            ).fetchone()[0]
            members = dict(
                conn.execute("SELECT user, joined_at FROM chat_members WHERE room = ?", (name,))
            )
            return RoomState(name, head, int(oldest) if oldest is not None else head + 1, members)

        return await self._db.read(read)

    async def append(
        self, room: str, head: int, messages: list[NewMessage], keep: int, ttl: float, now: float
    ) -> list[StoredMessage]:
        def write(conn: sqlite3.Connection) -> list[StoredMessage]:
            row = conn.execute("SELECT head FROM chat_heads WHERE room = ?", (room,)).fetchone()
            stored = int(row[0]) if row else 0
            if stored != head:
                raise RuntimeError(f"room {room}: head {head} given, {stored} stored")
            out: list[StoredMessage] = []
            last = head
            for new in messages:
                if new.client_id is not None:
                    found = conn.execute(
                        f"SELECT {_COLUMNS} FROM chat_messages"
                        " WHERE room = ? AND sender = ? AND client_id = ?",
                        (room, new.sender, new.client_id),
                    ).fetchone()
                    if found is not None:
                        out.append(_message(found, duplicate=True))
                        continue
                last += 1
                meta = orjson.dumps(new.meta) if new.meta is not None else None
                conn.execute(
                    "INSERT INTO chat_messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (room, last, new.sender, new.text, new.ts, meta, new.client_id, new.stream),
                )
                out.append(new.stored(room, last))
            if last != head:
                conn.execute(
                    "INSERT INTO chat_heads VALUES (?, ?)"
                    " ON CONFLICT (room) DO UPDATE SET head = excluded.head",
                    (room, last),
                )
                conn.execute(
                    "DELETE FROM chat_messages WHERE room = ? AND id <= ?", (room, last - keep)
                )
                if ttl > 0:
                    conn.execute(
                        "DELETE FROM chat_messages WHERE room = ? AND ts < ?", (room, now - ttl)
                    )
            return out

        return await self._db.write(write)

    async def messages(
        self, room: str, *, after: int | None = None, before: int | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        def read(conn: sqlite3.Connection) -> list[StoredMessage]:
            lo = after if after is not None else -1
            hi = before if before is not None else 1 << 62
            order = "ASC" if after is not None else "DESC"
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM chat_messages"
                f" WHERE room = ? AND id > ? AND id < ? ORDER BY id {order} LIMIT ?",
                (room, lo, hi, max(limit, 0)),
            ).fetchall()
            if after is None:
                rows.reverse()
            return [_message(r) for r in rows]

        return await self._db.read(read)

    async def add_member(self, room: str, user: str, now: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO chat_members VALUES (?, ?, ?) ON CONFLICT (room, user) DO NOTHING",
                (room, user, now),
            )

        await self._db.write(write)

    async def remove_member(self, room: str, user: str) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM chat_members WHERE room = ? AND user = ?", (room, user))
            return cur.rowcount == 1

        return await self._db.write(write)
