"""shipping: books and cancels shipments. Durian cannot be shipped (the carrier refuses
it), which gives the demo a shipping failure and its compensation path; the admin
endpoint can make every booking fail."""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import HTTPException
from pydantic import BaseModel

from atoll import Context, Service
from atoll.observability import annotate
from shop.messages import (
    CancelShipment,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentFailed,
    ShipmentScheduled,
)

#: SKUs the carrier refuses.
UNSHIPPABLE = {"durian": "the carrier refuses to ship durian"}

log = structlog.get_logger(__name__)

service = Service(
    "shipping",
    title="shop: shipping",
    schema=[
        """CREATE TABLE IF NOT EXISTS shipments (
            order_id TEXT PRIMARY KEY,
            shipment_id TEXT,
            customer_id TEXT NOT NULL,
            items TEXT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
    ],
)


class Outage(BaseModel):
    """``fail_all``: every booking fails, to watch compensations happen."""

    fail_all: bool = False


outage = Outage()


@service.handles(ScheduleShipment)
async def schedule(command: ScheduleShipment, ctx: Context) -> None:
    """Book a shipment, or fail with the reason (nothing is booked then)."""
    annotate(**{"order.id": command.order_id})
    existing = await ctx.fetch_one(
        "SELECT shipment_id, status, reason FROM shipments WHERE order_id = ?", command.order_id
    )
    if existing is not None:  # a repeated command: answer as the first time
        if existing[1] == "SCHEDULED":
            ctx.reply(ShipmentScheduled(order_id=command.order_id, shipment_id=existing[0]))
        else:
            ctx.reply(ShipmentFailed(order_id=command.order_id, reason=existing[2] or existing[1]))
        return
    refused = [UNSHIPPABLE[i.sku] for i in command.items if i.sku in UNSHIPPABLE]
    if outage.fail_all:
        refused.append("shipping is down (injected outage)")
    shipment_id = None if refused else f"sh-{ctx.random.new_id()[:12]}"
    await ctx.execute(
        "INSERT INTO shipments (order_id, shipment_id, customer_id, items, status, reason,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        command.order_id,
        shipment_id,
        command.customer_id,
        json.dumps([[i.sku, i.qty] for i in command.items]),
        "FAILED" if refused else "SCHEDULED",
        "; ".join(refused) or None,
        ctx.clock.time(),
    )
    if refused:
        log.warning("shipment refused", order_id=command.order_id, reason="; ".join(refused))
        ctx.reply(ShipmentFailed(order_id=command.order_id, reason="; ".join(refused)))
    else:
        assert shipment_id is not None
        log.info("shipment scheduled", order_id=command.order_id, shipment_id=shipment_id)
        ctx.reply(ShipmentScheduled(order_id=command.order_id, shipment_id=shipment_id))


@service.handles(CancelShipment)
async def cancel(command: CancelShipment, ctx: Context) -> None:
    """Cancel a booked shipment (a no-op for one that failed or does not exist)."""
    annotate(**{"order.id": command.order_id})
    await ctx.execute(
        "UPDATE shipments SET status = 'CANCELLED', updated_at = ?"
        " WHERE order_id = ? AND status = 'SCHEDULED'",
        ctx.clock.time(),
        command.order_id,
    )
    ctx.reply(ShipmentCancelled(order_id=command.order_id))


@service.http.get("/shipments/{order_id}")
async def get_shipment(order_id: str) -> dict[str, Any]:
    """An order's shipment."""
    async with service.read() as db:
        row = await db.fetch_one(
            "SELECT shipment_id, status, reason, items FROM shipments WHERE order_id = ?",
            order_id,
        )
    if row is None:
        raise HTTPException(404, f"no shipment for order {order_id!r}")
    return {
        "order_id": order_id,
        "shipment_id": row[0],
        "status": row[1],
        "reason": row[2],
        "items": [{"sku": sku, "qty": qty} for sku, qty in json.loads(row[3])],
    }


@service.http.put("/admin/outage")
async def set_outage(new: Outage) -> Outage:
    """Make every booking fail (or not)."""
    outage.fail_all = new.fail_all
    return outage
