import httpx

from atoll import Command, Context, Service
from atoll.testing import wait_until
from atoll.transport import OutgoingMessage
from support import System


class Job(Command):
    message_type = "metrics.Job"
    n: int


async def test_metrics_show_handling_latency_counts_outbox_and_dead_letters(tmp_path):
    worker = Service("worker")
    boss = Service("boss")

    @worker.handles(Job)
    async def on_job(job: Job, ctx: Context) -> None:
        return

    system = System(tmp_path)
    try:
        (worker_rt, boss_rt) = await system.start(worker, boss)
        async with boss.unit_of_work() as ctx:
            for n in range(5):
                ctx.send(Job(n=n), to="worker")
        await system.transport.publish([OutgoingMessage("service.worker", "junk", None, b"junk")])
        await wait_until(
            lambda: worker_rt.stats.handled == 5 and worker_rt.stats.dead_lettered == 1,
            what="five jobs and one dead letter",
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=worker.http), base_url="http://w"
        )
        async with client:
            response = await client.get("/metrics")
        text = response.text
        assert response.status_code == 200
        handled = 'message_type="metrics.Job",outcome="handled",service="worker"'
        assert f"atoll_messages_in_total{{{handled}}} 5.0" in text
        assert (
            'atoll_handler_duration_seconds_count{message_type="metrics.Job",service="worker"} 5.0'
            in text
        )
        assert 'atoll_dead_letters_total{service="worker"} 1.0' in text
        assert 'atoll_outbox_pending_messages{service="worker"} 0.0' in text
        assert 'atoll_ready{service="worker"} 1.0' in text
        boss_metrics = (await boss_rt.metrics.render()).decode()
        assert 'atoll_messages_out_total{service="boss"} 5.0' in boss_metrics
    finally:
        await system.stop()
