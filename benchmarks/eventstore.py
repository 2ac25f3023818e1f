"""Event store benchmark: atoll against the eventsourcing library and raw INSERTs.

    .venv/bin/python benchmarks/eventstore.py [--quick] [--postgres URL]

On the same PostgreSQL server and on SQLite (WAL, synchronous=FULL for everyone), it
measures appends with 1, 8 and 32 concurrent writers, each to its own stream, in
batches of 1 and of 10 events; reading one stream; and reading the global log. The
peers are eventsourcing's application recorders (``PostgresApplicationRecorder``, which
keeps its global log gap-free by ``LOCK TABLE ... IN EXCLUSIVE MODE``, and
``SQLiteApplicationRecorder``), and, as the limit, a plain multi-row INSERT of the same
rows into a table of the same shape with the same driver (asyncpg, sqlite3) and no
checks at all. atoll runs with its guarantees on: expected-version checks, idempotency
by event id, and the watermarked global log (a reader that pages through the log while
the writers run is checked to see every event exactly once).

The last line of output is one JSON object (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

from atoll.determinism import RandomSource
from atoll.eventstore import NO_STREAM, START, EventData, PostgresEventStore, SQLiteEventStore

DATA = b'{"order_id":"o-000123","amount_cents":1250,"currency":"EUR","note":"benchmark"}'
META = b'{"aggregate":"order"}'
WRITERS = [1, 8, 32]
BATCHES = (1, 10)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- timing -------------------------------------------------------------------------------


async def run_async_writers(
    writers: int, seconds: float, step: Callable[[int], Awaitable[int]]
) -> float:
    """Run ``step(writer)`` in ``writers`` tasks for ``seconds``; events per second."""
    for w in range(writers):  # warm up: connections, prepared statements, streams
        await step(w)
    counts = [0] * writers
    stop = time.perf_counter() + seconds

    async def loop(w: int) -> None:
        while time.perf_counter() < stop:
            counts[w] += await step(w)

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(writers)))
    return sum(counts) / (time.perf_counter() - started)


def run_thread_writers(writers: int, seconds: float, step: Callable[[int], int]) -> float:
    """Run ``step(writer)`` in ``writers`` threads for ``seconds``; events per second."""
    for w in range(writers):
        step(w)
    counts = [0] * writers
    stop = time.perf_counter() + seconds

    def loop(w: int) -> None:
        while time.perf_counter() < stop:
            counts[w] += step(w)

    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(loop, range(writers)))
    return sum(counts) / (time.perf_counter() - started)


# -- atoll --------------------------------------------------------------------------------


class AtollWriters:
    """Each writer appends to its own stream with an exact expected version."""

    def __init__(self, store: Any, batch: int, label: str) -> None:
        self.store = store
        self.batch = batch
        self.label = label
        self.versions: dict[int, int] = {}
        self.rngs: dict[int, RandomSource] = {}
        self.appended = 0

    async def step(self, w: int) -> int:
        rng = self.rngs.get(w)
        if rng is None:
            rng = self.rngs[w] = RandomSource(w)
        events = [
            EventData(event_id=rng.new_id(), type="OrderPaid", data=DATA, metadata=META)
            for _ in range(self.batch)
        ]
        version = self.versions.get(w)
        result = await self.store.append(
            f"{self.label}{w}", events, NO_STREAM if version is None else version
        )
        self.versions[w] = result.last_version
        self.appended += self.batch
        return self.batch


async def tail_reader(store: Any, label: str, stop: asyncio.Event, seen: list[str]) -> None:
    """Page through the global log while writers run (the no-skip guarantee under load)."""
    position = START
    while True:
        stopping = stop.is_set()
        batch = await store.read_all(after=position, limit=1000)
        seen += [e.event_id for e in batch if e.stream_id.startswith(label)]
        if batch:
            position = batch[-1].position
        elif stopping and not await store.has_held_back():
            return
        else:
            await asyncio.sleep(0.05)


async def atoll_append(
    make_store: Callable[[], Any], writers: int, batch: int, seconds: float, label: str
) -> float:
    store = make_store()
    async with store:
        appender = AtollWriters(store, batch, label)
        stop = asyncio.Event()
        seen: list[str] = []
        reader = asyncio.ensure_future(tail_reader(store, label, stop, seen))
        try:
            rate = await run_async_writers(writers, seconds, appender.step)
        finally:
            stop.set()
        await reader
        # Every appended event, read once, by a reader that ran during the appends.
        if len(seen) != appender.appended or len(set(seen)) != len(seen):
            raise AssertionError(
                f"no-skip check failed: appended {appender.appended}, read {len(seen)} "
                f"({len(set(seen))} distinct)"
            )
    return rate


# -- eventsourcing ------------------------------------------------------------------------


class EventsourcingWriters:
    def __init__(self, recorder: Any, batch: int) -> None:
        self.recorder = recorder
        self.batch = batch
        self.local = threading.local()

    def step(self, _w: int) -> int:
        state = self.local.__dict__
        if "id" not in state:
            state["id"], state["version"] = uuid.uuid4(), 0
        events = []
        for _ in range(self.batch):
            events.append(StoredEvent(state["id"], state["version"], "OrderPaid", DATA))
            state["version"] += 1
        self.recorder.insert_events(events)
        return self.batch


def es_postgres(url: str, schema: str, pool_size: int, table: str) -> tuple[Any, Any]:
    u = urlsplit(url)
    datastore = PostgresDatastore(
        dbname=u.path.lstrip("/"),
        host=u.hostname or "127.0.0.1",
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password or "",
        pool_size=pool_size,
        schema=schema,
    )
    recorder = PostgresApplicationRecorder(datastore, events_table_name=table)
    recorder.create_table()
    return datastore, recorder


def es_sqlite(path: Path, pool_size: int) -> tuple[Any, Any]:
    datastore = SQLiteDatastore(str(path), pool_size=pool_size, max_overflow=0, pool_timeout=60)
    create = datastore.pool._create_connection

    def durable() -> Any:
        # The same durability as atoll: WAL (eventsourcing's default) and synchronous=FULL.
        connection = create()
        connection._sqlite_conn.execute("PRAGMA synchronous=FULL")
        connection._sqlite_conn.execute("PRAGMA busy_timeout=60000")
        return connection

    datastore.pool._create_connection = durable  # type: ignore[method-assign]
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    return datastore, recorder


# -- raw INSERT ---------------------------------------------------------------------------


async def raw_postgres(
    url: str, schema: str, writers: int, batch: int, *, seconds: float, round_: int
) -> float:
    name = f"raw_w{writers}_b{batch}"
    table = f'"{schema}".{name}'
    async with asyncpg.create_pool(url, min_size=writers, max_size=writers) as pool:
        await pool.execute(
            f"""CREATE TABLE IF NOT EXISTS {table} (
                position bigint GENERATED ALWAYS AS IDENTITY,
                tx_key xid8 NOT NULL DEFAULT pg_current_xact_id(),
                stream_id text NOT NULL, version bigint NOT NULL, event_id uuid NOT NULL,
                type text NOT NULL, type_version integer NOT NULL, data bytea NOT NULL,
                metadata bytea NOT NULL, recorded_at double precision NOT NULL,
                PRIMARY KEY (stream_id, version))"""
        )
        await pool.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {name}_e ON {table} (event_id)")
        await pool.execute(
            f"CREATE UNIQUE INDEX IF NOT EXISTS {name}_l ON {table} (tx_key, position)"
        )
        values = ", ".join(
            f"(${i * 8 + 1}, ${i * 8 + 2}, ${i * 8 + 3}, ${i * 8 + 4}, ${i * 8 + 5},"
            f" ${i * 8 + 6}, ${i * 8 + 7}, ${i * 8 + 8})"
            for i in range(batch)
        )
        sql = (
            f"INSERT INTO {table} (stream_id, version, event_id, type, type_version, data,"
            f" metadata, recorded_at) VALUES {values}"
        )
        versions: dict[int, int] = {}

        async def step(w: int) -> int:
            version = versions.get(w, 0)
            args: list[Any] = []
            for i in range(batch):
                args += [
                    f"r{w}-{round_}",
                    version + i,
                    uuid.uuid4(),
                    "OrderPaid",
                    1,
                    DATA,
                    META,
                    time.time(),
                ]
            versions[w] = version + batch
            async with pool.acquire() as conn:
                await conn.execute(sql, *args)
            return batch

        return await run_async_writers(writers, seconds, step)


def raw_sqlite(path: Path, writers: int, batch: int, seconds: float, round_: int) -> float:
    table = f"raw_w{writers}_b{batch}"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute(
        f"""CREATE TABLE IF NOT EXISTS {table} (
            position INTEGER PRIMARY KEY AUTOINCREMENT, stream_id TEXT NOT NULL,
            version INTEGER NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL,
            type_version INTEGER NOT NULL, data BLOB NOT NULL, metadata BLOB NOT NULL,
            recorded_at REAL NOT NULL)"""
    )
    setup.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {table}_s ON {table} (stream_id, version)")
    setup.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {table}_e ON {table} (event_id)")
    setup.close()
    sql = (
        f"INSERT INTO {table} (stream_id, version, event_id, type, type_version, data, metadata,"
        f" recorded_at) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * batch)
    )
    # SQLite has one writer at a time. Writers that each hold a connection would contend
    # for its lock through the busy handler, which sleeps (milliseconds at a time): the
    # limit is one connection that the writers take turns on, one transaction per append.
    conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    turn = threading.Lock()
    versions = [0] * writers

    def step(w: int) -> int:
        params: list[Any] = []
        for i in range(batch):
            params += [
                f"r{w}-{round_}",
                versions[w] + i,
                uuid.uuid4().hex,
                "OrderPaid",
                1,
                DATA,
                META,
                time.time(),
            ]
        versions[w] += batch
        with turn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, params)
            conn.execute("COMMIT")
        return batch

    try:
        return run_thread_writers(writers, seconds, step)
    finally:
        conn.close()


# -- reads --------------------------------------------------------------------------------


async def atoll_reads(store: Any, stream_events: int, log_events: int) -> tuple[float, float]:
    rng = RandomSource(99)
    for _ in range(stream_events // 100):
        await store.append(
            "read-stream",
            [
                EventData(event_id=rng.new_id(), type="T", data=DATA, metadata=META)
                for _ in range(100)
            ],
        )
    have = 0
    position = START
    while True:
        batch = await store.read_all(after=position, limit=5000)
        have += len(batch)
        if len(batch) < 5000:
            break
        position = batch[-1].position
    while have < log_events:
        await store.append(
            f"fill-{have}",
            [
                EventData(event_id=rng.new_id(), type="T", data=DATA, metadata=META)
                for _ in range(500)
            ],
        )
        have += 500
    reps = 5
    started = time.perf_counter()
    for _ in range(reps):
        events = await store.read_stream("read-stream")
        assert len(events) == stream_events
    stream_rate = reps * stream_events / (time.perf_counter() - started)
    started = time.perf_counter()
    read = 0
    position = START
    while read < log_events:
        batch = await store.read_all(after=position, limit=1000)
        read += len(batch)
        position = batch[-1].position
    log_rate = read / (time.perf_counter() - started)
    return stream_rate, log_rate


def es_reads(recorder: Any, stream_events: int, log_events: int) -> tuple[float, float]:
    oid = uuid.uuid4()
    for start in range(0, stream_events, 100):
        recorder.insert_events([StoredEvent(oid, v, "T", DATA) for v in range(start, start + 100)])
    have = recorder.max_notification_id() or 0
    while have < log_events:
        filler = uuid.uuid4()
        recorder.insert_events([StoredEvent(filler, v, "T", DATA) for v in range(500)])
        have += 500
    reps = 5
    started = time.perf_counter()
    for _ in range(reps):
        events = recorder.select_events(oid)
        assert len(events) == stream_events
    stream_rate = reps * stream_events / (time.perf_counter() - started)
    started = time.perf_counter()
    read = 0
    start = 1
    while read < log_events:
        batch = recorder.select_notifications(start, 1000)
        read += len(batch)
        start = batch[-1].id + 1
    log_rate = read / (time.perf_counter() - started)
    return stream_rate, log_rate


# -- the run ------------------------------------------------------------------------------


def case(
    cases: dict[str, Any], name: str, atoll: float, peer: float, unit: str = "events/s"
) -> None:
    cases[name] = {
        "atoll": round(atoll, 1),
        "peer": round(peer, 1),
        "unit": unit,
        "ratio": round(atoll / peer, 3) if peer else None,
    }
    log(f"  {name:55s} atoll {atoll:10.0f}  peer {peer:10.0f}  ratio {atoll / peer:6.2f}")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


async def append_cases(
    backend: str,
    rounds: int,
    cases: dict[str, Any],
    systems: dict[str, Callable[[int, int, int], Awaitable[float]]],
) -> None:
    """Each writers/batch combination, all systems in turn, ``rounds`` times; medians.

    Interleaving the systems spreads the machine's background load over all of them.
    """
    for writers in WRITERS:
        for batch in BATCHES:
            rates: dict[str, list[float]] = {name: [] for name in systems}
            for round_ in range(rounds):
                for name, run in systems.items():
                    rates[name].append(await run(writers, batch, round_))
            atoll, peer, raw = (median(rates[n]) for n in ("atoll", "eventsourcing", "raw"))
            suffix = "" if batch == 1 else f"-batch-{batch}"
            case(cases, f"{backend}-{writers}-writers{suffix}-vs-eventsourcing", atoll, peer)
            case(cases, f"{backend}-{writers}-writers{suffix}-vs-raw-insert", atoll, raw)


async def bench_postgres(
    url: str, seconds: float, rounds: int, cases: dict[str, Any], reads: tuple[int, int]
) -> None:
    schema = f"bench_es_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(url)
    await admin.execute(f'CREATE SCHEMA "{schema}"')

    async def atoll(writers: int, batch: int, round_: int) -> float:
        return await atoll_append(
            lambda: PostgresEventStore(url, schema=schema, max_connections=writers + 3),
            writers,
            batch,
            seconds,
            f"w{writers}b{batch}r{round_}-",
        )

    async def eventsourcing(writers: int, batch: int, _round: int) -> float:
        datastore, recorder = es_postgres(url, schema, writers, f"es_w{writers}_b{batch}")
        try:
            step = EventsourcingWriters(recorder, batch).step
            return await asyncio.to_thread(run_thread_writers, writers, seconds, step)
        finally:
            datastore.close()

    async def raw(writers: int, batch: int, round_: int) -> float:
        return await raw_postgres(url, schema, writers, batch, seconds=seconds, round_=round_)

    try:
        systems = {"atoll": atoll, "eventsourcing": eventsourcing, "raw": raw}
        await append_cases("postgres", rounds, cases, systems)
        read_schema = f"{schema}_reads"
        await admin.execute(f'CREATE SCHEMA "{read_schema}"')
        async with PostgresEventStore(url, schema=read_schema) as store:
            a_stream, a_log = await atoll_reads(store, *reads)
        datastore, recorder = es_postgres(url, read_schema, 2, "es_reads")
        try:
            e_stream, e_log = await asyncio.to_thread(es_reads, recorder, *reads)
        finally:
            datastore.close()
        case(cases, "postgres-stream-read-vs-eventsourcing", a_stream, e_stream)
        case(cases, "postgres-global-read-vs-eventsourcing", a_log, e_log)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}_reads" CASCADE')
        await admin.close()


async def bench_sqlite(
    seconds: float, rounds: int, cases: dict[str, Any], reads: tuple[int, int]
) -> None:
    with tempfile.TemporaryDirectory(prefix="atoll-bench-es-") as tmp:
        root = Path(tmp)

        async def atoll(writers: int, batch: int, round_: int) -> float:
            return await atoll_append(
                lambda: SQLiteEventStore.from_path(
                    root / f"atoll-{writers}-{batch}.db", synchronous="FULL"
                ),
                writers,
                batch,
                seconds,
                f"w{writers}b{batch}r{round_}-",
            )

        async def eventsourcing(writers: int, batch: int, _round: int) -> float:
            datastore, recorder = es_sqlite(root / f"es-{writers}-{batch}.db", writers)
            try:
                step = EventsourcingWriters(recorder, batch).step
                return await asyncio.to_thread(run_thread_writers, writers, seconds, step)
            finally:
                datastore.close()

        async def raw(writers: int, batch: int, round_: int) -> float:
            path = root / f"raw-{writers}-{batch}.db"
            return await asyncio.to_thread(raw_sqlite, path, writers, batch, seconds, round_)

        systems = {"atoll": atoll, "eventsourcing": eventsourcing, "raw": raw}
        await append_cases("sqlite", rounds, cases, systems)
        async with SQLiteEventStore.from_path(root / "atoll-reads.db") as store:
            a_stream, a_log = await atoll_reads(store, *reads)
        datastore, recorder = es_sqlite(root / "es-reads.db", 2)
        try:
            e_stream, e_log = await asyncio.to_thread(es_reads, recorder, *reads)
        finally:
            datastore.close()
        case(cases, "sqlite-stream-read-vs-eventsourcing", a_stream, e_stream)
        case(cases, "sqlite-global-read-vs-eventsourcing", a_log, e_log)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under 60 s)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--backend", choices=["postgres", "sqlite"], help="only this backend")
    parser.add_argument("--writers", type=int, action="append", help="only these writer counts")
    parser.add_argument("--seconds", type=float, help="seconds per append case")
    args = parser.parse_args()
    if args.writers:
        WRITERS[:] = args.writers
    seconds = args.seconds or (0.45 if args.quick else 1.2)
    rounds = 2 if args.quick else 5
    reads = (1000, 10_000) if args.quick else (2000, 50_000)
    cases: dict[str, Any] = {}
    started = time.perf_counter()
    if args.backend in (None, "postgres"):
        log(f"PostgreSQL ({rounds} rounds of {seconds} s per append case, medians)")
        await bench_postgres(args.postgres, seconds, rounds, cases, reads)
    if args.backend in (None, "sqlite"):
        log(f"SQLite, WAL + synchronous=FULL ({rounds} rounds of {seconds} s per append case)")
        await bench_sqlite(seconds, rounds, cases, reads)
    log(f"done in {time.perf_counter() - started:.0f} s")
    print(json.dumps({"benchmark": "eventstore", "cases": cases}))


if __name__ == "__main__":
    asyncio.run(main())
