"""The shop's saga participants on their own: payments keeps money, shipping and
inventory undo what they did."""

import asyncio
import sys

import httpx

from support import SHOP, System

sys.path.insert(0, str(SHOP))

from atoll import Context, Reply, Service
from atoll.testing import wait_until
from shop import inventory, payments, shipping
from shop.messages import (
    AuthorizePayment,
    CapturePayment,
    CommitStock,
    LineItem,
    PaymentAuthorized,
    PaymentDeclined,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    ShipmentFailed,
    ShipmentScheduled,
    VoidPayment,
)


def requester():
    """A service that sends commands and records the replies it gets."""
    replies: list[Reply] = []
    svc = Service("requester")
    for cls in (PaymentAuthorized, PaymentDeclined, ShipmentScheduled, ShipmentFailed):

        @svc.handles(cls)
        async def record(reply: Reply, ctx: Context) -> None:
            replies.append(reply)

    return svc, replies


async def invariants():
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=payments.service.http), base_url="http://p"
    )
    async with client:
        return (await client.get("/admin/invariants")).json()


async def test_money_is_conserved_and_never_negative_under_concurrent_orders(tmp_path):
    system = System(tmp_path)
    svc, replies = requester()
    try:
        await system.start(payments.service, svc)
        async with svc.unit_of_work() as ctx:
            # 'poor' has 100 cents: 40 concurrent holds of 30 can fit only 3 times.
            for n in range(40):
                ctx.send(
                    AuthorizePayment(order_id=f"o{n}", customer_id="poor", amount_cents=30),
                    to="payments",
                    key=f"o{n}",
                )
        await wait_until(lambda: len(replies) == 40, what="40 replies")
        authorized = [r.order_id for r in replies if isinstance(r, PaymentAuthorized)]
        assert len(authorized) == 3
        async with svc.unit_of_work() as ctx:
            ctx.send(CapturePayment(order_id=authorized[0]), to="payments")
            ctx.send(VoidPayment(order_id=authorized[1]), to="payments")
            ctx.send(CapturePayment(order_id=authorized[2]), to="payments")
        await asyncio.sleep(0.3)
        async with svc.unit_of_work() as ctx:
            ctx.send(RefundPayment(order_id=authorized[2]), to="payments")
            ctx.send(VoidPayment(order_id="never-held"), to="payments")
        await asyncio.sleep(0.3)
        checks = await invariants()
        assert checks["conserved"], checks
        assert checks["no_negative_balance"], checks
        assert checks["holds_match_payments"], checks
        async with payments.service.read() as db:
            row = await db.fetch_one(
                "SELECT available_cents, held_cents, captured_cents FROM wallets"
                " WHERE customer_id = 'poor'"
            )
        assert tuple(row) == (70, 0, 30)
    finally:
        await system.stop()


async def test_shipping_refuses_durian_and_inventory_gives_stock_back(tmp_path):
    system = System(tmp_path)
    svc, replies = requester()
    try:
        await system.start(shipping.service, inventory.service, svc)
        async with svc.unit_of_work() as ctx:
            ctx.send(
                ScheduleShipment(order_id="a", customer_id="c1", items=[LineItem("apple", 1)]),
                to="shipping",
            )
            ctx.send(
                ScheduleShipment(order_id="d", customer_id="c1", items=[LineItem("durian", 1)]),
                to="shipping",
            )
            ctx.send(ReserveStock(order_id="r", items=[LineItem("cherry", 5)]), to="inventory")
        await wait_until(lambda: len(replies) == 2, what="two shipping replies")
        by_order = {r.order_id: r for r in replies}
        assert isinstance(by_order["a"], ShipmentScheduled)
        assert isinstance(by_order["d"], ShipmentFailed)
        assert "durian" in by_order["d"].reason

        async def cherries():
            async with inventory.service.read() as db:
                return await db.fetch_value("SELECT available FROM stock WHERE sku = 'cherry'")

        await wait_until(lambda: _equals(cherries(), 15), what="the reservation")
        async with svc.unit_of_work() as ctx:
            ctx.send(ReleaseStock(order_id="r"), to="inventory")
            ctx.send(ReleaseStock(order_id="r"), to="inventory")  # twice: released once
            ctx.send(CommitStock(order_id="r"), to="inventory")  # too late: stays released
        await wait_until(lambda: _equals(cherries(), 20), what="the stock back")
        await asyncio.sleep(0.2)
        assert await cherries() == 20
    finally:
        await system.stop()


async def _equals(value, expected):
    return await value == expected
