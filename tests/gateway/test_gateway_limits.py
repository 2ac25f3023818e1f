"""Rate limits: local, shared through Redis (accurate under concurrency), degrading to local."""

import asyncio
import os
import shutil
import socket
import subprocess
import uuid

import httpx
import pytest
import structlog
from gateway_support import base_config, raw_request, running_gateway, url, write_config
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from atoll.determinism import SystemClock
from atoll.gateway import mint_token
from atoll.gateway._limits import ip_limit_key

REDIS_URL = os.environ.get("ATOLL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLOCK = SystemClock()


def limited_config(tmp_path, stub, rate_limit, **extra):
    return write_config(
        tmp_path / f"gw-{uuid.uuid4().hex[:6]}.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [
                {
                    "name": "limited",
                    "match": {"prefix": "/"},
                    "upstream": "a",
                    "rate_limit": rate_limit,
                },
            ],
            **extra,
        ),
    )


async def test_local_limit_answers_429_with_retry_after_and_ratelimit_headers(tmp_path, stub):
    config = limited_config(tmp_path, stub, {"rate": 1, "burst": 3, "per": "ip"})
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        responses = [await client.get(url(gw, "/x")) for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert [r.headers["ratelimit-remaining"] for r in responses] == ["2", "1", "0", "0"]
        assert all(r.headers["ratelimit-limit"] == "3" for r in responses)
        refused = responses[-1]
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["ratelimit-reset"]) >= 1
        assert len(stub.hits) == 3
        metrics = (await client.get(f"http://127.0.0.1:{gw.admin_port}/metrics")).text
        assert 'atoll_gateway_rate_limited_total{route="limited"} 1.0' in metrics


async def test_limits_are_per_client(tmp_path, stub):
    config = limited_config(
        tmp_path,
        stub,
        {"rate": 0.001, "burst": 2, "per": "client"},
        auth={
            "api_keys": {
                "keys": [
                    {"name": "k1", "key": "key-one-0123456789"},
                    {"name": "k2", "key": "key-two-0123456789"},
                ]
            }
        },
    )
    text = config.read_text().replace("rate_limit:", "auth: api_key\n  rate_limit:")
    config.write_text(text)
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        one = [
            (
                await client.get(url(gw, "/x"), headers={"x-api-key": "key-one-0123456789"})
            ).status_code
            for _ in range(3)
        ]
        two = [
            (
                await client.get(url(gw, "/x"), headers={"x-api-key": "key-two-0123456789"})
            ).status_code
            for _ in range(3)
        ]
        assert one == [200, 200, 429]
        assert two == [200, 200, 429]


@pytest.mark.redis
async def test_shared_limit_is_accurate_across_gateways_under_concurrency(tmp_path, stub):
    """Two gateway instances, 48 concurrent clients, one limit of 40/s with a burst of 10."""
    prefix = f"atoll-test-gw-{uuid.uuid4().hex[:10]}"
    rate, burst = 40.0, 10
    config = limited_config(
        tmp_path,
        stub,
        # A generous timeout: this test's one event loop runs both gateways and 48 clients.
        {"rate": rate, "burst": burst, "per": "route", "shared": True, "shared_timeout": 1.0},
        rate_limits={"store": REDIS_URL, "prefix": prefix},
    )
    async with running_gateway(config) as gw1, running_gateway(config) as gw2:
        limits = httpx.Limits(max_connections=48, max_keepalive_connections=48)
        async with httpx.AsyncClient(limits=limits) as client:
            granted = []
            refused = 0
            started = CLOCK.monotonic()
            stop_at = started + 2.0

            async def hammer(i):
                nonlocal refused
                target = gw1 if i % 2 else gw2
                while CLOCK.monotonic() < stop_at:
                    r = await client.get(url(target, "/x"))
                    if r.status_code == 200:
                        granted.append(CLOCK.monotonic())
                    else:
                        assert r.status_code == 429, r.text
                        refused += 1

            await asyncio.gather(*(hammer(i) for i in range(48)))
            elapsed = max(granted) - started
        assert gw1.gen.limits["limited"].degraded_total == 0
        assert gw2.gen.limits["limited"].degraded_total == 0
    # GCRA: at most burst + rate * elapsed (+1 for the permit at the boundary).
    ceiling = burst + rate * elapsed + 1
    assert len(granted) <= ceiling, (len(granted), ceiling)
    # Not far below it either. The margin is for this test's one event loop (two gateways,
    # 48 clients) falling behind on a loaded machine: a GCRA banks no permits beyond the
    # burst for moments nobody asked (0.9 failed once in a full suite run: 94 of 95.4).
    assert len(granted) >= 0.8 * (burst + rate * elapsed), (len(granted), elapsed)
    # The clients asked for well over the limit, so the limit decided what was granted.
    # (Not "more refused than granted": under load this test's one event loop sends
    # fewer requests: once in a full suite run, 189 asked for 101 granted.)
    assert len(granted) + refused > 1.2 * ceiling, (len(granted), refused, ceiling)
    client = Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    assert keys  # the limit lived in Redis
    await client.delete(*keys)
    await client.aclose()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def own_redis():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    for _ in range(200):
        try:
            await client.ping()
            break
        except (OSError, RedisConnectionError):
            await asyncio.sleep(0.05)
    await client.aclose()
    yield process, f"redis://127.0.0.1:{port}/0"
    if process.poll() is None:
        process.terminate()
        process.wait(10)


async def test_when_redis_fails_limits_fall_back_to_local(tmp_path, stub, own_redis):
    process, redis_url = own_redis
    config = limited_config(
        tmp_path,
        stub,
        {"rate": 0.001, "burst": 5, "per": "route", "shared": True, "degraded_rate": 0.001},
        rate_limits={"store": redis_url, "prefix": "fallback"},
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/x"))).status_code == 200  # through Redis
        limits = gw.gen.limits["limited"]
        assert limits.degraded_total == 0
        process.terminate()
        process.wait(10)
        statuses = [(await client.get(url(gw, "/x"))).status_code for _ in range(8)]
        # No request failed because Redis did: the local limit (burst 5) took over.
        assert statuses == [200] * 5 + [429] * 3
        assert limits.degraded_total == 8


def per_ip_config(tmp_path, stub, **server):
    return limited_config(
        tmp_path,
        stub,
        {"rate": 0.001, "burst": 2, "per": "ip"},
        server={"port": 8080, "access_log": True, "drain_timeout": 5, **server},
    )


async def statuses_for(gw, client, chains):
    """Each request's status and the client its access log line names."""
    out = []
    for chain in chains:
        with structlog.testing.capture_logs() as logs:
            r = await client.get(url(gw, "/x"), headers={"x-forwarded-for": chain})
        [line] = [entry for entry in logs if entry.get("event") == "request"]
        out.append((r.status_code, line["client"]))
    return out


async def test_clients_behind_a_trusted_proxy_get_their_own_buckets(tmp_path, stub):
    config = per_ip_config(tmp_path, stub, trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        one = await statuses_for(gw, client, ["203.0.113.1"] * 3)
        # Recursive: 10.1.2.3 is a trusted hop too; what the client wrote left of the
        # address the first trusted hop saw is not believed.
        two = await statuses_for(gw, client, ["6.6.6.6, 203.0.113.2, 10.1.2.3"] * 3)
        sent = stub.hits[-1]["headers"]["x-forwarded-for"]
        # Every hop trusted: the leftmost, as nginx; a hop that is not an address: the
        # trusted hop that wrote it.
        edges = await statuses_for(gw, client, ["10.0.0.7, 10.0.0.8", "junk, 10.9.9.9"])
    assert one == [(200, "203.0.113.1"), (200, "203.0.113.1"), (429, "203.0.113.1")]
    assert edges == [(200, "10.0.0.7"), (200, "10.9.9.9")]
    assert two == [(200, "203.0.113.2"), (200, "203.0.113.2"), (429, "203.0.113.2")]
    # The chain goes on, ending with the client the gateway settled on.
    assert sent == "6.6.6.6, 203.0.113.2, 10.1.2.3, 203.0.113.2"


async def test_without_trusted_proxies_forwarded_clients_share_the_peers_bucket(tmp_path, stub):
    config = per_ip_config(tmp_path, stub)
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        seen = await statuses_for(gw, client, ["203.0.113.1", "203.0.113.2", "203.0.113.3"])
    assert seen == [(200, "127.0.0.1"), (200, "127.0.0.1"), (429, "127.0.0.1")]


async def test_a_spoofed_chain_from_an_untrusted_peer_is_not_believed(tmp_path, stub):
    config = per_ip_config(tmp_path, stub, trusted_proxies=["10.0.0.0/8", "::1"])
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        seen = await statuses_for(gw, client, ["203.0.113.1", "10.0.0.1", "203.0.113.3"])
        sent = stub.hits[-1]["headers"]["x-forwarded-for"]
    assert seen == [(200, "127.0.0.1"), (200, "127.0.0.1"), (429, "127.0.0.1")]
    # As without the setting: the peer is appended to what the client sent.
    assert sent == "10.0.0.1, 127.0.0.1"


async def test_forwarded_entries_with_ports_name_their_address(tmp_path, stub):
    # Some proxies append the client's port too; it is not part of who the client is.
    config = per_ip_config(tmp_path, stub, trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        seen = await statuses_for(
            gw,
            client,
            [
                "203.0.113.4:5000, 10.1.2.3:443",
                "[2001:db8::7]:443",
                "[2001:db8::8]",
                "203.0.113.5:port",  # not an address: the trusted peer that wrote it
                "[2001:db8::9]x",
                "203.0.113.4:5001",  # the same client from another port: its bucket
                "203.0.113.4",
            ],
        )
    assert seen == [
        (200, "203.0.113.4"),
        (200, "2001:db8::7"),
        (200, "2001:db8::8"),
        (200, "127.0.0.1"),
        (200, "127.0.0.1"),
        (200, "203.0.113.4"),
        (429, "203.0.113.4"),
    ]


# --- found by a review -------------------------------------------------------------------


async def test_per_subject_a_token_does_not_share_an_api_keys_bucket(tmp_path, stub):
    """A token whose ``sub`` is an API key's name is another client."""
    secret = "a-development-secret-of-32-bytes!!"
    config = limited_config(
        tmp_path,
        stub,
        {"rate": 0.001, "burst": 2, "per": "subject"},
        auth={
            "jwt": {"algorithms": ["HS256"], "hs256_secret": secret},
            "api_keys": {"keys": [{"name": "partner-a", "key": "pk-0123456789abcdef"}]},
        },
    )
    config.write_text(
        config.read_text().replace("rate_limit:", "auth: [jwt, api_key]\n  rate_limit:")
    )
    token = mint_token(subject="partner-a", scopes=[], secret=secret.encode())
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        for _ in range(2):
            r = await client.get(url(gw, "/x"), headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        r = await client.get(url(gw, "/x"), headers={"x-api-key": "pk-0123456789abcdef"})
        assert r.status_code == 200, r.headers


async def test_per_ip_groups_an_ipv6_client_by_its_64(tmp_path, stub):
    """A host gets a /64 and may use a new address for every request."""
    config = limited_config(
        tmp_path,
        stub,
        {"rate": 0.001, "burst": 2, "per": "ip"},
        server={"trusted_proxies": ["127.0.0.1"]},
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        statuses = [
            (
                await client.get(url(gw, "/x"), headers={"x-forwarded-for": f"2001:db8::{i:x}"})
            ).status_code
            for i in range(1, 6)
        ]
        other_64 = await client.get(url(gw, "/x"), headers={"x-forwarded-for": "2001:db8:0:1::1"})
        mapped = await client.get(url(gw, "/x"), headers={"x-forwarded-for": "::ffff:192.0.2.7"})
        plain = await client.get(url(gw, "/x"), headers={"x-forwarded-for": "192.0.2.7"})
    assert statuses == [200, 200, 429, 429, 429], statuses
    assert other_64.status_code == 200
    # An IPv4-mapped address is that IPv4 client: one bucket for both spellings.
    assert (mapped.status_code, plain.status_code) == (200, 200)
    assert ip_limit_key("::ffff:192.0.2.7") == ip_limit_key("192.0.2.7")


async def test_a_redis_outage_logs_once_not_once_per_client(tmp_path, stub, caplog):
    config = limited_config(
        tmp_path,
        stub,
        {"rate": 100, "burst": 100, "per": "ip", "shared": True},
        rate_limits={"store": f"redis://127.0.0.1:{_free_port()}/0", "prefix": "flood"},
        server={"trusted_proxies": ["127.0.0.1"]},
    )
    with caplog.at_level("INFO"):
        async with running_gateway(config) as gw, httpx.AsyncClient() as client:
            for i in range(200):
                r = await client.get(url(gw, "/x"), headers={"x-forwarded-for": f"203.0.113.{i}"})
                assert r.status_code == 200
            assert gw.gen.limits["limited"].degraded_total == 200
    about_the_store = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING"
        and ("shared state unavailable" in r.getMessage() or "store failed" in r.getMessage())
    ]
    assert len(about_the_store) == 1, about_the_store


async def test_an_outage_and_its_end_are_logged_once_each(tmp_path, stub, own_redis, caplog):
    process, redis_url = own_redis
    config = limited_config(
        tmp_path,
        stub,
        {"rate": 1000, "burst": 1000, "per": "route", "shared": True},
        rate_limits={"store": redis_url, "prefix": "outage"},
    )
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with caplog.at_level("INFO"):
        async with running_gateway(config) as gw, httpx.AsyncClient() as client:
            limits = gw.gen.limits["limited"]
            assert (await client.get(url(gw, "/x"))).status_code == 200
            process.terminate()
            process.wait(10)
            for _ in range(5):
                assert (await client.get(url(gw, "/x"))).status_code == 200
            degraded = limits.degraded_total
            assert degraded >= 1
            restarted = subprocess.Popen(
                [
                    *(shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                await wait_until_redis(redis_url)
                await asyncio.sleep(1.2)  # past the store's retry interval
                for _ in range(20):
                    assert (await client.get(url(gw, "/x"))).status_code == 200
                # Back through Redis: at most the first call after the interval was local.
                assert limits.degraded_total <= degraded + 1
            finally:
                restarted.terminate()
                restarted.wait(10)
    messages = [r.getMessage() for r in caplog.records if r.name == "atoll.gateway"]
    assert sum("store failed" in m for m in messages) == 1, messages
    assert sum("limits are shared again" in m for m in messages) == 1, messages


async def wait_until_redis(redis_url):
    client = Redis.from_url(redis_url)
    try:
        for _ in range(200):
            try:
                await client.ping()
            except (OSError, RedisConnectionError):
                await asyncio.sleep(0.05)
            else:
                return
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_reload_that_changes_only_the_prefix_uses_the_new_prefix(tmp_path, stub):
    redis_url = REDIS_URL
    old, new = (f"atoll-test-{uuid.uuid4().hex[:8]}" for _ in range(2))
    limit = {"rate": 100, "burst": 100, "per": "route", "shared": True}
    config = limited_config(tmp_path, stub, limit, rate_limits={"store": redis_url, "prefix": old})
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/x"))).status_code == 200
        config.write_text(config.read_text().replace(old, new))
        assert await gw.reload()
        assert (await client.get(url(gw, "/x"))).status_code == 200
    redis = Redis.from_url(redis_url)
    try:
        under_new = [k async for k in redis.scan_iter(match=f"{new}:*")]
        under_old = [k async for k in redis.scan_iter(match=f"{old}:*")]
        assert under_new, f"still written under the old prefix: {under_old}"
    finally:
        for prefix in (old, new):
            keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
            if keys:
                await redis.delete(*keys)
        await redis.aclose()


def test_the_ratelimit_block_is_the_ratelimit_fields_on_the_wire():
    from atoll.gateway._gateway import _ratelimit_block, _ratelimit_headers  # noqa: PLC0415
    from atoll.resilience import Permit  # noqa: PLC0415

    for permit in (
        Permit(True, 0.0, 10, 9, 0.25, True),
        Permit(True, 0.0, 10, 0, 3.0001, True),
        Permit(False, 1.5, 10, None, None, False),  # what a limiter says without a TAT
    ):
        wire = b"".join(b"%b: %b\r\n" % pair for pair in _ratelimit_headers(permit))
        assert _ratelimit_block(permit) == wire


async def test_a_limited_cors_answer_carries_each_field_once(tmp_path, stub):
    config = limited_config(
        tmp_path,
        stub,
        {"rate": 100, "burst": 5, "per": "ip"},
        cors={"allow_origins": ["https://shop.example"]},
    )
    async with running_gateway(config) as gw:
        answer = await raw_request(
            gw.port,
            b"GET /x HTTP/1.1\r\nHost: t\r\nOrigin: https://shop.example\r\n"
            b"Connection: close\r\n\r\n",
        )
    head = answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    names = [line.split(b":", 1)[0] for line in head[1:]]
    assert head[0].startswith(b"http/1.1 200")
    for name in (
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
        b"access-control-allow-origin",
    ):
        assert names.count(name) == 1, (name, head)
    assert b"ratelimit-remaining: 4" in head
    assert b"access-control-allow-origin: https://shop.example" in head
