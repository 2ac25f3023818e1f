import asyncio
import sqlite3

import pytest

from atoll.persistence import (
    DatabaseFullError,
    DatabaseLockedError,
    SQLiteDatabase,
    TransientDatabaseError,
)


@pytest.fixture
async def db(tmp_path):
    database = SQLiteDatabase(tmp_path / "s.db", lock_timeout=0.2)
    await database.open()
    await database.migrate("t", ["CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB)"])
    yield database
    await database.close()


async def test_a_database_locked_by_another_writer_is_a_clear_transient_error(db, tmp_path):
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseLockedError, match="locked by another writer"):
            async with db.unit_of_work() as uow:
                await uow.execute("INSERT INTO t (n) VALUES (1)")
    finally:
        other.execute("ROLLBACK")
        other.close()
    async with db.unit_of_work() as uow:  # works again once the lock is gone
        await uow.execute("INSERT INTO t (n) VALUES (1)")
    async with db.read() as session:
        assert await session.fetch_value("SELECT count(*) FROM t") == 1


async def test_a_full_database_is_a_clear_transient_error_and_keeps_nothing(db):
    db._conn.execute("PRAGMA max_page_count = 20")
    with pytest.raises(DatabaseFullError, match="full") as caught:
        async with db.unit_of_work() as uow:
            uow.add_outgoing(message_id="m", topic="t", key=None, body=b"x")
            for n in range(200):
                await uow.execute("INSERT INTO t (n, pad) VALUES (?, ?)", n, b"x" * 1000)
    assert isinstance(caught.value, TransientDatabaseError)
    db._conn.execute("PRAGMA max_page_count = 1000000")
    async with db.read() as session:
        assert await session.fetch_value("SELECT count(*) FROM t") == 0
    assert await db.outbox_fetch(10) == []


async def test_a_unit_of_work_waits_for_another_writers_lock_off_the_event_loop(tmp_path):
    # BEGIN IMMEDIATE runs inline when the lock is free; when another process holds it,
    # the wait must happen on the writer thread: the event loop keeps running meanwhile,
    # and the unit of work goes through once the lock is released.
    database = SQLiteDatabase(tmp_path / "w.db", lock_timeout=10.0)
    await database.open()
    await database.migrate("t", ["CREATE TABLE t (n INTEGER PRIMARY KEY)"])
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, other.execute, "ROLLBACK")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.ensure_future(ticker())
    try:
        async with database.unit_of_work() as uow:
            await uow.execute("INSERT INTO t (n) VALUES (1)")
    finally:
        ticking.cancel()
        other.close()
    assert ticks >= 10  # the loop ran while the unit of work waited for the lock
    async with database.read() as session:
        assert await session.fetch_value("SELECT count(*) FROM t") == 1
    # The inline attempt switched SQLite's busy handler off; it must be back on.
    assert database._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    async with database.unit_of_work() as uow:  # and the fast path works again
        await uow.execute("INSERT INTO t (n) VALUES (2)")
    assert database._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    await database.close()
