"""Per-upstream timeouts, retries (idempotent only), breakers and deadline propagation."""

import httpx
from gateway_support import base_config, running_gateway, url, write_config

from atoll.determinism import SystemClock

CLOCK = SystemClock()


def config_with(tmp_path, stub, policy, **route):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address], "policy": policy, "passive": {"failures": 1000}}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a", **route}],
        ),
    )


async def test_retries_only_idempotent_requests(tmp_path, stub):
    config = config_with(
        tmp_path, stub, {"retry": {"max_attempts": 3, "base_delay": 0, "max_delay": 0}}
    )
    stub.status = 503
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/x"))
        assert r.status_code == 503
        assert len(stub.hits) == 3
        r = await client.post(url(gw, "/x"), json={"pay": 1})
        assert r.status_code == 503
        assert len(stub.hits) == 4
        r = await client.post(url(gw, "/x"), json={"pay": 1}, headers={"idempotency-key": "k1"})
        assert len(stub.hits) == 7  # with an idempotency key it may be retried
        r = await client.put(url(gw, "/x"), json={"v": 1})
        assert len(stub.hits) == 10
        stub.status = 404
        await client.get(url(gw, "/x"))
        assert len(stub.hits) == 11  # a 404 is an answer, not a failure


async def test_breaker_opens_on_5xx_and_refuses_with_503(tmp_path, stub):
    config = config_with(
        tmp_path,
        stub,
        {"breaker": {"window_size": 4, "minimum_calls": 4, "failure_rate": 0.5, "wait": 30}},
    )
    stub.status = 500
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        for _ in range(4):
            assert (await client.get(url(gw, "/x"))).status_code == 500
        r = await client.get(url(gw, "/x"))
        assert r.status_code == 503
        assert "circuit breaker is open" in r.json()["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert len(stub.hits) == 4
        breakers = (await client.get(f"http://127.0.0.1:{gw.admin_port}/breakers")).json()[
            "breakers"
        ]
        assert breakers[0]["name"] == "a"
        assert breakers[0]["state"] == "open"
        metrics = (await client.get(f"http://127.0.0.1:{gw.admin_port}/metrics")).text
        assert 'atoll_breaker_state{breaker="a",state="open"} 1.0' in metrics


async def test_breaker_counts_timeouts(tmp_path, stub):
    config = config_with(
        tmp_path,
        stub,
        {"attempt_timeout": 0.1, "breaker": {"window_size": 2, "minimum_calls": 2, "wait": 30}},
    )
    stub.delay = 0.5
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        started = CLOCK.monotonic()
        assert (await client.get(url(gw, "/x"))).status_code == 504
        assert CLOCK.monotonic() - started < 0.45
        assert (await client.get(url(gw, "/x"))).status_code == 504
        assert (await client.get(url(gw, "/x"))).status_code == 503


async def test_deadline_is_propagated_and_narrowed(tmp_path, stub):
    config = config_with(tmp_path, stub, {"timeout": 5}, timeout=2)
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        await client.get(url(gw, "/x"))
        sent = int(stub.hits[-1]["headers"]["x-atoll-deadline"])
        assert 1500 < sent <= 2000
        await client.get(url(gw, "/x"), headers={"x-atoll-deadline": "300"})
        sent = int(stub.hits[-1]["headers"]["x-atoll-deadline"])
        assert 0 < sent <= 300
        hits = len(stub.hits)
        r = await client.get(url(gw, "/x"), headers={"x-atoll-deadline": "0"})
        assert r.status_code == 504
        assert len(stub.hits) == hits
        await client.get(url(gw, "/x"), headers={"x-atoll-deadline": "junk"})
        assert 1500 < int(stub.hits[-1]["headers"]["x-atoll-deadline"]) <= 2000
        stub.delay = 0.6
        r = await client.get(url(gw, "/x"), headers={"x-atoll-deadline": "200"})
        assert r.status_code == 504
