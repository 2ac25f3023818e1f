"""kill -9 the shop's services at random while orders pour in; then check the books.

The shop runs as `atoll up` runs it (one process per service, restarted when it dies).
While orders are placed, a killer sends SIGKILL to a random service process (the
orchestrator, orders, or a participant: inventory, payments, shipping) every second or
so. Afterwards every saga must be terminal, money conserved and never negative, stock
accounted for, and no effect applied twice.

The short version runs in `make test`; the full one places 1,000 orders:

    ATOLL_CRASH_ORDERS=1000 .venv/bin/pytest -m slow tests/shop/test_shop_crash.py
"""

import asyncio
import contextlib
import os
import random
import signal
from pathlib import Path

import httpx
import pytest
from test_shop import Shop

from atoll.testing import wait_until

SEED_STOCK = {"apple": 100, "banana": 50, "cherry": 20, "durian": 2, "elderberry": 0}
VICTIMS = ("orders", "inventory", "payments", "shipping")
CUSTOMERS = ("c1", "c2", "c3", "alice", "bob", "poor")


def pids_of(service: str) -> list[int]:
    """Processes running `atoll run SERVICE`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"run" in argv and service.encode() in argv and b"atoll" in argv:
                found.append(int(entry.name))
    return found


async def place_orders(client: httpx.AsyncClient, shop: Shop, count: int, rng: random.Random):
    """Place ``count`` orders, retrying while orders is down; return the ids accepted."""
    accepted: list[str] = []
    for _ in range(count):
        sku = rng.choice(["apple", "apple", "banana", "cherry", "durian", "kiwi"])
        body = {
            "customer_id": rng.choice(CUSTOMERS),
            "items": [{"sku": sku, "qty": rng.randint(1, 3)}],
        }
        for _attempt in range(200):
            try:
                response = await client.post(f"{shop.orders}/orders", json=body)
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
                continue
            if response.status_code == 202:
                accepted.append(response.json()["order_id"])
                break
            await asyncio.sleep(0.1)  # 503 while a dependency restarts
    return accepted


async def killer(stop: asyncio.Event, rng: random.Random, kills: list[str]):
    order: list[str] = []
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        if not order:  # every service in turn, in a random order
            order = list(VICTIMS)
            rng.shuffle(order)
        victim = order.pop()
        for pid in pids_of(victim):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                kills.append(victim)


async def get_json(client, url):
    for _ in range(600):
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get(url)
            if response.status_code == 404:
                return {}  # nothing of that order there
            if response.status_code < 500:
                return response.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "orders",
    [
        pytest.param(150, id="short"),
        pytest.param(
            int(os.environ.get("ATOLL_CRASH_ORDERS", "1000")), id="full", marks=pytest.mark.slow
        ),
    ],
)
async def test_kill_9_at_random_while_orders_pour_in(tmp_path, orders, request):
    if "full" in request.node.name and "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("the full crash run: -m slow (ATOLL_CRASH_ORDERS sets the count)")
    rng = random.Random(7)
    shop = Shop(tmp_path)
    shop.start()
    kills: list[str] = []
    stop = asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            await shop.wait_ready(client)
            chaos = asyncio.create_task(killer(stop, rng, kills))
            accepted = await place_orders(client, shop, orders, rng)
            stop.set()
            await chaos
            assert kills, "nothing was killed"

            async def settled():
                body = await get_json(client, f"{shop.orders}/atoll/sagas?limit=10000")
                return len(body) >= len(accepted) and all(
                    s["state"] in ("COMPLETED", "COMPENSATED") for s in body
                )

            await wait_until(settled, timeout=600, interval=1.0, what="every saga to end")
            sagas = await get_json(client, f"{shop.orders}/atoll/sagas?limit=10000")
            by_id = {s["saga_id"]: s for s in sagas if s["name"] == "place-order"}
            assert set(accepted) <= set(by_id), "an accepted order has no saga"
            # Every order the shop took, not only those whose 202 reached the client: a
            # kill between the commit and the answer leaves an order the client retried
            # as a new one, and that first order still runs its saga to the end.
            orders_taken = sorted(by_id)
            for order_id in orders_taken:
                view = await get_json(client, f"{shop.orders}/orders/{order_id}")
                expected = "CONFIRMED" if by_id[order_id]["state"] == "COMPLETED" else "REJECTED"
                assert view["status"] == expected, (order_id, view, by_id[order_id])
                payment = await get_json(client, f"{shop.payments}/payments/{order_id}")
                shipment = await get_json(
                    client, f"http://127.0.0.1:{shop.ports['shipping']}/shipments/{order_id}"
                )
                reservation = await get_json(
                    client,
                    f"http://127.0.0.1:{shop.ports['inventory']}/reservations/{order_id}",
                )
                if expected == "CONFIRMED":
                    assert payment["status"] == "CAPTURED", (order_id, payment)
                    assert shipment["status"] == "SCHEDULED", (order_id, shipment)
                    assert reservation["status"] == "COMMITTED", (order_id, reservation)
                else:
                    assert payment.get("status") in (None, "VOIDED", "DECLINED", "REFUNDED")
                    assert shipment.get("status") in (None, "CANCELLED", "FAILED")
                    assert reservation.get("status") in (None, "RELEASED")

            checks = await get_json(client, f"{shop.payments}/admin/invariants")
            assert checks["conserved"], checks
            assert checks["no_negative_balance"], checks
            assert checks["holds_match_payments"], checks
            inventory = f"http://127.0.0.1:{shop.ports['inventory']}"
            stock = {s["sku"]: s["available"] for s in await get_json(client, f"{inventory}/stock")}
            sold: dict[str, int] = dict.fromkeys(SEED_STOCK, 0)
            for order_id in orders_taken:
                reservation = await get_json(client, f"{inventory}/reservations/{order_id}")
                if reservation.get("status") == "COMMITTED":
                    for sku, qty in reservation["items"].items():
                        sold[sku] += qty
            for sku, seed in SEED_STOCK.items():
                assert stock[sku] >= 0
                assert stock[sku] + sold[sku] == seed, (sku, stock[sku], sold[sku], seed)
            print(
                f"{len(accepted)} orders accepted ({len(orders_taken)} taken),"
                f" {len(kills)} kills: {sorted(set(kills))}"
            )
        assert shop.stop() == 0
    finally:
        stop.set()
        if shop.process is not None and shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()
