"""inventory: stock levels and reservations. Stock never goes negative."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import structlog
from fastapi import HTTPException

from atoll import Context, Service
from atoll.observability import annotate
from shop.messages import (
    CommitStock,
    ReleaseStock,
    ReserveStock,
    StockCommitted,
    StockRejected,
    StockReleased,
    StockReserved,
)

#: Loaded once, on the first start of a fresh database.
SEED_STOCK: dict[str, tuple[str, int]] = {
    "apple": ("Apple", 100),
    "banana": ("Banana", 50),
    "cherry": ("Cherry (box)", 20),
    "durian": ("Durian", 2),
    "elderberry": ("Elderberry jam", 0),
}

log = structlog.get_logger(__name__)

service = Service(
    "inventory",
    schema=[
        """CREATE TABLE IF NOT EXISTS stock (
            sku TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            available INTEGER NOT NULL CHECK (available >= 0)
        )""",
        """CREATE TABLE IF NOT EXISTS reservations (
            order_id TEXT PRIMARY KEY,
            items TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ],
)
service.migration(
    "reservation-status",
    # HELD until the order is paid (COMMITTED) or compensated (RELEASED).
    ["ALTER TABLE reservations ADD COLUMN status TEXT NOT NULL DEFAULT 'HELD'"],
)
service.migration(
    "seed-stock",
    [
        f"INSERT INTO stock (sku, name, available) VALUES ('{sku}', '{name}', {qty})"
        for sku, (name, qty) in SEED_STOCK.items()
    ],
)


@service.handles(ReserveStock)
async def reserve_stock(command: ReserveStock, ctx: Context) -> None:
    """Reserve every line or none. Runs in one transaction with its reply."""
    annotate(**{"order.id": command.order_id})
    held = await ctx.fetch_value(
        "SELECT status FROM reservations WHERE order_id = ?", command.order_id
    )
    if held == "RELEASED":
        ctx.reply(StockRejected(order_id=command.order_id, reason="the reservation was released"))
        return
    if held is not None:
        ctx.reply(StockReserved(order_id=command.order_id))
        return
    wanted = Counter[str]()
    for line in command.items:
        wanted[line.sku] += line.qty
    problems = []
    for sku, qty in sorted(wanted.items()):
        if qty <= 0:
            problems.append(f"{sku}: quantity must be positive")
            continue
        available = await ctx.fetch_value("SELECT available FROM stock WHERE sku = ?", sku)
        if available is None:
            problems.append(f"{sku}: unknown SKU")
        elif available < qty:
            problems.append(f"{sku}: only {available} left, {qty} wanted")
    if problems:
        log.warning("stock rejected", order_id=command.order_id, reason="; ".join(problems))
        ctx.reply(StockRejected(order_id=command.order_id, reason="; ".join(problems)))
        return
    for sku, qty in wanted.items():
        await ctx.execute(
            "UPDATE stock SET available = available - ? WHERE sku = ? AND available >= ?",
            qty,
            sku,
            qty,
        )
    await ctx.execute(
        "INSERT INTO reservations (order_id, items, created_at) VALUES (?, ?, ?)",
        command.order_id,
        json.dumps(dict(wanted)),
        ctx.clock.time(),
    )
    log.info("stock reserved", order_id=command.order_id, skus=sorted(wanted))
    ctx.reply(StockReserved(order_id=command.order_id))


@service.handles(ReleaseStock)
async def release_stock(command: ReleaseStock, ctx: Context) -> None:
    """Give a held reservation back to stock; a released or unknown one is a no-op."""
    annotate(**{"order.id": command.order_id})
    row = await ctx.fetch_one(
        "SELECT items, status FROM reservations WHERE order_id = ?", command.order_id
    )
    if row is not None and row[1] == "HELD":
        for sku, qty in json.loads(row[0]).items():
            await ctx.execute("UPDATE stock SET available = available + ? WHERE sku = ?", qty, sku)
        await ctx.execute(
            "UPDATE reservations SET status = 'RELEASED' WHERE order_id = ?", command.order_id
        )
    ctx.reply(StockReleased(order_id=command.order_id))


@service.handles(CommitStock)
async def commit_stock(command: CommitStock, ctx: Context) -> None:
    """Make a held reservation final (the stock is sold)."""
    annotate(**{"order.id": command.order_id})
    await ctx.execute(
        "UPDATE reservations SET status = 'COMMITTED' WHERE order_id = ? AND status = 'HELD'",
        command.order_id,
    )
    ctx.reply(StockCommitted(order_id=command.order_id))


@service.http.get("/reservations/{order_id}")
async def get_reservation(order_id: str) -> dict[str, Any]:
    """An order's reservation and its status."""
    async with service.read() as db:
        row = await db.fetch_one(
            "SELECT items, status FROM reservations WHERE order_id = ?", order_id
        )
    if row is None:
        raise HTTPException(404, f"no reservation for order {order_id!r}")
    return {"order_id": order_id, "items": json.loads(row[0]), "status": row[1]}


@service.http.get("/stock")
async def list_stock() -> list[dict[str, Any]]:
    """Every SKU with what is available."""
    async with service.read() as db:
        rows = await db.fetch_all("SELECT sku, name, available FROM stock ORDER BY sku")
    return [{"sku": r[0], "name": r[1], "available": r[2]} for r in rows]


@service.http.get("/stock/{sku}")
async def get_stock(sku: str) -> dict[str, Any]:
    """One SKU."""
    async with service.read() as db:
        row = await db.fetch_one("SELECT sku, name, available FROM stock WHERE sku = ?", sku)
    if row is None:
        raise HTTPException(404, f"no SKU {sku!r}")
    return {"sku": row[0], "name": row[1], "available": row[2]}
