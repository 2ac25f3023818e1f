"""Shared breaker windows and rate limits through real Redis, and what happens without it.

The shared server (127.0.0.1:6379 or ATOLL_TEST_REDIS_URL) is only read and written under
a unique key prefix. Tests that make Redis go away start their own redis-server on a free
port, or put a black-hole TCP proxy in front of it; they never touch the shared server.
"""

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from resilience_helpers import BoomError, fail, ok, wait_until

from atoll.determinism import SystemClock, VirtualClock
from atoll.resilience import (
    BreakerOpenError,
    BreakerState,
    CircuitBreaker,
    RateLimitedError,
    RateLimiter,
)
from atoll.resilience.redis import RedisSharedState
from support import free_port

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("ATOLL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def prefix():
    name = f"atoll-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def stores(prefix):
    """Two stores with their own connections: two instances of one service."""
    # The tests' VirtualClock drives the limits, as in a simulation.
    made = [
        RedisSharedState.from_url(REDIS_URL, prefix=prefix, server_time=False) for _ in range(2)
    ]
    yield made
    for store in made:
        await store.aclose()


async def synced(*breakers):
    """Wait until no breaker has an exchange with the store in flight."""
    await wait_until(
        lambda: all(b._shared._task is None and b._shared._open_task is None for b in breakers)
    )


def shared_breaker(store, clock, **kwargs):
    options = {
        "window": "time",
        "window_size": 10,
        "minimum_calls": 6,
        "failure_rate": 0.5,
        "sync_interval": 0.25,
        "shared_timeout": 0.5,
        "clock": clock,
    }
    options.update(kwargs)
    return CircuitBreaker("payments", shared=store, **options)


async def record(breaker, pattern):
    for ch in pattern:
        with contextlib.suppress(BoomError, BreakerOpenError):
            await breaker.call(ok if ch == "S" else fail)
        await synced(breaker)


async def test_instances_decide_on_their_combined_window(stores):
    clock = VirtualClock(start=time.time())
    a, b = (shared_breaker(store, clock) for store in stores)
    await record(a, "FFF")
    await record(b, "FFF")
    # Neither has the 6 calls it needs on its own; what each has sent so far is shared.
    assert a.state is b.state is BreakerState.CLOSED
    await clock.advance(0.3)
    await record(a, "S")  # A sends its last failures and sees B's first
    await clock.advance(0.3)
    await record(b, "S")  # B sends the rest: 6 failures of 8 calls in the shared window
    assert b.state is BreakerState.OPEN
    assert b.snapshot().sharing == "shared"
    assert b._window.calls == 4  # its own window alone (3 of 4 failed) is under minimum_calls
    await a.aclose()
    await b.aclose()


async def test_an_open_breaker_is_adopted_by_the_other_instances(stores):
    clock = VirtualClock(start=time.time())
    a = shared_breaker(stores[0], clock)
    b = shared_breaker(stores[1], clock, minimum_calls=2)
    await record(a, "SS")  # A is healthy
    await record(b, "FF")  # B opens and says so in Redis
    assert b.state is BreakerState.OPEN
    await synced(a, b)
    changes = []
    a.add_listener(changes.append)
    await clock.advance(0.3)
    await record(a, "S")  # A's next exchange with Redis brings the news
    assert a.state is BreakerState.OPEN
    assert changes[0].reason == "opened by another instance"
    with pytest.raises(BreakerOpenError) as on_a:
        await a.call(ok)
    with pytest.raises(BreakerOpenError) as on_b:
        await b.call(ok)
    assert on_a.value.retry_at == pytest.approx(on_b.value.retry_at, abs=0.002)
    await a.aclose()
    await b.aclose()


async def test_an_opening_starts_a_fresh_shared_window(stores):
    clock = VirtualClock(start=time.time())
    a = shared_breaker(stores[0], clock, wait=5, half_open_calls=1, minimum_calls=2)
    await record(a, "FF")
    await synced(a)
    assert a.state is BreakerState.OPEN
    await clock.advance(5)
    await record(a, "S")  # the trial call closes it
    assert a.state is BreakerState.CLOSED
    await clock.advance(0.3)
    await record(a, "S")
    assert a.state is BreakerState.CLOSED  # the old failures did not come back from Redis
    assert a.snapshot().window_failures == 0
    await a.aclose()


async def test_instances_share_one_rate_limit(stores):
    clock = VirtualClock(start=time.time())
    limiters = [
        RateLimiter("api", rate=5, burst=5, shared=store, shared_timeout=0.5, clock=clock)
        for store in stores
    ]
    for i in range(5):
        assert await limiters[i % 2].call(ok, i) == i
    with pytest.raises(RateLimitedError) as info:
        await limiters[1].call(ok)
    assert info.value.retry_after == pytest.approx(0.2, abs=0.01)
    await clock.advance(0.2)
    assert await limiters[0].call(ok, "again") == "again"
    with pytest.raises(RateLimitedError):
        await limiters[1].call(ok)
    assert sum(limiter.degraded_total for limiter in limiters) == 0


class OwnRedis:
    """A redis-server of this test's own, which it can stop and start again."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    async def start(self):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await self._wait_ready()
        except BaseException:
            self.stop()
            raise

    async def _wait_ready(self):
        client = Redis.from_url(self.url)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        try:
            while True:
                try:
                    await client.ping()
                except (OSError, RedisConnectionError):
                    if loop.time() > end:
                        raise
                    await asyncio.sleep(0.05)
                else:
                    return
        finally:
            await client.aclose()

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
async def own_redis():
    server = OwnRedis()
    await server.start()
    try:
        yield server
    finally:
        server.stop()


async def timed(coro):
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await coro
    return result, loop.time() - started


async def test_redis_going_away_never_fails_a_call(own_redis):
    store = RedisSharedState.from_url(own_redis.url, prefix="down")
    clock = SystemClock()
    breaker = CircuitBreaker(
        "payments",
        window="time",
        window_size=10,
        minimum_calls=5,
        failure_rate=0.5,
        sync_interval=0.02,
        shared_timeout=0.05,
        shared=store,
        clock=clock,
    )
    limiter = RateLimiter(
        "api", rate=10_000, burst=10_000, shared=store, shared_timeout=0.05, clock=clock
    )
    await breaker.call(ok)
    await wait_until(lambda: breaker.snapshot().sharing == "shared")
    assert await limiter.call(ok, "shared") == "shared"
    assert limiter.degraded_total == 0

    own_redis.stop()

    slowest = 0.0
    for i in range(100):
        result, took = await timed(breaker.call(ok, i))
        assert result == i
        _, took_limiter = await timed(limiter.call(ok))
        slowest = max(slowest, took, took_limiter)
    # A call never waits for the store longer than its short timeout, and a dead store is
    # left alone for a second after failing, instead of costing every call a timeout.
    assert slowest < 0.5
    assert limiter.degraded_total >= 99
    await wait_until(lambda: breaker.snapshot().sharing == "degraded", timeout=3)
    # Local decisions go on: failures still open the breaker (on a fresh window, as the
    # hundred successes above would otherwise outweigh them).
    breaker.reset()
    for _ in range(5):
        with contextlib.suppress(BoomError):
            await breaker.call(fail)
    assert breaker.state is BreakerState.OPEN
    breaker.reset()

    await own_redis.start()  # Redis comes back on the same port
    await asyncio.sleep(1.1)  # the link's retry interval

    async def shared_again():
        await breaker.call(ok)
        return breaker.snapshot().sharing == "shared"

    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not await shared_again():
        assert loop.time() < end, "sharing did not resume"
        await asyncio.sleep(0.05)
    await limiter.call(ok)
    degraded = limiter.degraded_total
    await limiter.call(ok)
    assert limiter.degraded_total == degraded  # decided in Redis again
    await breaker.aclose()
    await store.aclose()


class BlackHoleProxy:
    """Accepts TCP connections and never answers: a Redis that has become unbearably slow."""

    def __init__(self):
        self.server = None
        self.connections = []

    async def start(self):
        async def swallow(reader, writer):
            self.connections.append(writer)
            with contextlib.suppress(Exception):
                await reader.read()  # hold the connection, answer nothing

        self.server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def stop(self):
        for writer in self.connections:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


async def test_slow_redis_costs_at_most_the_short_timeout():
    proxy = BlackHoleProxy()
    url = await proxy.start()
    store = RedisSharedState.from_url(url, prefix="slow", socket_timeout=5.0)
    clock = SystemClock()
    limiter = RateLimiter(
        "api", rate=1000, burst=1000, shared=store, shared_timeout=0.05, clock=clock
    )
    breaker = CircuitBreaker(
        "payments",
        window="time",
        window_size=10,
        sync_interval=0.01,
        shared_timeout=0.05,
        shared=store,
        clock=clock,
    )
    try:
        result, took = await timed(limiter.call(ok, "local"))
        assert result == "local"
        assert 0.04 <= took < 0.5  # waited for the store's short timeout, then decided locally
        assert limiter.degraded_total == 1
        _, took = await timed(limiter.call(ok))
        assert took < 0.02  # the slow store is now left alone
        for _ in range(20):
            _, took = await timed(breaker.call(ok))
            assert took < 0.02  # a breaker never waits for the store: it syncs in the background
        await wait_until(lambda: breaker._shared._link.errors >= 1)
        assert breaker.snapshot().sharing == "degraded"
    finally:
        await breaker.aclose()
        await store.aclose()
        await proxy.stop()


async def test_instances_with_skewed_clocks_share_one_limit_on_the_servers_clock(prefix):
    """Two gateways' hosts, one 30 s ahead: on their own clocks the one ahead finds the
    limit's arrival time in its past and is granted a fresh burst; on Redis's, not."""
    now = time.time()
    outcomes = {}
    for server_time in (False, True):
        stores = [
            RedisSharedState.from_url(
                REDIS_URL, prefix=f"{prefix}-{server_time}", server_time=server_time
            )
            for _ in range(2)
        ]
        try:
            on_time = RateLimiter(
                "api", rate=1, burst=3, shared=stores[0], clock=VirtualClock(start=now)
            )
            ahead = RateLimiter(
                "api", rate=1, burst=3, shared=stores[1], clock=VirtualClock(start=now + 30)
            )
            granted = [(await on_time.try_acquire()).granted for _ in range(3)]
            assert granted == [True, True, True]
            outcomes[server_time] = (await ahead.try_acquire()).granted
        finally:
            for store in stores:
                await store.aclose()
    assert outcomes == {False: True, True: False}
