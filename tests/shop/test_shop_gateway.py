"""The shop behind its gateway, started by `atoll up` like `make demo` does."""

import os
import signal

import httpx
import pytest
from test_shop import Shop, final, trace_of
from test_shop_crash import pids_of

from atoll.gateway import load_gateway_config, mint_token
from atoll.testing import wait_until
from support import SHOP, free_ports


@pytest.mark.timeout(120)
async def test_the_shop_answers_through_its_gateway(tmp_path):
    shop = Shop(tmp_path)
    shop.start()
    config = load_gateway_config(SHOP / "gateway.yaml")
    assert config.auth.jwt is not None
    token = mint_token(
        subject="alice",
        scopes=["orders:read", "orders:write"],
        secret=config.auth.jwt.hs256_secret,
        issuer="atoll-shop-dev",
        audience="shop",
    )
    auth = {"authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)

            async def gateway_ready():
                try:
                    r = await client.get(f"http://127.0.0.1:{shop.gateway_admin_port}/readyz")
                except httpx.HTTPError:
                    return False
                return r.status_code == 200

            await wait_until(gateway_ready, timeout=30, what="the gateway")
            gw = shop.gateway
            order = {"customer_id": "c1", "items": [{"sku": "apple", "qty": 1}]}
            assert (await client.post(f"{gw}/orders", json=order)).status_code == 401
            placed = await client.post(f"{gw}/orders", json=order, headers=auth)
            assert placed.status_code == 202, placed.text
            order_id = placed.json()["order_id"]
            shop.orders = gw  # final() polls GET /orders/{id}: through the gateway too
            client.headers.update(auth)
            assert (await final(client, shop, order_id))["status"] == "CONFIRMED"
            # The gateway starts the order's trace, and it crosses every service.
            everyone = {"gateway", "orders", "inventory", "catalog", "payments", "shipping"}
            trace = await trace_of(client, shop, order_id, everyone)
            gateway_spans = [s for s in trace["spans"] if s["service"] == "gateway"]
            root = next(s for s in trace["spans"] if s["parent_span_id"] is None)
            assert root["service"] == "gateway", root
            assert root["kind"] == "server"
            assert any(s["span_id"] == root["span_id"] for s in gateway_spans)
            orders_server = [
                s for s in trace["spans"] if s["service"] == "orders" and s["kind"] == "server"
            ]
            assert orders_server
            assert orders_server[0]["parent_span_id"] in {s["span_id"] for s in gateway_spans}
            assert orders_server[0]["attributes"].get("http.request.method") == "POST"
            assert (await client.get(f"{gw}/stock/apple")).json()["sku"] == "apple"
            assert (await client.get(f"{gw}/products")).status_code == 200
            history = await client.get(f"{gw}/customers/c1/orders")
            assert history.status_code == 200
            details = await client.get(f"{gw}/orders/{order_id}/details")
            assert details.status_code == 200
            body = details.json()
            assert body["order"]["order_id"] == order_id
            assert body["payment"]["status"] == "CAPTURED"
            assert body["shipment"]["status"] == "SCHEDULED"
            assert "_partial" not in body
            # With payments stopped, its part is optional: omitted and flagged, not failed.
            frozen = pids_of("payments")
            assert frozen
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                degraded = await client.get(f"{gw}/orders/{order_id}/details")
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            assert degraded.status_code == 200
            body = degraded.json()
            assert body["_partial"] == ["payment"]
            assert "payment" not in body
            assert body["shipment"]["status"] == "SCHEDULED"
            assert (await client.get(f"{gw}/orders/nope")).status_code == 404
            routes = (await client.get(f"http://127.0.0.1:{shop.gateway_admin_port}/routes")).json()
            assert "place-order" in {r["name"] for r in routes["routes"]}
        assert shop.stop() == 0
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()


def free_port_pair() -> int:
    """A port whose next one is free too (for a service with two instances)."""
    return free_ports(2)


def shop_with_two(tmp_path, service: str) -> tuple[Shop, int]:
    """The shop (not started) with two instances of ``service``, and its first port."""
    port = free_port_pair()
    name = service.upper()
    shop = Shop(
        tmp_path,
        extra_env={
            f"ATOLL__SERVICES__{name}__PORT": str(port),
            f"ATOLL__SERVICES__{name}__INSTANCES": "2",
        },
    )
    shop.ports[service] = port
    return shop, port


@pytest.mark.timeout(120)
async def test_a_service_with_two_instances_is_balanced_by_the_gateway(tmp_path):
    shop, catalog_port = shop_with_two(tmp_path, "catalog")
    shop.start()
    admin = f"http://127.0.0.1:{shop.gateway_admin_port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            # The second instance answers on its own port, as its own process.
            second = await client.get(f"http://127.0.0.1:{catalog_port + 1}/readyz")
            assert second.status_code == 200

            async def gateway_ready():
                try:
                    return (await client.get(f"{admin}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(gateway_ready, timeout=30, what="the gateway")
            for _ in range(20):
                assert (await client.get(f"{shop.gateway}/products")).status_code == 200
            upstreams = (await client.get(f"{admin}/upstreams")).json()["upstreams"]
            [catalog] = [u for u in upstreams if u["name"] == "catalog"]
            served = {i["address"]: i["requests"] for i in catalog["instances"]}
            assert set(served) == {
                f"127.0.0.1:{catalog_port}",
                f"127.0.0.1:{catalog_port + 1}",
            }, served
            assert all(count > 0 for count in served.values()), served
            assert sum(served.values()) >= 20
            # An order still prices its items from catalog and completes, once.
            order = {"customer_id": "c1", "items": [{"sku": "apple", "qty": 1}]}
            placed = await client.post(f"{shop.orders}/orders", json=order)
            assert placed.status_code == 202, placed.text
            assert (await final(client, shop, placed.json()["order_id"]))["status"] == "CONFIRMED"
        assert "catalog.2" in shop.log.read_text()
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.stop()


@pytest.mark.timeout(150)
async def test_two_instances_of_orders_share_its_sagas_and_projection(tmp_path):
    # Orders runs sagas and the order-history projection on one database: both
    # instances take its messages and run its projection, each change once.
    shop, orders_port = shop_with_two(tmp_path, "orders")
    shop.orders = f"http://127.0.0.1:{orders_port}"
    second = f"http://127.0.0.1:{orders_port + 1}"
    shop.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            assert (await client.get(f"{second}/readyz")).status_code == 200
            placed = []
            for n in range(8):  # half on each instance
                base = shop.orders if n % 2 else second
                response = await client.post(
                    f"{base}/orders",
                    json={"customer_id": "c2", "items": [{"sku": "apple", "qty": 1}]},
                )
                assert response.status_code == 202, response.text
                placed.append(response.json()["order_id"])
            for order_id in placed:
                assert (await final(client, shop, order_id))["status"] == "CONFIRMED"
            history: list[dict[str, object]] = []

            async def listed() -> bool:
                for base in (shop.orders, second):
                    history[:] = (await client.get(f"{base}/customers/c2/orders")).json()
                    confirmed = [h for h in history if h["status"] == "CONFIRMED"]
                    if len(confirmed) != len(placed):
                        return False
                return True

            await wait_until(listed, what="every order in the history, seen from both")
            # Each order once in the projection, whichever instance applied its events.
            assert sorted(h["order_id"] for h in history) == sorted(placed)
            # One saga per order, each completed once, whichever instance moved it.
            sagas = (await client.get(f"{second}/atoll/sagas")).json()
            assert len(sagas) == len(placed), sagas
            assert {s["state"] for s in sagas} == {"COMPLETED"}, sagas
        assert shop.stop() == 0
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.stop()
