"""PostgreSQL under faults: crashes, several relays, and connections cut mid-stream."""

import asyncio
import hashlib
import os

import asyncpg
import pytest

from atoll.persistence import TransientDatabaseError
from atoll.persistence.postgres import PostgresDatabase
from atoll.service import ServiceRuntime
from atoll.testing import ExactlyOnceCrashConformance, TcpProxy, wait_until
from atoll.testing._crash_kit import check_exactly_once, effects_done
from atoll.testing._crash_system import CrashWork, consumer, produce, producer
from atoll.transport.memory import InMemoryTransport

pytestmark = pytest.mark.postgres
DSN = os.environ.get("ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def schema_for(tmp_path, role):
    token = hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]
    return f"atoll_t_{token}_{role}"


@pytest.fixture
async def cleanup_schemas(tmp_path):
    yield
    conn = await asyncpg.connect(DSN)
    try:
        for role in ("producer", "consumer"):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_for(tmp_path, role)}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.usefixtures("cleanup_schemas")
class TestPostgresCrashes(ExactlyOnceCrashConformance):
    """kill -9 at every step with both services' databases on PostgreSQL."""

    def transport_url(self, tmp_path):
        return f"sqlite:///{tmp_path}/bus.db"

    def database_url(self, tmp_path, role):
        return f"{DSN}?schema={schema_for(tmp_path, role)}"


def runtime(service, database, transport):
    return ServiceRuntime(
        service,
        database=database,
        transport=transport,
        owns_transport=False,
        max_batch=32,
        relay_batch=32,
        relay_poll_interval=0.2,
    )


async def produce_retrying(rt, count):
    """Produce like an HTTP client would: retry when the database is unavailable."""
    while True:
        try:
            await produce(rt, count)
        except TransientDatabaseError:
            await asyncio.sleep(0.05)
        else:
            return


@pytest.mark.usefixtures("cleanup_schemas")
async def test_two_relays_on_one_database_publish_each_message_once_in_order(tmp_path):
    transport = InMemoryTransport()
    await transport.connect()
    schema = schema_for(tmp_path, "producer")
    producers = [
        runtime(producer, PostgresDatabase(DSN, schema=schema), transport) for _ in range(2)
    ]
    cons = runtime(
        consumer, PostgresDatabase(DSN, schema=schema_for(tmp_path, "consumer")), transport
    )
    await cons.start()
    for rt in producers:
        await rt.start()
    try:
        count = 300

        async def produce_share(instance: int) -> None:
            # Each instance sends half of the work, its keys its own (so per-key order is
            # the order this instance committed them).
            for n in range(instance, count, 2):
                async with producers[instance].unit_of_work() as ctx:
                    await ctx.execute("INSERT INTO produced (n) VALUES (?)", n)
                    ctx.send(CrashWork(n=n), to=consumer.name, key=f"i{instance}-{n % 5}")

        # Both instances commit messages; only the lease holder's relay publishes.
        await asyncio.gather(produce_share(0), produce_share(1))
        await wait_until(lambda: effects_done(cons.database, count), timeout=60, what="all effects")
        await check_exactly_once(cons.database, count, transport)
        assert cons.stats.duplicates == 0, "a message was published twice in the normal path"
        assert sum(rt.relay.published for rt in producers) == count
    finally:
        for rt in [*producers, cons]:
            await rt.stop()
        await transport.close()


@pytest.mark.usefixtures("cleanup_schemas")
async def test_connections_cut_mid_stream_leave_no_half_written_effect(tmp_path):
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    via_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
    transport = InMemoryTransport()
    await transport.connect()
    prod = runtime(
        producer, PostgresDatabase(via_proxy, schema=schema_for(tmp_path, "producer")), transport
    )
    cons = runtime(
        consumer, PostgresDatabase(via_proxy, schema=schema_for(tmp_path, "consumer")), transport
    )
    await cons.start()
    await prod.start()
    try:
        count = 300
        producing = asyncio.get_running_loop().create_task(produce_retrying(prod, count))
        for _ in range(4):
            await asyncio.sleep(0.25)
            proxy.cut()  # what a PostgreSQL restart looks like to its clients
        await producing
        check_db = PostgresDatabase(DSN, schema=schema_for(tmp_path, "consumer"))
        await check_db.open()
        try:
            await wait_until(lambda: effects_done(check_db, count), timeout=60, what="all effects")
            await check_exactly_once(check_db, count, transport)
        finally:
            await check_db.close()
    finally:
        await prod.stop()
        await cons.stop()
        await transport.close()
        await proxy.close()
