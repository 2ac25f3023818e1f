"""The PostgreSQL event store: the conformance kit, plus the watermark's own tests."""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg
import msgspec
import pytest

from atoll.determinism import RandomSource, SystemClock
from atoll.eventstore import NO_STREAM, START, EventData, PostgresEventStore
from atoll.eventstore._postgres import _raw
from atoll.persistence import DatabaseUnavailableError
from atoll.testing import EventStoreConformance
from atoll.testing._eventstore_kit import read_everything, settle

pytestmark = pytest.mark.postgres
PG_URL = os.environ.get("ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


class TestPostgresEventStore(EventStoreConformance):
    @pytest.fixture
    async def store(self, pg_schema):
        async with PostgresEventStore(PG_URL, schema=pg_schema, max_connections=20) as store:
            yield store

    @pytest.fixture
    async def peers(self, store, pg_schema):
        async with PostgresEventStore(PG_URL, schema=pg_schema, max_connections=10) as other:
            yield [other]


class NaivePostgresEventStore(PostgresEventStore):
    """The log read by sequence number alone, without the watermark: a deliberately
    broken reader, to show that the tests catch what the watermark prevents."""

    async def read_all(self, *, after=START, limit=500):
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT position FROM {self.table('events')} WHERE position > $1"
                " ORDER BY position LIMIT $2",
                after,
                limit,
            )
            by_seq = {r[0]: r for r in rows}
            full = await conn.fetch(
                f"SELECT tx_key, position FROM {self.table('events')} WHERE position = ANY($1)",
                list(by_seq),
            )
        packed = {r[1]: (r[0] << 64) | r[1] for r in full}
        events = {e.position: e for e in await super().read_all(limit=100_000)}
        # Unwatermarked rows are not in super().read_all; fetch them plainly.
        out = []
        for seq in sorted(by_seq):
            event = events.get(packed[seq])
            if event is None:
                event = await self._plain(seq)
            out.append(msgspec.structs.replace(event, position=seq))
        return out

    async def _plain(self, seq):
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT stream_id, version, tx_key, position, event_id, type, type_version, data,"
                f" metadata, recorded_at FROM {self.table('events')} WHERE position = $1",
                seq,
            )
        return _raw(row)

    async def head_position(self):
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                f"SELECT coalesce(max(position), 0) FROM {self.table('events')}"
            )

    async def has_held_back(self):
        return False


def event(rng):
    return EventData(event_id=rng.new_id(), type="T", data=b"{}")


async def xmin_of(store, event_id):
    """The id of the transaction that inserted an event (PostgreSQL's xmin column)."""
    async with store.pool.acquire() as conn:
        return int(
            await conn.fetchval(
                f"SELECT xmin::text::bigint FROM {store.table('events')} WHERE event_id = $1",
                uuid.UUID(event_id),
            )
        )


async def test_a_naive_reader_skips_the_late_commit_that_the_watermark_holds_back(pg_schema):
    rng = RandomSource(3)
    async with (
        PostgresEventStore(PG_URL, schema=pg_schema) as store,
        NaivePostgresEventStore(PG_URL, schema=pg_schema) as naive,
    ):
        early, late = event(rng), event(rng)
        async with store.transaction() as tx:
            await store.append("slow", [early], tx=tx)
            await store.append("fast", [late])
            naive_seen = await naive.read_all()
            assert [e.event_id for e in naive_seen] == [late.event_id]
            assert await store.read_all() == []  # held back behind the open transaction
            backlog = await store.backlog(START)
            assert backlog.held_back == 1
        naive_after = await naive.read_all(after=naive_seen[-1].position)
        assert naive_after == []  # the naive reader stepped past `early` for good
        await settle(store)
        assert [e.event_id for e in await store.read_all()] == [early.event_id, late.event_id]


async def test_the_concurrency_conformance_test_fails_on_a_naive_reader(pg_schema):
    """The kit's concurrency test is able to fail: it catches a reader without watermark."""

    class Kit(EventStoreConformance):
        conformance_events = 1500
        conformance_deadline = 3.0

    kit = Kit()
    async with (
        PostgresEventStore(PG_URL, schema=pg_schema, max_connections=20) as store,
        NaivePostgresEventStore(PG_URL, schema=pg_schema, max_connections=10) as naive,
    ):
        with pytest.raises((AssertionError, pytest.fail.Exception)) as failure:
            await kit.test_many_writers_and_tailing_readers_see_every_event_once_in_one_order(
                store, [naive]
            )
    # It skips events, or (when another session holds everyone back long enough for
    # the naive readers to see every event) delivers them in another order.
    assert any(
        word in str(failure.value) for word in ("misses", "skipped", "disagree on the order")
    )


async def test_the_log_order_follows_causality_even_for_an_older_transaction(pg_schema):
    """A transaction that got its id early, then read a newer event, appends after it."""
    rng = RandomSource(4)
    async with PostgresEventStore(PG_URL, schema=pg_schema) as store:
        cause, effect, first, second = event(rng), event(rng), event(rng), event(rng)
        async with store.transaction() as tx:
            await store.set_stream_metadata("unrelated", {"why": "take an id early"}, tx=tx)
            await store.append("cause-1", [cause])  # a younger transaction, committed
            await store.append("shared-1", [first], NO_STREAM)
            assert await store.read_stream("cause-1", tx=tx)  # the older one reads it...
            await store.append("effect-1", [effect], tx=tx)  # ...and then appends
            await store.append("shared-1", [second], 0, tx=tx)
        # By transaction id alone the effect would come first:
        assert await xmin_of(store, effect.event_id) < await xmin_of(store, cause.event_id)
        assert await xmin_of(store, second.event_id) < await xmin_of(store, first.event_id)
        order = [e.event_id for e in await read_everything(store)]
        assert order.index(cause.event_id) < order.index(effect.event_id)
        assert order.index(first.event_id) < order.index(second.event_id)


async def test_an_open_transaction_holds_the_log_back_and_is_named(pg_schema):
    rng = RandomSource(5)
    async with PostgresEventStore(PG_URL, schema=pg_schema) as store:
        blocker = await asyncpg.connect(PG_URL)
        try:
            transaction = blocker.transaction()
            await transaction.start()
            # Holds an id and writes nothing.
            blocker_id = await blocker.fetchval("SELECT pg_current_xact_id()")
            pid = blocker.get_server_pid()
            await store.append("held-1", [event(rng)])
            assert await store.read_all() == []
            assert await store.has_held_back()
            backlog = await store.backlog(START)
            assert (backlog.events, backlog.held_back) == (0, 1)
            assert backlog.blocked_by is not None
            async with store.pool.acquire() as conn:
                watermark = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())")
            if watermark == blocker_id:  # else an older session elsewhere on the server
                assert f"pid {pid}" in backlog.blocked_by
            await transaction.commit()
        finally:
            await blocker.close()
        await settle(store)
        assert len(await store.read_all()) == 1


async def test_a_transaction_that_starts_after_an_append_cannot_hold_it_back(pg_schema):
    """The order key never exceeds an id handed out before the append.

    The append's statement sees a newer transaction as completed, so xmax of its
    snapshot is an id nobody holds yet. Had the key been xmax, a transaction that takes
    that id later (after the append committed) would hold the event back while open.
    """
    rng = RandomSource(8)
    async with PostgresEventStore(PG_URL, schema=pg_schema) as store:
        store._committed = lambda: None  # no NOTIFY transactions taking ids in between
        for _attempt in range(5):
            mine, other = event(rng), event(rng)
            async with store.transaction() as tx:
                await store.set_stream_metadata("early", {}, tx=tx)  # this transaction's id
                await store.append("other", [other])  # a newer id, completed
                await store.append("mine", [mine], tx=tx)
            blocker = await asyncpg.connect(PG_URL)
            try:
                transaction = blocker.transaction()
                await transaction.start()
                blocker_id = await blocker.fetchval("SELECT pg_current_xact_id()")
                if blocker_id != await xmin_of(store, other.event_id) + 1:
                    continue  # another session on the server took an id: try again
                seen: list[str] = []
                for _ in range(300):
                    seen = [e.event_id for e in await store.read_all(limit=1000)]
                    if mine.event_id in seen:
                        break
                    await SystemClock().sleep(0.01)
                assert mine.event_id in seen
                return
            finally:
                await blocker.close()
        pytest.fail("could not set up the scenario: the server hands out ids too fast")


async def test_notify_wakes_other_processes_and_is_coalesced(pg_schema):
    rng = RandomSource(6)
    async with (
        PostgresEventStore(PG_URL, schema=pg_schema, max_connections=12) as writer,
        PostgresEventStore(PG_URL, schema=pg_schema) as reader,
    ):
        listener = await asyncpg.connect(PG_URL)
        notifications = []
        await listener.add_listener(writer.channel, lambda *args: notifications.append(args))
        try:
            with reader.waiter() as waiter:
                await waiter.wait(0.3, SystemClock())  # the listener's start-up hint
                waiter.clear()
                await writer.append("n-0", [event(rng)])
                # Only LISTEN/NOTIFY can wake `reader`: it did not append anything.
                assert await waiter.wait(5.0, SystemClock())
            notifications.clear()
            appends = [writer.append(f"n-{i % 10}", [event(rng)]) for i in range(200)]
            await asyncio.gather(*appends)
            await SystemClock().sleep(0.1)
        finally:
            await listener.close()
        assert 1 <= len(notifications) < 100


async def test_runs_inside_a_callers_asyncpg_transaction(pg_schema):
    """A future PostgreSQL unit of work only needs to expose `.connection` and on_commit."""

    class UnitOfWork:
        def __init__(self, connection):
            self.connection = connection
            self.callbacks = []

        def on_commit(self, callback):
            self.callbacks.append(callback)

    rng = RandomSource(7)
    async with PostgresEventStore(PG_URL, schema=pg_schema) as store:
        conn = await asyncpg.connect(PG_URL)
        try:
            uow = UnitOfWork(conn)
            async with conn.transaction():
                await store.append("in-tx", [event(rng)], NO_STREAM, tx=uow)
                await conn.execute("SELECT 1")
                assert len(await store.read_stream("in-tx", tx=uow)) == 1
                assert await store.read_stream("in-tx") == []  # not committed yet
            assert len(await store.read_stream("in-tx")) == 1
            assert len(uow.callbacks) == 1
            tx = conn.transaction()
            await tx.start()
            await store.append("in-tx", [event(rng)], 0, tx=uow)
            await tx.rollback()
            assert len(await store.read_stream("in-tx")) == 1
        finally:
            await conn.close()
        with pytest.raises(TypeError, match="not a PostgreSQL transaction"):
            await store.append("in-tx", [event(rng)], tx=object())  # type: ignore[arg-type]


async def test_an_unreachable_server_is_a_clear_transient_error(pg_schema):
    store = PostgresEventStore("postgresql://postgres:secret@127.0.0.1:1/test", schema=pg_schema)
    with pytest.raises(DatabaseUnavailableError) as failure:
        await store.open()
    assert "secret" not in str(failure.value)
    assert "***" in str(failure.value)


@pytest.mark.slow
async def test_soak_many_writers_and_readers(pg_schema):
    """The concurrency conformance test, ten times longer, over two pools."""

    class Soak(EventStoreConformance):
        conformance_writers = 32
        conformance_events = 30_000
        conformance_readers = 8
        conformance_deadline = 300.0

    async with (
        PostgresEventStore(PG_URL, schema=pg_schema, max_connections=30) as store,
        PostgresEventStore(PG_URL, schema=pg_schema, max_connections=20) as other,
    ):
        await Soak().test_many_writers_and_tailing_readers_see_every_event_once_in_one_order(
            store, [other]
        )
