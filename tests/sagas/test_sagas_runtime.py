"""The engine in real services on a transport: replies, the deadline poller, the router."""

import httpx
from order_saga import (
    CancelShipment,
    ChargePayment,
    Order,
    PaymentCharged,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    ShipmentCancelled,
    StockReleased,
    StockReserved,
    make_engine,
    order_saga,
)

from atoll import Context, Service
from atoll.sagas import Retry, to_mermaid
from atoll.testing import wait_until
from support import System


def participants(effects):
    inventory = Service("inventory")
    payments = Service("payments")
    shipping = Service("shipping")

    @inventory.handles(ReserveStock)
    async def on_reserve(cmd: ReserveStock, ctx: Context) -> None:
        effects.append(("reserve", cmd.order_id))
        ctx.reply(StockReserved(order_id=cmd.order_id))

    @inventory.handles(ReleaseStock)
    async def on_release(cmd: ReleaseStock, ctx: Context) -> None:
        effects.append(("release", cmd.order_id))
        ctx.reply(StockReleased(order_id=cmd.order_id))

    @payments.handles(ChargePayment)
    async def on_charge(cmd: ChargePayment, ctx: Context) -> None:
        effects.append(("charge", ctx.correlation_id))
        ctx.reply(PaymentCharged(order_id=cmd.order_id, payment_id="p"))

    @payments.handles(RefundPayment)
    async def on_refund(cmd: RefundPayment, ctx: Context) -> None:
        effects.append(("refund", cmd.order_id))
        ctx.reply(PaymentRefunded(order_id=cmd.order_id))

    @shipping.handles(ScheduleShipment)
    async def on_ship(cmd: ScheduleShipment, ctx: Context) -> None:
        effects.append(("ship", cmd.order_id))  # never replies: the saga times out

    @shipping.handles(CancelShipment)
    async def on_cancel(cmd: CancelShipment, ctx: Context) -> None:
        effects.append(("cancel", cmd.order_id))
        ctx.reply(ShipmentCancelled(order_id=cmd.order_id))

    return inventory, payments, shipping


async def test_sagas_run_across_services_and_the_poller_fires_real_deadlines(tmp_path):
    system = System(tmp_path)
    saga = order_saga(step_timeout=0.3, retry=Retry(attempts=2, backoff=0.1, jitter=False))
    engine = make_engine("rt-orders", saga, poll_interval=0.05)
    effects = []
    seen = []
    engine.add_listener(seen.append)
    try:
        (orchestrator, *_) = await system.start(engine.service, *participants(effects))
        async with engine.service.unit_of_work() as ctx:
            shipped = await engine.start(ctx, saga, Order(order_id="o1"), saga_id="s1")
            local = await engine.start(ctx, saga, Order(order_id="o2", ship=False), saga_id="s2")

        async def ended():
            return {s.saga_id: s.state for s in await engine.list()} == {
                "s1": "COMPENSATED",
                "s2": "COMPLETED",
            }

        await wait_until(ended, timeout=20, what="both sagas to end")
        assert sorted(e for e in effects if e[1] == "o1") == sorted(
            [
                ("reserve", "o1"),
                ("ship", "o1"),
                ("ship", "o1"),
                ("cancel", "o1"),
                ("refund", "o1"),
                ("release", "o1"),
            ]
        )
        assert ("charge", shipped) in effects, "participants see the saga id as correlation id"
        assert ("charge", local) in effects
        view = await engine.view(shipped)
        # timeout, retry due, timeout again
        assert [h.event for h in view.history].count("deadline") == 3
        assert {t.saga_id for t in seen} == {"s1", "s2"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=engine.service.http), base_url="http://t"
        ) as client:
            listed = (await client.get("/atoll/sagas")).json()
            assert {i["saga_id"] for i in listed} == {"s1", "s2"}
            diagram = await client.get("/atoll/sagas/definitions/place-order/diagram")
            assert diagram.text == to_mermaid(saga)
        assert orchestrator.stats.dead_lettered == 0
    finally:
        await system.stop()
    assert engine._poller is None, "the poller outlived its service"
