"""The span store: one SQLite file, split into segments that retention drops whole.

Layout. Spans live in *segments*: a table ``spans_N`` (one row per span), written in
arrival order, and ``chunks_N`` (the attribute index of its chunks of spans). A new
segment starts when the current one holds ``max_spans / segments`` spans or is older
than ``max_age / segments``. Retention drops the oldest segments whole (``DROP TABLE``),
which costs a fraction of deleting rows one by one from tables with indexes, so pruning
never competes with ingest for long. Resources, scopes and (service, operation) pairs
are small tables shared by all segments. Log records (OTLP logs) live in the same
segments, in ``logs_N``, and count toward a segment's size and ``max_spans`` as spans
do, so retention keeps a trace and its logs for the same time.

Indexes, per segment, and why each is there:

* ``spans_N(trace_id, span_id)`` UNIQUE: a trace's spans for the trace view and the
  result list; the uniqueness makes a re-sent batch (an exporter retrying after a
  timeout) a no-op.
* ``spans_N(start_ns)``: newest-first search and time ranges without a sort.
* ``logs_N(trace_id)``, partial (records with a trace id): a trace's logs for the trace
  view.
* ``chunks_N`` is the attribute index: one row per chunk of spans (a range of ids),
  holding a Bloom filter of the chunk's distinct scalar attributes (``_terms``), from
  the terms the decoder collected while it read the attributes (see below).

Writes. One writer thread owns the write connection. Requests queue their decoded
batches; the writer takes everything queued (up to ``max_transaction_spans``) into one
transaction and one COMMIT (group commit), then answers every request in it. A request is
answered only after its spans are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec

from atoll.determinism import Clock, SystemClock
from atoll.observability.collector._decode import (
    SHORT_ROW,
    DecodedBatch,
    Interner,
    LogRow,
    ResourceRow,
    ScopeRow,
    SpanRow,
    add_terms,
)
from atoll.observability.collector._errors import (
    CollectorClosedError,
    CollectorError,
    CollectorOverloadedError,
    CollectorStorageError,
)
from atoll.observability.collector._terms import (
    Term,
    bloom_bits,
    make_bloom,
    might_contain,
    term_hash,
)
from atoll.persistence._sqlite import Synchronous, connect_sqlite, map_sqlite_error

log = logging.getLogger("atoll.collector")
T = TypeVar("T")

#: 2 added log records (``logs_N``, ``segments.log_count``); 3 replaced the attribute
#: index's rows (``attrs_N``) by a Bloom filter per chunk (``chunks_N.bloom``). Files of
#: 1 and 2 are upgraded.
SCHEMA_VERSION: Final = 3
_APPLICATION_ID: Final = 0x61746F6C  # "atol": marks the file as a collector store

_GLOBAL_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS segments (
        id INTEGER PRIMARY KEY,
        created_at REAL NOT NULL,
        last_write_at REAL NOT NULL,
        span_count INTEGER NOT NULL DEFAULT 0,
        log_count INTEGER NOT NULL DEFAULT 0,
        indexed_upto INTEGER NOT NULL DEFAULT 0,
        min_start_ns INTEGER,
        max_start_ns INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS resources (
        id INTEGER PRIMARY KEY,
        digest BLOB NOT NULL,
        service TEXT NOT NULL,
        attributes TEXT,
        last_segment INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS resources_service ON resources(service)",
    """CREATE TABLE IF NOT EXISTS scopes (
        id INTEGER PRIMARY KEY,
        digest BLOB NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        attributes TEXT,
        last_segment INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS operations (
        service TEXT NOT NULL,
        name TEXT NOT NULL,
        last_segment INTEGER NOT NULL,
        PRIMARY KEY (service, name)
    ) WITHOUT ROWID""",
)

#: The columns of a span row as the decoder gives it (``_decode.SpanRow``): a short row
#: has the first ``SHORT_ROW`` of them; the rest are NULL.
_INSERT_COLUMNS: Final = (
    "trace_id, span_id, parent_id, resource_id, scope_id, name, kind, start_ns,"
    " duration_ns, status, flags, attributes, status_message, trace_state, events, links,"
    " dropped"
)
_INSERT_SHORT: Final = ", ".join(_INSERT_COLUMNS.split(", ")[:SHORT_ROW])

#: The columns the reader selects (``_trace_sync``).
_SPAN_COLUMNS: Final = (
    "trace_id, span_id, parent_id, resource_id, scope_id, name, kind, start_ns,"
    " duration_ns, status, status_message, trace_state, flags, attributes, events, links,"
    " dropped"
)


_LOG_COLUMNS: Final = (
    "time_ns, observed_ns, severity, severity_text, body, attributes, trace_id, span_id,"
    " flags, resource_id, scope_id, event_name, dropped"
)


def _logs_schema(n: int) -> tuple[str, ...]:
    # No unique key: a log record has no id, so one an exporter sends twice (a retry
    # after a lost answer) is stored twice. Its trace's logs are found by trace_id;
    # searches walk the table newest first, as records arrive in about time order.
    return (
        f"""CREATE TABLE IF NOT EXISTS logs_{n} (
            id INTEGER PRIMARY KEY,
            time_ns INTEGER NOT NULL,
            observed_ns INTEGER NOT NULL,
            severity INTEGER NOT NULL,
            severity_text TEXT,
            body TEXT,
            attributes TEXT,
            trace_id BLOB,
            span_id BLOB,
            flags INTEGER NOT NULL,
            resource_id INTEGER NOT NULL,
            scope_id INTEGER NOT NULL,
            event_name TEXT,
            dropped INTEGER NOT NULL
        )""",
        (
            f"CREATE INDEX IF NOT EXISTS logs_{n}_trace ON logs_{n}(trace_id)"
            " WHERE trace_id IS NOT NULL"
        ),
    )


def _chunks_schema(n: int) -> tuple[str, ...]:
    return (
        (
            f"CREATE TABLE chunks_{n} (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL,"
            " bloom BLOB NOT NULL)"
        ),
    )


def _segment_schema(n: int) -> tuple[str, ...]:
    # `value` has no declared type on purpose: no affinity, so '123' and 123 stay apart.
    return (
        f"""CREATE TABLE spans_{n} (
            id INTEGER PRIMARY KEY,
            trace_id BLOB NOT NULL,
            span_id BLOB NOT NULL,
            parent_id BLOB,
            resource_id INTEGER NOT NULL,
            scope_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            kind INTEGER NOT NULL,
            start_ns INTEGER NOT NULL,
            duration_ns INTEGER NOT NULL,
            status INTEGER NOT NULL,
            status_message TEXT,
            trace_state TEXT,
            flags INTEGER NOT NULL,
            attributes TEXT,
            events TEXT,
            links TEXT,
            dropped TEXT
        )""",
        f"CREATE UNIQUE INDEX spans_{n}_trace ON spans_{n}(trace_id, span_id)",
        f"CREATE INDEX spans_{n}_start ON spans_{n}(start_ns)",
        *_chunks_schema(n),
        *_logs_schema(n),
    )


#: The attribute value as indexed: booleans as 'true'/'false' (json_each gives 1/0,
#: which would collide with integers), everything else as json_each gives it.
_INDEXED_VALUE: Final = (
    "CASE j.type WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE j.value END"
)

STATUS_NAMES: Final = {0: "unset", 1: "ok", 2: "error"}
KIND_NAMES: Final = {
    0: "unspecified",
    1: "internal",
    2: "server",
    3: "client",
    4: "producer",
    5: "consumer",
}
_STATUS_ERROR: Final = 2


@dataclass(frozen=True, slots=True)
class Retention:
    """How much the collector keeps. Spans go oldest-received first, a segment at a time.

    Attributes:
        max_age: seconds a span is kept after it was received, or None for no limit.
        max_spans: spans and log records kept at most, or None for no limit.
        segments: the store is split in this many segments; retention drops one whole
            segment at a time, so it keeps between ``(segments-1)/segments`` and all of
            ``max_spans``, and spans for up to ``max_age * (1 + 1/segments)``.
        interval: seconds between background passes of age retention (count retention
            runs after every write that takes the store over ``max_spans``).
        max_segment_spans: a segment holds this many spans at most, whatever
            ``max_spans / segments`` is (the store then has more, smaller segments than
            ``segments``, and keeps closer to ``max_spans``). Spans arrive in random
            trace-id order, so each commit rewrites about as many pages of the segment's
            trace-id index as it inserts spans, up to the whole index: a small index keeps
            what a commit writes small (``docs/collector.md``, "Segments").
    """

    max_age: float | None = 24 * 3600.0
    max_spans: int | None = 1_000_000
    segments: int = 10
    interval: float = 10.0
    max_segment_spans: int = 10_000

    def __post_init__(self) -> None:
        if self.max_age is not None and not self.max_age > 0:
            raise ValueError(f"Retention.max_age must be positive or None, not {self.max_age}")
        if self.max_spans is not None and self.max_spans < 1:
            raise ValueError(f"Retention.max_spans must be at least 1, not {self.max_spans}")
        if self.segments < 2:
            raise ValueError(f"Retention.segments must be at least 2, not {self.segments}")
        if not self.interval > 0:
            raise ValueError(f"Retention.interval must be positive, not {self.interval}")
        if self.max_segment_spans < 1:
            raise ValueError(
                f"Retention.max_segment_spans must be at least 1, not {self.max_segment_spans}"
            )

    @property
    def segment_spans(self) -> int:
        if self.max_spans is None:
            return self.max_segment_spans
        return max(1, min(math.ceil(self.max_spans / self.segments), self.max_segment_spans))

    @property
    def segment_age(self) -> float | None:
        return None if self.max_age is None else self.max_age / self.segments


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """A trace search. Span conditions must hold for one span of a trace (as in Jaeger).

    ``service``, ``operation``, the durations, ``status`` and ``attributes`` all apply to
    the same span; ``attributes`` also match the attributes of the span's resource.
    ``start_ns``/``end_ns`` bound that span's start time.
    """

    service: str | None = None
    operation: str | None = None
    min_duration_ns: int | None = None
    max_duration_ns: int | None = None
    status: Literal["ok", "error"] | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    attributes: tuple[tuple[str, str], ...] = ()
    limit: int = 20


@dataclass(frozen=True, slots=True)
class ServiceSpans:
    name: str
    span_count: int
    error_count: int


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """One line of a search result."""

    trace_id: str
    root_service: str
    root_name: str
    start_ns: int
    duration_ns: int
    span_count: int
    error_count: int
    services: tuple[ServiceSpans, ...]
    #: True when no stored span of the trace is its root (not yet received, or pruned).
    root_missing: bool


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """A stored span, with its ids as hex and its JSON columns decoded."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    service: str
    resource_id: int
    name: str
    kind: str
    start_ns: int
    end_ns: int
    duration_ns: int
    status: str
    status_message: str | None
    trace_state: str | None
    flags: int
    scope_name: str
    scope_version: str
    attributes: dict[str, Any]
    events: list[dict[str, Any]]
    links: list[dict[str, Any]]
    dropped: dict[str, int] | None


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    service: str
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LogRecord:
    """A stored log record, with its ids as hex and its JSON columns decoded."""

    time_ns: int
    observed_ns: int
    #: OpenTelemetry's severity number: 1-4 TRACE, 5-8 DEBUG, 9-12 INFO, 13-16 WARN,
    #: 17-20 ERROR, 21-24 FATAL; 0 unspecified.
    severity: int
    #: The level those numbers name (``"info"``...), or ``"unspecified"``.
    level: str
    severity_text: str | None
    body: Any
    attributes: dict[str, Any]
    trace_id: str | None
    span_id: str | None
    flags: int
    service: str
    resource_id: int
    scope_name: str
    event_name: str | None
    dropped_attributes: int


@dataclass(frozen=True, slots=True)
class LogQuery:
    """A log search: records that match every condition given, newest first.

    ``text`` is a case-insensitive (for ASCII) substring of the body as stored (JSON);
    ``min_severity`` a severity number (9 is INFO, 13 WARN, 17 ERROR).
    """

    service: str | None = None
    min_severity: int | None = None
    trace_id: bytes | None = None
    text: str | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    limit: int = 100


_LEVELS: Final = ("trace", "debug", "info", "warn", "error", "fatal")


def severity_level(number: int) -> str:
    """The level an OpenTelemetry severity number is in: ``"info"`` for 9 to 12..."""
    if 1 <= number <= 24:
        return _LEVELS[(number - 1) // 4]
    return "unspecified"


@dataclass(frozen=True, slots=True)
class Trace:
    """Every stored span of one trace, earliest start first, and its log records,
    earliest first."""

    trace_id: str
    summary: TraceSummary
    spans: list[SpanRecord]
    resources: dict[int, ResourceRecord]
    logs: list[LogRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    name: str
    operations: list[str]


@dataclass(slots=True)
class StoreStats:
    """What the store holds, and what it was sent since it was opened."""

    spans: int = 0
    segments: int = 0
    oldest_received_at: float | None = None
    newest_received_at: float | None = None
    file_bytes: int = 0
    spans_received: int = 0
    spans_stored: int = 0
    spans_rejected: int = 0
    spans_duplicate: int = 0
    transactions: int = 0
    segments_dropped: int = 0
    write_failures: int = 0
    queued_spans: int = 0
    logs: int = 0
    logs_received: int = 0
    logs_stored: int = 0
    logs_rejected: int = 0


@dataclass(slots=True)
class _Segment:
    id: int
    created_at: float
    last_write_at: float
    span_count: int
    #: Spans with ids up to this one are in a chunk of the attribute index.
    indexed_upto: int = 0
    max_id: int = 0
    #: The attribute terms of the spans after ``indexed_upto``, as the decoder collected
    #: them; ``None`` when they are not all known (spans stored before a restart, or a
    #: batch without terms), and the indexer reads them from the rows instead.
    terms: set[Term] | None = field(default_factory=set)
    log_count: int = 0

    @property
    def size(self) -> int:
        return self.span_count + self.log_count


@dataclass(frozen=True, slots=True)
class _AttributeTerm:
    key: str
    candidates: list[object]
    resource_ids: list[int]
    indexed: bool
    #: The terms the value may be indexed under, one per candidate.
    hashes: tuple[Term, ...] = ()


#: Beyond this many chunks holding a value, listing their id ranges costs more than it
#: saves: the value is common, and newest-first search finds matches quickly anyway.
_MAX_CHUNK_RANGES: Final = 64


@dataclass(slots=True)
class _Pending:
    batch: DecodedBatch
    done: asyncio.Future[None]


class _ReaderState(threading.local):
    """Each reader thread's connection, and the deadline of the query it runs."""

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.deadline = math.inf


@dataclass(slots=True)
class _Counters:
    received: int = 0
    stored: int = 0
    rejected: int = 0
    duplicate: int = 0
    transactions: int = 0
    dropped_segments: int = 0
    write_failures: int = 0
    logs_received: int = 0
    logs_stored: int = 0
    logs_rejected: int = 0


_json_decode: Final = msgspec.json.decode


def _loads(text: str | None, default: Any) -> Any:
    return default if text is None else _json_decode(text)


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def _value_candidates(value: str) -> list[object]:
    """What a searched attribute value may be stored as: the text, and the number."""
    candidates: list[object] = [value]
    try:
        whole = int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                candidates.append(number)
    else:
        if -(2**63) <= whole < 2**63:  # stored as int64; a longer one is only text
            candidates.append(whole)
    return candidates


class SpanStore:
    """Spans in SQLite, written by one thread with group commit, read by a small pool.

    Durability: a write returns after the COMMIT of the transaction holding its spans. In
    WAL mode with ``synchronous="NORMAL"`` (the default) that survives a crash of the
    collector process but not necessarily a power loss or OS crash, which may lose the
    last transactions; ``"FULL"`` fsyncs every commit.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        retention: Retention | None = None,
        synchronous: Synchronous = "NORMAL",
        clock: Clock | None = None,
        max_pending_spans: int = 100_000,
        max_transaction_spans: int = 20_000,
        index_attributes: bool = True,
        index_chunk: int = 8192,
        index_delay: float = 1.0,
        query_timeout: float = 10.0,
        readers: int = 2,
    ) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self.synchronous: Synchronous = synchronous
        self.index_attributes = index_attributes
        self.index_chunk = index_chunk
        self.index_delay = index_delay
        self.query_timeout = query_timeout
        self._clock: Clock = clock or SystemClock()
        self._max_pending = max_pending_spans
        self._max_transaction = max_transaction_spans
        self._readers = readers
        self.resources = Interner()
        self.scopes = Interner()
        self._what = f"collector store {self.path}"
        self._conn: sqlite3.Connection | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._reader_state = _ReaderState()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._queue: deque[_Pending] = deque()
        self._queued_spans = 0
        self._wake = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._indexer_task: asyncio.Task[None] | None = None
        self._closing = False
        self._counters = _Counters()

    def __repr__(self) -> str:
        return f"SpanStore({str(self.path)!r})"

    @property
    def clock(self) -> Clock:
        """The clock the store reads (receive times, retention)."""
        return self._clock

    # --- lifecycle ----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._closing

    async def open(self) -> None:
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="atoll-collector-write")
        self._reader_pool = ThreadPoolExecutor(
            self._readers, thread_name_prefix="atoll-collector-read"
        )
        try:
            self._conn = await self._in_writer(self._open_sync)
        except sqlite3.Error as exc:
            self._shutdown_executors()
            raise map_sqlite_error(exc, f"opening {self._what}") from exc
        except BaseException:
            self._shutdown_executors()
            raise
        self._closing = False
        loop = asyncio.get_running_loop()
        self._writer_task = loop.create_task(self._write_loop(), name="atoll-collector-writer")
        if self.index_attributes:
            self._indexer_task = loop.create_task(
                self._index_loop(), name="atoll-collector-indexer"
            )

    async def close(self) -> None:
        """Store what is queued, then close. Idempotent."""
        if self._conn is None:
            return
        self._closing = True
        self._wake.set()
        indexer, self._indexer_task = self._indexer_task, None
        if indexer is not None:
            indexer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await indexer
        task, self._writer_task = self._writer_task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        await self._in_writer(conn.close)
        self._shutdown_executors()
        with self._reader_lock:
            conns, self._reader_conns = self._reader_conns, []
        for reader in conns:
            reader.close()

    def _shutdown_executors(self) -> None:
        for executor in (self._writer, self._reader_pool):
            if executor is not None:
                executor.shutdown(wait=True)
        self._writer = self._reader_pool = None

    async def _in_writer(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the writer thread. A cancelled caller still waits for it to end."""
        if self._writer is None:
            raise CollectorClosedError(f"{self._what} is not open")
        future = asyncio.get_running_loop().run_in_executor(self._writer, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    def _check_file(self, conn: sqlite3.Connection) -> int:
        """The file's schema version (0 for a new file), if atoll can open it."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if app_id != _APPLICATION_ID and tables:
            raise CollectorError(
                f"{self.path} is not a collector store (it holds other tables);"
                " give the collector its own file"
            )
        if version > SCHEMA_VERSION:
            raise CollectorError(
                f"{self.path} has collector schema version {version}, newer than this"
                f" atoll's {SCHEMA_VERSION}"
            )
        return int(version) if tables else 0

    def _open_sync(self) -> sqlite3.Connection:
        conn = connect_sqlite(self.path, synchronous=self.synchronous, busy_timeout=10.0)
        try:
            conn.row_factory = None
            # Index pages stay hot across transactions; the WAL is cut back after each
            # checkpoint so one large burst does not leave a large file behind.
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute("PRAGMA journal_size_limit=67108864")
            # Checkpoint every ~40 MB of WAL rather than 4 MB: index pages written many
            # times between two checkpoints are copied to the database file once.
            conn.execute("PRAGMA wal_autocheckpoint=10000")
            conn.execute("PRAGMA temp_store=MEMORY")
            version = self._check_file(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _GLOBAL_SCHEMA:
                    conn.execute(statement)
                if version == 1:
                    _upgrade_from_1(conn)
                if version in {1, 2}:
                    _upgrade_from_2(conn)
                conn.execute(f"PRAGMA application_id={_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._segments = [
                _Segment(row[0], row[1], row[2], row[3], indexed_upto=row[4], log_count=row[5])
                for row in conn.execute(
                    "SELECT id, created_at, last_write_at, span_count, indexed_upto, log_count"
                    " FROM segments ORDER BY id"
                )
            ]
            for segment in self._segments:
                segment.max_id = conn.execute(
                    f"SELECT coalesce(max(id), 0) FROM spans_{segment.id}"
                ).fetchone()[0]
                if segment.max_id > segment.indexed_upto:
                    segment.terms = None  # stored by an earlier run: read from the rows
            self.resources.seed(conn.execute("SELECT digest, id FROM resources"))
            self.scopes.seed(conn.execute("SELECT digest, id FROM scopes"))
        except BaseException:
            conn.close()
            raise
        return conn

    # --- writing ------------------------------------------------------------------

    async def write(self, batch: DecodedBatch) -> None:
        """Store a batch; returns once it is committed.

        Raises:
            CollectorOverloadedError: too many spans are already queued.
            CollectorStorageError: the transaction failed; none of the batch was kept.
            CollectorClosedError: the store is closed.
        """
        if not self.is_open:
            raise CollectorClosedError(f"{self._what} is not open")
        counters = self._counters
        if batch.noun != "span":
            counters.logs_received += len(batch.logs) + batch.rejected
            counters.logs_rejected += batch.rejected
        else:
            counters.received += len(batch.spans) + batch.rejected
            counters.rejected += batch.rejected
        size = batch.size
        if not size:
            return
        if self._queued_spans and self._queued_spans + size > self._max_pending:
            raise CollectorOverloadedError(
                f"{self._queued_spans} spans and log records are waiting to be stored;"
                " try again shortly"
            )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(batch, done))
        self._queued_spans += size
        self._wake.set()
        await done

    def _take(self) -> tuple[list[_Pending], int]:
        """The queued batches for one transaction: all, up to ``max_transaction_spans``."""
        taken: list[_Pending] = []
        size = 0
        while self._queue and (
            not taken or size + self._queue[0].batch.size <= self._max_transaction
        ):
            pending = self._queue.popleft()
            taken.append(pending)
            size += pending.batch.size
        return taken, size

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            taken, size = self._take()
            now = self._clock.time()
            outcome: BaseException | None = None
            spans = sum(len(p.batch.spans) for p in taken)
            try:
                inserted = await self._in_writer(
                    partial(self._write_sync, [p.batch for p in taken], size, now)
                )
            except Exception as exc:
                self._counters.write_failures += 1
                log.exception("writing %d spans and log records to %s failed", size, self._what)
                error = exc
                if isinstance(exc, sqlite3.Error):
                    error = map_sqlite_error(exc, f"writing to {self._what}")
                outcome = CollectorStorageError(f"the export was not stored: {error}")
            else:
                self._counters.stored += inserted
                self._counters.duplicate += spans - inserted
                self._counters.logs_stored += size - spans
                self._counters.transactions += 1
            finally:
                self._queued_spans -= size
            _settle(taken, outcome)
            if self.index_attributes and self._unindexed() >= self.index_chunk:
                await self._index()

    def _write_sync(self, batches: Sequence[DecodedBatch], size: int, now: float) -> int:  # noqa: C901 - one transaction, in order
        """Store the batches in one transaction; returns how many spans were inserted
        (the rest were duplicates). Every log record is inserted."""
        conn = self._conn
        assert conn is not None
        segment = self._current_segment_sync(conn, now, size)
        n = segment.id
        resources: dict[int, ResourceRow] = {}
        scopes: dict[int, ScopeRow] = {}
        operations: set[tuple[str, str]] = set()
        for batch in batches:
            resources.update(batch.resources)
            scopes.update(batch.scopes)
            operations.update(batch.operations)
        with_spans = [b for b in batches if b.spans]
        logs: list[LogRow] = [row for b in batches for row in b.logs]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO resources (id, digest, service, attributes, last_segment)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET last_segment = excluded.last_segment",
                [(r.id, r.digest, r.service, r.attributes, n) for r in resources.values()],
            )
            conn.executemany(
                "INSERT INTO scopes (id, digest, name, version, attributes, last_segment)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET last_segment = excluded.last_segment",
                [(s.id, s.digest, s.name, s.version, s.attributes, n) for s in scopes.values()],
            )
            conn.executemany(
                "INSERT INTO operations (service, name, last_segment) VALUES (?, ?, ?)"
                " ON CONFLICT (service, name) DO UPDATE SET last_segment = excluded.last_segment"
                " WHERE last_segment < excluded.last_segment",
                [(service, name, n) for service, name in operations],
            )
            before = segment.max_id
            inserted = 0
            if with_spans:
                before = conn.execute(f"SELECT coalesce(max(id), 0) FROM spans_{n}").fetchone()[0]
                rows: list[SpanRow] = list(
                    itertools.chain.from_iterable(b.spans for b in with_spans)
                )
                min_start = min(row[7] for row in rows)
                max_start = max(row[7] for row in rows)
                short = [row for row in rows if len(row) == SHORT_ROW]
                inserted = conn.executemany(
                    f"INSERT OR IGNORE INTO spans_{n} ({_INSERT_SHORT})"
                    f" VALUES ({_marks(range(SHORT_ROW))})",
                    short,
                ).rowcount
                if len(short) < len(rows):
                    inserted += conn.executemany(
                        f"INSERT OR IGNORE INTO spans_{n} ({_INSERT_COLUMNS})"
                        f" VALUES ({_marks(range(17))})",
                        [row for row in rows if len(row) != SHORT_ROW],
                    ).rowcount
                conn.execute(
                    "UPDATE segments SET span_count = span_count + ?, last_write_at = ?,"
                    " min_start_ns = min(coalesce(min_start_ns, ?), ?),"
                    " max_start_ns = max(coalesce(max_start_ns, ?), ?) WHERE id = ?",
                    (inserted, now, min_start, min_start, max_start, max_start, n),
                )
            if logs:
                conn.executemany(
                    f"INSERT INTO logs_{n} ({_LOG_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    logs,
                )
                conn.execute(
                    "UPDATE segments SET log_count = log_count + ?, last_write_at = ? WHERE id = ?",
                    (len(logs), now, n),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        segment.span_count += inserted
        segment.log_count += len(logs)
        segment.last_write_at = now
        segment.max_id = before + inserted  # rowids are handed out as max(id) + 1
        if self.index_attributes and segment.terms is not None:
            # Terms of spans that were duplicates (not inserted) may be among them: a
            # superset is harmless, as a search checks each candidate span's attributes.
            for batch in with_spans:  # log batches have no terms, and need none
                if batch.terms is None:
                    segment.terms = None
                    break
                segment.terms.update(batch.terms)
        limit = self.retention.max_spans
        if limit is not None and sum(s.size for s in self._segments) > limit:
            self._prune_count_sync(conn)
        return inserted

    def _current_segment_sync(self, conn: sqlite3.Connection, now: float, size: int) -> _Segment:
        segment = self._segments[-1] if self._segments else None
        age = self.retention.segment_age
        if (
            segment is None
            or (segment.size and segment.size + size > self.retention.segment_spans)
            or (age is not None and segment.size and now - segment.created_at >= age)
        ):
            segment = self._create_segment_sync(conn, now)
            self._prune_count_sync(conn)
        return segment

    def _create_segment_sync(self, conn: sqlite3.Connection, now: float) -> _Segment:
        n = (self._segments[-1].id + 1) if self._segments else 1
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _segment_schema(n):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO segments (id, created_at, last_write_at) VALUES (?, ?, ?)",
                (n, now, now),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        segment = _Segment(n, now, now, 0)
        self._segments.append(segment)
        return segment

    # --- the attribute index ---------------------------------------------------------
    #
    # Coarse on purpose: for each *chunk* of spans (a range of ids, at least
    # ``index_chunk`` spans or what arrived in ``index_delay`` seconds), one row with a
    # Bloom filter of the chunk's distinct (key, value) terms (``_terms``). A row per term
    # cost about as much as storing the span rows (two unique ids a span, in random
    # order into a B-tree); a filter costs a few hashes a term. A search checks the
    # attribute JSON of the spans in the chunks whose filter may have the value (about
    # 1% of the others too), newest first, and stops at its limit. Spans not yet in a
    # chunk are checked the same way.

    def _unindexed(self) -> int:
        return sum(s.max_id - s.indexed_upto for s in self._segments)

    async def _index(self) -> None:
        try:
            await self._in_writer(self._index_sync)
        except CollectorClosedError:
            raise
        except Exception:
            log.exception("indexing attributes in %s failed; will try again", self._what)

    async def index_now(self) -> None:
        """Index the attributes of every span stored so far."""
        while self._unindexed():
            await self._in_writer(self._index_sync)

    async def _index_loop(self) -> None:
        while True:
            await self._clock.sleep(self.index_delay)
            if self._unindexed():
                try:
                    await self._index()
                except CollectorClosedError:
                    return

    def _index_sync(self) -> None:
        conn = self._conn
        if conn is None:
            raise CollectorClosedError(f"{self._what} is not open")
        for segment in list(self._segments):
            if segment.max_id <= segment.indexed_upto:
                continue
            if segment.terms is not None:
                # The terms the decoder collected: one chunk for all the spans after the
                # last one (``index_chunk`` of them, or what came within ``index_delay``).
                self._add_chunk_sync(conn, segment, segment.max_id, segment.terms)
                segment.terms = set()
            else:
                # Spans stored before a restart (or by an older version): their terms are
                # read back from their attribute JSON, by the same function, one chunk of
                # ``index_chunk`` spans a call, so that the writer (whose thread this is)
                # stores what arrives between two chunks.
                low = segment.indexed_upto + 1
                high = min(segment.max_id, low + self.index_chunk - 1)
                terms: set[Term] = set()
                for (text,) in conn.execute(
                    f"SELECT attributes FROM spans_{segment.id}"
                    " WHERE id BETWEEN ? AND ? AND attributes IS NOT NULL",
                    (low, high),
                ):
                    add_terms(terms, _loads(text, {}))
                self._add_chunk_sync(conn, segment, high, terms)
                if segment.indexed_upto == segment.max_id:
                    segment.terms = set()  # caught up: the decoder's terms from now on

    def _add_chunk_sync(
        self, conn: sqlite3.Connection, segment: _Segment, high: int, terms: set[Term]
    ) -> None:
        """Index the spans of ``segment`` after ``indexed_upto`` up to ``high``: one row
        with the Bloom filter of their ``terms``."""
        n, low = segment.id, segment.indexed_upto + 1
        bloom = make_bloom(terms, bloom_bits(len(terms)))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                f"INSERT INTO chunks_{n} (lo, hi, bloom) VALUES (?, ?, ?)", (low, high, bloom)
            )
            conn.execute("UPDATE segments SET indexed_upto = ? WHERE id = ?", (high, n))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        segment.indexed_upto = high

    # --- retention ----------------------------------------------------------------

    async def prune(self) -> int:
        """Apply retention now; returns how many segments were dropped."""
        now = self._clock.time()
        dropped: int = await self._in_writer(partial(self._prune_sync, now))
        return dropped

    async def run_retention(self) -> None:
        """Apply retention every ``retention.interval`` seconds until cancelled."""
        while True:
            await self._clock.sleep(self.retention.interval)
            try:
                await self.prune()
            except CollectorClosedError:
                return
            except Exception:
                log.exception("retention pass on %s failed; will try again", self._what)

    def _prune_sync(self, now: float) -> int:
        conn = self._conn
        if conn is None:
            return 0
        dropped = 0
        max_age = self.retention.max_age
        if max_age is not None:
            cutoff = now - max_age
            while self._segments and self._segments[0].last_write_at < cutoff:
                self._drop_segment_sync(conn, self._segments[0])
                dropped += 1
        return dropped + self._prune_count_sync(conn)

    def _prune_count_sync(self, conn: sqlite3.Connection) -> int:
        limit = self.retention.max_spans
        if limit is None:
            return 0
        dropped = 0
        total = sum(s.size for s in self._segments)
        while len(self._segments) > 1 and total > limit:
            oldest = self._segments[0]
            total -= oldest.size
            self._drop_segment_sync(conn, oldest)
            dropped += 1
        return dropped

    def _drop_segment_sync(self, conn: sqlite3.Connection, segment: _Segment) -> None:
        n = segment.id
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"DROP TABLE IF EXISTS attrs_{n}")  # schema 2 and before
            conn.execute(f"DROP TABLE IF EXISTS chunks_{n}")
            conn.execute(f"DROP TABLE IF EXISTS spans_{n}")
            conn.execute(f"DROP TABLE IF EXISTS logs_{n}")
            conn.execute("DELETE FROM segments WHERE id = ?", (n,))
            # Shared rows no live segment refers to any more.
            for table in ("resources", "scopes", "operations"):
                conn.execute(f"DELETE FROM {table} WHERE last_segment <= ?", (n,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._segments.remove(segment)
        self._counters.dropped_segments += 1
        log.info(
            "dropped segment %d (%d spans, %d log records) of %s",
            n,
            segment.span_count,
            segment.log_count,
            self._what,
        )

    # --- reading ------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        state = self._reader_state
        if state.conn is None:
            conn = connect_sqlite(
                self.path, synchronous=self.synchronous, busy_timeout=10.0, read_only=True
            )
            conn.row_factory = None
            conn.execute("PRAGMA cache_size=-16384")
            conn.execute("PRAGMA temp_store=MEMORY")
            clock = self._clock
            conn.set_progress_handler(lambda: clock.monotonic() > state.deadline, 20_000)
            with self._reader_lock:
                self._reader_conns.append(conn)
            state.conn = conn
        return state.conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        if self._reader_pool is None or not self.is_open:
            raise CollectorClosedError(f"{self._what} is not open")
        timeout = self.query_timeout
        clock = self._clock

        def run() -> T:
            conn = self._reader()
            self._reader_state.deadline = clock.monotonic() + timeout
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                self._reader_state.deadline = math.inf
                conn.execute("COMMIT")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader_pool, run)
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise CollectorStorageError(
                    f"{what} took longer than {timeout:g} s; narrow the search"
                ) from exc
            raise map_sqlite_error(exc, f"{what} on {self._what}") from exc
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, f"{what} on {self._what}") from exc

    async def stats(self) -> StoreStats:
        def run(conn: sqlite3.Connection) -> StoreStats:
            spans, logs, segments, oldest, newest = conn.execute(
                "SELECT coalesce(sum(span_count), 0), coalesce(sum(log_count), 0), count(*),"
                " min(created_at), max(last_write_at) FROM segments"
            ).fetchone()
            size = 0
            for suffix in ("", "-wal"):
                with contextlib.suppress(OSError):
                    size += Path(f"{self.path}{suffix}").stat().st_size
            c = self._counters
            return StoreStats(
                spans=spans,
                segments=segments,
                oldest_received_at=oldest,
                newest_received_at=newest,
                file_bytes=size,
                spans_received=c.received,
                spans_stored=c.stored,
                spans_rejected=c.rejected,
                spans_duplicate=c.duplicate,
                transactions=c.transactions,
                segments_dropped=c.dropped_segments,
                write_failures=c.write_failures,
                queued_spans=self._queued_spans,
                logs=logs,
                logs_received=c.logs_received,
                logs_stored=c.logs_stored,
                logs_rejected=c.logs_rejected,
            )

        return await self._read(run, "reading statistics")

    async def services(self) -> list[ServiceInfo]:
        def run(conn: sqlite3.Connection) -> list[ServiceInfo]:
            found: dict[str, list[str]] = {}
            for service, name in conn.execute(
                "SELECT service, name FROM operations ORDER BY service, name"
            ):
                found.setdefault(service, []).append(name)
            for (service,) in conn.execute("SELECT DISTINCT service FROM resources"):
                found.setdefault(service, [])
            return [ServiceInfo(name, ops) for name, ops in sorted(found.items())]

        return await self._read(run, "listing services")

    async def search(self, query: TraceQuery) -> list[TraceSummary]:
        return await self._read(partial(self._search_sync, query), "searching traces")

    async def get_trace(self, trace_id: bytes) -> Trace | None:
        return await self._read(partial(self._trace_sync, trace_id), "reading a trace")

    def _segment_ids(
        self, conn: sqlite3.Connection, start_ns: int | None = None, end_ns: int | None = None
    ) -> list[int]:
        return [n for n, _ in self._segments_read(conn, start_ns, end_ns)]

    def _segments_read(
        self, conn: sqlite3.Connection, start_ns: int | None = None, end_ns: int | None = None
    ) -> list[tuple[int, int]]:
        """(segment, indexed_upto), newest first, of the segments that may hold matches."""
        found = []
        for n, indexed, low, high in conn.execute(
            "SELECT id, indexed_upto, min_start_ns, max_start_ns FROM segments ORDER BY id DESC"
        ):
            if low is None:
                continue
            if start_ns is not None and high < start_ns:
                continue
            if end_ns is not None and low > end_ns:
                continue
            found.append((n, indexed))
        return found

    def _span_conditions(
        self, query: TraceQuery, conn: sqlite3.Connection
    ) -> tuple[list[str], list[object]] | None:
        """SQL conditions on one span (``s``) for everything but attributes; None if
        nothing can match."""
        where: list[str] = []
        params: list[object] = []
        if query.service is not None:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM resources WHERE service = ?", (query.service,)
                )
            ]
            if not ids:
                return None
            where.append(f"s.resource_id IN ({_marks(ids)})")
            params.extend(ids)
        simple: tuple[tuple[str, object], ...] = (
            ("s.name = ?", query.operation),
            ("s.duration_ns >= ?", query.min_duration_ns),
            ("s.duration_ns <= ?", query.max_duration_ns),
            ("s.start_ns >= ?", query.start_ns),
            ("s.start_ns <= ?", query.end_ns),
        )
        for condition, value in simple:
            if value is not None:
                where.append(condition)
                params.append(value)
        if query.status == "error":
            where.append(f"s.status = {_STATUS_ERROR}")
        elif query.status == "ok":
            where.append(f"s.status != {_STATUS_ERROR}")
        return where, params

    def _attribute_terms(self, query: TraceQuery, conn: sqlite3.Connection) -> list[_AttributeTerm]:
        terms = []
        for key, value in query.attributes:
            candidates = _value_candidates(value)
            resource_ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT DISTINCT r.id FROM resources AS r, json_each(r.attributes) AS j"
                    f" WHERE j.key = ? AND {_INDEXED_VALUE} IN ({_marks(candidates)})",
                    (key, *candidates),
                )
            ]
            hashes = tuple(term_hash(key, candidate) for candidate in candidates)  # type: ignore[arg-type]
            terms.append(
                _AttributeTerm(
                    key, candidates, resource_ids, indexed=self.index_attributes, hashes=hashes
                )
            )
        return terms

    def _attribute_clause(
        self, conn: sqlite3.Connection, n: int, indexed_upto: int, term: _AttributeTerm
    ) -> tuple[str, list[object]]:
        """The condition for one ``key=value`` in segment ``n``: the span's JSON has it
        (looked at only in the chunks whose index says so, and in the tail not indexed
        yet), or its resource has it."""
        marks = _marks(term.candidates)
        # Scalars only, as the index holds them: json_each gives an array or a map as its
        # JSON text, which the index does not hold (a search for it would find spans not
        # indexed yet, and none once they are).
        has = (
            f"EXISTS (SELECT 1 FROM json_each(s.attributes) AS j WHERE j.key = ?"
            f" AND j.type NOT IN ('array', 'object') AND {_INDEXED_VALUE} IN ({marks}))"
        )
        params: list[object] = [term.key, *term.candidates]
        if term.indexed:
            ranges = [
                (lo, hi)
                for lo, hi, bloom in conn.execute(f"SELECT lo, hi, bloom FROM chunks_{n}")
                if any(might_contain(bloom, h) for h in term.hashes)
            ]
            where = [f"s.id > {int(indexed_upto)}"]
            if len(ranges) <= _MAX_CHUNK_RANGES:
                where += [f"s.id BETWEEN {int(lo)} AND {int(hi)}" for lo, hi in ranges]
            else:
                where = []  # too many to list: the JSON check alone decides
            if where:
                has = f"({' OR '.join(where)}) AND {has}"
        if term.resource_ids:
            clause = f"({has} OR s.resource_id IN ({_marks(term.resource_ids)}))"
            return clause, [*params, *term.resource_ids]
        return f"({has})", params

    def _search_sync(self, query: TraceQuery, conn: sqlite3.Connection) -> list[TraceSummary]:
        conditions = self._span_conditions(query, conn)
        if conditions is None:
            return []
        where, params = conditions
        attribute_terms = self._attribute_terms(query, conn)
        found: dict[bytes, None] = {}
        # Segments newest first, spans newest first within each (the start_ns index),
        # stopping as soon as `limit` distinct traces are found.
        for n, indexed_upto in self._segments_read(conn, query.start_ns, query.end_ns):
            clauses = list(where)
            segment_params = list(params)
            for term in attribute_terms:
                clause, clause_params = self._attribute_clause(conn, n, indexed_upto, term)
                clauses.append(clause)
                segment_params.extend(clause_params)
            sql = f"SELECT s.trace_id FROM spans_{n} AS s"
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            cursor = conn.execute(sql + " ORDER BY s.start_ns DESC", segment_params)
            try:
                for (trace_id,) in cursor:
                    found.setdefault(trace_id, None)
                    if len(found) >= query.limit:
                        break
            finally:
                cursor.close()
            if len(found) >= query.limit:
                break
        summaries = self._summaries_sync(conn, list(found))
        summaries.sort(key=lambda s: s.start_ns, reverse=True)
        return summaries

    def _services_of(self, conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, str]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        return dict(
            conn.execute(
                f"SELECT id, service FROM resources WHERE id IN ({','.join('?' * len(wanted))})",
                wanted,
            ).fetchall()
        )

    def _summaries_sync(
        self, conn: sqlite3.Connection, trace_ids: list[bytes]
    ) -> list[TraceSummary]:
        if not trace_ids:
            return []
        spans: dict[bytes, dict[bytes, tuple[Any, ...]]] = {t: {} for t in trace_ids}
        marks = ",".join("?" * len(trace_ids))
        for n in self._segment_ids(conn):
            for row in conn.execute(
                f"SELECT trace_id, span_id, parent_id, resource_id, name, start_ns, duration_ns,"
                f" status FROM spans_{n} WHERE trace_id IN ({marks})",
                trace_ids,
            ):
                spans[row[0]].setdefault(row[1], row)
        services = self._services_of(
            conn, (row[3] for by_id in spans.values() for row in by_id.values())
        )
        summaries = []
        for trace_id, by_id in spans.items():
            if by_id:
                summaries.append(_summarize(trace_id, list(by_id.values()), services))
        return summaries

    def _trace_sync(self, trace_id: bytes, conn: sqlite3.Connection) -> Trace | None:
        rows: dict[bytes, tuple[Any, ...]] = {}
        for n in self._segment_ids(conn):
            for row in conn.execute(
                f"SELECT {_SPAN_COLUMNS} FROM spans_{n} WHERE trace_id = ?", (trace_id,)
            ):
                rows.setdefault(row[1], row)
        log_rows = [
            row
            for n in self._all_segment_ids(conn)
            for row in conn.execute(
                f"SELECT {_LOG_COLUMNS} FROM logs_{n} WHERE trace_id = ?", (trace_id,)
            )
        ]
        logs = self._log_records(conn, log_rows)
        logs.sort(key=lambda record: record.time_ns)
        if not rows:
            # Logs whose spans were sampled out, sent elsewhere or not received yet.
            return _logs_only_trace(trace_id, logs) if logs else None
        resource_ids = sorted({row[3] for row in rows.values()})
        scope_ids = sorted({row[4] for row in rows.values()})
        resources = {
            id_: ResourceRecord(service, _loads(attributes, {}))
            for id_, service, attributes in conn.execute(
                "SELECT id, service, attributes FROM resources"
                f" WHERE id IN ({','.join('?' * len(resource_ids))})",
                resource_ids,
            )
        }
        scopes = {
            id_: (name, version)
            for id_, name, version in conn.execute(
                f"SELECT id, name, version FROM scopes WHERE id IN ({_marks(scope_ids)})",
                scope_ids,
            )
        }
        spans = []
        for row in rows.values():
            (
                tid,
                sid,
                parent,
                resource_id,
                scope_id,
                name,
                kind,
                start,
                duration,
                status,
                message,
                state,
                flags,
                attributes,
                events,
                links,
                dropped,
            ) = row
            resource = resources.get(resource_id)
            scope_name, scope_version = scopes.get(scope_id, ("", ""))
            spans.append(
                SpanRecord(
                    trace_id=tid.hex(),
                    span_id=sid.hex(),
                    parent_span_id=parent.hex() if parent is not None else None,
                    service=resource.service if resource is not None else "unknown_service",
                    resource_id=resource_id,
                    name=name,
                    kind=KIND_NAMES.get(kind, str(kind)),
                    start_ns=start,
                    end_ns=start + duration,
                    duration_ns=duration,
                    status=STATUS_NAMES.get(status, "unset"),
                    status_message=message,
                    trace_state=state,
                    flags=flags,
                    scope_name=scope_name,
                    scope_version=scope_version,
                    attributes=_loads(attributes, {}),
                    events=_loads(events, []),
                    links=_loads(links, []),
                    dropped=_loads(dropped, None),
                )
            )
        spans.sort(key=lambda s: (s.start_ns, s.span_id))
        summary = _summarize(
            trace_id,
            [(r[0], r[1], r[2], r[3], r[5], r[7], r[8], r[9]) for r in rows.values()],
            {id_: r.service for id_, r in resources.items()},
        )
        return Trace(trace_id.hex(), summary, spans, resources, logs)

    def _all_segment_ids(self, conn: sqlite3.Connection) -> list[int]:
        """Every segment, newest first, spans or not, as this read transaction sees them."""
        return [n for (n,) in conn.execute("SELECT id FROM segments ORDER BY id DESC")]

    def _log_records(
        self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]
    ) -> list[LogRecord]:
        """Rows of ``_LOG_COLUMNS`` as :class:`LogRecord` s, in the same order."""
        resource_ids = sorted({row[9] for row in rows})
        scope_ids = sorted({row[10] for row in rows})
        services = dict(
            conn.execute(
                f"SELECT id, service FROM resources WHERE id IN ({_marks(resource_ids)})",
                resource_ids,
            )
        )
        scopes = dict(
            conn.execute(
                f"SELECT id, name FROM scopes WHERE id IN ({_marks(scope_ids)})", scope_ids
            )
        )
        return [
            LogRecord(
                time_ns=time_ns,
                observed_ns=observed,
                severity=severity,
                level=severity_level(severity),
                severity_text=severity_text,
                body=_loads(body, None),
                attributes=_loads(attributes, {}),
                trace_id=tid.hex() if tid is not None else None,
                span_id=sid.hex() if sid is not None else None,
                flags=flags,
                service=services.get(resource_id, "unknown_service"),
                resource_id=resource_id,
                scope_name=scopes.get(scope_id, ""),
                event_name=event_name,
                dropped_attributes=dropped,
            )
            for (
                time_ns,
                observed,
                severity,
                severity_text,
                body,
                attributes,
                tid,
                sid,
                flags,
                resource_id,
                scope_id,
                event_name,
                dropped,
            ) in rows
        ]

    async def search_logs(self, query: LogQuery) -> list[LogRecord]:
        """Log records that match ``query``, newest first (by arrival, then time)."""
        return await self._read(partial(self._search_logs_sync, query), "searching logs")

    def _search_logs_sync(self, query: LogQuery, conn: sqlite3.Connection) -> list[LogRecord]:
        conditions: list[str] = []
        params: list[object] = []
        if query.service is not None:
            ids = [
                id_
                for (id_,) in conn.execute(
                    "SELECT id FROM resources WHERE service = ?", (query.service,)
                )
            ]
            if not ids:
                return []
            conditions.append(f"resource_id IN ({_marks(ids)})")
            params.extend(ids)
        if query.min_severity is not None:
            conditions.append("severity >= ?")
            params.append(query.min_severity)
        if query.trace_id is not None:
            conditions.append("trace_id = ?")
            params.append(query.trace_id)
        if query.text:
            # As the text appears inside the stored JSON (quotes and backslashes escaped).
            needle = msgspec.json.encode(query.text).decode()[1:-1]
            escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conditions.append("body LIKE ? ESCAPE '\\'")
            params.append(f"%{escaped}%")
        if query.start_ns is not None:
            conditions.append("time_ns >= ?")
            params.append(query.start_ns)
        if query.end_ns is not None:
            conditions.append("time_ns <= ?")
            params.append(query.end_ns)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        found: list[tuple[Any, ...]] = []
        for n in self._all_segment_ids(conn):
            left = query.limit - len(found)
            if left <= 0:
                break
            found.extend(
                conn.execute(
                    f"SELECT {_LOG_COLUMNS} FROM logs_{n}{where} ORDER BY id DESC LIMIT ?",
                    (*params, left),
                )
            )
        records = self._log_records(conn, found)
        records.sort(key=lambda record: record.time_ns, reverse=True)
        return records


def _logs_only_trace(trace_id: bytes, logs: list[LogRecord]) -> Trace:
    """A trace of which only log records are stored: no span, the root missing."""
    start = logs[0].time_ns
    services: dict[str, int] = {}
    for record in logs:
        services[record.service] = services.get(record.service, 0) + 1
    summary = TraceSummary(
        trace_id=trace_id.hex(),
        root_service=logs[0].service,
        root_name="(no span stored)",
        start_ns=start,
        duration_ns=logs[-1].time_ns - start,
        span_count=0,
        error_count=0,
        services=tuple(ServiceSpans(name, 0, 0) for name in services),
        root_missing=True,
    )
    return Trace(trace_id.hex(), summary, [], {}, logs)


def _upgrade_from_2(conn: sqlite3.Connection) -> None:
    """Schema 2 to 3, in the caller's transaction: the attribute index's rows give way to
    a Bloom filter per chunk. Every segment's index is dropped and rebuilt by the indexer
    from the stored attributes; until then, searches read the spans themselves."""
    for (n,) in conn.execute("SELECT id FROM segments").fetchall():
        conn.execute(f"DROP TABLE IF EXISTS attrs_{n}")
        conn.execute(f"DROP TABLE IF EXISTS chunks_{n}")
        for statement in _chunks_schema(n):
            conn.execute(statement)
    conn.execute("UPDATE segments SET indexed_upto = 0")


def _upgrade_from_1(conn: sqlite3.Connection) -> None:
    """Schema 1 to 2, in the caller's transaction: log records in every segment."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(segments)")}
    if "log_count" not in columns:
        conn.execute("ALTER TABLE segments ADD COLUMN log_count INTEGER NOT NULL DEFAULT 0")
    for (n,) in conn.execute("SELECT id FROM segments").fetchall():
        for statement in _logs_schema(n):
            conn.execute(statement)


def _settle(taken: Sequence[_Pending], error: BaseException | None) -> None:
    for pending in taken:
        if pending.done.done():  # the request went away; its spans were written anyway
            continue
        if error is None:
            pending.done.set_result(None)
        else:
            pending.done.set_exception(error)


def _summarize(
    trace_id: bytes, rows: Sequence[tuple[Any, ...]], services: dict[int, str]
) -> TraceSummary:
    """Rows of (trace_id, span_id, parent_id, resource_id, name, start, duration, status)."""
    ids = {row[1] for row in rows}
    start = min(row[5] for row in rows)
    end = max(row[5] + row[6] for row in rows)
    roots = [row for row in rows if row[2] is None]
    root_missing = not roots
    if not roots:
        roots = [row for row in rows if row[2] not in ids] or list(rows)
    root = min(roots, key=lambda row: (row[5], -row[6]))
    per_service: dict[str, list[int]] = {}
    errors = 0
    for row in sorted(rows, key=lambda row: row[5]):
        counts = per_service.setdefault(services.get(row[3], "unknown_service"), [0, 0])
        counts[0] += 1
        if row[7] == _STATUS_ERROR:
            counts[1] += 1
            errors += 1
    return TraceSummary(
        trace_id=trace_id.hex(),
        root_service=services.get(root[3], "unknown_service"),
        root_name=root[4],
        start_ns=start,
        duration_ns=end - start,
        span_count=len(rows),
        error_count=errors,
        services=tuple(ServiceSpans(name, c[0], c[1]) for name, c in per_service.items()),
        root_missing=root_missing,
    )
