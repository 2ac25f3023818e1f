"""orders: the shop's public API. Places orders and records their outcome."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Header, HTTPException, Response
from pydantic import BaseModel, Field

from atoll import Context, Service
from shop.messages import LineItem, ReserveStock, StockRejected, StockReserved

service = Service(
    "orders",
    title="shop: orders",
    schema=[
        """CREATE TABLE IF NOT EXISTS orders (
            order_id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            items TEXT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, created_at)",
    ],
)

OrderStatus = Literal["PENDING", "CONFIRMED", "REJECTED"]


class OrderLine(BaseModel):
    """One line of an order."""

    sku: Annotated[str, Field(min_length=1, max_length=64)]
    qty: Annotated[int, Field(gt=0, le=10_000)]


class PlaceOrder(BaseModel):
    """The body of ``POST /orders``."""

    customer_id: Annotated[str, Field(min_length=1, max_length=64)]
    items: Annotated[list[OrderLine], Field(min_length=1, max_length=100)]


class OrderAccepted(BaseModel):
    """The answer to ``POST /orders``: the order exists; its outcome comes later."""

    order_id: str
    status: OrderStatus


class OrderView(BaseModel):
    """An order as ``GET /orders/{order_id}`` shows it."""

    order_id: str
    customer_id: str
    items: list[OrderLine]
    status: OrderStatus
    reason: str | None


@service.http.post("/orders", status_code=202, response_model=OrderAccepted)
async def place_order(
    order: PlaceOrder,
    response: Response,
    correlation_id: Annotated[str | None, Header(alias="X-Correlation-ID")] = None,
) -> OrderAccepted:
    """Record a PENDING order and ask inventory to reserve its stock, atomically."""
    async with service.unit_of_work(correlation_id=correlation_id) as ctx:
        order_id = ctx.random.new_id()
        now = ctx.clock.time()
        await ctx.execute(
            "INSERT INTO orders (order_id, customer_id, items, status, created_at, updated_at)"
            " VALUES (?, ?, ?, 'PENDING', ?, ?)",
            order_id,
            order.customer_id,
            json.dumps([line.model_dump() for line in order.items]),
            now,
            now,
        )
        ctx.send(
            ReserveStock(
                order_id=order_id,
                items=[LineItem(sku=line.sku, qty=line.qty) for line in order.items],
            ),
            to="inventory",
            key=order_id,
        )
    response.headers["Location"] = f"/orders/{order_id}"
    return OrderAccepted(order_id=order_id, status="PENDING")


@service.http.get("/orders/{order_id}", response_model=OrderView)
async def get_order(order_id: str) -> OrderView:
    """An order and its status."""
    async with service.read() as db:
        row = await db.fetch_one(
            "SELECT order_id, customer_id, items, status, reason FROM orders WHERE order_id = ?",
            order_id,
        )
    if row is None:
        raise HTTPException(404, f"no order {order_id!r}")
    return _view(row)


def _view(row: Any) -> OrderView:
    return OrderView(
        order_id=row[0],
        customer_id=row[1],
        items=[OrderLine(**line) for line in json.loads(row[2])],
        status=row[3],
        reason=row[4],
    )


async def _finish(ctx: Context, order_id: str, status: OrderStatus, reason: str | None) -> None:
    # Only a PENDING order changes: a late or repeated reply leaves the outcome alone.
    await ctx.execute(
        "UPDATE orders SET status = ?, reason = ?, updated_at = ?"
        " WHERE order_id = ? AND status = 'PENDING'",
        status,
        reason,
        ctx.clock.time(),
        order_id,
    )


@service.handles(StockReserved)
async def on_stock_reserved(reply: StockReserved, ctx: Context) -> None:
    """inventory held the stock: the order is confirmed."""
    await _finish(ctx, reply.order_id, "CONFIRMED", None)


@service.handles(StockRejected)
async def on_stock_rejected(reply: StockRejected, ctx: Context) -> None:
    """inventory could not hold the stock: the order is rejected with the reason."""
    await _finish(ctx, reply.order_id, "REJECTED", reply.reason)
