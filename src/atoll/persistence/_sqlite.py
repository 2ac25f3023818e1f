"""The embedded default: one SQLite file per service."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from atoll.determinism import Clock, SystemClock
from atoll.persistence._base import (
    Database,
    OutboxRecord,
    Row,
    Session,
    UnitOfWork,
    core_schema,
)
from atoll.persistence._errors import (
    CommitFailedError,
    DatabaseError,
    DatabaseFullError,
    DatabaseLockedError,
    IntegrityError,
    TransientDatabaseError,
)

T = TypeVar("T")
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_SCHEMA = core_schema(autoincrement="INTEGER PRIMARY KEY AUTOINCREMENT", blob="BLOB", real="REAL")

#: The batch (if any) the current task has open, per database.
_current_batch: contextvars.ContextVar[SQLiteDatabase | None] = contextvars.ContextVar(
    "atoll_sqlite_batch", default=None
)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def map_sqlite_error(exc: sqlite3.Error, what: str) -> DatabaseError:
    """Translate a driver error into atoll's hierarchy, naming what was being done."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return DatabaseLockedError(f"{what}: database is locked by another writer ({exc})")
    if name.startswith("SQLITE_FULL"):
        return DatabaseFullError(f"{what}: database or disk is full ({exc})")
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PROTOCOL")):
        return TransientDatabaseError(f"{what}: {exc}")
    if isinstance(exc, sqlite3.IntegrityError):
        return IntegrityError(f"{what}: {exc}")
    return DatabaseError(f"{what}: {exc}")


def _enter_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, waiting out other processes that open the file too.

    Switching to WAL (and running WAL recovery) answers SQLITE_BUSY at once, without the
    busy handler, while another connection does the same: several processes opening one
    new file together (``atoll up`` starting every service on one embedded bus) saw
    "database is locked" here. Runs on a database thread, never on the event loop.
    """
    waited = 0.0
    delay = 0.002
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            busy = (getattr(exc, "sqlite_errorname", "") or "").startswith("SQLITE_BUSY")
            if not busy or waited >= busy_timeout:
                raise
        else:
            return
        time.sleep(delay)  # determinism: allowed - a blocking retry on a database thread
        waited += delay
        delay = min(delay * 2, 0.05)


def _begin_without_waiting(conn: sqlite3.Connection, busy_timeout: float) -> bool:
    """``BEGIN IMMEDIATE`` if the write lock is free now; ``False`` (nothing done) if not.

    The busy handler is off for the attempt, so a lock held elsewhere answers
    SQLITE_BUSY at once instead of sleeping on the calling thread; it is restored after.
    """
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return False
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return True


#: The adapter for ``None``: ``{}.get(None)`` is ``None``, and a method in C costs less
#: than a Python function (about 600 instructions a call against 1,400).
_NO_ADAPTERS: Final[dict[None, None]] = {}
_none: Final = _NO_ADAPTERS.get


def register_identity_adapters() -> None:
    """Make binding ``bytes`` and ``None`` parameters cheap; nothing bound changes.

    CPython's ``sqlite3`` (3.11 at least) binds int, float and str directly but looks up
    an adapter for every other parameter, ``bytes`` and ``None`` included, and a miss
    costs a tuple, a dict lookup and two failed attribute lookups (one formats an
    AttributeError). Rows of ids, bodies and NULLs pay it several times: a collector
    span row eight times. An adapter that returns its value turns each miss into a hit:
    binding span rows took 7.4 then 4.5 µs a row (``--quick``) and 5.3 then 3.7 (full
    run), 0.2 to 0.4 µs a parameter (``benchmarks/collector_store.py``, case
    ``bind-adapted-vs-stock``). Registered only where nobody else has registered one, so
    an application's own adapters keep working.
    """
    if (bytes, sqlite3.PrepareProtocol) not in sqlite3.adapters:
        sqlite3.register_adapter(bytes, bytes)
    if (type(None), sqlite3.PrepareProtocol) not in sqlite3.adapters:
        sqlite3.register_adapter(type(None), _none)


register_identity_adapters()


def connect_sqlite(
    path: str | Path,
    *,
    synchronous: Synchronous,
    busy_timeout: float,
    read_only: bool = False,
) -> sqlite3.Connection:
    """Open a connection in WAL mode with atoll's settings, in autocommit mode."""
    conn = sqlite3.connect(
        str(path),
        isolation_level=None,
        check_same_thread=False,
        timeout=busy_timeout,
        cached_statements=256,
    )
    conn.row_factory = sqlite3.Row
    _enter_wal(conn, busy_timeout)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    # Each unit of work is a savepoint, and SQLite keeps the pages a savepoint changes
    # in a sub-journal, spilled to a temporary file past 64 KiB: then every page a
    # unit of work changes costs two pwrite() calls to that file. In memory it is a
    # copy. Measured on the saga benchmark: 22 pwrite() calls per saga before, 7 after.
    # It also keeps temporary tables and sorts in memory; they are small for a service.
    conn.execute("PRAGMA temp_store=MEMORY")
    if read_only:
        conn.execute("PRAGMA query_only=ON")
    return conn


class SQLiteSession(Session):
    """Statements on one SQLite connection, run inline on the event loop.

    Statements on a local file take microseconds; only lock waits and fsyncs (BEGIN
    IMMEDIATE and COMMIT) can block, and those run on the database's writer thread.
    """

    __slots__ = ("_conn", "_what")

    def __init__(self, conn: sqlite3.Connection, what: str) -> None:
        self._conn = conn
        self._what = what

    async def execute(self, sql: str, *params: Any) -> int:
        try:
            return self._conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self._what) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self._what) from exc

    async def fetch_all(self, sql: str, *params: Any) -> list[Row]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self._what) from exc

    async def fetch_one(self, sql: str, *params: Any) -> Row | None:
        try:
            return self._conn.execute(sql, params).fetchone()  # type: ignore[no-any-return]
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self._what) from exc


class SQLiteUnitOfWork(SQLiteSession, UnitOfWork):
    """A unit of work held in a savepoint of the database's current write transaction."""

    __slots__ = ("_callbacks", "_db", "_deferred", "_outgoing")

    def __init__(self, db: SQLiteDatabase) -> None:
        super().__init__(db._conn_or_raise(), db.what)
        self._db = db
        self._callbacks: list[Callable[[], None]] = []
        self._outgoing = False
        self._deferred: dict[str, list[tuple[Any, ...]]] | None = None

    async def insert_at_commit(self, sql: str, *params: Any) -> None:
        # Held until the transaction's COMMIT, and then run with the rows of every other
        # unit in it: one executemany per statement instead of one execute per row.
        deferred = self._deferred
        if deferred is None:
            deferred = self._deferred = {}
        rows = deferred.get(sql)
        if rows is None:
            deferred[sql] = [params]
        else:
            rows.append(params)

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
        try:
            self._conn.execute(
                "INSERT INTO atoll_outbox"
                " (message_id, topic, key, body, created_at, deliver_at, traceparent)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (message_id, topic, key, body, self._db.now(), deliver_at, traceparent),
            )
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self._what) from exc
        self._outgoing = True

    async def claim_inbox(self, consumer: str, message_id: str) -> bool:
        try:
            cursor = self._conn.execute(
                "INSERT INTO atoll_inbox (consumer, message_id, handled_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (consumer, message_id, self._db.now()),
            )
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self._what) from exc
        return cursor.rowcount == 1

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)


class _Group:
    """Units of work that share one transaction and wait for its commit."""

    __slots__ = ("callbacks", "deferred", "done", "outgoing")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Resolves to None on commit, or to the error that lost the transaction.
        self.done: asyncio.Future[BaseException | None] = loop.create_future()
        self.callbacks: list[Callable[[], None]] = []
        self.outgoing = False
        #: Rows of the units kept so far, for ``insert_at_commit``, by statement.
        self.deferred: dict[str, list[tuple[Any, ...]]] = {}

    def keep(self, uow: SQLiteUnitOfWork) -> None:
        """Take what a unit of work that was kept (released) leaves for the commit."""
        self.callbacks.extend(uow._callbacks)
        self.outgoing = self.outgoing or uow._outgoing
        if uow._deferred:
            for sql, rows in uow._deferred.items():
                self.deferred.setdefault(sql, []).extend(rows)


class SQLiteDatabase(Database):
    """A service database in one SQLite file, in WAL mode.

    Writes go through one connection. Units of work take turns on it, each in a
    savepoint of a shared write transaction; a unit that finishes while others wait
    leaves the transaction open for them and one COMMIT makes the whole group durable
    (group commit). At light load each unit commits alone, with no added wait.

    ``synchronous="FULL"`` (the default) fsyncs the WAL at every commit: a committed
    effect survives power loss, not only a process crash. ``"NORMAL"`` is several times
    faster and survives a process crash (kill -9), but may lose the last commits on
    power loss.
    """

    dialect = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        lock_timeout: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.lock_timeout = lock_timeout
        self.what = f"sqlite database {self.path}"
        self._clock: Clock = clock or SystemClock()
        self._conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._group: _Group | None = None
        self._commit_scheduled = False
        self._outbox_event = asyncio.Event()

    def __repr__(self) -> str:
        return f"SQLiteDatabase({str(self.path)!r})"

    def now(self) -> float:
        return self._clock.time()

    def _conn_or_raise(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DatabaseError(f"{self.what} is not open")
        return self._conn

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run a blocking call on the writer thread; survive cancellation of the caller.

        The call itself cannot be interrupted, so a cancelled caller still waits for it to
        finish before the cancellation propagates: the connection is never left mid-call.
        """
        assert self._executor is not None
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    async def open(self) -> None:
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"atoll-sqlite-{self.path.stem}")

        def _open() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            conn = connect_sqlite(
                self.path, synchronous=self.synchronous, busy_timeout=self.lock_timeout
            )
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(atoll_outbox)")}
                if "traceparent" not in columns:  # files made by atoll 0.1.0 before tracing
                    conn.execute("ALTER TABLE atoll_outbox ADD COLUMN traceparent TEXT")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            reader = connect_sqlite(
                self.path,
                synchronous=self.synchronous,
                busy_timeout=self.lock_timeout,
                read_only=True,
            )
            return conn, reader

        try:
            self._conn, self._read_conn = await self._in_thread(_open)
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, f"opening {self.what}") from exc

    async def close(self) -> None:
        if self._conn is None:
            return
        async with self._lock:
            conn, reader = self._conn, self._read_conn
            self._conn = self._read_conn = None
            if self._in_tx:
                await self._commit_locked()

            def _close() -> None:
                conn.close()
                if reader is not None:
                    reader.close()

            await self._in_thread(_close)
        assert self._executor is not None
        self._executor.shutdown(wait=True)
        self._executor = None

    @property
    def _in_tx(self) -> bool:
        # Derived from the connection itself: a cancelled BEGIN or COMMIT still runs to
        # completion on the writer thread, so no flag of ours could be trusted after one.
        return self._conn is not None and self._conn.in_transaction

    async def _begin_locked(self) -> None:
        conn = self._conn_or_raise()
        try:
            # Uncontended, BEGIN IMMEDIATE takes microseconds: run it here and spare the
            # hop to the writer thread and back (two event-loop wake-ups). Only another
            # process's write lock makes it wait, and that wait happens on the thread.
            if not _begin_without_waiting(conn, self.lock_timeout):
                await self._in_thread(lambda: conn.execute("BEGIN IMMEDIATE"))
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, f"starting a transaction on {self.what}") from exc
        finally:
            if conn.in_transaction and self._group is None:
                self._group = _Group(asyncio.get_running_loop())

    async def _commit_locked(self) -> None:
        """COMMIT the open transaction and settle its group. Caller holds the lock."""
        conn = self._conn
        group, self._group = self._group, None
        if conn is None:
            return
        try:
            if group is not None and group.deferred:
                # Inline: inserts into pages in memory; only the COMMIT waits on the disk.
                for sql, rows in group.deferred.items():
                    conn.executemany(sql, rows)
            await self._in_thread(lambda: conn.execute("COMMIT"))
        except asyncio.CancelledError:
            # The COMMIT ran to completion on its thread; settle the group as it ended.
            if conn.in_transaction:
                self._fail_transaction(conn, group, CommitFailedError("commit interrupted"))
            else:
                self._committed(group)
            raise
        except BaseException as exc:
            error: BaseException = exc
            if isinstance(exc, sqlite3.Error):
                error = map_sqlite_error(exc, f"committing to {self.what}")
            self._fail_transaction(conn, group, error)
            if error is exc:
                raise
            raise error from exc
        self._committed(group)

    def _committed(self, group: _Group | None) -> None:
        if group is None:
            return
        if not group.done.done():
            group.done.set_result(None)
        if group.outgoing:
            self._outbox_event.set()
        for callback in group.callbacks:
            callback()

    async def _rollback_locked(self) -> None:
        """Roll back the open transaction: every unit in it fails. Caller holds the lock."""
        conn = self._conn
        group, self._group = self._group, None
        if conn is not None:
            self._fail_transaction(
                conn, group, CommitFailedError("the batch holding this unit of work failed")
            )

    def _fail_transaction(
        self, conn: sqlite3.Connection, group: _Group | None, error: BaseException
    ) -> None:
        """Roll back what may remain (so the next unit starts clean); fail every waiter."""
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        if group is not None and not group.done.done():
            group.done.set_result(error)

    async def _scheduled_commit(self) -> None:
        async with self._lock:
            self._commit_scheduled = False
            if self._in_tx:
                # A failure reaches every waiter through the group's future.
                with contextlib.suppress(Exception):
                    await self._commit_locked()

    def _schedule_commit(self) -> None:
        if not self._commit_scheduled:
            self._commit_scheduled = True
            # Queued behind the units of work already waiting for the lock, so they join
            # this transaction: that is the group commit.
            task = asyncio.get_running_loop().create_task(self._scheduled_commit())
            _background.add(task)
            task.add_done_callback(_background.discard)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        if _current_batch.get() is self:
            async with self._savepoint() as uow:
                yield uow
            return
        async with self._lock:
            if not self._in_tx:
                await self._begin_locked()
            group = self._group
            assert group is not None
            try:
                async with self._savepoint() as uow:
                    yield uow
                group.keep(uow)
            finally:
                # Even a failed unit must end the transaction soon: an open write
                # transaction holds SQLite's lock against every other process.
                self._schedule_commit()
        await _wait_commit(group.done)

    @asynccontextmanager
    async def _savepoint(self) -> AsyncIterator[SQLiteUnitOfWork]:
        conn = self._conn_or_raise()
        uow = SQLiteUnitOfWork(self)
        try:
            conn.execute("SAVEPOINT atoll_uow")
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self.what) from exc
        try:
            yield uow
        except BaseException:
            try:
                conn.execute("ROLLBACK TO atoll_uow")
                conn.execute("RELEASE atoll_uow")
            except sqlite3.Error:
                # A failed ROLLBACK TO means the transaction itself is gone; the
                # commit that follows then fails every unit in it, which is safe.
                pass
            raise
        try:
            conn.execute("RELEASE atoll_uow")
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, self.what) from exc
        batch_group = self._group
        if _current_batch.get() is self and batch_group is not None:
            batch_group.keep(uow)

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        if _current_batch.get() is self:
            yield
            return
        async with self._lock:
            if not self._in_tx:
                await self._begin_locked()
            token = _current_batch.set(self)
            try:
                yield
            except BaseException:
                _current_batch.reset(token)
                await self._rollback_locked()
                raise
            _current_batch.reset(token)
            await self._commit_locked()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Session]:
        if self._read_conn is None:
            raise DatabaseError(f"{self.what} is not open")
        yield SQLiteSession(self._read_conn, self.what)

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
        async with self.unit_of_work() as uow:
            await uow.executemany("DELETE FROM atoll_outbox WHERE seq = ?", [(s,) for s in seqs])

    async def outbox_stats(self) -> tuple[int, float | None, float | None]:
        async with self.read() as session:
            row = await session.fetch_one(
                "SELECT count(*), min(created_at) FROM atoll_outbox"
                " WHERE deliver_at IS NULL OR deliver_at <= ?",
                self.now(),
            )
            scheduled = await session.fetch_value(
                "SELECT min(deliver_at) FROM atoll_outbox WHERE deliver_at > ?", self.now()
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
        if not self._outbox_event.is_set():
            sleeper = asyncio.ensure_future(self._clock.sleep(timeout))
            waiter = asyncio.ensure_future(self._outbox_event.wait())
            try:
                await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()
        self._outbox_event.clear()

    async def try_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew a lease; one held by a dead process of this machine is free.

        Owners named ``"<pid>:<token>"`` are checked: a SQLite file is shared only by
        processes of one machine, so a holder whose pid is gone cannot renew.
        """
        now = self.now()
        async with self.unit_of_work() as uow:
            holder = await uow.fetch_one(
                "SELECT owner, expires_at FROM atoll_leases WHERE name = ?", name
            )
            if holder is not None and holder[0] != owner and holder[1] >= now:
                pid, sep, _ = str(holder[0]).partition(":")
                if sep and pid.isdigit() and not pid_alive(int(pid)):
                    await uow.execute("DELETE FROM atoll_leases WHERE name = ?", name)
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


async def _wait_commit(done: asyncio.Future[BaseException | None]) -> None:
    # Shielded: the commit completes or fails for the whole group at once, whatever
    # happens to one waiter.
    error = await asyncio.shield(done)
    if error is not None:
        raise CommitFailedError(f"the transaction was not committed: {error}") from error
