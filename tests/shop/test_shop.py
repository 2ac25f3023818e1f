"""The reference shop, run the way `make demo` runs it: `atoll up`, separate processes."""

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest

from atoll.testing import wait_until
from support import SHOP, free_port


class Shop:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.ports = {"orders": free_port(), "inventory": free_port()}
        self.orders = f"http://127.0.0.1:{self.ports['orders']}"
        self.inventory = f"http://127.0.0.1:{self.ports['inventory']}"
        self.process: subprocess.Popen[str] | None = None
        self.log = tmp_path / "shop.log"

    def start(self):
        env = dict(os.environ)
        env["ATOLL__SYSTEM__DATA_DIR"] = str(self.tmp_path / "data")
        for name, port in self.ports.items():
            env[f"ATOLL__SERVICES__{name.upper()}__PORT"] = str(port)
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "atoll", "up", "--config", str(SHOP / "atoll.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )

    async def wait_ready(self, client):
        async def ready():
            for url in (self.orders, self.inventory):
                try:
                    if (await client.get(f"{url}/readyz")).status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
            return True

        await wait_until(ready, timeout=60, what=f"the shop to be ready (log: {self.log})")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(60)


async def order(client, shop, items, customer="c1"):
    response = await client.post(
        f"{shop.orders}/orders", json={"customer_id": customer, "items": items}
    )
    assert response.status_code == 202, response.text
    return response.json()["order_id"]


async def final(client, shop, order_id):
    result = {}

    async def settled():
        body = (await client.get(f"{shop.orders}/orders/{order_id}")).json()
        result.update(body)
        return body["status"] != "PENDING"

    await wait_until(settled, timeout=30, what=f"order {order_id} to settle")
    return result


async def stock(client, shop, sku):
    return (await client.get(f"{shop.inventory}/stock/{sku}")).json()["available"]


@pytest.mark.timeout(180)
async def test_the_shop_takes_orders_end_to_end(tmp_path):
    shop = Shop(tmp_path)
    shop.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            apples = await stock(client, shop, "apple")
            confirmed = await final(
                client, shop, await order(client, shop, [{"sku": "apple", "qty": 3}])
            )
            assert confirmed["status"] == "CONFIRMED"
            assert confirmed["items"] == [{"sku": "apple", "qty": 3}]
            assert await stock(client, shop, "apple") == apples - 3

            unknown = await final(
                client, shop, await order(client, shop, [{"sku": "kiwi", "qty": 1}])
            )
            assert unknown["status"] == "REJECTED"
            assert "kiwi: unknown SKU" in unknown["reason"]

            short = await final(
                client, shop, await order(client, shop, [{"sku": "durian", "qty": 5}])
            )
            assert short["status"] == "REJECTED"
            assert "durian: only 2 left, 5 wanted" in short["reason"]
            assert await stock(client, shop, "durian") == 2, "a rejected order held stock"

            # 30 concurrent orders for the 20 boxes of cherries: exactly 20 succeed.
            ids = await asyncio.gather(
                *(order(client, shop, [{"sku": "cherry", "qty": 1}], f"c{i}") for i in range(30))
            )
            outcomes = await asyncio.gather(*(final(client, shop, i) for i in ids))
            statuses = sorted(o["status"] for o in outcomes)
            assert statuses.count("CONFIRMED") == 20
            assert statuses.count("REJECTED") == 10
            assert await stock(client, shop, "cherry") == 0

            invalid = await client.post(
                f"{shop.orders}/orders",
                json={"customer_id": "c1", "items": [{"sku": "apple", "qty": -1}]},
            )
            assert invalid.status_code == 422
            assert invalid.headers["content-type"] == "application/problem+json"
            missing = await client.get(f"{shop.orders}/orders/nope")
            assert missing.status_code == 404
            assert missing.json()["status"] == 404
        assert shop.stop() == 0
        assert "all services stopped" in shop.log.read_text()

        # A restart keeps everything and does not seed stock again.
        shop.start()
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            assert await stock(client, shop, "cherry") == 0
            assert (await client.get(f"{shop.orders}/orders/{ids[0]}")).json()["status"] in {
                "CONFIRMED",
                "REJECTED",
            }
        assert shop.stop() == 0
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()


@pytest.mark.timeout(120)
async def test_the_shop_runs_in_one_process_on_the_in_memory_transport(tmp_path):
    shop = Shop(tmp_path)
    env = dict(os.environ)
    env["ATOLL__SYSTEM__DATA_DIR"] = str(tmp_path / "data")
    env["ATOLL__SYSTEM__TRANSPORT"] = "memory://"
    for name, port in shop.ports.items():
        env[f"ATOLL__SERVICES__{name.upper()}__PORT"] = str(port)
    with shop.log.open("w") as log:
        shop.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "atoll",
                "up",
                "--single-process",
                "--config",
                str(SHOP / "atoll.toml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            placed = await final(
                client, shop, await order(client, shop, [{"sku": "banana", "qty": 2}])
            )
            assert placed["status"] == "CONFIRMED"
        assert shop.stop() == 0
    finally:
        if shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()


def test_memory_transport_without_single_process_is_refused_clearly(tmp_path):
    env = dict(os.environ, ATOLL__SYSTEM__TRANSPORT="memory://")
    result = subprocess.run(
        [sys.executable, "-m", "atoll", "up", "--config", str(SHOP / "atoll.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "system.transport" in result.stderr
    assert "--single-process" in result.stderr
