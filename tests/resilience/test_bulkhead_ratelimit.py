import asyncio

import pytest
from resilience_helpers import ok, settle

from atoll.resilience import (
    Bulkhead,
    BulkheadFullError,
    Deadline,
    InvalidPolicyError,
    RateLimitedError,
    RateLimiter,
    deadline_scope,
)


async def test_bulkhead_limits_concurrency_and_queues_in_order(clock):
    bulkhead = Bulkhead("db", max_concurrent=2, max_queue=2, clock=clock)
    gates = [asyncio.Event() for _ in range(4)]
    order = []

    async def work(i):
        order.append(("start", i))
        await gates[i].wait()
        return i

    tasks = [asyncio.create_task(bulkhead.call(work, i)) for i in range(4)]
    await settle()
    assert (bulkhead.active, bulkhead.queued) == (2, 2)
    with pytest.raises(BulkheadFullError, match="2 calls running and 2 waiting"):
        await bulkhead.call(ok)
    assert bulkhead.rejected_total == 1
    gates[1].set()
    await settle()
    assert order == [("start", 0), ("start", 1), ("start", 2)]  # first in, first served
    for gate in gates:
        gate.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3]
    assert (bulkhead.active, bulkhead.queued) == (0, 0)


async def test_bulkhead_without_queue_refuses_at_once(clock):
    bulkhead = Bulkhead("b", max_concurrent=1, clock=clock)
    gate = asyncio.Event()
    task = asyncio.create_task(bulkhead.call(gate.wait))
    await settle()
    with pytest.raises(BulkheadFullError):
        await bulkhead.call(ok)
    gate.set()
    await task


async def test_bulkhead_wait_is_bounded_by_max_wait_and_deadline(clock):
    bulkhead = Bulkhead("b", max_concurrent=1, max_queue=5, max_wait=2.0, clock=clock)
    gate = asyncio.Event()
    holder = asyncio.create_task(bulkhead.call(gate.wait))
    await settle()
    waiter = asyncio.create_task(bulkhead.call(ok))
    await settle()
    assert bulkhead.queued == 1
    await clock.advance(2.0)
    with pytest.raises(BulkheadFullError, match=r"within 2\.000 s"):
        await waiter
    assert bulkhead.queued == 0
    with deadline_scope(Deadline.after(0.5, clock=clock)):
        waiter = asyncio.create_task(bulkhead.call(ok))
        await settle()
    await clock.advance(0.5)
    with pytest.raises(BulkheadFullError, match=r"within 0\.500 s"):
        await waiter
    gate.set()
    await holder
    assert bulkhead.active == 0


async def test_cancelled_waiter_leaves_the_queue_and_slots_are_not_lost(clock):
    bulkhead = Bulkhead("b", max_concurrent=1, max_queue=5, clock=clock)
    gate = asyncio.Event()
    holder = asyncio.create_task(bulkhead.call(gate.wait))
    await settle()
    cancelled = asyncio.create_task(bulkhead.call(ok))
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert bulkhead.queued == 0
    gate.set()
    await holder
    assert await bulkhead.call(ok) == 1
    assert bulkhead.active == 0


async def test_waiter_cancelled_after_being_handed_a_slot_passes_it_on(clock):
    bulkhead = Bulkhead("b", max_concurrent=1, max_queue=5, clock=clock)
    async with bulkhead:
        first = asyncio.create_task(bulkhead.call(ok, "first"))
        second = asyncio.create_task(bulkhead.call(ok, "second"))
        await settle()
        assert bulkhead.queued == 2
    # Leaving the block handed the slot to `first`, which has not run yet: cancel it now.
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "second"
    assert (bulkhead.active, bulkhead.queued) == (0, 0)


async def test_bulkhead_as_context_manager(clock):
    bulkhead = Bulkhead("b", max_concurrent=1, clock=clock)
    async with bulkhead:
        assert bulkhead.active == 1
        with pytest.raises(BulkheadFullError):
            async with bulkhead:
                pass
    assert bulkhead.active == 0


async def test_rate_limiter_allows_bursts_then_refuses_saying_when(clock):
    limiter = RateLimiter("api", rate=10, burst=3, clock=clock)
    for _ in range(3):
        assert await limiter.call(ok) == 1
    with pytest.raises(RateLimitedError) as info:
        await limiter.call(ok)
    assert info.value.retry_after == pytest.approx(0.1)
    assert "rate limiter 'api'" in str(info.value)
    await clock.advance(0.1)
    assert await limiter.call(ok) == 1
    with pytest.raises(RateLimitedError):
        await limiter.call(ok)
    assert limiter.rejected_total == 2


async def test_rate_limiter_sustains_its_rate(fast_clock):
    limiter = RateLimiter("api", rate=50, burst=1, max_wait=1.0, clock=fast_clock)
    for _ in range(101):
        await limiter.call(ok)
    assert fast_clock.monotonic() == pytest.approx(2.0)  # 100 intervals of 20 ms


async def test_rate_limiter_waits_in_order_and_gives_back_cancelled_permits(clock):
    limiter = RateLimiter("api", rate=1, burst=1, max_wait=5, clock=clock)
    await limiter.call(ok)
    first = asyncio.create_task(limiter.call(ok, "first"))  # permit at t = 1
    second = asyncio.create_task(limiter.call(ok, "second"))  # permit at t = 2
    await settle()
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    await clock.advance(1)
    assert await first == "first"
    third = asyncio.create_task(limiter.call(ok, "third"))  # gets second's permit: t = 2
    await settle()
    await clock.advance(1)
    assert await third == "third"


async def test_rate_limiter_does_not_wait_past_the_deadline(clock):
    limiter = RateLimiter("api", rate=1, burst=1, max_wait=5, clock=clock)
    await limiter.call(ok)
    with deadline_scope(Deadline.after(0.5, clock=clock)), pytest.raises(RateLimitedError):
        await limiter.call(ok)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Bulkhead("b", max_concurrent=0), "max_concurrent"),
        (lambda: Bulkhead("b", max_concurrent=1, max_queue=-1), "max_queue"),
        (lambda: Bulkhead("b", max_concurrent=1, max_wait=-1), "max_wait"),
        (lambda: RateLimiter("r", rate=0), "rate"),
        (lambda: RateLimiter("r", rate=1, burst=0), "burst"),
        (lambda: RateLimiter("r", rate=1, max_wait=-2), "max_wait"),
        (lambda: RateLimiter("", rate=1), "name"),
    ],
)
def test_invalid_limits_are_refused(make, field):
    with pytest.raises(InvalidPolicyError) as info:
        make()
    assert info.value.field == field
