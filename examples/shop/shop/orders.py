"""orders: the shop's public API. Places orders and records their outcome."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import httpx
from fastapi import Header, HTTPException, Response
from pydantic import BaseModel, Field

from atoll import Context, Service
from atoll.observability import annotate
from atoll.resilience import HTTP, Fallback, ResilienceError
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
service.migration(
    "prices",
    [
        "ALTER TABLE orders ADD COLUMN total_cents INTEGER",
        "ALTER TABLE orders ADD COLUMN priced_from_fallback INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE IF NOT EXISTS known_prices (
            sku TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            price_cents INTEGER NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ],
)

OrderStatus = Literal["PENDING", "CONFIRMED", "REJECTED"]


class OrderLine(BaseModel):
    """One line of an order."""

    sku: Annotated[str, Field(min_length=1, max_length=64)]
    qty: Annotated[int, Field(gt=0, le=10_000)]


PriceSource = Literal["catalog", "last-known", "unknown-sku"]


class PricedLine(OrderLine):
    """A line with the price it was ordered at and where that price came from."""

    unit_price_cents: int | None = None
    price_source: PriceSource = "catalog"


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
    items: list[PricedLine]
    status: OrderStatus
    reason: str | None
    total_cents: int | None = None
    #: True when catalog could not be reached and a line used the last known price.
    priced_from_fallback: bool = False


class PricesUnavailableError(Exception):
    """catalog is unreachable and no price was ever seen for a SKU."""


async def price_of(sku: str) -> PricedLine:
    """The price of ``sku`` from catalog, through the ``catalog`` policy (timeout, retry
    with a budget, breaker); when that fails, the last price this service saw."""

    async def from_catalog() -> PricedLine:
        response = await service.client.get("catalog", f"/products/{sku}")
        if response.status_code == 404:
            return PricedLine(sku=sku, qty=1, price_source="unknown-sku")
        response.raise_for_status()
        body = response.json()
        return PricedLine(sku=sku, qty=1, unit_price_cents=body["price_cents"])

    async def last_known(error: BaseException) -> PricedLine:
        async with service.read() as db:
            cents = await db.fetch_value("SELECT price_cents FROM known_prices WHERE sku = ?", sku)
        if cents is None:
            raise PricesUnavailableError(sku) from error
        return PricedLine(sku=sku, qty=1, unit_price_cents=cents, price_source="last-known")

    fallback = Fallback(last_known, classifier=HTTP)
    return await fallback.call(from_catalog)


@service.http.post("/orders", status_code=202, response_model=OrderAccepted)
async def place_order(
    order: PlaceOrder,
    response: Response,
    correlation_id: Annotated[str | None, Header(alias="X-Correlation-ID")] = None,
) -> OrderAccepted:
    """Price the order, then record it PENDING and ask inventory to reserve its stock,
    atomically. Prices come from catalog, or from the last known price (and the order
    says so) while catalog is failing."""
    try:
        prices = {sku: await price_of(sku) for sku in sorted({line.sku for line in order.items})}
    except (PricesUnavailableError, ResilienceError, httpx.HTTPError) as exc:
        raise HTTPException(
            503, f"prices are unavailable: {exc}", headers={"Retry-After": "5"}
        ) from exc
    lines = [
        PricedLine(
            sku=line.sku,
            qty=line.qty,
            unit_price_cents=prices[line.sku].unit_price_cents,
            price_source=prices[line.sku].price_source,
        )
        for line in order.items
    ]
    known = [line for line in lines if line.unit_price_cents is not None]
    total = sum(line.qty * (line.unit_price_cents or 0) for line in known)
    fallback = any(line.price_source == "last-known" for line in lines)
    async with service.unit_of_work(correlation_id=correlation_id) as ctx:
        order_id = ctx.random.new_id()
        annotate(**{"order.id": order_id})  # find the order's trace by its id
        now = ctx.clock.time()
        await ctx.execute(
            "INSERT INTO orders (order_id, customer_id, items, status, created_at, updated_at,"
            " total_cents, priced_from_fallback) VALUES (?, ?, ?, 'PENDING', ?, ?, ?, ?)",
            order_id,
            order.customer_id,
            json.dumps([line.model_dump() for line in lines]),
            now,
            now,
            total if len(known) == len(lines) else None,
            1 if fallback else 0,
        )
        for line in lines:
            if line.price_source == "catalog" and line.unit_price_cents is not None:
                await ctx.execute(
                    "INSERT INTO known_prices (sku, name, price_cents, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (sku) DO UPDATE SET"
                    " price_cents = excluded.price_cents, updated_at = excluded.updated_at",
                    line.sku,
                    line.sku,
                    line.unit_price_cents,
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
            "SELECT order_id, customer_id, items, status, reason, total_cents,"
            " priced_from_fallback FROM orders WHERE order_id = ?",
            order_id,
        )
    if row is None:
        raise HTTPException(404, f"no order {order_id!r}")
    return _view(row)


def _view(row: Any) -> OrderView:
    return OrderView(
        order_id=row[0],
        customer_id=row[1],
        items=[PricedLine(**line) for line in json.loads(row[2])],
        status=row[3],
        reason=row[4],
        total_cents=row[5],
        priced_from_fallback=bool(row[6]),
    )


async def _finish(ctx: Context, order_id: str, status: OrderStatus, reason: str | None) -> None:
    annotate(**{"order.id": order_id, "order.status": status})
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
