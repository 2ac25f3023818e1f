"""The two small runtime features the saga engine needs: rejecting a message outright,
and a stop hook for background work started by a start hook."""

import asyncio

from atoll import Command, Context, Service
from atoll.service import MessageRejected
from atoll.testing import wait_until
from support import FAST_RETRY, System


class Poke(Command):
    message_type = "hooks.Poke"
    n: int


async def test_a_rejected_message_is_dead_lettered_at_once_and_its_effects_rolled_back(tmp_path):
    system = System(tmp_path)
    svc = Service("rejecting", redelivery=FAST_RETRY, schema=["CREATE TABLE seen (n INTEGER)"])
    calls = []

    @svc.handles(Poke)
    async def on_poke(poke: Poke, ctx: Context) -> None:
        calls.append(poke.n)
        await ctx.execute("INSERT INTO seen (n) VALUES (?)", poke.n)
        if poke.n == 1:
            raise MessageRejected("poke 1 answers nothing we asked")

    try:
        (rt,) = await system.start(svc)
        async with svc.unit_of_work() as ctx:
            ctx.send(Poke(n=1), to="rejecting", key="k")
            ctx.send(Poke(n=2), to="rejecting", key="k")

        async def parked():
            return len(await system.transport.dead_letters.list()) == 1

        await wait_until(parked, what="a dead letter")
        await wait_until(lambda: 2 in calls, what="the next message of the key")
        [record] = await system.transport.dead_letters.list()
        assert record.reason == "poke 1 answers nothing we asked"
        assert record.attempts == 1, "a rejected message must not be retried"
        assert calls.count(1) == 1
        async with rt.database.read() as db:
            assert [r[0] for r in await db.fetch_all("SELECT n FROM seen")] == [2]
        assert rt.stats.dead_lettered == 1
    finally:
        await system.stop()


async def test_stop_hooks_run_when_the_service_stops_or_is_abandoned(tmp_path):
    system = System(tmp_path)
    svc = Service("hooked")
    events = []
    tasks = []

    @svc.on_start
    async def started(runtime) -> None:
        events.append("start")
        tasks.append(asyncio.get_running_loop().create_task(asyncio.Event().wait()))

    @svc.on_stop
    async def stopped(runtime) -> None:
        events.append(f"stop:{runtime.state}")
        tasks[-1].cancel()

    try:
        (rt,) = await system.start(svc)
        await rt.stop()
        assert events == ["start", "stop:stopping"]
        assert tasks[0].cancelled() or tasks[0].done()
        await rt.start()
        await rt.abandon()
        assert events[-1] == "stop:stopped"
    finally:
        await system.stop()
