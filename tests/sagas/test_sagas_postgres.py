"""The engine's SQL on PostgreSQL: row locks, savepoints around local steps, operators."""

import os

import asyncpg
import pytest
from order_saga import (
    ChargePayment,
    Order,
    PaymentCharged,
    PaymentDeclined,
    RefundFailed,
    RefundPayment,
    happy,
    make_engine,
)

from atoll.determinism import RandomSource
from atoll.persistence.postgres import PostgresDatabase
from atoll.sagas import Call, Retry, Saga, SagaExistsError, Step
from atoll.testing import SagaTestKit

pytestmark = pytest.mark.postgres
DSN = os.environ.get("ATOLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def kit(tmp_path):
    schema = f"atoll_sagas_{RandomSource().new_id()[-12:]}"
    kit = SagaTestKit(
        make_engine("pg-orders"),
        tmp_path,
        database=lambda clock: PostgresDatabase(DSN, schema=schema, clock=clock),
    )
    happy(kit)
    try:
        async with kit:
            yield kit
    finally:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def test_sagas_complete_compensate_and_are_repaired_on_postgres(kit):
    done = await kit.start("place-order", Order(order_id="o1"))
    view = await kit.instance(done)
    assert view.state == "COMPLETED"
    assert view.data["notes"] == ["confirmed"]
    kit.participant("payments").on(
        ChargePayment, lambda c: PaymentDeclined(order_id=c.order_id, reason="no")
    )
    declined = await kit.start("place-order", Order(order_id="o2"))
    assert (await kit.instance(declined)).state == "COMPENSATED"
    kit.participant("payments").on(
        ChargePayment, lambda c: PaymentCharged(order_id=c.order_id, payment_id="p")
    ).on(RefundPayment, lambda c: RefundFailed(order_id=c.order_id, reason="down"))
    stuck = await kit.start("place-order", Order(order_id="o3", ship=False))
    await kit.engine.operate(stuck, "compensate", reason="test", operator="ann")
    await kit.run()
    await kit.advance(60)
    assert (await kit.instance(stuck)).state == "COMPENSATION_FAILED"
    await kit.restart()
    await kit.engine.operate(stuck, "skip", step="charge-payment", operator="ann")
    await kit.run()
    view = await kit.instance(stuck)
    assert view.state == "COMPENSATED"
    assert view.history[-1].state == "COMPENSATED"
    assert await kit.engine.counts() == {
        ("place-order", "COMPLETED"): 1,
        ("place-order", "COMPENSATED"): 2,
    }
    async with kit.runtime.database.read() as db:
        rows = await db.fetch_all("SELECT order_id FROM confirmed ORDER BY order_id")
    # o3 completed its last group (the local step has no compensation) before the operator
    # forced compensation; o2 never got that far.
    assert [r[0] for r in rows] == ["o1", "o3"]


async def test_a_failing_local_step_is_rolled_back_to_its_savepoint_on_postgres(tmp_path):
    attempts = []

    async def flaky(saga) -> None:
        attempts.append(saga.attempt)
        await saga.ctx.execute(
            "INSERT INTO confirmed (order_id, saga_id) VALUES (?, ?)", f"try-{saga.attempt}", "s"
        )
        if saga.attempt == 1:
            await saga.ctx.execute("SELECT no_such_column FROM confirmed")

    saga = Saga("local", Order, steps=[Step("flaky", Call(flaky, retry=Retry(3, backoff=0)))])
    schema = f"atoll_sagas_{RandomSource().new_id()[-12:]}"
    kit = SagaTestKit(
        make_engine("pg-local", saga),
        tmp_path,
        database=lambda clock: PostgresDatabase(DSN, schema=schema, clock=clock),
    )
    try:
        async with kit:
            saga_id = await kit.start(saga, Order(order_id="o"))
            assert (await kit.instance(saga_id)).state == "COMPLETED"
            async with kit.runtime.database.read() as db:
                rows = await db.fetch_all("SELECT order_id FROM confirmed")
            assert [r[0] for r in rows] == ["try-2"], "the failed attempt's insert was kept"
            assert attempts == [1, 2]
    finally:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def test_a_taken_id_writes_and_sends_nothing_on_postgres(kit):
    async with kit.runtime.unit_of_work() as ctx:
        await kit.engine.start(ctx, "place-order", Order(order_id="o9"), saga_id="order-9")
    async with kit.runtime.unit_of_work() as ctx:
        with pytest.raises(SagaExistsError, match="'order-9' exists already"):
            await kit.engine.start(ctx, "place-order", Order(order_id="x"), saga_id="order-9")
    await kit.run()
    view = await kit.instance("order-9")
    assert view.state == "COMPLETED"
    assert view.data["order_id"] == "o9"
    assert [h.seq for h in view.history] == [1, 2, 3, 4]
    assert len(kit.commands()) == 3
