"""Metrics the docs promise, with real values on a real service: ``atoll_redeliveries``
counts the deliveries after a first attempt, and the outbox gauges show what waits and
for how long while nothing publishes, then fall to zero once the relay catches up."""

from __future__ import annotations

import asyncio
import re

import httpx

from atoll import Command, Context, Service
from atoll.persistence import SQLiteDatabase
from atoll.testing import wait_until
from support import FAST_RETRY, System


class Job(Command):
    message_type = "claims.Job"
    n: int


async def scrape(service: Service) -> str:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.http), base_url="http://svc"
    ) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


def sample(text: str, metric: str, service: str) -> float:
    pattern = rf'^{metric}\{{service="{service}"\}} (\S+)$'
    [value] = re.findall(pattern, text, flags=re.MULTILINE)
    return float(value)


async def test_a_handler_that_fails_once_counts_one_redelivery(tmp_path):
    worker = Service("claims-worker", redelivery=FAST_RETRY)
    boss = Service("claims-boss")
    attempts: dict[int, int] = {}

    @worker.handles(Job)
    async def on_job(job: Job, ctx: Context) -> None:
        attempts[job.n] = attempts.get(job.n, 0) + 1
        if job.n == 1 and attempts[job.n] == 1:
            raise RuntimeError("the first attempt fails")

    system = System(tmp_path)
    try:
        (worker_rt, _) = await system.start(worker, boss)
        before = sample(await scrape(worker), "atoll_redeliveries_total", "claims-worker")
        async with boss.unit_of_work() as ctx:
            for n in range(3):
                ctx.send(Job(n=n), to="claims-worker", key=str(n))
        await wait_until(lambda: worker_rt.stats.handled == 3, what="three jobs handled")
        text = await scrape(worker)
    finally:
        await system.stop()
    assert attempts == {0: 1, 1: 2, 2: 1}
    assert before == 0.0
    assert sample(text, "atoll_redeliveries_total", "claims-worker") == 1.0
    assert sample(text, "atoll_dead_letters_total", "claims-worker") == 0.0


async def test_the_outbox_gauges_show_waiting_messages_and_their_growing_age(tmp_path):
    """Another instance holds the relay lease, so this one's relay publishes nothing."""
    sender = Service("claims-sender")
    database = SQLiteDatabase(tmp_path / "claims-sender.db")
    await database.open()
    lease, other = "relay:claims-sender", "another-instance"
    assert await database.try_lease(lease, other, 600.0)
    await database.close()
    system = System(tmp_path)
    try:
        (sender_rt,) = await system.start(sender, relay_poll_interval=0.05)
        empty = await scrape(sender)
        assert sample(empty, "atoll_outbox_pending_messages", "claims-sender") == 0.0
        assert sample(empty, "atoll_outbox_oldest_age_seconds", "claims-sender") == 0.0
        async with sender.unit_of_work() as ctx:
            for n in range(3):
                ctx.send(Job(n=n), to="nobody")
        await asyncio.sleep(0.2)
        first = await scrape(sender)
        await asyncio.sleep(0.3)
        second = await scrape(sender)
        assert sender_rt.relay.published == 0, "the relay published without the lease"
        # Readiness reports the same outbox.
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=sender.http), base_url="http://svc"
        ) as client:
            ready = (await client.get("/readyz")).json()
        assert ready["outbox"]["pending"] == 3
        await sender_rt.database.release_lease(lease, other)
        await wait_until(lambda: sender_rt.relay.published == 3, what="the relay to publish")
        drained = await scrape(sender)
    finally:
        await system.stop()
    assert sample(first, "atoll_outbox_pending_messages", "claims-sender") == 3.0
    age_first = sample(first, "atoll_outbox_oldest_age_seconds", "claims-sender")
    age_second = sample(second, "atoll_outbox_oldest_age_seconds", "claims-sender")
    assert age_first >= 0.2
    assert age_second >= age_first + 0.3
    assert sample(second, "atoll_outbox_pending_messages", "claims-sender") == 3.0
    assert sample(drained, "atoll_outbox_pending_messages", "claims-sender") == 0.0
    assert sample(drained, "atoll_outbox_oldest_age_seconds", "claims-sender") == 0.0
    assert sample(drained, "atoll_messages_out_total", "claims-sender") == 3.0
