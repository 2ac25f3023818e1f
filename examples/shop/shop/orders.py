"""orders: the shop's public API. Orders are event-sourced (the ``Order`` aggregate);
their history per customer is a projection; placing one runs the ``place-order`` saga:

reserve stock -> authorize payment -> schedule shipment -> capture payment and commit
stock (together) -> the order is CONFIRMED. A failure at any step compensates what was
done, in reverse order (cancel the shipment, void the payment, release the stock), and
the order ends REJECTED with the reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import httpx
import msgspec
import structlog
from fastapi import Header, HTTPException, Response
from pydantic import BaseModel, Field

from atoll import Service
from atoll.eventstore import Aggregate, EventRecord, Projection, Transaction, applies, on
from atoll.observability import annotate
from atoll.resilience import HTTP, Fallback, ResilienceError
from atoll.sagas import Parallel, Retry, Saga, SagaContext, SagaEngine, Send, Step
from shop.messages import (
    AuthorizePayment,
    CancelShipment,
    CapturePayment,
    CommitStock,
    LineItem,
    OrderConfirmed,
    OrderPlaced,
    OrderRejected,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    PricedItem,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ScheduleShipment,
    ShipmentCancelled,
    ShipmentFailed,
    ShipmentScheduled,
    StockCommitted,
    StockRejected,
    StockReleased,
    StockReserved,
    VoidPayment,
)

OrderStatus = Literal["NEW", "PENDING", "CONFIRMED", "REJECTED"]


class Order(Aggregate):
    """An order: placed, then confirmed or rejected. Stream ``order-<id>``."""

    category = "order"
    snapshot_every = 50

    customer_id: str = ""
    items: list[PricedItem] = []  # noqa: RUF012 - copied per aggregate by its state struct
    status: str = "NEW"
    reason: str | None = None
    total_cents: int | None = None
    priced_from_fallback: bool = False

    def place(self, customer_id: str, items: list[PricedItem]) -> None:
        """Record the order; the total is known only if every line has a price."""
        if self.status != "NEW":
            raise ValueError(f"order {self.id} was already placed")
        priced = [i for i in items if i.unit_price_cents is not None]
        self.record(
            OrderPlaced(
                order_id=self.id,
                customer_id=customer_id,
                items=items,
                total_cents=(
                    sum(i.qty * (i.unit_price_cents or 0) for i in priced)
                    if len(priced) == len(items)
                    else None
                ),
                priced_from_fallback=any(i.price_source == "last-known" for i in items),
            )
        )

    def confirm(self) -> None:
        """Confirm a pending order (a repeated or late outcome changes nothing)."""
        if self.status == "PENDING":
            self.record(OrderConfirmed(order_id=self.id))

    def reject(self, reason: str) -> None:
        """Reject a pending order with the reason (idempotent like :meth:`confirm`)."""
        if self.status == "PENDING":
            self.record(OrderRejected(order_id=self.id, reason=reason))

    @applies
    def _placed(self, event: OrderPlaced) -> None:
        self.customer_id = event.customer_id
        self.items = list(event.items)
        self.total_cents = event.total_cents
        self.priced_from_fallback = event.priced_from_fallback
        self.status = "PENDING"

    @applies
    def _confirmed(self, event: OrderConfirmed) -> None:
        del event
        self.status = "CONFIRMED"

    @applies
    def _rejected(self, event: OrderRejected) -> None:
        self.status = "REJECTED"
        self.reason = event.reason


class OrderHistory(Projection):
    """The ``order_history`` read model: a customer's orders, newest first."""

    name = "order-history"

    async def setup(self, tx: Transaction) -> None:
        await tx.execute(
            """CREATE TABLE IF NOT EXISTS order_history (
                order_id TEXT PRIMARY KEY,
                customer_id TEXT NOT NULL,
                status TEXT NOT NULL,
                reason TEXT,
                lines INTEGER NOT NULL,
                total_cents INTEGER,
                placed_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )"""
        )
        await tx.execute(
            "CREATE INDEX IF NOT EXISTS order_history_by_customer"
            " ON order_history (customer_id, placed_at)"
        )

    async def reset(self, tx: Transaction) -> None:
        await tx.execute("DELETE FROM order_history")

    @on
    async def placed(self, record: EventRecord[OrderPlaced], tx: Transaction) -> None:
        event = record.event
        await tx.execute(
            "INSERT INTO order_history (order_id, customer_id, status, lines, total_cents,"
            " placed_at, updated_at) VALUES (?, ?, 'PENDING', ?, ?, ?, ?)",
            event.order_id,
            event.customer_id,
            len(event.items),
            event.total_cents,
            record.recorded_at,
            record.recorded_at,
        )

    @on
    async def decided(
        self, record: EventRecord[OrderConfirmed | OrderRejected], tx: Transaction
    ) -> None:
        event = record.event
        status = "CONFIRMED" if isinstance(event, OrderConfirmed) else "REJECTED"
        reason = event.reason if isinstance(event, OrderRejected) else None
        await tx.execute(
            "UPDATE order_history SET status = ?, reason = ?, updated_at = ? WHERE order_id = ?",
            status,
            reason,
            record.recorded_at,
            event.order_id,
        )


log = structlog.get_logger(__name__)

service = Service(
    "orders",
    title="shop: orders",
    schema=[
        """CREATE TABLE IF NOT EXISTS known_prices (
            sku TEXT PRIMARY KEY,
            price_cents INTEGER NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
    ],
)
orders = service.repository(Order)
service.projection(OrderHistory())


# -- the place-order saga -----------------------------------------------------------------


class PlaceOrderData(msgspec.Struct):
    """What the saga carries from step to step."""

    order_id: str
    customer_id: str
    items: list[LineItem]
    amount_cents: int
    reason: str | None = None


def _note_reason(data: PlaceOrderData, reply: Any) -> None:
    """A participant's refusal becomes the order's reason for being rejected."""
    reason = getattr(reply, "reason", None)
    if reason:
        data.reason = reason


async def _confirmed(saga: SagaContext[PlaceOrderData]) -> None:
    order = await orders.load(saga.data.order_id, tx=saga.ctx)
    order.confirm()
    await orders.save(order, saga.ctx)


async def _rejected(saga: SagaContext[PlaceOrderData]) -> None:
    order = await orders.load(saga.data.order_id, tx=saga.ctx)
    order.reject(saga.data.reason or "the order could not be completed in time")
    await orders.save(order, saga.ctx)


#: Each participant gets three tries 30 s apart before a step counts as failed;
#: compensations keep trying longer, then wait for an operator (COMPENSATION_FAILED).
_TIMEOUT = 30.0
_TRIES = Retry(attempts=3, backoff=1.0)
_UNDO_TRIES = Retry(attempts=10, backoff=1.0, max_backoff=60.0)

place_order_saga: Saga[PlaceOrderData] = Saga(
    "place-order",
    PlaceOrderData,
    version=1,
    timeout=600.0,
    steps=[
        Step(
            "reserve-stock",
            Send(
                "inventory",
                lambda d: ReserveStock(order_id=d.order_id, items=d.items),
                success=StockReserved,
                failure=StockRejected,
                on_reply=_note_reason,
                timeout=_TIMEOUT,
                retry=_TRIES,
            ),
            compensation=Send(
                "inventory",
                lambda d: ReleaseStock(order_id=d.order_id),
                success=StockReleased,
                timeout=_TIMEOUT,
                retry=_UNDO_TRIES,
            ),
        ),
        Step(
            "authorize-payment",
            Send(
                "payments",
                lambda d: AuthorizePayment(
                    order_id=d.order_id, customer_id=d.customer_id, amount_cents=d.amount_cents
                ),
                success=PaymentAuthorized,
                failure=PaymentDeclined,
                on_reply=_note_reason,
                timeout=_TIMEOUT,
                retry=_TRIES,
            ),
            compensation=Send(
                "payments",
                lambda d: VoidPayment(order_id=d.order_id),
                success=PaymentVoided,
                timeout=_TIMEOUT,
                retry=_UNDO_TRIES,
            ),
        ),
        Step(
            "schedule-shipment",
            Send(
                "shipping",
                lambda d: ScheduleShipment(
                    order_id=d.order_id, customer_id=d.customer_id, items=d.items
                ),
                success=ShipmentScheduled,
                failure=ShipmentFailed,
                on_reply=_note_reason,
                timeout=_TIMEOUT,
                retry=_TRIES,
            ),
            compensation=Send(
                "shipping",
                lambda d: CancelShipment(order_id=d.order_id),
                success=ShipmentCancelled,
                timeout=_TIMEOUT,
                retry=_UNDO_TRIES,
            ),
        ),
        Parallel(
            "settle",
            [
                Step(
                    "capture-payment",
                    Send(
                        "payments",
                        lambda d: CapturePayment(order_id=d.order_id),
                        success=PaymentCaptured,
                        timeout=_TIMEOUT,
                        retry=_TRIES,
                    ),
                    compensation=Send(
                        "payments",
                        lambda d: RefundPayment(order_id=d.order_id),
                        success=PaymentRefunded,
                        timeout=_TIMEOUT,
                        retry=_UNDO_TRIES,
                    ),
                ),
                Step(
                    "commit-stock",
                    Send(
                        "inventory",
                        lambda d: CommitStock(order_id=d.order_id),
                        success=StockCommitted,
                        timeout=_TIMEOUT,
                        retry=_TRIES,
                    ),
                ),
            ],
        ),
    ],
    on_completed=_confirmed,
    on_compensated=_rejected,
)
sagas = SagaEngine(service, [place_order_saga])


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


class OrderSummary(BaseModel):
    """One order in a customer's history."""

    order_id: str
    status: OrderStatus
    reason: str | None
    lines: int
    total_cents: int | None
    placed_at: float


class PricesUnavailableError(Exception):
    """catalog is unreachable and no price was ever seen for a SKU."""


async def price_of(sku: str) -> PricedItem:
    """The price of ``sku`` from catalog, through the ``catalog`` policy (timeout, retry
    with a budget, breaker); when that fails, the last price this service saw."""

    async def from_catalog() -> PricedItem:
        response = await service.client.get("catalog", f"/products/{sku}")
        if response.status_code == 404:
            return PricedItem(sku=sku, qty=1, unit_price_cents=None, price_source="unknown-sku")
        response.raise_for_status()
        return PricedItem(
            sku=sku, qty=1, unit_price_cents=response.json()["price_cents"], price_source="catalog"
        )

    async def last_known(error: BaseException) -> PricedItem:
        async with service.read() as db:
            cents = await db.fetch_value("SELECT price_cents FROM known_prices WHERE sku = ?", sku)
        if cents is None:
            raise PricesUnavailableError(sku) from error
        return PricedItem(sku=sku, qty=1, unit_price_cents=cents, price_source="last-known")

    return await Fallback(last_known, classifier=HTTP).call(from_catalog)


@service.http.post("/orders", status_code=202, response_model=OrderAccepted)
async def place_order(
    body: PlaceOrder,
    response: Response,
    correlation_id: Annotated[str | None, Header(alias="X-Correlation-ID")] = None,
) -> OrderAccepted:
    """Price the order, then record it (``OrderPlaced``) and ask inventory to reserve its
    stock, atomically. Prices come from catalog, or from the last known price (and the
    order says so) while catalog is failing."""
    try:
        prices = {sku: await price_of(sku) for sku in sorted({line.sku for line in body.items})}
    except (PricesUnavailableError, ResilienceError, httpx.HTTPError) as exc:
        raise HTTPException(
            503, f"prices are unavailable: {exc}", headers={"Retry-After": "5"}
        ) from exc
    items = [
        PricedItem(
            sku=line.sku,
            qty=line.qty,
            unit_price_cents=prices[line.sku].unit_price_cents,
            price_source=prices[line.sku].price_source,
        )
        for line in body.items
    ]
    async with service.unit_of_work(correlation_id=correlation_id) as ctx:
        order = orders.create(ctx.random.new_id())
        annotate(**{"order.id": order.id})  # find the order's trace by its id
        order.place(body.customer_id, items)
        await orders.save(order, ctx)
        now = ctx.clock.time()
        for price in prices.values():
            if price.price_source == "catalog" and price.unit_price_cents is not None:
                await ctx.execute(
                    "INSERT INTO known_prices (sku, price_cents, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (sku) DO UPDATE SET price_cents = excluded.price_cents,"
                    " updated_at = excluded.updated_at",
                    price.sku,
                    price.unit_price_cents,
                    now,
                )
        await sagas.start(
            ctx,
            place_order_saga,
            PlaceOrderData(
                order_id=order.id,
                customer_id=body.customer_id,
                items=[LineItem(sku=line.sku, qty=line.qty) for line in body.items],
                amount_cents=order.total_cents or 0,
            ),
            saga_id=order.id,
        )
    log.info("order placed", order_id=order.id, cents=order.total_cents, lines=len(items))
    response.headers["Location"] = f"/orders/{order.id}"
    return OrderAccepted(order_id=order.id, status="PENDING")


@service.http.get("/orders/{order_id}", response_model=OrderView)
async def get_order(order_id: str) -> OrderView:
    """An order as its events say it is now."""
    order = await orders.get(order_id)
    if order is None:
        raise HTTPException(404, f"no order {order_id!r}")
    return OrderView(
        order_id=order.id,
        customer_id=order.customer_id,
        items=[
            PricedLine(
                sku=i.sku,
                qty=i.qty,
                unit_price_cents=i.unit_price_cents,
                price_source=i.price_source,
            )
            for i in order.items
        ],
        status=order.status,
        reason=order.reason,
        total_cents=order.total_cents,
        priced_from_fallback=order.priced_from_fallback,
    )


@service.http.get("/customers/{customer_id}/orders", response_model=list[OrderSummary])
async def customer_orders(customer_id: str, limit: int = 50) -> list[OrderSummary]:
    """A customer's orders, newest first, from the ``order-history`` projection."""
    async with service.read() as db:
        rows = await db.fetch_all(
            "SELECT order_id, status, reason, lines, total_cents, placed_at FROM order_history"
            " WHERE customer_id = ? ORDER BY placed_at DESC, order_id LIMIT ?",
            customer_id,
            min(max(limit, 1), 500),
        )
    return [_summary(row) for row in rows]


def _summary(row: Any) -> OrderSummary:
    return OrderSummary(
        order_id=row[0],
        status=row[1],
        reason=row[2],
        lines=row[3],
        total_cents=row[4],
        placed_at=row[5],
    )
