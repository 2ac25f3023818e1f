"""The embedded durable transport: a SQLite log with consumer groups and leases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from atoll._crash import crashpoint
from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.persistence._sqlite import Synchronous, connect_sqlite, map_sqlite_error, pid_alive
from atoll.transport._base import (
    Ack,
    BatchHandler,
    DeadLetter,
    DeadLetterRecord,
    DeadLetterStore,
    Delivery,
    Outcome,
    OutgoingMessage,
    RedeliveryPolicy,
    Transport,
    TransportError,
    TransportUnavailableError,
    command_group,
)
from atoll.transport._claim import Candidate, call_handler, claimable
from atoll.transport.sqlite._wake import WakeListener, WakeSender

T = TypeVar("T")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS atoll_subscriptions (
        topic TEXT NOT NULL,
        grp TEXT NOT NULL,
        PRIMARY KEY (topic, grp)
    )""",
    """CREATE TABLE IF NOT EXISTS atoll_deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT NOT NULL,
        topic TEXT NOT NULL,
        message_id TEXT NOT NULL,
        key TEXT,
        body BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        available_at REAL NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until REAL,
        last_error TEXT,
        published_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS atoll_deliveries_by_group ON atoll_deliveries (grp, seq)",
    """CREATE TABLE IF NOT EXISTS atoll_published (
        message_id TEXT PRIMARY KEY,
        published_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS atoll_published_at ON atoll_published (published_at)",
    """CREATE TABLE IF NOT EXISTS atoll_dead_letters (
        id TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        topic TEXT NOT NULL,
        message_id TEXT NOT NULL,
        key TEXT,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        dead_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS atoll_listeners (
        address TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        pid INTEGER NOT NULL
    )""",
]


def _begin(conn: sqlite3.Connection, timeout: float) -> None:
    """BEGIN IMMEDIATE, retrying quickly while another process holds the write lock.

    SQLite's own busy handler sleeps in steps of 1 to 100 ms; transactions here take
    well under a millisecond, so short sleeps keep latency low under contention.
    """
    delay = 0.0001
    waited = 0.0
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            name = getattr(exc, "sqlite_errorname", "")
            if not name.startswith("SQLITE_BUSY") or waited >= timeout:
                raise
            _sleep_in_thread(delay)
            waited += delay
            delay = min(delay * 2, 0.01)
        else:
            return


def _sleep_in_thread(seconds: float) -> None:
    # Runs on the transport's own thread, never on the event loop: a plain blocking wait.
    import time  # noqa: PLC0415 - the one place this module blocks a thread on purpose

    time.sleep(seconds)  # determinism: allowed - a blocking retry on the transport thread


class _SQLiteConsumer:
    def __init__(
        self,
        transport: SQLiteTransport,
        group: str,
        handler: BatchHandler,
        policy: RedeliveryPolicy,
        max_batch: int,
    ) -> None:
        self._transport = transport
        self._group = group
        self._handler = handler
        self._policy = policy
        self._max_batch = max_batch
        self._owner = f"{os.getpid()}:{transport._random.new_id()[:12]}"
        self._window = 4 * max_batch + 64
        self._stopping = False
        self._listener = WakeListener(transport._random)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._transport._run(
            self._transport._register_listener, self._listener.address, self._group
        )
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._stopping:
            if self._task is not None:
                await asyncio.wait([self._task])
            return
        self._stopping = True
        self._listener.event.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self in self._transport._consumers:
            self._transport._consumers.remove(self)
        with contextlib.suppress(Exception):
            await self._transport._run(self._transport._unregister_listener, self._listener.address)
        self._listener.close()

    def abandon(self) -> None:
        """Die without settling (a simulated crash): leases lapse after ``lease`` seconds."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        if self in self._transport._consumers:
            self._transport._consumers.remove(self)
        self._listener.close()

    async def _loop(self) -> None:
        transport = self._transport
        settle: tuple[Sequence[Delivery], Sequence[Outcome]] | None = None
        failures = 0
        while True:
            limit = 0 if self._stopping else self._max_batch
            self._listener.event.clear()
            try:
                batch, next_due = await transport._run(
                    transport._settle_and_claim,
                    self._group,
                    self._owner,
                    settle,
                    limit,
                    self._policy,
                    self._window,
                )
            except Exception as exc:
                failures += 1
                transport._log_failure(f"consumer {self._group}", exc)
                await transport.clock.sleep(min(5.0, 0.05 * 2**failures))
                continue
            failures = 0
            settle = None
            if self._stopping:
                return
            if not batch:
                await self._sleep(next_due)
                continue
            outcomes = await call_handler(self._handler, batch)
            crashpoint("consumer.before_ack")
            settle = (batch, outcomes)

    async def _sleep(self, next_due: float | None) -> None:
        transport = self._transport
        timeout = transport.poll_interval
        if next_due is not None:
            timeout = max(0.0, min(timeout, next_due - transport.clock.time()))
        if timeout <= 0:
            return
        sleeper = asyncio.ensure_future(transport.clock.sleep(timeout))
        waiter = asyncio.ensure_future(self._listener.event.wait())
        try:
            await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()


class _SQLiteDeadLetters(DeadLetterStore):
    def __init__(self, transport: SQLiteTransport) -> None:
        self._t = transport

    async def list(self, *, group: str | None = None, limit: int = 100) -> list[DeadLetterRecord]:
        return await self._t._run(self._t._dead_list, group, limit)

    async def get(self, record_id: str) -> DeadLetterRecord | None:
        return await self._t._run(self._t._dead_get, record_id)

    async def replay(self, record_id: str) -> bool:
        replayed, groups = await self._t._run(self._t._dead_replay, record_id)
        self._t._wake(groups)
        return replayed

    async def purge(self, record_id: str) -> bool:
        return await self._t._run(self._t._dead_purge, record_id)


class SQLiteTransport(Transport):
    """A durable message log in one SQLite file, shared by the processes of one machine.

    Deliveries are rows per consumer group; consumers claim them with a lease (an owner
    and an expiry) and settle them in the same transaction as their next claim. A lease
    whose owner process is gone is taken over at once (same machine, so the owner's pid
    can be checked); otherwise it lapses after ``lease`` seconds. Consumers are woken by
    datagrams on Unix sockets and poll every ``poll_interval`` seconds in case a hint
    is lost.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        lease: float = 30.0,
        poll_interval: float = 0.5,
        dedup_window: float = 600.0,
        lock_timeout: float = 10.0,
        clock: Clock | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.lease = lease
        self.poll_interval = poll_interval
        self.dedup_window = dedup_window
        self.lock_timeout = lock_timeout
        self.clock: Clock = clock or SystemClock()
        self._random = random or RandomSource(clock=self.clock)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._consumers: list[_SQLiteConsumer] = []
        self._sender: WakeSender | None = None
        self._dead = _SQLiteDeadLetters(self)
        self._last_prune = 0.0
        self._gone_listeners: list[str] = []
        self._logged: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"SQLiteTransport({str(self.path)!r})"

    @property
    def dead_letters(self) -> DeadLetterStore:
        return self._dead

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise TransportUnavailableError(f"{self!r} is not connected")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction on the transport's thread."""
        conn = self._conn
        if conn is None:
            raise TransportUnavailableError(f"{self!r} is not connected")
        try:
            _begin(conn, self.lock_timeout)
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise TransportError(
                str(map_sqlite_error(exc, f"embedded transport {self.path}"))
            ) from exc
        return result

    def _log_failure(self, what: str, exc: BaseException) -> None:
        # One line per change of error, not one per retry.
        text = f"{type(exc).__name__}: {exc}"
        if self._logged.get(what) != text:
            self._logged[what] = text
            import logging  # noqa: PLC0415 - cold path

            logging.getLogger("atoll.transport").warning("%s failed: %s (retrying)", what, text)

    async def connect(self) -> None:
        if self._executor is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="atoll-bus")

        def _open() -> None:
            conn = connect_sqlite(
                self.path, synchronous=self.synchronous, busy_timeout=self.lock_timeout
            )
            # From here on, _begin() retries lock waits itself, with finer steps.
            conn.execute("PRAGMA busy_timeout=0")
            self._conn = conn

            def schema(c: sqlite3.Connection) -> None:
                for statement in _SCHEMA:
                    c.execute(statement)

            self._tx(schema)

        try:
            await self._run(_open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._sender = WakeSender()

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.stop()
        if self._executor is None:
            return

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(_close)
        self._executor.shutdown(wait=True)
        self._executor = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _wake(self, addresses: list[str]) -> None:
        if self._sender is not None and addresses:
            self._gone_listeners.extend(self._sender.send(addresses))

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        addresses = await self._run(self._publish_tx, messages)
        self._wake(addresses)

    def _publish_tx(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        now = self.clock.time()
        gone, self._gone_listeners = self._gone_listeners, []

        def work(conn: sqlite3.Connection) -> list[str]:
            subscribers: dict[str, list[str]] = {}
            for topic, grp in conn.execute("SELECT topic, grp FROM atoll_subscriptions"):
                subscribers.setdefault(topic, []).append(grp)
            # A command waits for its service even before that service ever started.
            for topic in {m.topic for m in messages} - subscribers.keys():
                owner = command_group(topic)
                if owner is not None:
                    subscribers[topic] = [owner]
                    conn.execute(
                        "INSERT INTO atoll_subscriptions (topic, grp) VALUES (?, ?)"
                        " ON CONFLICT DO NOTHING",
                        (topic, owner),
                    )
            rows: list[tuple[str, str, str, str | None, bytes, float]] = []
            for m in messages:
                fresh = conn.execute(
                    "INSERT INTO atoll_published (message_id, published_at) VALUES (?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (m.message_id, now),
                ).rowcount
                if fresh:
                    rows.extend(
                        (grp, m.topic, m.message_id, m.key, m.body, now)
                        for grp in subscribers.get(m.topic, ())
                    )
            conn.executemany(
                "INSERT INTO atoll_deliveries (grp, topic, message_id, key, body, published_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            if gone:
                conn.executemany(
                    "DELETE FROM atoll_listeners WHERE address = ?", [(a,) for a in gone]
                )
            if now - self._last_prune > 60.0:
                self._last_prune = now
                conn.execute(
                    "DELETE FROM atoll_published WHERE published_at < ?", (now - self.dedup_window,)
                )
            groups = {r[0] for r in rows}
            if not groups:
                return []
            return [
                address
                for address, grp in conn.execute("SELECT address, grp FROM atoll_listeners")
                if grp in groups
            ]

        return self._tx(work)

    # -- consuming ------------------------------------------------------------------------

    async def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        policy: RedeliveryPolicy | None = None,
        max_batch: int = 100,
    ) -> _SQLiteConsumer:
        await self.declare(group, topics)
        consumer = _SQLiteConsumer(self, group, handler, policy or RedeliveryPolicy(), max_batch)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def declare(self, group: str, topics: Sequence[str]) -> None:
        def register(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO atoll_subscriptions (topic, grp) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(topic, group) for topic in topics],
            )

        await self._run(self._tx, register)

    def _register_listener(self, address: str, group: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO atoll_listeners (address, grp, pid) VALUES (?, ?, ?)",
                (address, group, os.getpid()),
            )

        self._tx(work)

    def _unregister_listener(self, address: str) -> None:
        self._tx(
            lambda conn: conn.execute("DELETE FROM atoll_listeners WHERE address = ?", (address,))
        )

    def _settle_and_claim(  # noqa: PLR0917 - called through run_in_executor, which passes positionals
        self,
        group: str,
        owner: str,
        settle: tuple[Sequence[Delivery], Sequence[Outcome]] | None,
        limit: int,
        policy: RedeliveryPolicy,
        window: int,
    ) -> tuple[list[Delivery], float | None]:
        now = self.clock.time()

        def work(conn: sqlite3.Connection) -> tuple[list[Delivery], float | None]:
            if settle is not None:
                self._settle(conn, settle[0], settle[1], policy=policy, now=now)
            if limit <= 0:
                return [], None
            return self._claim(conn, group, owner, limit=limit, window=window, now=now)

        return self._tx(work)

    def _settle(
        self,
        conn: sqlite3.Connection,
        batch: Sequence[Delivery],
        outcomes: Sequence[Outcome],
        *,
        policy: RedeliveryPolicy,
        now: float,
    ) -> None:
        acked: list[tuple[int]] = []
        for delivery, outcome in zip(batch, outcomes, strict=True):
            seq = delivery.token
            assert isinstance(seq, int)
            if isinstance(outcome, Ack):
                acked.append((seq,))
            elif isinstance(outcome, DeadLetter):
                self._park(conn, seq, outcome.reason, now)
            elif not outcome.count:
                conn.execute(
                    "UPDATE atoll_deliveries SET attempts = attempts - 1, lease_owner = NULL,"
                    " lease_until = NULL, available_at = ? WHERE seq = ?",
                    (now + (outcome.delay or 0.0), seq),
                )
            elif delivery.attempt >= policy.max_attempts:
                self._park(conn, seq, outcome.error, now)
            else:
                delay = outcome.delay
                if delay is None:
                    delay = policy.backoff(delivery.attempt, self._random.random())
                conn.execute(
                    "UPDATE atoll_deliveries SET available_at = ?, lease_owner = NULL,"
                    " lease_until = NULL, last_error = ? WHERE seq = ?",
                    (now + delay, outcome.error, seq),
                )
        if acked:
            conn.executemany("DELETE FROM atoll_deliveries WHERE seq = ?", acked)

    def _park(self, conn: sqlite3.Connection, seq: int, reason: str, now: float) -> None:
        conn.execute(
            "INSERT INTO atoll_dead_letters"
            " (id, grp, topic, message_id, key, body, reason, attempts, dead_at)"
            " SELECT ?, grp, topic, message_id, key, body, ?, attempts, ?"
            " FROM atoll_deliveries WHERE seq = ?",
            (self._random.new_id(), reason, now, seq),
        )
        conn.execute("DELETE FROM atoll_deliveries WHERE seq = ?", (seq,))

    def _claim(
        self,
        conn: sqlite3.Connection,
        group: str,
        owner: str,
        *,
        limit: int,
        window: int,
        now: float,
    ) -> tuple[list[Delivery], float | None]:
        head = conn.execute(
            "SELECT seq, key, available_at, lease_until, lease_owner FROM atoll_deliveries"
            " WHERE grp = ? ORDER BY seq LIMIT ?",
            (group, window),
        ).fetchall()
        alive: dict[str, bool] = {}
        candidates = []
        next_due: float | None = None
        for seq, key, available_at, leased_until, lease_owner in head:
            lease_until = leased_until
            if lease_until is not None and lease_until > now and lease_owner != owner:
                # Same machine: a lease held by a dead process is free now, not in 30 s.
                pid = int(lease_owner.split(":", 1)[0])
                if pid != os.getpid() and not alive.setdefault(lease_owner, pid_alive(pid)):
                    lease_until = None
            candidates.append(Candidate(seq, key, available_at, lease_until))
            wake_at = max(available_at, lease_until or 0.0)
            if wake_at > now and (next_due is None or wake_at < next_due):
                next_due = wake_at
        chosen = claimable(candidates, now, limit)
        if not chosen:
            return [], next_due
        lease_until = now + self.lease
        conn.executemany(
            "UPDATE atoll_deliveries SET attempts = attempts + 1, lease_owner = ?,"
            " lease_until = ? WHERE seq = ?",
            [(owner, lease_until, seq) for seq in chosen],
        )
        placeholders = ",".join("?" * len(chosen))
        rows = conn.execute(
            "SELECT seq, topic, message_id, key, body, attempts FROM atoll_deliveries"
            f" WHERE seq IN ({placeholders}) ORDER BY seq",
            chosen,
        ).fetchall()
        return [
            Delivery(group, topic, message_id, key, bytes(body), attempts, seq)
            for seq, topic, message_id, key, body, attempts in rows
        ], next_due

    # -- dead letters ---------------------------------------------------------------------

    def _dead_list(self, group: str | None, limit: int) -> list[DeadLetterRecord]:
        def work(conn: sqlite3.Connection) -> list[DeadLetterRecord]:
            sql = (
                "SELECT id, grp, topic, message_id, key, body, reason, attempts, dead_at"
                " FROM atoll_dead_letters"
            )
            params: tuple[Any, ...] = ()
            if group is not None:
                sql += " WHERE grp = ?"
                params = (group,)
            sql += " ORDER BY dead_at, id LIMIT ?"
            return [_dead_record(r) for r in conn.execute(sql, (*params, limit))]

        return self._tx(work)

    def _dead_get(self, record_id: str) -> DeadLetterRecord | None:
        def work(conn: sqlite3.Connection) -> DeadLetterRecord | None:
            row = conn.execute(
                "SELECT id, grp, topic, message_id, key, body, reason, attempts, dead_at"
                " FROM atoll_dead_letters WHERE id = ?",
                (record_id,),
            ).fetchone()
            return None if row is None else _dead_record(row)

        return self._tx(work)

    def _dead_replay(self, record_id: str) -> tuple[bool, list[str]]:
        now = self.clock.time()

        def work(conn: sqlite3.Connection) -> tuple[bool, list[str]]:
            row = conn.execute(
                "SELECT grp FROM atoll_dead_letters WHERE id = ?", (record_id,)
            ).fetchone()
            if row is None:
                return False, []
            conn.execute(
                "INSERT INTO atoll_deliveries (grp, topic, message_id, key, body, published_at)"
                " SELECT grp, topic, message_id, key, body, ? FROM atoll_dead_letters WHERE id = ?",
                (now, record_id),
            )
            conn.execute("DELETE FROM atoll_dead_letters WHERE id = ?", (record_id,))
            addresses = [
                a
                for (a,) in conn.execute(
                    "SELECT address FROM atoll_listeners WHERE grp = ?", (row[0],)
                )
            ]
            return True, addresses

        return self._tx(work)

    def _dead_purge(self, record_id: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute("DELETE FROM atoll_dead_letters WHERE id = ?", (record_id,)).rowcount
                == 1
            )

        return self._tx(work)

    # -- introspection --------------------------------------------------------------------

    async def pending(self, group: str) -> int:
        """Deliveries waiting for ``group`` (in flight included)."""

        def work(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(
                    "SELECT count(*) FROM atoll_deliveries WHERE grp = ?", (group,)
                ).fetchone()[0]
            )

        return await self._run(self._tx, work)


def _dead_record(row: Sequence[Any]) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=row[0],
        group=row[1],
        topic=row[2],
        message_id=row[3],
        key=row[4],
        body=bytes(row[5]),
        reason=row[6],
        attempts=row[7],
        dead_at=row[8],
    )
