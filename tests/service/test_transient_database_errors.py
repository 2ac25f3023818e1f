import sqlite3

from atoll import Command, Context, Service
from atoll.testing import wait_until


class Note(Command):
    message_type = "test.Note"
    n: int


async def test_a_locked_database_delays_handling_without_a_half_written_effect(system, tmp_path):
    svc = Service("locked", schema=["CREATE TABLE notes (n INTEGER PRIMARY KEY)"])

    @svc.handles(Note)
    async def on_note(note: Note, ctx: Context) -> None:
        await ctx.execute("INSERT INTO notes (n) VALUES (?)", note.n)
        ctx.publish_count = 1  # type: ignore[attr-defined]

    sender = Service("sender-locked")
    (rt, _) = await system.start(svc, sender)
    other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        async with sender.unit_of_work() as ctx:
            for n in range(5):
                ctx.send(Note(n=n), to="locked")
        await wait_until(lambda: rt.stats.batches >= 2, what="a retried batch")
        async with rt.database.read() as db:
            assert await db.fetch_value("SELECT count(*) FROM notes") == 0
    finally:
        other.execute("ROLLBACK")
        other.close()

    async def all_noted():
        async with rt.database.read() as db:
            return await db.fetch_value("SELECT count(*) FROM notes") == 5

    await wait_until(all_noted, what="the notes after the lock is released")
    assert await system.transport.dead_letters.list() == [], "a lock wait used up attempts"
