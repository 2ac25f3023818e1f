"""Routing, forwarding, balancing, health and the admin view, against stub upstreams."""

import asyncio

import httpx
import pytest
from gateway_support import Stub, admin_url, base_config, running_gateway, url, write_config
from prometheus_client.parser import text_string_to_metric_families

from atoll.testing import wait_until
from support import free_port


@pytest.fixture
def routes_config(tmp_path, stub, stub_b):
    return write_config(
        tmp_path / "gateway.yaml",
        base_config(
            {"a": {"targets": [stub.address]}, "b": {"targets": [stub_b.address]}},
            [
                {
                    "name": "order",
                    "match": {"path": "/orders/{id}", "methods": ["GET"]},
                    "upstream": "a",
                },
                {
                    "name": "orders-post",
                    "match": {"path": "/orders", "methods": ["POST"]},
                    "upstream": "a",
                },
                {
                    "name": "v2",
                    "match": {"prefix": "/api/v2"},
                    "upstream": "b",
                    "strip_prefix": True,
                },
                {
                    "name": "rewrite",
                    "match": {"path": "/legacy/{id}/info"},
                    "upstream": "b",
                    "rewrite": "/items/{id}",
                },
                {
                    "name": "by-host",
                    "match": {"prefix": "/hosted", "host": "*.example.com"},
                    "upstream": "b",
                },
                {
                    "name": "by-header",
                    "match": {"prefix": "/beta", "headers": {"x-beta": "1"}},
                    "upstream": "b",
                    "request_headers": {"set": {"x-added": "yes"}, "remove": ["x-secret"]},
                    "response_headers": {"set": {"x-gateway": "atoll"}, "remove": ["x-stub"]},
                },
                {"name": "stock", "match": {"prefix": "/stock"}, "upstream": "a"},
            ],
        ),
    )


async def test_routes_match_path_params_prefixes_hosts_and_headers(routes_config, stub, stub_b):
    async with running_gateway(routes_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/orders/42?x=1"))
        assert r.status_code == 200
        assert r.json()["path"] == "/orders/42"
        assert r.json()["query"] == "x=1"
        assert r.json()["stub"] == "a"
        r = await client.get(url(gw, "/api/v2/things/7"))
        assert r.json() == r.json() | {"stub": "b", "path": "/things/7"}
        r = await client.get(url(gw, "/legacy/9/info"))
        assert r.json()["path"] == "/items/9"
        r = await client.get(url(gw, "/hosted/x"), headers={"host": "shop.example.com"})
        assert r.json()["stub"] == "b"
        r = await client.get(url(gw, "/hosted/x"), headers={"host": "evil.test"})
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
        r = await client.get(url(gw, "/beta/x"))
        assert r.status_code == 404
        r = await client.get(
            url(gw, "/beta/x"), headers={"x-beta": "1", "x-secret": "s", "x-added": "forged"}
        )
        assert r.status_code == 200
        seen = r.json()["headers"]
        assert seen["x-added"] == "yes"
        assert "x-secret" not in seen
        assert r.headers["x-gateway"] == "atoll"
        assert "x-stub" not in r.headers
        # /stock matches /stock and /stock/..., not /stockpile
        assert (await client.get(url(gw, "/stock"))).status_code == 200
        assert (await client.get(url(gw, "/stock/apple"))).status_code == 200
        assert (await client.get(url(gw, "/stockpile"))).status_code == 404


async def test_method_mismatch_is_405_with_allow(routes_config):
    async with running_gateway(routes_config) as gw, httpx.AsyncClient() as client:
        r = await client.delete(url(gw, "/orders/1"))
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"  # a GET route answers HEAD (below)
        assert r.json()["status"] == 405
        r = await client.post(url(gw, "/orders"), json={"a": 1})
        assert r.status_code == 200
        assert r.json()["method"] == "POST"
        r = await client.head(url(gw, "/orders/1"))
        assert r.status_code == 200
        assert r.content == b""


async def test_forwarded_headers_and_request_ids(routes_config, stub):
    async with running_gateway(routes_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/orders/1"), headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        seen = stub.hits[-1]["headers"]
        assert seen["x-request-id"] == "abc-123"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["host"] == stub.address
        r = await client.get(url(gw, "/orders/1"), headers={"x-request-id": "bad id\twith spaces"})
        generated = r.headers["x-request-id"]
        assert len(generated) == 32
        assert generated != "bad id\twith spaces"
        assert stub.hits[-1]["headers"]["x-request-id"] == generated
        r = await client.get(url(gw, "/orders/1"), headers={"x-forwarded-for": "10.0.0.1"})
        assert stub.hits[-1]["headers"]["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


async def test_round_robin_and_least_outstanding(tmp_path, stub, stub_b):
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {
                "rr": {"targets": [stub.address, stub_b.address]},
                "lo": {"targets": [stub.address, stub_b.address], "balance": "least_outstanding"},
            },
            [
                {"name": "rr", "match": {"prefix": "/rr"}, "upstream": "rr"},
                {"name": "lo", "match": {"prefix": "/lo"}, "upstream": "lo"},
            ],
        ),
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        names = [(await client.get(url(gw, "/rr/x"))).json()["stub"] for _ in range(10)]
        assert names.count("a") == 5
        assert names.count("b") == 5
        # a is stuck: least-outstanding sends everything else to b.
        stub.release.clear()
        stuck = None
        for _ in range(4):  # until one request is stuck on a (ties rotate)
            task = asyncio.create_task(client.get(url(gw, "/lo/slow")))
            await asyncio.sleep(0.2)
            if any(h["path"] == "/lo/slow" for h in stub.hits):
                stuck = task
                break
            assert (await task).json()["stub"] == "b"
        assert stuck is not None
        names = [(await client.get(url(gw, "/lo/x"))).json()["stub"] for _ in range(6)]
        assert names == ["b"] * 6
        stub.release.set()
        assert (await stuck).status_code == 200


async def test_weighted_targets_share_traffic_smoothly_and_weight_0_drains(tmp_path, stub, stub_b):
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {
                "canary": {
                    "targets": [
                        {"address": stub.address, "weight": 3},
                        {"address": stub_b.address, "weight": 1},
                    ]
                },
                "drained": {
                    "targets": [stub.address, {"address": stub_b.address, "weight": 0}],
                    "passive": {"failures": 1, "ejection": 30},
                },
            },
            [
                {"name": "canary", "match": {"prefix": "/canary"}, "upstream": "canary"},
                {"name": "drained", "match": {"prefix": "/drained"}, "upstream": "drained"},
            ],
        ),
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        names = [(await client.get(url(gw, "/canary/x"))).json()["stub"] for _ in range(40)]
        assert names.count("a") == 30
        assert names.count("b") == 10
        # Smooth: b's turns are spread out, never two in a row, a at most three in a row.
        assert "bb" not in "".join(names)
        assert "aaaa" not in "".join(names)
        names = [(await client.get(url(gw, "/drained/x"))).json()["stub"] for _ in range(5)]
        assert names == ["a"] * 5
        # Only when no other instance is available does a drained one get requests.
        stub.status = 500
        assert (await client.get(url(gw, "/drained/x"))).status_code == 500  # a ejected
        stub.status = 200
        assert (await client.get(url(gw, "/drained/x"))).json()["stub"] == "b"
        admin = (await client.get(admin_url(gw, "/upstreams"))).json()
        weights = {
            i["address"]: i["weight"]
            for u in admin["upstreams"]
            if u["name"] == "canary"
            for i in u["instances"]
        }
        assert weights == {stub.address: 3, stub_b.address: 1}


async def test_passive_ejection_and_active_health_checks(tmp_path, stub, stub_b):
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {
                "pair": {
                    "targets": [stub.address, stub_b.address],
                    "passive": {"failures": 2, "ejection": 30},
                },
                "probed": {
                    "targets": [stub.address, stub_b.address],
                    "health": {"path": "/healthz", "interval": 0.05, "unhealthy_threshold": 2},
                },
            },
            [
                {"name": "pair", "match": {"prefix": "/pair"}, "upstream": "pair"},
                {"name": "probed", "match": {"prefix": "/probed"}, "upstream": "probed"},
            ],
        ),
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        stub.status = 500
        statuses = [(await client.get(url(gw, "/pair/x"))).status_code for _ in range(4)]
        assert statuses.count(500) == 2  # a failed twice, then was ejected
        names = [(await client.get(url(gw, "/pair/x"))).json()["stub"] for _ in range(6)]
        assert names == ["b"] * 6
        view = (await client.get(admin_url(gw, "/upstreams"))).json()["upstreams"]
        pair = next(u for u in view if u["name"] == "pair")
        assert [i["health"] for i in pair["instances"]] == ["ejected", "healthy"]
        # The active probe marks a down (its /healthz answers 503) and b stays in.
        await wait_until(
            lambda: not gw.gen.upstreams["probed"].instances[0].available, timeout=5, what="a down"
        )
        names = [(await client.get(url(gw, "/probed/x"))).json()["stub"] for _ in range(4)]
        assert names == ["b"] * 4
        stub.status = 200
        await wait_until(lambda: gw.gen.upstreams["probed"].instances[0].available, timeout=5)


async def test_admin_lists_routes_upstreams_breakers_and_metrics(routes_config):
    async with running_gateway(routes_config) as gw, httpx.AsyncClient() as client:
        await client.get(url(gw, "/orders/1"))
        await client.get(url(gw, "/nowhere"))
        routes = (await client.get(admin_url(gw, "/routes"))).json()["routes"]
        assert [r["name"] for r in routes][:2] == ["order", "orders-post"]
        assert (await client.get(admin_url(gw, "/readyz"))).status_code == 200
        metrics = (await client.get(admin_url(gw, "/metrics"))).text
        assert 'atoll_gateway_requests_total{code="200",route="order"} 1.0' in metrics
        assert 'atoll_gateway_upstream_requests_total{upstream="a"} 1.0' in metrics
        assert "atoll_gateway_request_duration_seconds_bucket" in metrics
        r = await client.post(admin_url(gw, "/routes"))
        assert r.status_code == 405
        # The admin endpoints are not on the public port.
        assert (await client.get(url(gw, "/metrics"))).status_code == 404


async def test_cors_preflight_and_simple_requests(tmp_path, stub):
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
            cors={
                "allow_origins": ["https://shop.example"],
                "allow_headers": ["authorization", "content-type"],
            },
        ),
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        r = await client.options(
            url(gw, "/orders"),
            headers={"origin": "https://shop.example", "access-control-request-method": "POST"},
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "https://shop.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        hits = len(stub.hits)
        assert hits == 0  # a preflight never reaches the upstream
        r = await client.get(url(gw, "/x"), headers={"origin": "https://shop.example"})
        assert r.headers["access-control-allow-origin"] == "https://shop.example"
        r = await client.get(url(gw, "/x"), headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await client.options(
            url(gw, "/orders"),
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert r.status_code == 403


async def test_unreachable_upstream_is_502_problem(tmp_path):
    dead = Stub("dead")  # never started: its port refuses connections
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"d": {"targets": [dead.address]}},
            [{"name": "d", "match": {"prefix": "/"}, "upstream": "d"}],
        ),
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/x"))
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["route"] == "d"


async def test_routes_allow_and_deny_client_addresses(tmp_path, stub):
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [
                {
                    "name": "internal",
                    "match": {"prefix": "/internal"},
                    "upstream": "a",
                    "allow_ips": ["10.0.0.0/8"],
                },
                {
                    "name": "local",
                    "match": {"prefix": "/local"},
                    "upstream": "a",
                    "allow_ips": "127.0.0.1",
                },
                {
                    "name": "denied",
                    "match": {"prefix": "/denied"},
                    "upstream": "a",
                    "allow_ips": ["127.0.0.0/8"],
                    "deny_ips": ["127.0.0.1"],
                },
                {"name": "open", "match": {"prefix": "/"}, "upstream": "a"},
            ],
            server={"port": 8080, "access_log": False, "trusted_proxies": ["127.0.0.2"]},
        ),
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/internal/x"))
        assert r.status_code == 403
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["route"] == "internal"
        assert (await client.get(url(gw, "/local/x"))).status_code == 200
        assert (await client.get(url(gw, "/denied/x"))).status_code == 403  # deny wins
        assert (await client.get(url(gw, "/open/x"))).status_code == 200
        assert len(stub.hits) == 2  # refused requests never reach the upstream
        # A client's own X-Forwarded-For is not believed: the peer is not a trusted proxy.
        forged = await client.get(url(gw, "/internal/x"), headers={"x-forwarded-for": "10.1.2.3"})
        assert forged.status_code == 403
    # Behind a trusted proxy, the client it names is the one judged.
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")) as proxy,
    ):
        headers = {"x-forwarded-for": "10.1.2.3"}
        assert (await proxy.get(url(gw, "/internal/x"), headers=headers)).status_code == 200
        assert (await proxy.get(url(gw, "/local/x"), headers=headers)).status_code == 403


async def test_a_mirrored_route_copies_requests_and_drops_the_copies_answers(
    tmp_path, stub, stub_b
):
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {
                "main": {"targets": [stub.address]},
                "shadow": {"targets": [stub_b.address]},
                "gone": {"targets": [f"127.0.0.1:{free_port()}"]},
            },
            [
                {
                    "name": "mirrored",
                    "match": {"prefix": "/m"},
                    "upstream": "main",
                    "mirror": {"upstream": "shadow"},
                },
                {
                    "name": "none",
                    "match": {"prefix": "/n"},
                    "upstream": "main",
                    "mirror": {"upstream": "shadow", "percent": 0},
                },
                {
                    "name": "broken",
                    "match": {"prefix": "/b"},
                    "upstream": "main",
                    "mirror": {"upstream": "gone"},
                },
            ],
        ),
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        # A client's own mark is not passed on: only copies carry it.
        forged = {"x-atoll-mirror": "true", "x_atoll_mirror": "true"}
        r = await client.post(url(gw, "/m/orders"), json={"n": 1}, headers=forged)
        assert r.status_code == 200
        assert r.json()["stub"] == "a"  # the client gets the main upstream's answer
        await wait_until(lambda: len(stub_b.hits) == 1, timeout=5, what="the copy")
        copy, original = stub_b.hits[0], stub.hits[0]
        assert (copy["method"], copy["path"], copy["body"]) == ("POST", "/m/orders", b'{"n":1}')
        assert copy["headers"]["x-atoll-mirror"] == "true"
        assert "x-atoll-mirror" not in original["headers"]
        assert copy["headers"]["x-request-id"] == original["headers"]["x-request-id"]
        for _ in range(5):
            assert (await client.get(url(gw, "/n/x"))).status_code == 200
        # A mirror that cannot be reached changes nothing for the client.
        stub_b.status = 500
        assert (await client.get(url(gw, "/b/x"))).status_code == 200
        assert (await client.get(url(gw, "/m/x"))).status_code == 200

        async def mirrored():
            text = (await client.get(admin_url(gw, "/metrics"))).text
            return {
                (sample.labels["route"], sample.labels["outcome"]): sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "atoll_gateway_mirrored"
                for sample in family.samples
                if sample.name.endswith("_total")
            }

        async def all_counted():
            return sum((await mirrored()).values()) == 3

        await wait_until(all_counted, timeout=5, what="the copies' outcomes")
        assert await mirrored() == {
            ("mirrored", "sent"): 1.0,
            ("mirrored", "failed"): 1.0,  # the shadow answered 500
            ("broken", "failed"): 1.0,
        }
    assert len(stub_b.hits) == 2  # none of the percent-0 route's requests
