"""A two-service system for the exactly-once crash tests.

``crash-producer`` writes a row and sends ``CrashWork(n)`` in one unit of work, for n in
``0..count-1``. ``crash-consumer`` counts the effect of each ``n`` and checks per-key
order. After any crash and restart, every ``n`` must have had exactly one effect.
"""

from __future__ import annotations

from atoll.messages import Command
from atoll.service import Context, Service, ServiceRuntime

KEYS = 5


class CrashWork(Command):
    """Do the work numbered ``n``."""

    message_type = "atoll.testing.CrashWork"
    n: int


producer = Service(
    "crash-producer",
    schema=["CREATE TABLE IF NOT EXISTS produced (n INTEGER PRIMARY KEY)"],
)
consumer = Service(
    "crash-consumer",
    schema=[
        "CREATE TABLE IF NOT EXISTS effects (n INTEGER PRIMARY KEY, times INTEGER NOT NULL)",
        """CREATE TABLE IF NOT EXISTS key_progress (
            key TEXT PRIMARY KEY, last_n INTEGER NOT NULL, violations INTEGER NOT NULL
        )""",
    ],
)


@consumer.handles(CrashWork)
async def do_work(work: CrashWork, ctx: Context) -> None:
    """The effect: count it, and note whether it arrived out of its key's order."""
    await ctx.execute(
        "INSERT INTO effects (n, times) VALUES (?, 1)"
        " ON CONFLICT (n) DO UPDATE SET times = effects.times + 1",
        work.n,
    )
    key = ctx.envelope.key if ctx.envelope is not None else None
    last = await ctx.fetch_value("SELECT last_n FROM key_progress WHERE key = ?", key)
    violation = 1 if last is not None and work.n < last else 0
    await ctx.execute(
        "INSERT INTO key_progress (key, last_n, violations) VALUES (?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET last_n = excluded.last_n,"
        " violations = key_progress.violations + excluded.violations",
        key,
        work.n,
        violation,
    )


async def produce(runtime: ServiceRuntime, count: int) -> None:
    """Send the work not yet produced, one unit of work per message."""
    from atoll._crash import crashpoint  # noqa: PLC0415 - test machinery

    async with runtime.database.read() as session:
        done = await session.fetch_value("SELECT max(n) FROM produced")
    start = 0 if done is None else int(done) + 1
    for n in range(start, count):
        async with runtime.unit_of_work() as ctx:
            await ctx.execute("INSERT INTO produced (n) VALUES (?)", n)
            ctx.send(CrashWork(n=n), to=consumer.name, key=f"k{n % KEYS}")
        crashpoint("producer.after_commit")
