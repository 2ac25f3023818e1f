"""payments: customer wallets. Authorize (hold), capture, void and refund.

Invariants, checked by ``GET /admin/invariants`` and by the crash tests:

* no balance is ever negative (CHECK constraints; a hold that does not fit is declined);
* money is conserved: the sum of every wallet's ``available + held + captured`` equals the
  sum of everything ever topped up.
"""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from fastapi import HTTPException
from pydantic import BaseModel, Field

from atoll import Context, Service
from atoll.observability import annotate
from shop.messages import (
    AuthorizePayment,
    CapturePayment,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    RefundPayment,
    VoidPayment,
)

#: Loaded once, on the first start: customer -> cents topped up.
SEED_WALLETS: dict[str, int] = {
    "c1": 100_000,
    "c2": 100_000,
    "c3": 100_000,
    "alice": 50_000,
    "bob": 50_000,
    "poor": 100,  # a customer without enough funds, for the demo's compensation path
}

log = structlog.get_logger(__name__)

service = Service(
    "payments",
    title="shop: payments",
    schema=[
        """CREATE TABLE IF NOT EXISTS wallets (
            customer_id TEXT PRIMARY KEY,
            available_cents BIGINT NOT NULL CHECK (available_cents >= 0),
            held_cents BIGINT NOT NULL DEFAULT 0 CHECK (held_cents >= 0),
            captured_cents BIGINT NOT NULL DEFAULT 0 CHECK (captured_cents >= 0),
            topped_up_cents BIGINT NOT NULL CHECK (topped_up_cents >= 0)
        )""",
        """CREATE TABLE IF NOT EXISTS payments (
            order_id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
            status TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
    ],
)
service.migration(
    "seed-wallets",
    [
        "INSERT INTO wallets (customer_id, available_cents, topped_up_cents)"
        f" VALUES ('{customer}', {cents}, {cents})"
        for customer, cents in SEED_WALLETS.items()
    ],
)

# Payment status: HELD (authorized) -> CAPTURED -> REFUNDED, or HELD -> VOIDED.


async def _payment(ctx: Context, order_id: str) -> Any:
    return await ctx.fetch_one(
        "SELECT customer_id, amount_cents, status FROM payments WHERE order_id = ?", order_id
    )


async def _set_status(ctx: Context, order_id: str, status: str) -> None:
    await ctx.execute(
        "UPDATE payments SET status = ?, updated_at = ? WHERE order_id = ?",
        status,
        ctx.clock.time(),
        order_id,
    )


@service.handles(AuthorizePayment)
async def authorize(command: AuthorizePayment, ctx: Context) -> None:
    """Hold the amount if the wallet has it; decline (holding nothing) if not."""
    annotate(**{"order.id": command.order_id})
    annotate(**{"payment.amount_cents": command.amount_cents})
    existing = await _payment(ctx, command.order_id)
    if existing is not None:  # a repeated command: answer as the first time
        if existing[2] == "DECLINED":
            ctx.reply(PaymentDeclined(order_id=command.order_id, reason="declined before"))
        else:
            ctx.reply(PaymentAuthorized(order_id=command.order_id))
        return
    if command.amount_cents < 0:
        ctx.reply(PaymentDeclined(order_id=command.order_id, reason="negative amount"))
        return
    held = await ctx.execute(
        "UPDATE wallets SET available_cents = available_cents - ?,"
        " held_cents = held_cents + ? WHERE customer_id = ? AND available_cents >= ?",
        command.amount_cents,
        command.amount_cents,
        command.customer_id,
        command.amount_cents,
    )
    status = "HELD" if held else "DECLINED"
    await ctx.execute(
        "INSERT INTO payments (order_id, customer_id, amount_cents, status, updated_at)"
        " VALUES (?, ?, ?, ?, ?)",
        command.order_id,
        command.customer_id,
        command.amount_cents,
        status,
        ctx.clock.time(),
    )
    if held:
        log.info("payment authorized", order_id=command.order_id, cents=command.amount_cents)
        ctx.reply(PaymentAuthorized(order_id=command.order_id))
        return
    wallet = await ctx.fetch_value(
        "SELECT available_cents FROM wallets WHERE customer_id = ?", command.customer_id
    )
    reason = (
        f"customer {command.customer_id!r} has no wallet"
        if wallet is None
        else f"insufficient funds: {wallet} cents available, {command.amount_cents} needed"
    )
    log.warning("payment declined", order_id=command.order_id, reason=reason)
    ctx.reply(PaymentDeclined(order_id=command.order_id, reason=reason))


@service.handles(CapturePayment)
async def capture(command: CapturePayment, ctx: Context) -> None:
    """Take a held amount (held -> captured)."""
    annotate(**{"order.id": command.order_id})
    payment = await _payment(ctx, command.order_id)
    if payment is None or payment[2] != "HELD":
        # Captured already (a repeat), or nothing to capture: nothing moves.
        if payment is not None and payment[2] in ("CAPTURED", "REFUNDED"):
            ctx.reply(PaymentCaptured(order_id=command.order_id))
            return
        raise RuntimeError(f"no held payment for order {command.order_id!r} to capture")
    await ctx.execute(
        "UPDATE wallets SET held_cents = held_cents - ?, captured_cents = captured_cents + ?"
        " WHERE customer_id = ?",
        payment[1],
        payment[1],
        payment[0],
    )
    await _set_status(ctx, command.order_id, "CAPTURED")
    log.info("payment captured", order_id=command.order_id, cents=payment[1])
    ctx.reply(PaymentCaptured(order_id=command.order_id))


@service.handles(VoidPayment)
async def void(command: VoidPayment, ctx: Context) -> None:
    """Release a hold (held -> available); anything else is left alone."""
    annotate(**{"order.id": command.order_id})
    payment = await _payment(ctx, command.order_id)
    if payment is not None and payment[2] == "HELD":
        await ctx.execute(
            "UPDATE wallets SET held_cents = held_cents - ?, available_cents = available_cents + ?"
            " WHERE customer_id = ?",
            payment[1],
            payment[1],
            payment[0],
        )
        await _set_status(ctx, command.order_id, "VOIDED")
    ctx.reply(PaymentVoided(order_id=command.order_id))


@service.handles(RefundPayment)
async def refund(command: RefundPayment, ctx: Context) -> None:
    """Give a captured amount back (captured -> available)."""
    annotate(**{"order.id": command.order_id})
    payment = await _payment(ctx, command.order_id)
    if payment is not None and payment[2] == "CAPTURED":
        await ctx.execute(
            "UPDATE wallets SET captured_cents = captured_cents - ?,"
            " available_cents = available_cents + ? WHERE customer_id = ?",
            payment[1],
            payment[1],
            payment[0],
        )
        await _set_status(ctx, command.order_id, "REFUNDED")
    ctx.reply(PaymentRefunded(order_id=command.order_id))


# -- HTTP -------------------------------------------------------------------------------


class TopUp(BaseModel):
    """The body of ``POST /wallets/{customer_id}/top-up``."""

    amount_cents: Annotated[int, Field(gt=0, le=100_000_000)]


def _wallet(row: Any) -> dict[str, Any]:
    return {
        "customer_id": row[0],
        "available_cents": row[1],
        "held_cents": row[2],
        "captured_cents": row[3],
        "topped_up_cents": row[4],
    }


_WALLET = (
    "SELECT customer_id, available_cents, held_cents, captured_cents, topped_up_cents FROM wallets"
)


@service.http.get("/wallets/{customer_id}")
async def get_wallet(customer_id: str) -> dict[str, Any]:
    """A customer's wallet."""
    async with service.read() as db:
        row = await db.fetch_one(f"{_WALLET} WHERE customer_id = ?", customer_id)
    if row is None:
        raise HTTPException(404, f"no wallet for customer {customer_id!r}")
    return _wallet(row)


@service.http.post("/wallets/{customer_id}/top-up")
async def top_up(customer_id: str, body: TopUp) -> dict[str, Any]:
    """Add money to a wallet (creating it)."""
    async with service.unit_of_work() as ctx:
        await ctx.execute(
            "INSERT INTO wallets (customer_id, available_cents, topped_up_cents) VALUES (?, ?, ?)"
            " ON CONFLICT (customer_id) DO UPDATE SET"
            " available_cents = wallets.available_cents + excluded.available_cents,"
            " topped_up_cents = wallets.topped_up_cents + excluded.topped_up_cents",
            customer_id,
            body.amount_cents,
            body.amount_cents,
        )
        row = await ctx.fetch_one(f"{_WALLET} WHERE customer_id = ?", customer_id)
    return _wallet(row)


@service.http.get("/payments/{order_id}")
async def get_payment(order_id: str) -> dict[str, Any]:
    """An order's payment."""
    async with service.read() as db:
        row = await db.fetch_one(
            "SELECT customer_id, amount_cents, status FROM payments WHERE order_id = ?", order_id
        )
    if row is None:
        raise HTTPException(404, f"no payment for order {order_id!r}")
    return {"order_id": order_id, "customer_id": row[0], "amount_cents": row[1], "status": row[2]}


@service.http.get("/admin/invariants")
async def invariants() -> dict[str, Any]:
    """Money conservation across every wallet, and that no balance is negative."""
    async with service.read() as db:
        row = await db.fetch_one(
            "SELECT coalesce(sum(available_cents + held_cents + captured_cents), 0),"
            " coalesce(sum(topped_up_cents), 0),"
            " coalesce(sum(CASE WHEN available_cents < 0 OR held_cents < 0"
            " OR captured_cents < 0 THEN 1 ELSE 0 END), 0) FROM wallets"
        )
        held = await db.fetch_value(
            "SELECT coalesce(sum(amount_cents), 0) FROM payments WHERE status = 'HELD'"
        )
        wallets_held = await db.fetch_value("SELECT coalesce(sum(held_cents), 0) FROM wallets")
    assert row is not None
    return {
        "money_in_wallets_cents": int(row[0]),
        "topped_up_cents": int(row[1]),
        "conserved": int(row[0]) == int(row[1]),
        "no_negative_balance": int(row[2]) == 0,
        "holds_match_payments": int(held) == int(wallets_held),
    }
