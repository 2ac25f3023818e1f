"""A three-step order saga and its messages, shared by the saga tests."""

from __future__ import annotations

import msgspec

from atoll import Command, Reply, Service
from atoll.sagas import Call, Parallel, Retry, Saga, SagaContext, SagaEngine, Send, Step


class ReserveStock(Command):
    message_type = "t.ReserveStock"
    order_id: str
    qty: int


class StockReserved(Reply):
    message_type = "t.StockReserved"
    order_id: str


class StockRejected(Reply):
    message_type = "t.StockRejected"
    order_id: str
    reason: str


class ReleaseStock(Command):
    message_type = "t.ReleaseStock"
    order_id: str


class StockReleased(Reply):
    message_type = "t.StockReleased"
    order_id: str


class ChargePayment(Command):
    message_type = "t.ChargePayment"
    order_id: str
    amount: int


class PaymentCharged(Reply):
    message_type = "t.PaymentCharged"
    order_id: str
    payment_id: str


class PaymentDeclined(Reply):
    message_type = "t.PaymentDeclined"
    order_id: str
    reason: str


class PaymentBusy(Reply):
    message_type = "t.PaymentBusy"
    order_id: str


class RefundPayment(Command):
    message_type = "t.RefundPayment"
    order_id: str
    payment_id: str


class PaymentRefunded(Reply):
    message_type = "t.PaymentRefunded"
    order_id: str


class RefundFailed(Reply):
    message_type = "t.RefundFailed"
    order_id: str
    reason: str


class ScheduleShipment(Command):
    message_type = "t.ScheduleShipment"
    order_id: str


class ShipmentScheduled(Reply):
    message_type = "t.ShipmentScheduled"
    order_id: str


class CancelShipment(Command):
    message_type = "t.CancelShipment"
    order_id: str


class ShipmentCancelled(Reply):
    message_type = "t.ShipmentCancelled"
    order_id: str


class Order(msgspec.Struct):
    order_id: str
    qty: int = 1
    amount: int = 10
    ship: bool = True
    payment_id: str | None = None
    notes: list[str] = msgspec.field(default_factory=list)


def reserve(order: Order) -> ReserveStock:
    return ReserveStock(order_id=order.order_id, qty=order.qty)


def release(order: Order) -> ReleaseStock:
    return ReleaseStock(order_id=order.order_id)


def charge(order: Order) -> ChargePayment:
    return ChargePayment(order_id=order.order_id, amount=order.amount)


def refund(order: Order) -> RefundPayment:
    return RefundPayment(order_id=order.order_id, payment_id=order.payment_id or "")


def remember_payment(order: Order, reply: PaymentCharged | PaymentDeclined | PaymentBusy) -> None:
    if isinstance(reply, PaymentCharged):
        order.payment_id = reply.payment_id


def ship(order: Order) -> ScheduleShipment:
    return ScheduleShipment(order_id=order.order_id)


def cancel_shipment(order: Order) -> CancelShipment:
    return CancelShipment(order_id=order.order_id)


def needs_shipping(order: Order) -> bool:
    return order.ship


async def confirm(saga: SagaContext[Order]) -> None:
    await saga.ctx.execute(
        "INSERT INTO confirmed (order_id, saga_id) VALUES (?, ?)", saga.data.order_id, saga.saga_id
    )
    saga.data.notes.append("confirmed")


def order_saga(
    *,
    version: int = 1,
    timeout: float | None = 600.0,
    step_timeout: float | None = 30.0,
    retry: Retry | None = None,
    compensation_retry: Retry | None = None,
) -> Saga[Order]:
    retry = retry or Retry(attempts=2, backoff=5.0, jitter=False)
    compensation_retry = compensation_retry or Retry(attempts=3, backoff=5.0, jitter=False)
    return Saga(
        "place-order",
        Order,
        version=version,
        timeout=timeout,
        steps=[
            Step(
                "reserve-stock",
                Send(
                    "inventory",
                    reserve,
                    success=StockReserved,
                    failure=StockRejected,
                    timeout=step_timeout,
                    retry=retry,
                ),
                compensation=Send(
                    "inventory",
                    release,
                    success=StockReleased,
                    timeout=step_timeout,
                    retry=compensation_retry,
                ),
            ),
            Step(
                "charge-payment",
                Send(
                    "payments",
                    charge,
                    success=PaymentCharged,
                    failure=PaymentDeclined,
                    retry_on=PaymentBusy,
                    on_reply=remember_payment,
                    timeout=step_timeout,
                    retry=retry,
                ),
                compensation=Send(
                    "payments",
                    refund,
                    success=PaymentRefunded,
                    failure=RefundFailed,
                    timeout=step_timeout,
                    retry=compensation_retry,
                ),
            ),
            Parallel(
                "fulfil",
                [
                    Step(
                        "ship",
                        Send(
                            "shipping",
                            ship,
                            success=ShipmentScheduled,
                            timeout=step_timeout,
                            retry=retry,
                        ),
                        compensation=Send(
                            "shipping",
                            cancel_shipment,
                            success=ShipmentCancelled,
                            timeout=step_timeout,
                            retry=compensation_retry,
                        ),
                        when=needs_shipping,
                    ),
                    Step("confirm", Call(confirm)),
                ],
            ),
        ],
    )


def make_engine(name: str = "orders", *sagas: Saga[Order], **kwargs: object) -> SagaEngine:
    service = Service(
        name,
        schema=["CREATE TABLE IF NOT EXISTS confirmed (order_id TEXT PRIMARY KEY, saga_id TEXT)"],
    )
    return SagaEngine(service, list(sagas) or [order_saga()], **kwargs)  # type: ignore[arg-type]


def happy(kit) -> None:
    kit.participant("inventory").on(ReserveStock, lambda c: StockReserved(order_id=c.order_id)).on(
        ReleaseStock, lambda c: StockReleased(order_id=c.order_id)
    )
    kit.participant("payments").on(
        ChargePayment, lambda c: PaymentCharged(order_id=c.order_id, payment_id="pay-" + c.order_id)
    ).on(RefundPayment, lambda c: PaymentRefunded(order_id=c.order_id))
    kit.participant("shipping").on(
        ScheduleShipment, lambda c: ShipmentScheduled(order_id=c.order_id)
    ).on(CancelShipment, lambda c: ShipmentCancelled(order_id=c.order_id))
