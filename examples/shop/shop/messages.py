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
