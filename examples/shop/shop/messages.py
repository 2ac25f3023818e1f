"""The messages the shop's services exchange."""

from __future__ import annotations

import msgspec

from atoll import Command, Reply


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
