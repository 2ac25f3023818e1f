"""The unit-of-work conformance kit: every database backend's tests subclass it."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atoll.determinism import RandomSource, VirtualClock
from atoll.persistence import Database

_random = RandomSource()


class BoomError(Exception):
    """Raised inside a unit of work to make it fail."""


class DatabaseConformance(abc.ABC):
    """Checks every point of the :class:`atoll.persistence.Database` contract.

    Subclass it and implement :meth:`make_database` (a new, empty database, unopened,
    using the given clock)::

        class TestSQLiteDatabase(DatabaseConformance):
            async def make_database(self, tmp_path, clock):
                return SQLiteDatabase(tmp_path / "service.db", clock=clock)
    """

    @abc.abstractmethod
    async def make_database(self, tmp_path: Path, clock: VirtualClock) -> Database:
        """A new database with none of atoll's tables yet (or empty ones)."""

    async def destroy_database(self, database: Database) -> None:
        """Remove what :meth:`make_database` created (e.g. a schema on a shared server)."""
        del database

    @pytest.fixture
    def clock(self) -> VirtualClock:
        """The database's clock."""
        return VirtualClock()

    @pytest.fixture
    async def db(self, tmp_path: Path, clock: VirtualClock) -> AsyncIterator[Database]:
        """An open database with a ``items`` table, closed after the test."""
        database = await self.make_database(tmp_path, clock)
        await database.open()
        await database.migrate(
            "test-items",
            [
                "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
                "INSERT INTO counter (id, n) VALUES (1, 0)",
            ],
        )
        try:
            yield database
        finally:
            await database.close()
            await self.destroy_database(database)

    async def count(self, db: Database, sql: str, *params: object) -> int:
        """The first column of ``sql`` as an int."""
        async with db.read() as session:
            return int(await session.fetch_value(sql, *params) or 0)

    # -- atomicity ------------------------------------------------------------------------

    async def test_state_outbox_and_inbox_commit_together(self, db: Database) -> None:
        async with db.unit_of_work() as uow:
            await uow.execute("INSERT INTO items (id, name) VALUES (?, ?)", 1, "one")
            uow.add_outgoing(message_id="m1", topic="t", key="k", body=b"x")
            assert await uow.claim_inbox("consumer", "in-1")
        assert await self.count(db, "SELECT count(*) FROM items") == 1
        records = await db.outbox_fetch(10)
        assert [(r.message_id, r.topic, r.key, r.body) for r in records] == [("m1", "t", "k", b"x")]
        async with db.unit_of_work() as uow:
            assert not await uow.claim_inbox("consumer", "in-1")

    async def test_a_failed_unit_of_work_keeps_nothing(self, db: Database) -> None:
        with pytest.raises(BoomError):
            async with db.unit_of_work() as uow:
                await uow.execute("INSERT INTO items (id, name) VALUES (?, ?)", 1, "one")
                uow.add_outgoing(message_id="m1", topic="t", key="k", body=b"x")
                await uow.claim_inbox("consumer", "in-1")
                raise BoomError
        assert await self.count(db, "SELECT count(*) FROM items") == 0
        assert await db.outbox_fetch(10) == []
        async with db.unit_of_work() as uow:
            assert await uow.claim_inbox("consumer", "in-1"), "the inbox kept a rolled-back claim"

    async def test_uncommitted_changes_are_invisible_to_readers(self, db: Database) -> None:
        inside = asyncio.Event()
        release = asyncio.Event()

        async def writer() -> None:
            async with db.unit_of_work() as uow:
                await uow.execute("INSERT INTO items (id, name) VALUES (?, ?)", 1, "one")
                inside.set()
                await release.wait()

        task = asyncio.get_running_loop().create_task(writer())
        await inside.wait()
        assert await self.count(db, "SELECT count(*) FROM items") == 0
        release.set()
        await task
        assert await self.count(db, "SELECT count(*) FROM items") == 1

    async def test_on_commit_runs_after_commit_only(self, db: Database) -> None:
        calls: list[str] = []
        async with db.unit_of_work() as uow:
            uow.on_commit(lambda: calls.append("ok"))
            assert calls == []
        assert calls == ["ok"]
        with pytest.raises(BoomError):
            async with db.unit_of_work() as uow:
                uow.on_commit(lambda: calls.append("failed"))
                raise BoomError
        assert calls == ["ok"]

    # -- the inbox ------------------------------------------------------------------------

    async def test_inbox_claims_once_among_concurrent_units(self, db: Database) -> None:
        results: list[bool] = []

        async def claim() -> None:
            async with db.unit_of_work() as uow:
                results.append(await uow.claim_inbox("consumer", "same"))

        await asyncio.gather(*(claim() for _ in range(10)))
        assert sorted(results) == [False] * 9 + [True]

    async def test_inbox_is_per_consumer(self, db: Database) -> None:
        async with db.unit_of_work() as uow:
            assert await uow.claim_inbox("a", "m")
            assert await uow.claim_inbox("b", "m")
            assert not await uow.claim_inbox("a", "m")

    async def test_prune_inbox(self, db: Database, clock: VirtualClock) -> None:
        async with db.unit_of_work() as uow:
            await uow.claim_inbox("c", "old")
        await clock.advance(100)
        async with db.unit_of_work() as uow:
            await uow.claim_inbox("c", "new")
        assert await db.prune_inbox(clock.time() - 50) == 1
        async with db.unit_of_work() as uow:
            assert await uow.claim_inbox("c", "old")
            assert not await uow.claim_inbox("c", "new")

    # -- the outbox -----------------------------------------------------------------------

    async def test_outbox_order_is_commit_order(self, db: Database) -> None:
        async def one(i: int) -> None:
            async with db.unit_of_work() as uow:
                row = await uow.fetch_one("UPDATE counter SET n = n + 1 WHERE id = 1 RETURNING n")
                assert row is not None
                # Units of work interleave here; only commit order may decide outbox order.
                await asyncio.sleep(0)
                uow.add_outgoing(message_id=f"m{i}", topic="t", key="k", body=str(row[0]).encode())

        await asyncio.gather(*(one(i) for i in range(50)))
        records = await db.outbox_fetch(100)
        assert [int(r.body) for r in records] == list(range(1, 51))

    async def test_outbox_delete_removes_exactly_those(self, db: Database) -> None:
        async with db.unit_of_work() as uow:
            for i in range(5):
                uow.add_outgoing(message_id=f"m{i}", topic="t", key=None, body=b"x")
        records = await db.outbox_fetch(10)
        await db.outbox_delete([records[1].seq, records[3].seq])
        assert [r.message_id for r in await db.outbox_fetch(10)] == ["m0", "m2", "m4"]
        count, oldest, _ = await db.outbox_stats()
        assert count == 3
        assert oldest is not None

    async def test_scheduled_messages_wait_until_due(
        self, db: Database, clock: VirtualClock
    ) -> None:
        async with db.unit_of_work() as uow:
            uow.add_outgoing(
                message_id="later", topic="t", key=None, body=b"x", deliver_at=clock.time() + 60
            )
            uow.add_outgoing(message_id="now", topic="t", key=None, body=b"x")
        assert [r.message_id for r in await db.outbox_fetch(10)] == ["now"]
        assert await db.outbox_next_scheduled() == pytest.approx(clock.time() + 60)
        await clock.advance(61)
        assert [r.message_id for r in await db.outbox_fetch(10)] == ["later", "now"]

    async def test_wait_for_outbox_wakes_on_commit(self, db: Database) -> None:
        waiter = asyncio.get_running_loop().create_task(db.wait_for_outbox(30.0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        async with db.unit_of_work() as uow:
            uow.add_outgoing(message_id="m", topic="t", key=None, body=b"x")
        await asyncio.wait_for(waiter, 5.0)

    # -- batches --------------------------------------------------------------------------

    async def test_batch_commits_once_and_isolates_failures(self, db: Database) -> None:
        async with db.batch():
            for i in range(5):
                try:
                    async with db.unit_of_work() as uow:
                        await uow.execute("INSERT INTO items (id, name) VALUES (?, ?)", i, f"n{i}")
                        uow.add_outgoing(message_id=f"m{i}", topic="t", key=None, body=b"x")
                        if i == 2:
                            raise BoomError
                except BoomError:
                    pass
            assert await self.count(db, "SELECT count(*) FROM items") == 0, "visible before commit"
        assert await self.count(db, "SELECT count(*) FROM items") == 4
        assert [r.message_id for r in await db.outbox_fetch(10)] == ["m0", "m1", "m3", "m4"]

    async def test_a_large_failed_unit_in_a_batch_keeps_nothing(self, db: Database) -> None:
        """A unit of work that changed every page of a table, then failed, is undone in
        full, and the units before and after it in the same batch are kept. (Its undo
        information is well past SQLite's 64 KiB in-memory threshold for a savepoint.)"""
        async with db.unit_of_work() as uow:
            await uow.executemany(
                "INSERT INTO items (id, name) VALUES (?, ?)", [(i, "a" * 200) for i in range(3000)]
            )
        async with db.batch():
            async with db.unit_of_work() as uow:
                await uow.execute("UPDATE items SET name = ? WHERE id = 0", "first")
            try:
                async with db.unit_of_work() as uow:
                    await uow.execute("UPDATE items SET name = ?", "b" * 200)
                    raise BoomError
            except BoomError:
                pass
            async with db.unit_of_work() as uow:
                await uow.execute("UPDATE items SET name = ? WHERE id = 1", "last")
        untouched = await self.count(db, "SELECT count(*) FROM items WHERE name = ?", "a" * 200)
        assert untouched == 2998
        assert await self.count(db, "SELECT count(*) FROM items WHERE name = 'first'") == 1
        assert await self.count(db, "SELECT count(*) FROM items WHERE name = 'last'") == 1

    async def test_rows_inserted_at_commit_share_their_units_fate(self, db: Database) -> None:
        insert = "INSERT INTO items (id, name) VALUES (?, ?)"
        async with db.unit_of_work() as uow:
            await uow.insert_at_commit(insert, 1, "alone")
        async with db.batch():
            for i in (2, 3, 4):
                try:
                    async with db.unit_of_work() as uow:
                        await uow.execute(
                            "UPDATE counter SET n = n + 1 WHERE id = 1"
                        )  # an ordinary statement beside it
                        await uow.insert_at_commit(insert, i, f"batched {i}")
                        if i == 3:
                            raise BoomError
                except BoomError:
                    pass
        try:
            async with db.unit_of_work() as uow:
                await uow.insert_at_commit(insert, 5, "failed")
                raise BoomError
        except BoomError:
            pass
        async with db.read() as session:
            rows = await session.fetch_all("SELECT id, name FROM items ORDER BY id")
        assert [(r[0], r[1]) for r in rows] == [(1, "alone"), (2, "batched 2"), (4, "batched 4")]
        assert await self.count(db, "SELECT n FROM counter WHERE id = 1") == 2

    async def test_concurrent_units_of_work_all_commit(self, db: Database) -> None:
        async def one(i: int) -> None:
            async with db.unit_of_work() as uow:
                await uow.execute("INSERT INTO items (id, name) VALUES (?, ?)", i, "x")

        await asyncio.gather(*(one(i) for i in range(200)))
        assert await self.count(db, "SELECT count(*) FROM items") == 200

    # -- leases and migrations ------------------------------------------------------------

    async def test_leases_are_exclusive_until_they_expire(
        self, db: Database, clock: VirtualClock
    ) -> None:
        assert await db.try_lease("relay", "a", 10.0)
        assert not await db.try_lease("relay", "b", 10.0)
        assert await db.try_lease("relay", "a", 10.0), "the holder could not renew"
        await clock.advance(11)
        assert await db.try_lease("relay", "b", 10.0), "an expired lease was not taken over"
        assert not await db.try_lease("relay", "a", 10.0)
        await db.release_lease("relay", "b")
        assert await db.try_lease("relay", "a", 10.0)

    async def test_migrations_apply_once(self, db: Database) -> None:
        statements = ["INSERT INTO items (id, name) VALUES (100, 'seed')"]
        assert await db.migrate("seed", statements)
        assert not await db.migrate("seed", statements)
        assert await self.count(db, "SELECT count(*) FROM items WHERE id = 100") == 1

    async def test_a_failed_migration_is_not_recorded(self, db: Database) -> None:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any driver error will do
            await db.migrate("broken", ["INSERT INTO items (id, name) VALUES (1, 'a')", "NOT SQL"])
        assert await self.count(db, "SELECT count(*) FROM items") == 0
        assert await db.migrate("broken", ["INSERT INTO items (id, name) VALUES (1, 'a')"])

    async def test_reopening_keeps_committed_state(self, db: Database, tmp_path: Path) -> None:
        del tmp_path
        async with db.unit_of_work() as uow:
            await uow.execute("INSERT INTO items (id, name) VALUES (?, ?)", 1, "kept")
            uow.add_outgoing(message_id=_random.new_id(), topic="t", key=None, body=b"x")
        await db.close()
        await db.open()
        assert await self.count(db, "SELECT count(*) FROM items") == 1
        assert len(await db.outbox_fetch(10)) == 1
