"""The messages the shop's services exchange."""

from __future__ import annotations

import msgspec

from atoll import Command, Event, Reply


class LineItem(msgspec.Struct, frozen=True):
    """One SKU and how many of it."""

    sku: str
    qty: int


class ReserveStock(Command):
    """orders -> inventory: hold stock for an order, all lines or none."""

    message_type = "inventory.ReserveStock"
    order_id: str
    items: list[LineItem]


class StockReserved(Reply):
    """inventory -> orders: every line is held."""

    message_type = "inventory.StockReserved"
    order_id: str


class StockRejected(Reply):
    """inventory -> orders: nothing was held, and why."""

    message_type = "inventory.StockRejected"
    order_id: str
    reason: str


class PricedItem(msgspec.Struct, frozen=True):
    """An ordered line with the price it was ordered at and where that price came from
    (``catalog``, ``last-known`` while catalog was failing, or ``unknown-sku``)."""

    sku: str
    qty: int
    unit_price_cents: int | None
    price_source: str


class OrderPlaced(Event):
    """orders: an order was placed and waits for its outcome."""

    message_type = "orders.OrderPlaced"
    order_id: str
    customer_id: str
    items: list[PricedItem]
    total_cents: int | None
    priced_from_fallback: bool


class OrderConfirmed(Event):
    """orders: the order goes ahead."""

    message_type = "orders.OrderConfirmed"
    order_id: str


class OrderRejected(Event):
    """orders: the order cannot go ahead, and why."""

    message_type = "orders.OrderRejected"
    order_id: str
    reason: str


# -- inventory: what follows a reservation ----------------------------------------------


class ReleaseStock(Command):
    """orders -> inventory: give a reservation's stock back (compensation)."""

    message_type = "inventory.ReleaseStock"
    order_id: str


class StockReleased(Reply):
    """inventory -> orders: the reservation's stock is available again (or there was none)."""

    message_type = "inventory.StockReleased"
    order_id: str


class CommitStock(Command):
    """orders -> inventory: the reserved stock is sold; the reservation becomes final."""

    message_type = "inventory.CommitStock"
    order_id: str


class StockCommitted(Reply):
    """inventory -> orders: the reservation is final."""

    message_type = "inventory.StockCommitted"
    order_id: str


# -- payments ---------------------------------------------------------------------------


class AuthorizePayment(Command):
    """orders -> payments: hold ``amount_cents`` of the customer's wallet for the order."""

    message_type = "payments.AuthorizePayment"
    order_id: str
    customer_id: str
    amount_cents: int


class PaymentAuthorized(Reply):
    """payments -> orders: the amount is held."""

    message_type = "payments.PaymentAuthorized"
    order_id: str


class PaymentDeclined(Reply):
    """payments -> orders: nothing is held, and why."""

    message_type = "payments.PaymentDeclined"
    order_id: str
    reason: str


class CapturePayment(Command):
    """orders -> payments: take the held amount."""

    message_type = "payments.CapturePayment"
    order_id: str


class PaymentCaptured(Reply):
    """payments -> orders: the held amount is taken."""

    message_type = "payments.PaymentCaptured"
    order_id: str


class VoidPayment(Command):
    """orders -> payments: release a held amount (compensation)."""

    message_type = "payments.VoidPayment"
    order_id: str


class PaymentVoided(Reply):
    """payments -> orders: the hold is released (or there was none)."""

    message_type = "payments.PaymentVoided"
    order_id: str


class RefundPayment(Command):
    """orders -> payments: give a captured amount back (compensation after capture)."""

    message_type = "payments.RefundPayment"
    order_id: str


class PaymentRefunded(Reply):
    """payments -> orders: the captured amount is back in the wallet."""

    message_type = "payments.PaymentRefunded"
    order_id: str


# -- shipping ---------------------------------------------------------------------------


class ScheduleShipment(Command):
    """orders -> shipping: book a shipment for the order's lines."""

    message_type = "shipping.ScheduleShipment"
    order_id: str
    customer_id: str
    items: list[LineItem]


class ShipmentScheduled(Reply):
    """shipping -> orders: the shipment is booked."""

    message_type = "shipping.ShipmentScheduled"
    order_id: str
    shipment_id: str


class ShipmentFailed(Reply):
    """shipping -> orders: no shipment could be booked, and why."""

    message_type = "shipping.ShipmentFailed"
    order_id: str
    reason: str


class CancelShipment(Command):
    """orders -> shipping: cancel a booked shipment (compensation)."""

    message_type = "shipping.CancelShipment"
    order_id: str


class ShipmentCancelled(Reply):
    """shipping -> orders: the shipment is cancelled (or there was none)."""

    message_type = "shipping.ShipmentCancelled"
    order_id: str
