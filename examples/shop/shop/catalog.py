"""catalog: product names and prices, with a switch to make it slow or failing.

The admin endpoint ``PUT /admin/faults`` injects latency and an error rate, so a user
can watch the breaker in ``orders`` open (``GET :8090/atoll/breakers``), orders fall back
to the last known price, and the breaker close again once the faults are cleared.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import HTTPException
from pydantic import BaseModel, Field

from atoll import Service

#: Loaded once, on the first start of a fresh database: sku -> (name, price in cents).
SEED_PRODUCTS: dict[str, tuple[str, int]] = {
    "apple": ("Apple", 50),
    "banana": ("Banana", 25),
    "cherry": ("Cherry (box)", 450),
    "durian": ("Durian", 1200),
    "elderberry": ("Elderberry jam", 600),
}

service = Service(
    "catalog",
    title="shop: catalog",
    schema=[
        """CREATE TABLE IF NOT EXISTS products (
            sku TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            price_cents INTEGER NOT NULL CHECK (price_cents >= 0)
        )""",
    ],
)
service.migration(
    "seed-products",
    [
        f"INSERT INTO products (sku, name, price_cents) VALUES ('{sku}', '{name}', {price})"
        for sku, (name, price) in SEED_PRODUCTS.items()
    ],
)


class Faults(BaseModel):
    """Injected trouble: every product request waits ``latency_ms`` and then fails with
    probability ``error_rate`` (a 503)."""

    latency_ms: Annotated[int, Field(ge=0, le=60_000)] = 0
    error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


faults = Faults()


async def _suffer() -> None:
    runtime = service.runtime
    if faults.latency_ms:
        await runtime.clock.sleep(faults.latency_ms / 1000)
    if faults.error_rate and runtime.random.random() < faults.error_rate:
        raise HTTPException(503, "catalog is failing (injected fault)")


@service.http.get("/products")
async def list_products() -> list[dict[str, Any]]:
    """Every product."""
    await _suffer()
    async with service.read() as db:
        rows = await db.fetch_all("SELECT sku, name, price_cents FROM products ORDER BY sku")
    return [{"sku": r[0], "name": r[1], "price_cents": r[2]} for r in rows]


@service.http.get("/products/{sku}")
async def get_product(sku: str) -> dict[str, Any]:
    """One product's name and price."""
    await _suffer()
    async with service.read() as db:
        row = await db.fetch_one("SELECT sku, name, price_cents FROM products WHERE sku = ?", sku)
    if row is None:
        raise HTTPException(404, f"no product {sku!r}")
    return {"sku": row[0], "name": row[1], "price_cents": row[2]}


@service.http.get("/admin/faults")
async def get_faults() -> Faults:
    """The faults in force."""
    return faults


@service.http.put("/admin/faults")
async def set_faults(new: Faults) -> Faults:
    """Inject latency and an error rate into product requests."""
    faults.latency_ms = new.latency_ms
    faults.error_rate = new.error_rate
    return faults


@service.http.delete("/admin/faults")
async def clear_faults() -> Faults:
    """Back to normal."""
    faults.latency_ms = 0
    faults.error_rate = 0.0
    return faults
