"""A service database on PostgreSQL (asyncpg), with the outbox, the inbox and leases.

Why asyncpg: with the unit of work's statement mix (own row, inbox row, outbox rows,
COMMIT) asyncpg and psycopg 3 are level while the commit's fsync dominates, and asyncpg
is about twice as fast once it does not (``benchmarks/pg_drivers.py``); it also has a
binary protocol, cheap ``executemany`` and LISTEN/NOTIFY on any connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from atoll._urls import query_options, redact, reject_unknown, take_option
from atoll.determinism import Clock, SystemClock
from atoll.persistence._base import Database, OutboxRecord, Row, Session, UnitOfWork, core_schema
from atoll.persistence._errors import (
    CommitFailedError,
    DatabaseError,
    DatabaseFullError,
    DatabaseLockedError,
    DatabaseUnavailableError,
    IntegrityError,
    TransientDatabaseError,
)

log = logging.getLogger("atoll.persistence.postgres")

_SCHEMA = core_schema(autoincrement="BIGSERIAL PRIMARY KEY", blob="BYTEA", real="DOUBLE PRECISION")
#: Namespaces atoll's advisory locks (two-int form: (namespace, hashtext(name))).
_LOCK_OUTBOX_KEY = 0x41544F4C  # "ATOL"
_LOCK_MIGRATIONS = 0x41544F4D

_current_batch: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "atoll_pg_batch", default=None
)


@lru_cache(maxsize=1024)
def translate_placeholders(sql: str) -> str:
    """``?`` placeholders to ``$1, $2, ...``, leaving quoted text and comments alone."""
    out: list[str] = []
    n = 0
    i = 0
    length = len(sql)
    while i < length:
        ch = sql[i]
        if ch in ("'", '"'):
            end = i + 1
            while end < length:
                if sql[end] == ch:
                    if end + 1 < length and sql[end + 1] == ch:
                        end += 2
                        continue
                    break
                end += 1
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
    # asyncpg returns the command tag, e.g. "INSERT 0 1", "UPDATE 3", "DELETE 0".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def map_postgres_error(exc: BaseException, what: str) -> DatabaseError:  # noqa: PLR0911 - one return per error family
    """Translate a driver error into atoll's hierarchy, naming what was being done."""
    text = f"{what}: {exc}"
    if isinstance(exc, asyncpg.UniqueViolationError | asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(text)
    if isinstance(exc, asyncpg.DiskFullError | asyncpg.OutOfMemoryError):
        return DatabaseFullError(text)
    if isinstance(exc, asyncpg.LockNotAvailableError | asyncpg.DeadlockDetectedError):
        return DatabaseLockedError(text)
    if isinstance(
        exc,
        asyncpg.SerializationError | asyncpg.QueryCanceledError | asyncpg.TooManyConnectionsError,
    ):
        return TransientDatabaseError(text)
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | ConnectionError
        | OSError
        | TimeoutError,
    ):
        return DatabaseUnavailableError(text)
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return DatabaseError(f"{what}: authentication failed ({exc})")
    return DatabaseError(text)


_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@dataclass(slots=True)
class _Outgoing:
    message_id: str
    topic: str
    key: str | None
    body: bytes
    deliver_at: float | None
    traceparent: str | None


class PostgresSession(Session):
    """Statements on one connection; ``?`` placeholders translated to ``$n``."""

    __slots__ = ("_conn", "_what")

    def __init__(self, conn: asyncpg.Connection, what: str) -> None:
        self._conn = conn
        self._what = what

    async def execute(self, sql: str, *params: Any) -> int:
        try:
            return _rowcount(await self._conn.execute(translate_placeholders(sql), *params))
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, self._what) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(translate_placeholders(sql), list(rows))
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, self._what) from exc

    async def fetch_all(self, sql: str, *params: Any) -> list[Row]:
        try:
            return list(await self._conn.fetch(translate_placeholders(sql), *params))
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, self._what) from exc

    async def fetch_one(self, sql: str, *params: Any) -> Row | None:
        try:
            row: Row | None = await self._conn.fetchrow(translate_placeholders(sql), *params)
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, self._what) from exc
        return row


class PostgresUnitOfWork(PostgresSession, UnitOfWork):
    """A unit of work in a transaction (or a savepoint of a batch's transaction).

    Outgoing messages are buffered and written just before COMMIT, each key under a
    transaction-scoped advisory lock: two transactions that emit the same key commit
    their outbox rows in the order their sequence numbers were drawn, so the relay
    publishes each key in commit order.
    """

    __slots__ = ("_callbacks", "_db", "_outgoing", "connection")

    def __init__(self, conn: asyncpg.Connection, db: PostgresDatabase) -> None:
        super().__init__(conn, db.what)
        #: The asyncpg connection of this transaction (the event store appends on it).
        self.connection = conn
        self._db = db
        self._outgoing: list[_Outgoing] = []
        self._callbacks: list[Callable[[], None]] = []

    def add_outgoing(
        self,
        *,
        message_id: str,
        topic: str,
        key: str | None,
        body: bytes,
        deliver_at: float | None = None,
        traceparent: str | None = None,
    ) -> None:
        self._outgoing.append(_Outgoing(message_id, topic, key, body, deliver_at, traceparent))

    async def claim_inbox(self, consumer: str, message_id: str) -> bool:
        return (
            await self.execute(
                "INSERT INTO atoll_inbox (consumer, message_id, handled_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                consumer,
                message_id,
                self._db.now(),
            )
            == 1
        )

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)


async def _write_outbox(
    conn: asyncpg.Connection, db: PostgresDatabase, rows: list[_Outgoing]
) -> None:
    """Insert buffered messages, holding each key's advisory lock until COMMIT."""
    if not rows:
        return
    keys = sorted({r.key for r in rows if r.key is not None})
    if keys:
        # Sorted, so two transactions never wait on each other's keys in opposite order.
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(k)) FROM unnest($2::text[]) AS k",
            _LOCK_OUTBOX_KEY,
            keys,
        )
    now = db.now()
    await conn.executemany(
        "INSERT INTO atoll_outbox"
        " (message_id, topic, key, body, created_at, deliver_at, traceparent)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [(r.message_id, r.topic, r.key, r.body, now, r.deliver_at, r.traceparent) for r in rows],
    )


@dataclass(slots=True)
class _Batch:
    db: PostgresDatabase
    conn: asyncpg.Connection
    outgoing: list[_Outgoing] = field(default_factory=list)
    callbacks: list[Callable[[], None]] = field(default_factory=list)


async def keep_session(_connection: asyncpg.Connection) -> None:
    """Release a pooled connection as it is, without asyncpg's reset query.

    asyncpg resets every connection it takes back (``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL``): a round trip per unit of work. Without it, atoll's unit of
    work shape runs 1.3x faster when commits do not wait for the disk and 1.14x with one
    writer that does; with 8 writers waiting on fsync it makes no difference
    (``benchmarks/pg_drivers.py``, ``keep-session-vs-reset-*``). asyncpg still rolls back
    a transaction left open. What atoll runs leaves no
    session state (transaction-scoped advisory locks; its LISTEN has a connection of its
    own), so what remains is the rule of PgBouncer's transaction pooling for handler
    code: ``SET LOCAL``, not ``SET``; ``pg_advisory_xact_lock``, not session locks.
    """


def _url_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)


class PostgresDatabase(Database):
    """A service database on PostgreSQL, one schema per service.

    Units of work run concurrently on pooled connections (PostgreSQL isolates them);
    ``batch()`` holds one connection and transaction for the calling task, with a
    savepoint per unit of work. After a commit that wrote outbox records this process
    wakes its relay directly and sends at most one ``NOTIFY`` per ``notify_interval``
    for relays in other processes (a coalesced hint: one NOTIFY per transaction would
    serialise commits); relays also poll, so a lost notification loses nothing.

    A unit of work must leave no session state on its connection (see
    :func:`keep_session`): connections go back to the pool without a reset, unless
    ``reset_sessions`` (URL option ``reset_sessions=true``) asks for asyncpg's reset
    after every unit of work, at the price of a round trip each.
    """

    dialect = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        notify_interval: float = 0.005,
        reset_sessions: bool = False,
        clock: Clock | None = None,
    ) -> None:
        self.dsn = dsn
        self.reset_sessions = reset_sessions
        self.schema = schema
        self.what = f"postgresql database {redact(dsn)}" + (f" (schema {schema})" if schema else "")
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._ssl = ssl_context
        self._notify_interval = notify_interval
        self._clock: Clock = clock or SystemClock()
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._outbox_event = asyncio.Event()
        self._channel = f"atoll_outbox_{schema or 'public'}"
        self._last_notify = 0.0
        self._notify_pending = False

    def __repr__(self) -> str:
        return f"PostgresDatabase({redact(self.dsn)!r}, schema={self.schema!r})"

    @classmethod
    def from_url(cls, url: str, *, clock: Clock | None = None) -> PostgresDatabase:
        """``postgresql://user[:pass]@host:port/db?schema=orders&pool_max=10&sslmode=require``.

        Options: ``schema``, ``pool_min``, ``pool_max``, ``connect_timeout`` (seconds),
        ``reset_sessions`` (``true`` to reset each connection as it goes back to the pool).

        TLS: ``sslmode`` (``disable``, ``require``, ``verify-full``), ``sslrootcert``,
        ``sslcert``, ``sslkey`` file paths. The password may also come from
        ``password_file`` (a path) or the ``PGPASSWORD`` environment variable.
        """
        options = query_options(url)
        schema = take_option(options, "schema", str, None, url)
        pool_max = take_option(options, "pool_max", int, 10, url)
        pool_min = take_option(options, "pool_min", int, 1, url)
        timeout = take_option(options, "connect_timeout", float, 10.0, url)
        sslmode = take_option(options, "sslmode", str, "prefer", url)
        rootcert = take_option(options, "sslrootcert", str, None, url)
        cert = take_option(options, "sslcert", str, None, url)
        key = take_option(options, "sslkey", str, None, url)
        password_file = take_option(options, "password_file", str, None, url)
        reset_sessions = take_option(options, "reset_sessions", _url_bool, False, url)
        reject_unknown(options, url)
        parts = urlsplit(url)
        dsn = urlunsplit(parts._replace(scheme="postgresql", query=""))
        if password_file is not None:
            secret = Path(password_file).read_text(encoding="utf-8").strip()
            user = parts.username or "postgres"
            host = parts.netloc.rsplit("@", 1)[-1]
            dsn = urlunsplit(
                parts._replace(scheme="postgresql", netloc=f"{user}:{secret}@{host}", query="")
            )
        context: ssl.SSLContext | None = None
        if sslmode in ("require", "verify-ca", "verify-full"):
            context = ssl.create_default_context(cafile=rootcert)
            if sslmode == "require" and rootcert is None:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if cert is not None:
                context.load_cert_chain(cert, key)
        return cls(
            dsn,
            schema=schema,
            min_size=pool_min,
            max_size=pool_max,
            connect_timeout=timeout,
            ssl_context=context,
            reset_sessions=reset_sessions,
            clock=clock,
        )

    def now(self) -> float:
        return self._clock.time()

    # -- connections ----------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        # A startup parameter, not a SET: the pool's RESET ALL on release keeps it.
        return {"search_path": f'"{self.schema}"'} if self.schema else {}

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            if self.schema:
                admin = await asyncpg.connect(
                    self.dsn, timeout=self._connect_timeout, ssl=self._ssl
                )
                try:
                    await admin.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                except asyncpg.UniqueViolationError:
                    pass  # created concurrently by another instance
                finally:
                    await admin.close()
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                ssl=self._ssl,
                server_settings=self._server_settings(),
                reset=None if self.reset_sessions else keep_session,
            )
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, f"connecting to {self.what}") from exc
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", _LOCK_MIGRATIONS)
            for statement in _SCHEMA:
                await conn.execute(statement)
            # Tables made by atoll 0.1.0 before tracing lack the column.
            await conn.execute("ALTER TABLE atoll_outbox ADD COLUMN IF NOT EXISTS traceparent TEXT")
        await self._listen()

    async def _listen(self) -> None:
        with contextlib.suppress(*_DRIVER_ERRORS):
            conn = await asyncpg.connect(
                self.dsn,
                timeout=self._connect_timeout,
                ssl=self._ssl,
                server_settings=self._server_settings(),
            )
            await conn.add_listener(self._channel, self._on_notify)
            conn.add_termination_listener(self._on_listener_lost)
            self._listener = conn

    def _on_notify(self, *_: object) -> None:
        self._outbox_event.set()

    def _on_listener_lost(self, *_: object) -> None:
        # Polling covers the gap; the next wait_for_outbox reconnects.
        self._listener = None

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await listener.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (shared with the event store of the same service)."""
        return self._pool_or_raise()

    def _pool_or_raise(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseError(f"{self.what} is not open")
        return self._pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool_or_raise().acquire() as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, self.what) from exc

    # -- units of work --------------------------------------------------------------------

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        batch = _current_batch.get()
        if batch is not None and batch.db is self:
            async with self._savepoint(batch) as uow:
                yield uow
            return
        async with self._connection() as conn:
            uow = PostgresUnitOfWork(conn, self)
            try:
                transaction = conn.transaction()
                await transaction.start()
            except _DRIVER_ERRORS as exc:
                raise map_postgres_error(exc, f"starting a transaction on {self.what}") from exc
            try:
                yield uow
                await _write_outbox(conn, self, uow._outgoing)
            except BaseException as exc:
                with contextlib.suppress(*_DRIVER_ERRORS):
                    await transaction.rollback()
                if isinstance(exc, _DRIVER_ERRORS):
                    raise map_postgres_error(exc, self.what) from exc
                raise
            try:
                await transaction.commit()
            except _DRIVER_ERRORS as exc:
                error = map_postgres_error(exc, f"committing to {self.what}")
                raise CommitFailedError(str(error)) from exc
        self._committed(bool(uow._outgoing), uow._callbacks)

    @asynccontextmanager
    async def _savepoint(self, batch: _Batch) -> AsyncIterator[PostgresUnitOfWork]:
        uow = PostgresUnitOfWork(batch.conn, self)
        try:
            savepoint = batch.conn.transaction()
            await savepoint.start()
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, self.what) from exc
        try:
            yield uow
        except BaseException:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await savepoint.rollback()
            raise
        try:
            await savepoint.commit()
        except _DRIVER_ERRORS as exc:
            raise map_postgres_error(exc, self.what) from exc
        batch.outgoing.extend(uow._outgoing)
        batch.callbacks.extend(uow._callbacks)

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        current = _current_batch.get()
        if current is not None and current.db is self:
            yield
            return
        async with self._connection() as conn:
            try:
                transaction = conn.transaction()
                await transaction.start()
            except _DRIVER_ERRORS as exc:
                raise map_postgres_error(exc, f"starting a transaction on {self.what}") from exc
            batch = _Batch(self, conn)
            token = _current_batch.set(batch)
            try:
                yield
                await _write_outbox(conn, self, batch.outgoing)
            except BaseException as exc:
                _current_batch.reset(token)
                with contextlib.suppress(*_DRIVER_ERRORS):
                    await transaction.rollback()
                if isinstance(exc, _DRIVER_ERRORS):
                    raise map_postgres_error(exc, self.what) from exc
                raise
            _current_batch.reset(token)
            try:
                await transaction.commit()
            except _DRIVER_ERRORS as exc:
                error = map_postgres_error(exc, f"committing to {self.what}")
                raise CommitFailedError(str(error)) from exc
        self._committed(bool(batch.outgoing), batch.callbacks)

    def _committed(self, outgoing: bool, callbacks: list[Callable[[], None]]) -> None:
        if outgoing:
            self._outbox_event.set()
            self._hint_other_processes()
        for callback in callbacks:
            callback()

    def _hint_other_processes(self) -> None:
        """At most one NOTIFY per interval, sent outside any user transaction."""
        if self._notify_pending:
            return
        self._notify_pending = True
        delay = max(0.0, self._last_notify + self._notify_interval - self._clock.monotonic())
        task = asyncio.get_running_loop().create_task(self._notify_after(delay))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _notify_after(self, delay: float) -> None:
        try:
            if delay:
                await self._clock.sleep(delay)
            self._notify_pending = False
            self._last_notify = self._clock.monotonic()
            if self._pool is not None:
                async with self._pool.acquire() as conn:
                    await conn.execute("SELECT pg_notify($1, '')", self._channel)
        except Exception as exc:  # a hint only: relays poll anyway
            self._notify_pending = False
            log.debug("outbox notify failed: %s", exc)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Session]:
        async with self._connection() as conn:
            yield PostgresSession(conn, self.what)

    # -- migrations -----------------------------------------------------------------------

    async def migrate(self, name: str, statements: Sequence[str]) -> bool:
        """Apply once, under an advisory lock so concurrent instances do not race."""
        async with self.unit_of_work() as uow:
            await uow.execute("SELECT pg_advisory_xact_lock(?, 0)", _LOCK_MIGRATIONS)
            if await uow.fetch_value("SELECT 1 FROM atoll_migrations WHERE name = ?", name):
                return False
            for statement in statements:
                await uow.execute(statement)
            await uow.execute(
                "INSERT INTO atoll_migrations (name, applied_at) VALUES (?, ?)", name, self.now()
            )
        return True

    # -- outbox ---------------------------------------------------------------------------

    async def outbox_fetch(self, limit: int) -> list[OutboxRecord]:
        async with self.read() as session:
            rows = await session.fetch_all(
                "SELECT seq, message_id, topic, key, body, created_at, traceparent"
                " FROM atoll_outbox WHERE deliver_at IS NULL OR deliver_at <= ?"
                " ORDER BY seq LIMIT ?",
                self.now(),
                limit,
            )
        return [OutboxRecord(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) for r in rows]

    async def outbox_delete(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        async with self._connection() as conn:
            try:
                await conn.execute(
                    "DELETE FROM atoll_outbox WHERE seq = ANY($1::bigint[])", list(seqs)
                )
            except _DRIVER_ERRORS as exc:
                raise map_postgres_error(exc, self.what) from exc

    async def outbox_stats(self) -> tuple[int, float | None, float | None]:
        now = self.now()
        async with self.read() as session:
            row = await session.fetch_one(
                "SELECT count(*), min(created_at) FROM atoll_outbox"
                " WHERE deliver_at IS NULL OR deliver_at <= ?",
                now,
            )
            scheduled = await session.fetch_value(
                "SELECT min(deliver_at) FROM atoll_outbox WHERE deliver_at > ?", now
            )
        assert row is not None
        return int(row[0]), row[1], scheduled

    async def outbox_next_scheduled(self) -> float | None:
        async with self.read() as session:
            value = await session.fetch_value(
                "SELECT min(deliver_at) FROM atoll_outbox WHERE deliver_at > ?", self.now()
            )
        return None if value is None else float(value)

    async def wait_for_outbox(self, timeout: float) -> None:
        if self._listener is None and self._pool is not None:
            await self._listen()
        if not self._outbox_event.is_set():
            sleeper = asyncio.ensure_future(self._clock.sleep(timeout))
            waiter = asyncio.ensure_future(self._outbox_event.wait())
            try:
                await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()
        self._outbox_event.clear()

    # -- leases and inbox -----------------------------------------------------------------

    async def try_lease(self, name: str, owner: str, ttl: float) -> bool:
        now = self.now()
        async with self.unit_of_work() as uow:
            changed = await uow.execute(
                "INSERT INTO atoll_leases (name, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at"
                " WHERE atoll_leases.owner = excluded.owner OR atoll_leases.expires_at < ?",
                name,
                owner,
                now + ttl,
                now,
            )
        return changed == 1

    async def release_lease(self, name: str, owner: str) -> None:
        async with self.unit_of_work() as uow:
            await uow.execute("DELETE FROM atoll_leases WHERE name = ? AND owner = ?", name, owner)

    async def prune_inbox(self, older_than: float) -> int:
        async with self.unit_of_work() as uow:
            return await uow.execute("DELETE FROM atoll_inbox WHERE handled_at < ?", older_than)


_background: set[asyncio.Task[None]] = set()
