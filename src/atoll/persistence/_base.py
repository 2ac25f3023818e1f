"""The unit-of-work seam: a service's own database, its outbox and its inbox."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import msgspec


class Row(Protocol):
    """A result row, addressable by column index and by column name."""

    def __getitem__(self, key: int | str, /) -> Any: ...


class OutboxRecord(msgspec.Struct, frozen=True):
    """One committed message waiting in the outbox."""

    seq: int
    message_id: str
    topic: str
    key: str | None
    body: bytes
    created_at: float
    #: The W3C traceparent of the span that committed it, for the relay's span links.
    traceparent: str | None = None


class Session(abc.ABC):
    """Queries against a service's database.

    Placeholders are ``?`` on every backend (backends translate). Values are Python
    ``None``, ``int``, ``float``, ``str`` and ``bytes``. Result rows are addressable by
    index and by column name.
    """

    @abc.abstractmethod
    async def execute(self, sql: str, *params: Any) -> int:
        """Run one statement; return the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter row."""

    @abc.abstractmethod
    async def fetch_all(self, sql: str, *params: Any) -> list[Row]:
        """Run a query and return all of its rows."""

    async def fetch_one(self, sql: str, *params: Any) -> Row | None:
        """Run a query and return its first row, or ``None``."""
        rows = await self.fetch_all(sql, *params)
        return rows[0] if rows else None

    async def fetch_value(self, sql: str, *params: Any) -> Any:
        """Run a query and return the first column of its first row, or ``None``."""
        row = await self.fetch_one(sql, *params)
        return None if row is None else row[0]

    async def insert_at_commit(self, sql: str, *params: Any) -> None:
        """Insert one row as part of this session's unit of work, perhaps at its commit.

        For append-only rows that nothing in the unit of work reads back, such as an
        audit trail. The row must be kept if and only if the unit of work is, like every
        other statement in it. A backend may hold it and run all such rows of one
        transaction together just before its COMMIT, one ``executemany`` per statement;
        the statement must then not fail, because if it does the whole transaction fails
        with every unit of work in it. This default runs it at once.
        """
        await self.execute(sql, *params)


class UnitOfWork(Session):
    """One atomic piece of work on a service's database.

    Contract (every backend must keep it, and ``atoll.testing.DatabaseConformance``
    checks it):

    * Everything done through the unit of work (statements on the service's own tables,
      :meth:`add_outgoing` and :meth:`claim_inbox`) must become durable together when the
      ``async with`` block exits normally, or not at all. If the block raises, none of it
      may be kept, and the exception propagates.
    * The block's exit must not return before the commit is durable: a caller that goes
      on to acknowledge a message can rely on the effect being on disk.
    * Outgoing messages must be kept in the outbox in the order they were added, and
      that order must agree with commit order across units of work, so that the relay
      publishes each key's messages in commit order.
    * :meth:`claim_inbox` must return ``True`` exactly once per ``(consumer, message_id)``
      across all committed units of work, including concurrent ones.
    """

    @abc.abstractmethod
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
        """Queue a message in the outbox as part of this unit of work.

        ``deliver_at`` (wall-clock seconds) holds the message until then: scheduled
        messages survive restarts because they wait in the database, not in memory.
        """

    @abc.abstractmethod
    async def claim_inbox(self, consumer: str, message_id: str) -> bool:
        """Record that ``consumer`` handled ``message_id``; ``False`` if already recorded."""

    @abc.abstractmethod
    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after this unit of work is durably committed."""


class Database(abc.ABC):
    """A service's own database: its tables, its outbox and its inbox.

    Contract:

    * :meth:`unit_of_work` opens a :class:`UnitOfWork` (see its contract). Concurrent
      units of work must be isolated from each other: one's uncommitted changes must not
      be visible to another.
    * :meth:`batch` groups every unit of work opened by the *current task* inside it into
      one transaction, committed when the ``batch`` block exits. A unit of work in a
      batch that raises is rolled back alone (the others are kept). If the ``batch``
      block itself raises, or its commit fails, none of its units of work are kept and
      the exception propagates.
    * :meth:`read` gives a session for queries that change nothing and sees committed
      data only.
    * The outbox methods serve the relay: :meth:`outbox_fetch` must return due records
      in commit order; :meth:`outbox_delete` must remove exactly the given records.
    """

    #: ``"sqlite"`` or ``"postgresql"``: services with dialect-specific SQL branch on it.
    dialect: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create atoll's own tables if they do not exist."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Wait for the running unit of work, then disconnect."""

    @abc.abstractmethod
    def unit_of_work(self) -> AbstractAsyncContextManager[UnitOfWork]:
        """Open a unit of work (see :class:`UnitOfWork`)."""

    @abc.abstractmethod
    def batch(self) -> AbstractAsyncContextManager[None]:
        """Group this task's units of work into one transaction."""

    @abc.abstractmethod
    def read(self) -> AbstractAsyncContextManager[Session]:
        """Open a read-only session on committed data."""

    async def migrate(self, name: str, statements: Sequence[str]) -> bool:
        """Apply ``statements`` once, recorded under ``name``; ``False`` if already applied.

        Statements run in one unit of work, so a migration is applied completely or not
        at all.
        """
        async with self.unit_of_work() as uow:
            done = await uow.fetch_value("SELECT 1 FROM atoll_migrations WHERE name = ?", name)
            if done:
                return False
            for statement in statements:
                await uow.execute(statement)
            await uow.execute(
                "INSERT INTO atoll_migrations (name, applied_at) VALUES (?, ?)",
                name,
                self.now(),
            )
        return True

    @abc.abstractmethod
    def now(self) -> float:
        """Wall-clock seconds from this database's clock."""

    @abc.abstractmethod
    async def outbox_fetch(self, limit: int) -> list[OutboxRecord]:
        """Up to ``limit`` due outbox records, oldest commit first."""

    @abc.abstractmethod
    async def outbox_delete(self, seqs: Sequence[int]) -> None:
        """Remove published records from the outbox."""

    @abc.abstractmethod
    async def outbox_stats(self) -> tuple[int, float | None, float | None]:
        """``(count, created_at of the oldest record, deliver_at of the next scheduled)``."""

    @abc.abstractmethod
    async def outbox_next_scheduled(self) -> float | None:
        """When the next scheduled (not yet due) record becomes due, if any."""

    @abc.abstractmethod
    async def wait_for_outbox(self, timeout: float) -> None:
        """Return when a commit added outbox records, or after ``timeout`` seconds.

        A hint only: callers must poll, since commits by other processes may not wake it.
        """

    @abc.abstractmethod
    async def try_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the named lease for ``owner`` for ``ttl`` seconds.

        Returns ``True`` while ``owner`` holds it. At most one owner holds a lease at a time
        (among clocks that agree within the ttl).
        """

    @abc.abstractmethod
    async def release_lease(self, name: str, owner: str) -> None:
        """Give up the named lease if ``owner`` holds it."""

    @abc.abstractmethod
    async def prune_inbox(self, older_than: float) -> int:
        """Delete inbox records handled before ``older_than``; return how many."""


#: atoll's own tables, in SQL both SQLite and PostgreSQL accept.
def core_schema(*, autoincrement: str, blob: str, real: str) -> list[str]:
    """The DDL for atoll's tables in a dialect described by its three type spellings."""
    return [
        f"""CREATE TABLE IF NOT EXISTS atoll_outbox (
            seq {autoincrement},
            message_id TEXT NOT NULL,
            topic TEXT NOT NULL,
            key TEXT,
            body {blob} NOT NULL,
            created_at {real} NOT NULL,
            deliver_at {real},
            traceparent TEXT
        )""",
        (
            "CREATE INDEX IF NOT EXISTS atoll_outbox_scheduled ON atoll_outbox (deliver_at)"
            " WHERE deliver_at IS NOT NULL"
        ),
        f"""CREATE TABLE IF NOT EXISTS atoll_inbox (
            consumer TEXT NOT NULL,
            message_id TEXT NOT NULL,
            handled_at {real} NOT NULL,
            PRIMARY KEY (consumer, message_id)
        )""",
        f"""CREATE TABLE IF NOT EXISTS atoll_migrations (
            name TEXT PRIMARY KEY,
            applied_at {real} NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS atoll_leases (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at {real} NOT NULL
        )""",
    ]
