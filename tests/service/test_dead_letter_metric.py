"""atoll_dead_letters counts a message whose handler failed on its last attempt, which the
transport parks, once; a failure on an earlier attempt is not counted."""

from __future__ import annotations

import httpx

from atoll import Command, Context, Service
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.testing import wait_until
from atoll.transport import RedeliveryPolicy
from atoll.transport.sqlite import SQLiteTransport


class Job(Command):
    message_type = "dlq.Job"
    n: int


async def test_a_message_out_of_attempts_is_counted_once_as_a_dead_letter(tmp_path):
    worker = Service(
        "worker",
        redelivery=RedeliveryPolicy(max_attempts=2, backoff_base=0.01, backoff_cap=0.02),
    )
    attempts: dict[int, int] = {}

    @worker.handles(Job)
    async def on_job(job: Job, ctx: Context) -> None:
        attempts[job.n] = attempts.get(job.n, 0) + 1
        if job.n == 1 or attempts[job.n] == 1:  # job 1 always fails; job 2 once
            raise RuntimeError(f"job {job.n} failed")

    transport = SQLiteTransport(tmp_path / "bus.db", lease=1.0, poll_interval=0.05)
    runtime = ServiceRuntime(
        worker, database=SQLiteDatabase(tmp_path / "worker.db"), transport=transport
    )
    await runtime.start()
    try:
        async with worker.unit_of_work() as ctx:
            ctx.send(Job(n=1), to="worker", key="a")
            ctx.send(Job(n=2), to="worker", key="b")

        async def parked() -> bool:
            return len(await transport.dead_letters.list()) == 1 and attempts.get(2) == 2

        await wait_until(parked, what="job 1 parked and job 2 handled")
        [dead] = await transport.dead_letters.list()
        assert dead.attempts == 2
        assert "job 1 failed" in dead.reason
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=worker.http), base_url="http://worker"
        )
        async with client:
            metrics = (await client.get("/metrics")).text
            ready = (await client.get("/readyz")).json()
    finally:
        await runtime.stop()
    assert attempts == {1: 2, 2: 2}
    assert 'atoll_dead_letters_total{service="worker"} 1.0' in metrics
    assert ready["consumer"]["dead_lettered"] == 1
    assert ready["consumer"]["failed"] == 3
