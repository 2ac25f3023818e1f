"""The event store in a service's own SQLite database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from atoll.determinism import Clock, SystemClock
from atoll.eventstore._base import EventStore, Transaction, common_schema
from atoll.eventstore._errors import (
    ConcurrencyError,
    DuplicateEventError,
    EventStoreError,
    StreamDeletedError,
)
from atoll.eventstore._model import (
    ANY,
    START,
    AppendResult,
    Backlog,
    EventData,
    ExpectedVersion,
    RawEvent,
    StreamInfo,
    check_expected,
    decode_metadata,
    describe_expected,
    encode_metadata,
    expected_matches,
    normalize_event_id,
)
from atoll.persistence import DatabaseError, Row, Session, SQLiteDatabase
from atoll.persistence._sqlite import Synchronous

_EVENT_COLUMNS = (
    "stream_id, version, position, event_id, type, type_version, data, metadata, recorded_at"
)
#: Rows per multi-row INSERT: well under SQLite's 32766 bound variables.
_INSERT_CHUNK = 500


def _raw(row: Row) -> RawEvent:
    return RawEvent(
        stream_id=row[0],
        version=row[1],
        position=row[2],
        event_id=row[3],
        type=row[4],
        type_version=row[5],
        data=bytes(row[6]),
        metadata=bytes(row[7]),
        recorded_at=row[8],
    )


def _stream_info(row: Row) -> StreamInfo:
    return StreamInfo(
        stream_id=row[0],
        version=int(row[1]),
        deleted=bool(row[2]),
        truncated_before=int(row[3]),
        metadata=decode_metadata(None if row[4] is None else bytes(row[4])),
        created_at=float(row[5]),
        updated_at=float(row[6]),
    )


def sqlite_schema(prefix: str) -> list[str]:
    """The event store's DDL for SQLite, for tables named ``prefix...``."""
    statements = [
        """CREATE TABLE IF NOT EXISTS {t}streams (
            stream_id TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0,
            truncate_before INTEGER NOT NULL DEFAULT 0,
            metadata BLOB,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        # AUTOINCREMENT: a position is never reused, even after the newest events are
        # deleted, so a reader's checkpoint can never point past a new event.
        """CREATE TABLE IF NOT EXISTS {t}events (
            position INTEGER PRIMARY KEY AUTOINCREMENT,
            stream_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            event_id TEXT NOT NULL,
            type TEXT NOT NULL,
            type_version INTEGER NOT NULL,
            data BLOB NOT NULL,
            metadata BLOB NOT NULL,
            recorded_at REAL NOT NULL
        )""",
        "CREATE UNIQUE INDEX IF NOT EXISTS {i}events_stream ON {t}events (stream_id, version)",
        "CREATE UNIQUE INDEX IF NOT EXISTS {i}events_event_id ON {t}events (event_id)",
        *common_schema(blob="BLOB", real="REAL", position="INTEGER"),
    ]
    return [s.format(t=prefix, i=prefix) for s in statements]


class SQLiteEventStore(EventStore):
    """Event streams in the tables ``atoll_es_*`` of a service's SQLite database.

    Appends take part in the service's units of work (pass the
    :class:`~atoll.persistence.UnitOfWork` or :class:`~atoll.service.Context` as
    ``tx``), so events, outbox messages and read models commit together. Without ``tx``
    each append is its own unit of work; concurrent ones share a commit (the database
    group-commits them).

    The global log needs no watermark here: SQLite has one writer at a time, positions
    come from ``AUTOINCREMENT`` inside the write transaction, and readers see whole
    transactions only, so positions become visible in increasing order.
    """

    dialect = "sqlite"

    def __init__(
        self,
        database: SQLiteDatabase,
        *,
        prefix: str = "atoll_es_",
        clock: Clock | None = None,
        owns_database: bool = False,
    ) -> None:
        super().__init__(prefix=prefix, clock=clock or SystemClock())
        self.database = database
        self._owns_database = owns_database

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        prefix: str = "atoll_es_",
        synchronous: Synchronous = "FULL",
        clock: Clock | None = None,
    ) -> SQLiteEventStore:
        """A store with its own database file (closed with the store)."""
        database = SQLiteDatabase(path, synchronous=synchronous, clock=clock)
        return cls(database, prefix=prefix, clock=clock, owns_database=True)

    def __repr__(self) -> str:
        return f"SQLiteEventStore({str(self.database.path)!r}, prefix={self.prefix!r})"

    async def open(self) -> None:
        await self.database.open()
        await self.database.migrate(f"atoll.eventstore:{self.prefix}:1", sqlite_schema(self.prefix))

    async def close(self) -> None:
        if self._owns_database:
            await self.database.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.database.unit_of_work() as uow:
            yield uow

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[Session]:
        async with self.database.read() as session:
            yield session

    # -- appending ------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[EventData],
        expected_version: ExpectedVersion = ANY,
        *,
        tx: Transaction | None = None,
    ) -> AppendResult:
        check_expected(expected_version)
        if not events:
            raise ValueError(f"append to {stream_id!r}: no events given")
        ids = [normalize_event_id(e.event_id) for e in events]
        if len(set(ids)) != len(ids):
            raise DuplicateEventError(stream_id, "the same event id appears twice in one append")
        if tx is None:
            # Our own unit of work: its savepoint already undoes a failed append.
            async with self.database.unit_of_work() as uow:
                result = await self._append(uow, stream_id, events, ids, expected_version)
                if not result.deduplicated:
                    uow.on_commit(self._committed)
            return result
        # A savepoint of our own: a failed append leaves nothing behind even in a unit of
        # work whose owner catches the error and carries on.
        await tx.execute("SAVEPOINT atoll_es_append")
        try:
            result = await self._append(tx, stream_id, events, ids, expected_version)
        except BaseException:
            try:
                await tx.execute("ROLLBACK TO atoll_es_append")
                await tx.execute("RELEASE atoll_es_append")
            except DatabaseError:
                pass  # the transaction is gone: the unit of work fails as a whole
            raise
        await tx.execute("RELEASE atoll_es_append")
        if not result.deduplicated:
            tx.on_commit(self._committed)
        return result

    async def _append(
        self,
        w: Transaction,
        stream_id: str,
        events: Sequence[EventData],
        ids: list[str],
        expected: ExpectedVersion,
    ) -> AppendResult:
        t = self.prefix
        marks = ", ".join("?" * len(ids))
        # One statement: the stream's state, and whether any of the ids is stored.
        row = await w.fetch_one(
            f"SELECT (SELECT version FROM {t}streams WHERE stream_id = ?),"
            f" (SELECT deleted FROM {t}streams WHERE stream_id = ?),"
            f" EXISTS (SELECT 1 FROM {t}events WHERE event_id IN ({marks}))",
            stream_id,
            stream_id,
            *ids,
        )
        assert row is not None
        current = -1 if row[0] is None else int(row[0])
        if row[1]:
            raise StreamDeletedError(stream_id, current)
        if row[2]:
            existing = await w.fetch_all(
                f"SELECT event_id, stream_id, version, position FROM {t}events"
                f" WHERE event_id IN ({marks})",
                *ids,
            )
            return idempotent_result(stream_id, ids, {r[0]: (r[1], r[2], r[3]) for r in existing})
        if not expected_matches(expected, current):
            raise ConcurrencyError(stream_id, describe_expected(expected), current)
        now = self.clock.time()
        last = current + len(events)
        await w.execute(
            f"INSERT INTO {t}streams (stream_id, version, created_at, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET"
            " version = excluded.version, updated_at = excluded.updated_at",
            stream_id,
            last,
            now,
            now,
        )
        positions: list[int] = []
        for start in range(0, len(events), _INSERT_CHUNK):
            chunk = events[start : start + _INSERT_CHUNK]
            params: list[Any] = []
            for offset, event in enumerate(chunk, start):
                params += (
                    stream_id,
                    current + 1 + offset,
                    ids[offset],
                    event.type,
                    event.type_version,
                    event.data,
                    event.metadata,
                    now,
                )
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            rows = await w.fetch_all(
                f"INSERT INTO {t}events (stream_id, version, event_id, type, type_version,"
                f" data, metadata, recorded_at) VALUES {values} RETURNING position",
                *params,
            )
            positions += sorted(int(r[0]) for r in rows)
        return AppendResult(
            stream_id=stream_id,
            first_version=current + 1,
            last_version=last,
            first_position=positions[0],
            last_position=positions[-1],
        )

    # -- streams --------------------------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
        tx: Session | Transaction | None = None,
    ) -> list[RawEvent]:
        t = self.prefix
        async with self._reading(tx) as r:
            row = await r.fetch_one(
                f"SELECT version, deleted FROM {t}streams WHERE stream_id = ?", stream_id
            )
            if row is None:
                return []
            if row[1]:
                raise StreamDeletedError(stream_id, int(row[0]))
            if backwards:
                start = int(row[0]) if from_version is None else from_version
                sql = (
                    f"SELECT {_EVENT_COLUMNS} FROM {t}events WHERE stream_id = ?"
                    " AND version <= ? ORDER BY version DESC LIMIT ?"
                )
            else:
                start = 0 if from_version is None else from_version
                sql = (
                    f"SELECT {_EVENT_COLUMNS} FROM {t}events WHERE stream_id = ?"
                    " AND version >= ? ORDER BY version LIMIT ?"
                )
            rows = await r.fetch_all(sql, stream_id, start, -1 if limit is None else limit)
        return [_raw(row) for row in rows]

    async def stream_info(
        self, stream_id: str, *, tx: Session | Transaction | None = None
    ) -> StreamInfo | None:
        async with self._reading(tx) as r:
            row = await r.fetch_one(
                "SELECT stream_id, version, deleted, truncate_before, metadata, created_at,"
                f" updated_at FROM {self.prefix}streams WHERE stream_id = ?",
                stream_id,
            )
        return None if row is None else _stream_info(row)

    async def set_stream_metadata(
        self, stream_id: str, metadata: dict[str, Any], *, tx: Transaction | None = None
    ) -> None:
        now = self.clock.time()
        async with self._writing(tx) as w:
            await w.execute(
                f"INSERT INTO {self.prefix}streams (stream_id, version, metadata, created_at,"
                " updated_at) VALUES (?, -1, ?, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET"
                " metadata = excluded.metadata, updated_at = excluded.updated_at",
                stream_id,
                encode_metadata(metadata),
                now,
                now,
            )

    async def delete_stream(
        self,
        stream_id: str,
        *,
        expected_version: ExpectedVersion = ANY,
        tx: Transaction | None = None,
    ) -> None:
        check_expected(expected_version)
        t = self.prefix
        now = self.clock.time()
        async with self._writing(tx) as w:
            row = await w.fetch_one(
                f"SELECT version, deleted FROM {t}streams WHERE stream_id = ?", stream_id
            )
            current = -1 if row is None else int(row[0])
            if row is not None and row[1]:
                raise StreamDeletedError(stream_id, current)
            if not expected_matches(expected_version, current):
                raise ConcurrencyError(stream_id, describe_expected(expected_version), current)
            await w.execute(
                f"INSERT INTO {t}streams (stream_id, version, deleted, created_at, updated_at)"
                " VALUES (?, -1, 1, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET deleted = 1,"
                " updated_at = excluded.updated_at",
                stream_id,
                now,
                now,
            )
            await w.execute(f"DELETE FROM {t}events WHERE stream_id = ?", stream_id)
            await w.execute(f"DELETE FROM {t}snapshots WHERE stream_id = ?", stream_id)

    async def truncate_before(
        self, stream_id: str, version: int, *, tx: Transaction | None = None
    ) -> None:
        t = self.prefix
        async with self._writing(tx) as w:
            row = await w.fetch_one(
                f"SELECT version, deleted FROM {t}streams WHERE stream_id = ?", stream_id
            )
            check_truncation(stream_id, version, None if row is None else (row[0], row[1]))
            await w.execute(
                f"UPDATE {t}streams SET truncate_before = max(truncate_before, ?),"
                " updated_at = ? WHERE stream_id = ?",
                version,
                self.clock.time(),
                stream_id,
            )
            await w.execute(
                f"DELETE FROM {t}events WHERE stream_id = ? AND version < ?", stream_id, version
            )

    async def list_streams(
        self, *, after: str | None = None, limit: int = 100, prefix: str | None = None
    ) -> list[StreamInfo]:
        sql = (
            "SELECT stream_id, version, deleted, truncate_before, metadata, created_at,"
            f" updated_at FROM {self.prefix}streams WHERE stream_id > ?"
        )
        params: list[Any] = [after or ""]
        if prefix:
            sql += " AND substr(stream_id, 1, ?) = ?"
            params += [len(prefix), prefix]
        sql += " ORDER BY stream_id LIMIT ?"
        async with self.read_session() as r:
            rows = await r.fetch_all(sql, *params, limit)
        return [_stream_info(row) for row in rows]

    # -- the global log -------------------------------------------------------------------

    async def read_all(self, *, after: int = START, limit: int = 500) -> list[RawEvent]:
        async with self.read_session() as r:
            rows = await r.fetch_all(
                f"SELECT {_EVENT_COLUMNS} FROM {self.prefix}events WHERE position > ?"
                " ORDER BY position LIMIT ?",
                after,
                limit,
            )
        return [_raw(row) for row in rows]

    async def read_last(self, limit: int = 10) -> list[RawEvent]:
        async with self.read_session() as r:
            rows = await r.fetch_all(
                f"SELECT {_EVENT_COLUMNS} FROM {self.prefix}events ORDER BY position DESC LIMIT ?",
                limit,
            )
        return [_raw(row) for row in reversed(rows)]

    async def head_position(self) -> int:
        async with self.read_session() as r:
            value = await r.fetch_value(f"SELECT max(position) FROM {self.prefix}events")
        return START if value is None else int(value)

    async def backlog(self, after: int, *, cap: int = 100_000) -> Backlog:
        t = self.prefix
        async with self.read_session() as r:
            count = await r.fetch_value(
                f"SELECT count(*) FROM (SELECT 1 FROM {t}events WHERE position > ? LIMIT ?)",
                after,
                cap + 1,
            )
            oldest = await r.fetch_value(
                f"SELECT recorded_at FROM {t}events WHERE position > ? ORDER BY position LIMIT 1",
                after,
            )
        return Backlog(
            events=min(int(count), cap),
            capped=int(count) > cap,
            held_back=0,
            oldest_recorded_at=None if oldest is None else float(oldest),
        )


def idempotent_result(
    stream_id: str, ids: list[str], found: dict[str, tuple[str, int, int]]
) -> AppendResult:
    """The earlier result if ``ids`` were appended to ``stream_id`` exactly so; else raise.

    ``found`` maps each already stored id to ``(stream_id, version, position)``.
    """
    for event_id in ids:
        where = found.get(event_id)
        if where is None:
            first = next(iter(found))
            other = found[first]
            raise DuplicateEventError(
                stream_id,
                f"event {first} is already stored as {other[0]!r} v{other[1]} but event "
                f"{event_id} of the same append is not",
            )
        if where[0] != stream_id:
            raise DuplicateEventError(
                stream_id, f"event {event_id} is already stored in stream {where[0]!r}"
            )
    versions = [found[i][1] for i in ids]
    if versions != list(range(versions[0], versions[0] + len(versions))):
        raise DuplicateEventError(
            stream_id, "the event ids are already stored, but in another order or with gaps"
        )
    positions = [found[i][2] for i in ids]
    return AppendResult(
        stream_id=stream_id,
        first_version=versions[0],
        last_version=versions[-1],
        first_position=positions[0],
        last_position=positions[-1],
        deduplicated=True,
    )


def check_truncation(stream_id: str, version: int, row: tuple[Any, Any] | None) -> None:
    """Refuse to truncate a missing or deleted stream, or past its end."""
    if row is None:
        raise EventStoreError(f"cannot truncate stream {stream_id!r}: it does not exist")
    current, deleted = int(row[0]), bool(row[1])
    if deleted:
        raise StreamDeletedError(stream_id, current)
    if version < 0 or version > current + 1:
        raise ValueError(
            f"cannot truncate stream {stream_id!r} before v{version}: it is at v{current}"
        )
