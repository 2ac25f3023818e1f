"""The event store on PostgreSQL (asyncpg), with a global log no reader can skip.

How the global log is ordered and why a reader cannot skip an event is explained in
``docs/eventstore.md`` ("The global log"); the short version is in
:class:`PostgresEventStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any, Protocol

from atoll._urls import redact
from atoll.determinism import Clock, SystemClock
from atoll.eventstore._base import EventStore, Transaction, check_identifier, common_schema
from atoll.eventstore._errors import (
    ConcurrencyError,
    DuplicateEventError,
    StreamDeletedError,
)
from atoll.eventstore._model import (
    ANY,
    NO_STREAM,
    START,
    STREAM_EXISTS,
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
from atoll.eventstore._sqlite import check_truncation, idempotent_result
from atoll.persistence import (
    DatabaseError,
    DatabaseUnavailableError,
    IntegrityError,
    Row,
    Session,
    TransientDatabaseError,
)

log = logging.getLogger("atoll.eventstore")

_MASK64 = (1 << 64) - 1

#: The order key of an event: never less than its own transaction id (so it becomes
#: readable only once that transaction has ended), nor than the id of any transaction
#: the inserting statement sees as committed (its snapshot's xmax - 1, the newest
#: completed id), nor than the previous event of the same stream (``last_tx`` of the
#: stream row, read under its row lock). Every id at or below the key was handed out
#: before the append, so no transaction that starts later can hold the event back.
_ORDER_KEY = (
    "greatest(pg_current_xact_id(),"
    " (pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1)::text::xid8)"
)
#: Every transaction id below this has ended: committed rows with an order key below it
#: are final, and no transaction can still add one.
_WATERMARK = "pg_snapshot_xmin(pg_current_snapshot())"

_EVENT_COLUMNS = (
    "stream_id, version, tx_key, position, event_id, type, type_version, data, metadata,"
    " recorded_at"
)


def pack_position(tx_key: int, seq: int) -> int:
    """One int for the order ``(tx_key, seq)``: ``tx_key * 2**64 + seq``."""
    return (tx_key << 64) | seq


def unpack_position(position: int) -> tuple[int, int]:
    """The inverse of :func:`pack_position`."""
    if position < 0:
        raise ValueError(f"positions are >= 0, got {position}")
    return position >> 64, position & _MASK64


def format_position(position: int) -> str:
    """A PostgreSQL position as ``order_key:sequence`` for people."""
    tx_key, seq = unpack_position(position)
    return f"{tx_key}:{seq}"


class AsyncpgConnection(Protocol):
    """The part of :class:`asyncpg.Connection` the store uses."""

    async def execute(self, query: str, *args: Any) -> str: ...

    async def executemany(self, command: str, args: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: Any) -> Any: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...


@lru_cache(maxsize=512)
def qmark_to_dollar(sql: str) -> str:
    """Translate atoll's ``?`` placeholders to PostgreSQL's ``$1, $2, ...``.

    Question marks inside single-quoted literals, double-quoted identifiers and
    comments are left alone.
    """
    out: list[str] = []
    n = 0
    i = 0
    length = len(sql)
    while i < length:
        ch = sql[i]
        if ch in "'\"":
            end = sql.find(ch, i + 1)
            while end != -1 and end + 1 < length and sql[end + 1] == ch:
                end = sql.find(ch, end + 2)
            end = length - 1 if end == -1 else end
            out.append(sql[i : end + 1])
            i = end + 1
            continue
        if ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = length if end == -1 else end
            out.append(sql[i:end])
            i = end
            continue
        if ch == "?":
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _rowcount(status: str) -> int:
    """The row count of a command status such as ``INSERT 0 3`` or ``UPDATE 2``."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def map_pg_error(exc: BaseException, what: str) -> DatabaseError:
    """Translate an asyncpg error into atoll's hierarchy, naming what was being done."""
    import asyncpg  # noqa: PLC0415 - optional extra

    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(f"{what}: {exc}")
    if isinstance(
        exc,
        asyncpg.SerializationError
        | asyncpg.DeadlockDetectedError
        | asyncpg.LockNotAvailableError
        | asyncpg.QueryCanceledError,
    ):
        return TransientDatabaseError(f"{what}: {exc}")
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | ConnectionError
        | OSError,
    ):
        return DatabaseUnavailableError(f"{what}: {exc}")
    return DatabaseError(f"{what}: {exc}")


def _is_driver_error(exc: BaseException) -> bool:
    import asyncpg  # noqa: PLC0415 - optional extra

    return isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError)


class PostgresTransaction(Session):
    """A :class:`~atoll.persistence.Session` over one asyncpg connection.

    Takes atoll's ``?`` placeholders. :meth:`on_commit` callbacks run after the store's
    own transaction commits. ``connection`` is the asyncpg connection, for code that
    needs PostgreSQL features the session does not cover (arrays, ``COPY``).
    """

    __slots__ = ("_callbacks", "connection", "what")

    def __init__(self, connection: Any, what: str) -> None:
        self.connection = connection
        self.what = what
        self._callbacks: list[Callable[[], None]] = []

    async def execute(self, sql: str, *params: Any) -> int:
        try:
            return _rowcount(await self.connection.execute(qmark_to_dollar(sql), *params))
        except Exception as exc:
            if _is_driver_error(exc):
                raise map_pg_error(exc, self.what) from exc
            raise

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self.connection.executemany(qmark_to_dollar(sql), rows)
        except Exception as exc:
            if _is_driver_error(exc):
                raise map_pg_error(exc, self.what) from exc
            raise

    async def fetch_all(self, sql: str, *params: Any) -> list[Row]:
        try:
            return list(await self.connection.fetch(qmark_to_dollar(sql), *params))
        except Exception as exc:
            if _is_driver_error(exc):
                raise map_pg_error(exc, self.what) from exc
            raise

    async def fetch_one(self, sql: str, *params: Any) -> Row | None:
        try:
            row: Row | None = await self.connection.fetchrow(qmark_to_dollar(sql), *params)
        except Exception as exc:
            if _is_driver_error(exc):
                raise map_pg_error(exc, self.what) from exc
            raise
        return row

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _run_commit_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def connection_of(tx: object) -> Any:
    """The asyncpg connection behind a transaction the store was given."""
    if isinstance(tx, PostgresTransaction):
        return tx.connection
    conn = getattr(tx, "connection", None)
    if conn is None:
        # atoll.service.Context wraps a unit of work.
        inner = getattr(tx, "unit_of_work", None)
        conn = getattr(inner, "connection", None)
    if conn is None:
        raise TypeError(
            f"{type(tx).__name__} is not a PostgreSQL transaction: pass store.transaction(), "
            "or a unit of work that exposes its asyncpg connection as `.connection`"
        )
    return conn


def _raw(row: Any) -> RawEvent:
    return RawEvent(
        stream_id=row[0],
        version=row[1],
        position=pack_position(row[2], row[3]),
        event_id=row[4].hex,
        type=row[5],
        type_version=row[6],
        data=row[7],
        metadata=row[8],
        recorded_at=row[9],
    )


def _stream_info(row: Any) -> StreamInfo:
    return StreamInfo(
        stream_id=row[0],
        version=int(row[1]),
        deleted=bool(row[2]),
        truncated_before=int(row[3]),
        metadata=decode_metadata(row[4]),
        created_at=float(row[5]),
        updated_at=float(row[6]),
    )


def postgres_schema(schema: str, prefix: str) -> list[str]:
    """The event store's DDL for PostgreSQL."""
    t = f'"{schema}".{prefix}'
    statements = [
        f'CREATE SCHEMA IF NOT EXISTS "{schema}"',
        # fillfactor: appenders to different streams update different rows; fewer rows
        # per page means less contention on hot pages.
        f"""CREATE TABLE IF NOT EXISTS {t}streams (
            stream_id text PRIMARY KEY,
            version bigint NOT NULL,
            deleted boolean NOT NULL DEFAULT false,
            truncate_before bigint NOT NULL DEFAULT 0,
            metadata bytea,
            last_tx xid8 NOT NULL DEFAULT '0',
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL
        ) WITH (fillfactor = 20)""",
        # position: an identity with the default CACHE 1, so that values are handed out
        # in increasing order across sessions (a cache would let a later append take a
        # lower number); the order of the log relies on it within one order key.
        f"""CREATE TABLE IF NOT EXISTS {t}events (
            position bigint GENERATED ALWAYS AS IDENTITY,
            tx_key xid8 NOT NULL,
            stream_id text NOT NULL,
            version bigint NOT NULL,
            event_id uuid NOT NULL,
            type text NOT NULL,
            type_version integer NOT NULL,
            data bytea NOT NULL,
            metadata bytea NOT NULL,
            recorded_at double precision NOT NULL,
            PRIMARY KEY (stream_id, version)
        )""",
        f"CREATE UNIQUE INDEX IF NOT EXISTS {prefix}events_event_id ON {t}events (event_id)",
        f"CREATE UNIQUE INDEX IF NOT EXISTS {prefix}events_log ON {t}events (tx_key, position)",
    ]
    statements += [
        s.format(t=t, i=prefix)
        for s in common_schema(blob="bytea", real="double precision", position="numeric")
    ]
    return statements


def _append_sql(t: str, expected: ExpectedVersion) -> str:
    """One statement that checks the stream, locks its row and inserts the events.

    ``$1`` stream id, ``$2`` event count, ``$3..$7`` the event arrays, ``$8`` the time,
    ``$9`` the exact expected version (only for an exact expectation). It returns no
    rows when the stream is not as expected, is deleted, or holds the first event id
    already; the caller then finds out which.
    """
    # Idempotency: a repeated append with an exact version or NO_STREAM fails its
    # version check and is then recognised by the diagnosis; with ANY or STREAM_EXISTS
    # it would not, so those look for the first event id up front.
    fresh = (
        f"NOT EXISTS (SELECT 1 FROM {t}events WHERE event_id = ($3::uuid[])[1])"
        if expected is ANY or expected is STREAM_EXISTS
        else "true"
    )
    insert = f"""
INSERT INTO {t}events (tx_key, stream_id, version, event_id, type, type_version, data,
    metadata, recorded_at)
SELECT cur.tx, $1::text, cur.base + u.i, u.id, u.t, u.tv, u.d, u.m, $8::float8
FROM cur, unnest($3::uuid[], $4::text[], $5::int[], $6::bytea[], $7::bytea[])
    WITH ORDINALITY AS u(id, t, tv, d, m, i)
ORDER BY u.i
RETURNING version, tx_key, position"""
    if isinstance(expected, int) or expected is STREAM_EXISTS:
        condition = "s.version >= 0" if expected is STREAM_EXISTS else "s.version = $9::bigint"
        return f"""
WITH cur AS (
    UPDATE {t}streams AS s
    SET version = s.version + $2::bigint, updated_at = $8::float8,
        last_tx = greatest({_ORDER_KEY}, s.last_tx)
    WHERE s.stream_id = $1::text AND NOT s.deleted AND {condition} AND {fresh}
    RETURNING s.version - $2::bigint AS base, s.last_tx AS tx
){insert}"""
    only_if = "s.version < 0 AND NOT s.deleted" if expected is NO_STREAM else "NOT s.deleted"
    return f"""
WITH cur AS (
    INSERT INTO {t}streams AS s (stream_id, version, last_tx, created_at, updated_at)
    SELECT $1::text, $2::bigint - 1, {_ORDER_KEY}, $8::float8, $8::float8 WHERE {fresh}
    ON CONFLICT (stream_id) DO UPDATE
    SET version = s.version + $2::bigint, updated_at = excluded.updated_at,
        last_tx = greatest(excluded.last_tx, s.last_tx)
    WHERE {only_if}
    RETURNING s.version - $2::bigint AS base, s.last_tx AS tx
){insert}"""


class PostgresEventStore(EventStore):
    """Event streams in PostgreSQL, through asyncpg.

    The global log is ordered by ``(order key, sequence)``. An event's order key is at
    least its own transaction's id, and readers only read events whose order key is
    below the *visibility watermark* ``pg_snapshot_xmin(pg_current_snapshot())`` of
    their own statement: every transaction with a lower id has ended, so no event can
    still appear below the watermark, and the watermark never moves back. A reader that
    pages through the log in that order therefore never skips an event that commits
    late and never sees one twice — without a table lock (writers to different streams
    run concurrently) and without a gap timer. An open transaction that has written
    anything holds the watermark back: delivery waits for it (:meth:`backlog` names the
    blocking backend), it never skips it.

    Readers are woken by a coalesced ``NOTIFY`` (at most one per ``notify_interval`` per
    store, sent outside the appending transactions, so commits are not serialised on
    the notification queue) and always poll as well.

    Runs standalone on its own pool (``dsn``; its connections put ``schema`` first on
    the ``search_path``, so unqualified read-model tables live next to the events), on a
    given asyncpg ``pool``, and inside a given transaction: pass ``tx=`` a
    :meth:`transaction`, or any unit of work that exposes its asyncpg connection as
    ``.connection``.
    """

    dialect = "postgresql"

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Any = None,
        schema: str = "public",
        prefix: str = "atoll_es_",
        clock: Clock | None = None,
        min_connections: int = 1,
        max_connections: int = 10,
        notify_interval: float = 0.005,
    ) -> None:
        super().__init__(prefix=prefix, clock=clock or SystemClock())
        if (dsn is None) == (pool is None):
            raise ValueError("PostgresEventStore takes either a dsn or a pool")
        self.schema = check_identifier(schema, "schema")
        self._dsn = dsn
        self._pool: Any = pool
        self._owns_pool = pool is None
        self._min_connections = min_connections
        self._max_connections = max_connections
        self._notify_interval = notify_interval
        self.what = f"postgres event store {redact(dsn) if dsn else 'on a pool'}"
        self.channel = self._channel_name()
        self._t = f'"{self.schema}".{self.prefix}'
        self._sql = {
            "exact": _append_sql(self._t, 0),
            "exists": _append_sql(self._t, STREAM_EXISTS),
            "new": _append_sql(self._t, NO_STREAM),
            "any": _append_sql(self._t, ANY),
        }
        self._notify_pending = False
        self._notifier: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresEventStore(schema={self.schema!r}, prefix={self.prefix!r})"

    def _channel_name(self) -> str:
        name = f"{self.schema}_{self.prefix}events"
        if len(name) > 60:
            name = "atoll_es_" + hashlib.sha256(name.encode()).hexdigest()[:40]
        return name

    def table(self, name: str) -> str:
        return f"{self._t}{name}"

    async def exclusive(self, tx: Transaction, name: str) -> None:
        key = f"{self.channel}:{name}".encode()
        lock_id = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1
        await connection_of(tx).execute("SELECT pg_advisory_xact_lock($1)", lock_id)

    @property
    def pool(self) -> Any:
        """The asyncpg pool (after :meth:`open`)."""
        if self._pool is None:
            raise DatabaseError(f"{self.what} is not open")
        return self._pool

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        self._closed = False
        if self._pool is None:
            import asyncpg  # noqa: PLC0415 - optional extra

            # The store leaves no session state either (its locks are transaction-scoped;
            # its listener is removed, UNLISTEN, before the connection goes back).
            from atoll.persistence.postgres._database import keep_session  # noqa: PLC0415

            try:
                # Read models that projections create without a schema land in the
                # store's schema, next to the events and checkpoints they derive from.
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_connections,
                    max_size=self._max_connections,
                    server_settings={"search_path": f'"{self.schema}", public'},
                    reset=keep_session,
                )
            except Exception as exc:
                raise map_pg_error(exc, f"connecting {self.what}") from exc
        lock_key = int.from_bytes(hashlib.sha256(self.channel.encode()).digest()[:8], "big") >> 1
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # Concurrent first starts must not race on CREATE ... IF NOT EXISTS.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
                for statement in postgres_schema(self.schema, self.prefix):
                    await conn.execute(statement)
        except Exception as exc:
            if _is_driver_error(exc):
                raise map_pg_error(exc, f"creating the tables of {self.what}") from exc
            raise

    async def close(self) -> None:
        self._closed = True
        for task in (self._notifier, self._listener):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._notifier = self._listener = None
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # -- transactions ---------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        async with self.pool.acquire() as conn:
            tx = PostgresTransaction(conn, self.what)
            try:
                async with conn.transaction():
                    yield tx
            except Exception as exc:
                if _is_driver_error(exc):
                    raise map_pg_error(exc, f"a transaction on {self.what}") from exc
                raise
            tx._run_commit_callbacks()

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[Session]:
        async with self.pool.acquire() as conn:
            yield PostgresTransaction(conn, self.what)

    @asynccontextmanager
    async def _conn(self, tx: object | None) -> AsyncIterator[Any]:
        if tx is not None:
            yield connection_of(tx)
            return
        async with self.pool.acquire() as conn:
            yield conn

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
        ids = [uuid.UUID(normalize_event_id(e.event_id)) for e in events]
        if len(set(ids)) != len(ids):
            raise DuplicateEventError(stream_id, "the same event id appears twice in one append")
        extra: tuple[int, ...] = ()
        if isinstance(expected_version, int):
            sql, extra = self._sql["exact"], (expected_version,)
        else:
            key = {ANY: "any", NO_STREAM: "new", STREAM_EXISTS: "exists"}[expected_version]
            sql = self._sql[key]
        args = (
            stream_id,
            len(events),
            ids,
            [e.type for e in events],
            [e.type_version for e in events],
            [e.data for e in events],
            [e.metadata for e in events],
            self.clock.time(),
            *extra,
        )
        # A diagnosis can find that the state changed again since the append statement
        # (the condition that failed no longer holds): then the append is tried again.
        for _ in range(5):
            result = await self._try_append(
                stream_id, ids=ids, expected=expected_version, sql=sql, args=args, tx=tx
            )
            if result is not None:
                return result
        raise ConcurrencyError(stream_id, describe_expected(expected_version), -1)

    async def _try_append(
        self,
        stream_id: str,
        *,
        ids: list[uuid.UUID],
        expected: ExpectedVersion,
        sql: str,
        args: tuple[Any, ...],
        tx: Transaction | None,
    ) -> AppendResult | None:
        import asyncpg  # noqa: PLC0415 - optional extra

        try:
            async with self._conn(tx) as conn:
                rows = await conn.fetch(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            # Only possible for event ids stored under another stream, or a concurrent
            # append of the same ids: the statement stored nothing. In a caller's
            # transaction the error has aborted it, so it cannot be reported as success.
            result = await self._diagnose(stream_id, ids, expected, None)
            if result is not None and tx is None:
                return result
            raise DuplicateEventError(stream_id, f"an event id is already stored ({exc})") from exc
        except Exception as exc:
            if _is_driver_error(exc):
                raise map_pg_error(exc, f"appending to {stream_id!r} in {self.what}") from exc
            raise
        if not rows:
            return await self._diagnose(stream_id, ids, expected, tx)
        rows = sorted(rows, key=lambda r: r[0])
        if tx is None:
            self._committed()
        else:
            tx.on_commit(self._committed)
        return AppendResult(
            stream_id=stream_id,
            first_version=rows[0][0],
            last_version=rows[-1][0],
            first_position=pack_position(rows[0][1], rows[0][2]),
            last_position=pack_position(rows[-1][1], rows[-1][2]),
        )

    async def _diagnose(
        self,
        stream_id: str,
        ids: list[uuid.UUID],
        expected: ExpectedVersion,
        tx: Transaction | None,
    ) -> AppendResult | None:
        """Why an append stored nothing: raise, return the earlier result, or ``None``."""
        t = self._t
        async with self._conn(tx) as conn:
            stream = await conn.fetchrow(
                f"SELECT version, deleted FROM {t}streams WHERE stream_id = $1", stream_id
            )
            found = await conn.fetch(
                f"SELECT event_id, stream_id, version, tx_key, position FROM {t}events"
                " WHERE event_id = ANY($1::uuid[])",
                ids,
            )
        current = -1 if stream is None else int(stream[0])
        if stream is not None and stream[1]:
            raise StreamDeletedError(stream_id, current)
        if found:
            return idempotent_result(
                stream_id,
                [i.hex for i in ids],
                {r[0].hex: (r[1], r[2], pack_position(r[3], r[4])) for r in found},
            )
        if not expected_matches(expected, current):
            raise ConcurrencyError(stream_id, describe_expected(expected), current)
        return None

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
        t = self._t
        async with self._conn(tx) as conn:
            stream = await conn.fetchrow(
                f"SELECT version, deleted FROM {t}streams WHERE stream_id = $1", stream_id
            )
            if stream is None:
                return []
            if stream[1]:
                raise StreamDeletedError(stream_id, int(stream[0]))
            if backwards:
                start = int(stream[0]) if from_version is None else from_version
                rows = await conn.fetch(
                    f"SELECT {_EVENT_COLUMNS} FROM {t}events WHERE stream_id = $1"
                    " AND version <= $2 ORDER BY version DESC LIMIT $3",
                    stream_id,
                    start,
                    limit,
                )
            else:
                rows = await conn.fetch(
                    f"SELECT {_EVENT_COLUMNS} FROM {t}events WHERE stream_id = $1"
                    " AND version >= $2 ORDER BY version LIMIT $3",
                    stream_id,
                    0 if from_version is None else from_version,
                    limit,
                )
        return [_raw(row) for row in rows]

    async def stream_info(
        self, stream_id: str, *, tx: Session | Transaction | None = None
    ) -> StreamInfo | None:
        async with self._conn(tx) as conn:
            row = await conn.fetchrow(
                "SELECT stream_id, version, deleted, truncate_before, metadata, created_at,"
                f" updated_at FROM {self._t}streams WHERE stream_id = $1",
                stream_id,
            )
        return None if row is None else _stream_info(row)

    async def set_stream_metadata(
        self, stream_id: str, metadata: dict[str, Any], *, tx: Transaction | None = None
    ) -> None:
        async with self._conn(tx) as conn:
            await conn.execute(
                f"INSERT INTO {self._t}streams (stream_id, version, metadata, created_at,"
                " updated_at) VALUES ($1, -1, $2, $3, $3) ON CONFLICT (stream_id) DO UPDATE"
                " SET metadata = excluded.metadata, updated_at = excluded.updated_at",
                stream_id,
                encode_metadata(metadata),
                self.clock.time(),
            )

    @asynccontextmanager
    async def _locked_stream(
        self, stream_id: str, tx: Transaction | None
    ) -> AsyncIterator[tuple[Any, Any]]:
        """A connection in a transaction, with the stream's row (if any) locked."""
        async with self._writing(tx) as w:
            conn = connection_of(w)
            row = await conn.fetchrow(
                f"SELECT version, deleted FROM {self._t}streams WHERE stream_id = $1 FOR UPDATE",
                stream_id,
            )
            yield conn, row

    async def delete_stream(
        self,
        stream_id: str,
        *,
        expected_version: ExpectedVersion = ANY,
        tx: Transaction | None = None,
    ) -> None:
        check_expected(expected_version)
        t = self._t
        async with self._locked_stream(stream_id, tx) as (conn, row):
            current = -1 if row is None else int(row[0])
            if row is not None and row[1]:
                raise StreamDeletedError(stream_id, current)
            if not expected_matches(expected_version, current):
                raise ConcurrencyError(stream_id, describe_expected(expected_version), current)
            await conn.execute(
                f"INSERT INTO {t}streams (stream_id, version, deleted, created_at, updated_at)"
                " VALUES ($1, -1, true, $2, $2) ON CONFLICT (stream_id) DO UPDATE"
                " SET deleted = true, updated_at = excluded.updated_at",
                stream_id,
                self.clock.time(),
            )
            await conn.execute(f"DELETE FROM {t}events WHERE stream_id = $1", stream_id)
            await conn.execute(f"DELETE FROM {t}snapshots WHERE stream_id = $1", stream_id)

    async def truncate_before(
        self, stream_id: str, version: int, *, tx: Transaction | None = None
    ) -> None:
        t = self._t
        async with self._locked_stream(stream_id, tx) as (conn, row):
            check_truncation(stream_id, version, None if row is None else (row[0], row[1]))
            await conn.execute(
                f"UPDATE {t}streams SET truncate_before = greatest(truncate_before, $2),"
                " updated_at = $3 WHERE stream_id = $1",
                stream_id,
                version,
                self.clock.time(),
            )
            await conn.execute(
                f"DELETE FROM {t}events WHERE stream_id = $1 AND version < $2", stream_id, version
            )

    async def list_streams(
        self, *, after: str | None = None, limit: int = 100, prefix: str | None = None
    ) -> list[StreamInfo]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT stream_id, version, deleted, truncate_before, metadata, created_at,"
                f" updated_at FROM {self._t}streams WHERE stream_id > $1"
                " AND ($2::text IS NULL OR left(stream_id, length($2)) = $2)"
                " ORDER BY stream_id LIMIT $3",
                after or "",
                prefix,
                limit,
            )
        return [_stream_info(row) for row in rows]

    # -- the global log -------------------------------------------------------------------

    async def read_all(self, *, after: int = START, limit: int = 500) -> list[RawEvent]:
        tx_key, seq = unpack_position(after)
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    f"SELECT {_EVENT_COLUMNS} FROM {self._t}events"
                    " WHERE (tx_key, position) > ($1::xid8, $2::bigint)"
                    f" AND tx_key < {_WATERMARK}"
                    " ORDER BY tx_key, position LIMIT $3",
                    tx_key,
                    seq,
                    limit,
                )
        except Exception as exc:
            if _is_driver_error(exc):
                raise map_pg_error(exc, f"reading the log of {self.what}") from exc
            raise
        return [_raw(row) for row in rows]

    async def read_last(self, limit: int = 10) -> list[RawEvent]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_EVENT_COLUMNS} FROM {self._t}events WHERE tx_key < {_WATERMARK}"
                " ORDER BY tx_key DESC, position DESC LIMIT $1",
                limit,
            )
        return [_raw(row) for row in reversed(rows)]

    async def head_position(self) -> int:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT tx_key, position FROM {self._t}events WHERE tx_key < {_WATERMARK}"
                " ORDER BY tx_key DESC, position DESC LIMIT 1"
            )
        return START if row is None else pack_position(row[0], row[1])

    async def backlog(self, after: int, *, cap: int = 100_000) -> Backlog:
        tx_key, seq = unpack_position(after)
        t = self._t
        # One snapshot for all four questions, so that they agree with each other.
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            count = await conn.fetchval(
                f"SELECT count(*) FROM (SELECT 1 FROM {t}events"
                " WHERE (tx_key, position) > ($1::xid8, $2::bigint)"
                f" AND tx_key < {_WATERMARK} LIMIT $3) AS behind",
                tx_key,
                seq,
                cap + 1,
            )
            oldest = await conn.fetchval(
                f"SELECT recorded_at FROM {t}events"
                " WHERE (tx_key, position) > ($1::xid8, $2::bigint)"
                f" AND tx_key < {_WATERMARK} ORDER BY tx_key, position LIMIT 1",
                tx_key,
                seq,
            )
            held = await conn.fetchrow(
                f"SELECT count(*), min(recorded_at) FROM {t}events WHERE tx_key >= {_WATERMARK}"
            )
            blocked_by = None
            if held[0]:
                blocker = await conn.fetchrow(
                    "SELECT pid, state, extract(epoch FROM now() - xact_start),"
                    " left(query, 120) FROM pg_stat_activity"
                    f" WHERE backend_xid = xid({_WATERMARK})"
                )
                if blocker is not None:
                    blocked_by = (
                        f"pid {blocker[0]} ({blocker[1]}, transaction open for "
                        f"{float(blocker[2] or 0):.1f} s): {blocker[3]}"
                    )
        candidates = [v for v in (oldest, held[1]) if v is not None]
        return Backlog(
            events=min(int(count), cap),
            capped=int(count) > cap,
            held_back=int(held[0]),
            oldest_recorded_at=min(candidates) if candidates else None,
            blocked_by=blocked_by,
        )

    async def has_held_back(self) -> bool:
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    f"SELECT EXISTS (SELECT 1 FROM {self._t}events WHERE tx_key >= {_WATERMARK})"
                )
            )

    # -- wake-ups -------------------------------------------------------------------------

    def _committed(self) -> None:
        super()._committed()
        if self._closed:
            return
        self._notify_pending = True
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify_loop())

    async def _notify_loop(self) -> None:
        """Send at most one NOTIFY per interval, outside any appending transaction."""
        while self._notify_pending and not self._closed:
            self._notify_pending = False
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute("SELECT pg_notify($1, '')", self.channel)
            except Exception as exc:
                log.debug("%s: NOTIFY failed (readers still poll): %s", self.what, exc)
            await self.clock.sleep(self._notify_interval)

    def _ensure_listening(self) -> None:
        if self._closed or (self._listener is not None and not self._listener.done()):
            return
        self._listener = asyncio.get_running_loop().create_task(self._listen_loop())

    async def _listen_loop(self) -> None:
        """Keep one connection LISTENing; hints from other processes wake local readers."""
        delay = 0.1
        while not self._closed:
            lost = asyncio.Event()
            try:
                async with self.pool.acquire() as conn:
                    conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                    await conn.add_listener(self.channel, self._on_notify)
                    delay = 0.1
                    try:
                        # Woken readers catch up on anything missed while reconnecting.
                        self._hub.wake()
                        await lost.wait()
                    finally:
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(self.channel, self._on_notify)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: LISTEN failed, readers poll until it is back: %s", self.what, exc)
            await self.clock.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_notify(self, *_args: object) -> None:
        self._hub.wake()
