"""Aggregate routes: required, optional and fallback parts, with a stopped upstream."""

import httpx
from gateway_support import base_config, running_gateway, url, write_config

from atoll.determinism import SystemClock

CLOCK = SystemClock()


def details_config(tmp_path, orders, payments, shipping, *, payment="optional", timeout=2):
    payment_part = {"upstream": "payments", "path": "/payments/{id}"}
    if payment == "optional":
        payment_part["optional"] = True
    elif payment == "required":
        payment_part["required"] = True
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {
                "orders": {"targets": [orders.address]},
                "payments": {"targets": [payments.address]},
                "shipping": {"targets": [shipping.address]},
            },
            [
                {
                    "name": "order-details",
                    "match": {"path": "/orders/{id}/details", "methods": ["GET"]},
                    "aggregate": {
                        "timeout": timeout,
                        "parts": {
                            "order": {
                                "upstream": "orders",
                                "path": "/orders/{id}",
                                "required": True,
                            },
                            "payment": payment_part,
                            "shipment": {
                                "upstream": "shipping",
                                "path": "/shipments/{id}",
                                "fallback": {"status": "unknown"},
                            },
                        },
                    },
                }
            ],
        ),
    )


async def test_all_parts_answer(tmp_path, three):
    _orders, payments, _shipping = three
    async with (
        running_gateway(details_config(tmp_path, *three)) as gw,
        httpx.AsyncClient() as client,
    ):
        r = await client.get(url(gw, "/orders/o-7/details"))
        assert r.status_code == 200
        body = r.json()
        assert body["order"]["path"] == "/orders/o-7"
        assert body["payment"]["path"] == "/payments/o-7"
        assert body["shipment"]["path"] == "/shipments/o-7"
        assert "_partial" not in body
        # One deadline for all of them, propagated.
        assert 0 < int(payments.hits[-1]["headers"]["x-atoll-deadline"]) <= 2000


async def test_optional_and_fallback_parts_of_stopped_upstreams(tmp_path, three):
    _orders, payments, shipping = three
    async with (
        running_gateway(details_config(tmp_path, *three)) as gw,
        httpx.AsyncClient() as client,
    ):
        await payments.stop()
        await shipping.stop()
        r = await client.get(url(gw, "/orders/o-1/details"))
        assert r.status_code == 200
        body = r.json()
        assert body["order"]["path"] == "/orders/o-1"
        assert "payment" not in body
        assert body["shipment"] == {"status": "unknown"}
        assert body["_partial"] == ["payment", "shipment"]


async def test_a_required_part_failing_fails_the_response(tmp_path, three):
    orders, payments, _shipping = three
    async with (
        running_gateway(details_config(tmp_path, *three, payment="required")) as gw,
        httpx.AsyncClient() as client,
    ):
        await payments.stop()
        r = await client.get(url(gw, "/orders/o-1/details"))
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/problem+json"
        assert "payment" in r.json()["detail"]
        await orders.stop()
        r = await client.get(url(gw, "/orders/o-1/details"))
        assert r.status_code == 502


async def test_a_required_parts_404_is_passed_on(tmp_path, three):
    orders, _payments, _shipping = three
    orders.status = 404
    async with (
        running_gateway(details_config(tmp_path, *three)) as gw,
        httpx.AsyncClient() as client,
    ):
        r = await client.get(url(gw, "/orders/nope/details"))
        assert r.status_code == 404


async def test_slow_parts_are_cut_at_the_one_deadline(tmp_path, three):
    orders, payments, shipping = three
    payments.delay = 2.0
    shipping.delay = 2.0
    async with (
        running_gateway(details_config(tmp_path, *three, timeout=0.3)) as gw,
        httpx.AsyncClient() as client,
    ):
        started = CLOCK.monotonic()
        r = await client.get(url(gw, "/orders/o-2/details"))
        assert CLOCK.monotonic() - started < 1.0
        assert r.status_code == 200
        assert r.json()["_partial"] == ["payment", "shipment"]
        orders.delay = 2.0
        r = await client.get(url(gw, "/orders/o-2/details"))
        assert r.status_code == 504
