"""The event store seam: streams with optimistic concurrency and a global log."""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, Self, runtime_checkable

from atoll.determinism import Clock
from atoll.eventstore._errors import CheckpointConflictError
from atoll.eventstore._model import (
    ANY,
    START,
    AppendResult,
    Backlog,
    EventData,
    ExpectedVersion,
    RawEvent,
    Snapshot,
    StreamInfo,
)
from atoll.eventstore._wake import Waiter, WakeHub
from atoll.persistence import Row, Session

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def check_identifier(value: str, what: str) -> str:
    """Table prefixes and schema names go into SQL: only plain lowercase identifiers."""
    if not _IDENTIFIER.match(value):
        raise ValueError(f"{what} {value!r} must match {_IDENTIFIER.pattern}")
    return value


@runtime_checkable
class Transaction(Protocol):
    """A transaction on the store's database that the store's writes can join.

    :class:`atoll.persistence.UnitOfWork`, :class:`atoll.service.Context` and the
    store's own :meth:`EventStore.transaction` all are one: events appended through it
    commit (or roll back) together with everything else done in it, such as a service's
    outbox messages or a projection's read model and checkpoint.
    """

    async def execute(self, sql: str, *params: Any) -> int: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch_all(self, sql: str, *params: Any) -> list[Row]: ...

    async def fetch_one(self, sql: str, *params: Any) -> Row | None: ...

    async def fetch_value(self, sql: str, *params: Any) -> Any: ...

    def on_commit(self, callback: Callable[[], None]) -> None: ...


class EventStore(abc.ABC):
    """Streams of events with optimistic concurrency, and one global log of all of them.

    Contract (``atoll.testing.EventStoreConformance`` checks every backend):

    * :meth:`append` must store all of its events or none. It must raise
      :class:`~atoll.eventstore.ConcurrencyError` (naming the stream, the expected and
      the actual version) when the stream is not at ``expected_version``,
      :class:`~atoll.eventstore.StreamDeletedError` on a deleted stream, and
      :class:`~atoll.eventstore.DuplicateEventError` when an event id is already
      stored except as this very append. Appending the same events (same ids, same
      order) to the same stream again must store nothing and return the first result
      with ``deduplicated=True``.
    * With ``tx``, the append must commit or roll back with that transaction; without
      it, the append commits before :meth:`append` returns.
    * Stream versions start at 0 and have no gaps (truncation removes a prefix).
    * :meth:`read_all` must return committed events only, in one total order that is
      the same for every reader, such that a reader that pages through the log with
      ``after=`` the last position it saw never skips an event and never sees one twice
      — including events whose transaction commits after later positions were read.
      The order must agree with each stream's version order, and with causality: an
      event appended after its writer read another event comes after it.
    * Concurrent writers to different streams must not be serialised by a global lock.
    * :meth:`waiter` hints are hints: readers must also poll.
    """

    #: ``"sqlite"`` or ``"postgresql"``.
    dialect: str
    clock: Clock

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from atoll.eventstore._tracing import trace_methods  # noqa: PLC0415 - no cycle

        trace_methods(cls)

    def __init__(self, *, prefix: str, clock: Clock) -> None:
        self.prefix = check_identifier(prefix, "table prefix")
        self.clock = clock
        self._hub = WakeHub()

    # -- lifecycle ------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the store's tables if they do not exist."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work and disconnect what the store opened itself."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transactions ---------------------------------------------------------------------

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Open a write transaction on the store's database (see :class:`Transaction`)."""

    @abc.abstractmethod
    def read_session(self) -> AbstractAsyncContextManager[Session]:
        """A session that reads committed data only."""

    async def exclusive(self, tx: Transaction, name: str) -> None:  # noqa: B027 - SQLite: no-op
        """Hold a lock named ``name`` until ``tx`` ends (SQLite's single writer already does).

        For work that must not run twice at once, such as creating a projection's tables.
        """

    def table(self, name: str) -> str:
        """The SQL name of one of the store's tables (``events``, ``streams``, ...)."""
        return f"{self.prefix}{name}"

    @asynccontextmanager
    async def _writing(self, tx: Transaction | None) -> AsyncIterator[Transaction]:
        if tx is not None:
            yield tx
            return
        async with self.transaction() as own:
            yield own

    @asynccontextmanager
    async def _reading(self, tx: Session | Transaction | None) -> AsyncIterator[Session]:
        if tx is not None:
            yield tx  # type: ignore[misc]  # a Transaction is a Session in all but name
            return
        async with self.read_session() as session:
            yield session

    # -- streams --------------------------------------------------------------------------

    @abc.abstractmethod
    async def append(
        self,
        stream_id: str,
        events: Sequence[EventData],
        expected_version: ExpectedVersion = ANY,
        *,
        tx: Transaction | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` if it is at ``expected_version``."""

    @abc.abstractmethod
    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
        tx: Session | Transaction | None = None,
    ) -> list[RawEvent]:
        """Events of one stream from ``from_version`` (inclusive), forwards or backwards.

        Forwards starts at the first event by default, backwards at the last. A stream
        that does not exist reads as empty; a deleted one raises
        :class:`~atoll.eventstore.StreamDeletedError`.
        """

    @abc.abstractmethod
    async def stream_info(
        self, stream_id: str, *, tx: Session | Transaction | None = None
    ) -> StreamInfo | None:
        """The stream's version, deletion, truncation and metadata; ``None`` if unknown."""

    @abc.abstractmethod
    async def set_stream_metadata(
        self, stream_id: str, metadata: dict[str, Any], *, tx: Transaction | None = None
    ) -> None:
        """Replace the stream's metadata (creating an empty stream if needed)."""

    @abc.abstractmethod
    async def delete_stream(
        self,
        stream_id: str,
        *,
        expected_version: ExpectedVersion = ANY,
        tx: Transaction | None = None,
    ) -> None:
        """Tombstone the stream: remove its events and snapshot, refuse it forever after."""

    @abc.abstractmethod
    async def truncate_before(
        self, stream_id: str, version: int, *, tx: Transaction | None = None
    ) -> None:
        """Remove the stream's events before ``version``; later versions stay."""

    @abc.abstractmethod
    async def list_streams(
        self, *, after: str | None = None, limit: int = 100, prefix: str | None = None
    ) -> list[StreamInfo]:
        """Streams in id order, after ``after``, optionally those starting with ``prefix``."""

    # -- the global log -------------------------------------------------------------------

    @abc.abstractmethod
    async def read_all(self, *, after: int = START, limit: int = 500) -> list[RawEvent]:
        """Up to ``limit`` committed events of the global log after position ``after``."""

    @abc.abstractmethod
    async def read_last(self, limit: int = 10) -> list[RawEvent]:
        """The last ``limit`` readable events of the global log, in log order."""

    @abc.abstractmethod
    async def head_position(self) -> int:
        """The position of the last readable event of the global log (``START`` if none)."""

    @abc.abstractmethod
    async def backlog(self, after: int, *, cap: int = 100_000) -> Backlog:
        """How many committed events lie after ``after``, and since when they wait."""

    async def has_held_back(self) -> bool:
        """Whether committed events wait behind an open transaction (PostgreSQL only).

        Readers then poll soon instead of waiting for a hint: the transaction that holds
        them back may end without appending anything, and so without a hint.
        """
        return False

    def waiter(self) -> Waiter:
        """A wake-up flag set when events may have been committed (close it when done)."""
        self._ensure_listening()
        return self._hub.waiter()

    def _ensure_listening(self) -> None:  # noqa: B027 - an optional hook; SQLite needs none
        """Backends that learn of other processes' commits start listening here."""

    def _committed(self) -> None:
        """Called after a commit that appended events: wake readers."""
        self._hub.wake()

    # -- snapshots ------------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot, *, tx: Transaction | None = None) -> None:
        """Keep ``snapshot`` as the stream's latest, unless a newer one is stored."""
        t = self.table("snapshots")
        async with self._writing(tx) as w:
            await w.execute(
                f"INSERT INTO {t} AS cur (stream_id, version, type, schema_version, data,"
                " recorded_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET"
                " version = excluded.version, type = excluded.type,"
                " schema_version = excluded.schema_version, data = excluded.data,"
                " recorded_at = excluded.recorded_at WHERE cur.version < excluded.version",
                snapshot.stream_id,
                snapshot.version,
                snapshot.type,
                snapshot.schema_version,
                snapshot.data,
                snapshot.recorded_at,
            )

    async def load_snapshot(
        self, stream_id: str, *, tx: Session | Transaction | None = None
    ) -> Snapshot | None:
        """The stream's latest snapshot, if any."""
        async with self._reading(tx) as r:
            row = await r.fetch_one(
                "SELECT stream_id, version, type, schema_version, data, recorded_at"
                f" FROM {self.table('snapshots')} WHERE stream_id = ?",
                stream_id,
            )
        if row is None:
            return None
        return Snapshot(
            stream_id=row[0],
            version=int(row[1]),
            type=row[2],
            schema_version=int(row[3]),
            data=bytes(row[4]),
            recorded_at=float(row[5]),
        )

    # -- checkpoints ----------------------------------------------------------------------

    async def load_checkpoint(
        self, name: str, *, tx: Session | Transaction | None = None
    ) -> int | None:
        """The position a named reader has processed up to, ``None`` if it never ran."""
        async with self._reading(tx) as r:
            value = await r.fetch_value(
                f"SELECT position FROM {self.table('checkpoints')} WHERE name = ?", name
            )
        return None if value is None else int(value)

    async def save_checkpoint(
        self, name: str, position: int, *, expected: int | None, tx: Transaction
    ) -> None:
        """Move a checkpoint from ``expected`` to ``position`` inside ``tx``.

        Raises :class:`~atoll.eventstore.CheckpointConflictError` if the checkpoint is no
        longer at ``expected`` (another runner moved or reset it): the caller's
        transaction must then roll back, which keeps its effects exactly once.
        """
        t = self.table("checkpoints")
        now = self.clock.time()
        if expected is None:
            changed = await tx.execute(
                f"INSERT INTO {t} (name, position, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                name,
                position,
                now,
            )
        else:
            changed = await tx.execute(
                f"UPDATE {t} SET position = ?, updated_at = ? WHERE name = ? AND position = ?",
                position,
                now,
                name,
                expected,
            )
        if changed != 1:
            raise CheckpointConflictError(name, expected)

    async def delete_checkpoint(self, name: str, *, tx: Transaction | None = None) -> None:
        """Forget a named reader's position (it starts again from ``START``)."""
        async with self._writing(tx) as w:
            await w.execute(f"DELETE FROM {self.table('checkpoints')} WHERE name = ?", name)

    async def list_checkpoints(self) -> list[tuple[str, int, float]]:
        """Every checkpoint as ``(name, position, updated_at)``."""
        async with self.read_session() as r:
            rows = await r.fetch_all(
                f"SELECT name, position, updated_at FROM {self.table('checkpoints')} ORDER BY name"
            )
        return [(row[0], int(row[1]), float(row[2])) for row in rows]


def common_schema(*, blob: str, real: str, position: str) -> list[str]:
    """DDL shared by every backend: snapshots, checkpoints and the personal-data keys.

    ``{t}`` stands for the (qualified) table prefix, ``{i}`` for the index name prefix.
    """
    return [
        f"""CREATE TABLE IF NOT EXISTS {{t}}snapshots (
            stream_id TEXT PRIMARY KEY,
            version BIGINT NOT NULL,
            type TEXT NOT NULL,
            schema_version INTEGER NOT NULL,
            data {blob} NOT NULL,
            recorded_at {real} NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS {{t}}checkpoints (
            name TEXT PRIMARY KEY,
            position {position} NOT NULL,
            updated_at {real} NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS {{t}}subject_keys (
            subject TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            key {blob} NOT NULL,
            created_at {real} NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS {{t}}erasures (
            subject TEXT NOT NULL,
            erased_at {real} NOT NULL,
            reason TEXT NOT NULL,
            requested_by TEXT NOT NULL,
            key_existed BOOLEAN NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS {i}erasures_subject ON {t}erasures (subject)",
    ]
