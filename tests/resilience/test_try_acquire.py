"""RateLimiter.try_acquire: a permit now or a refusal that says when, with what is left."""

import math

import pytest

from atoll.determinism import VirtualClock
from atoll.resilience import RateLimiter, SharedState


async def test_permits_count_down_and_come_back():
    clock = VirtualClock()
    limiter = RateLimiter("api", rate=2, burst=3, clock=clock)
    permits = [await limiter.try_acquire() for _ in range(4)]
    assert [p.granted for p in permits] == [True, True, True, False]
    assert [p.remaining for p in permits] == [2, 1, 0, 0]
    assert all(p.limit == 3 for p in permits)
    assert permits[0].reset == pytest.approx(0.5)
    assert permits[2].reset == pytest.approx(1.5)
    refused = permits[3]
    assert refused.wait == pytest.approx(0.5)
    assert refused.local
    assert limiter.rejected_total == 1
    await clock.advance(0.5)
    again = await limiter.try_acquire()
    assert again.granted
    assert again.remaining == 0
    await clock.advance(10)
    assert (await limiter.try_acquire()).remaining == 2


class _Store(SharedState):
    def __init__(self, fail=False):
        self.fail = fail

    async def sync_window(self, name, **kw):
        raise NotImplementedError

    async def open_circuit(self, name, **kw):
        raise NotImplementedError

    async def reserve_permit(self, name, *, now, interval, tolerance, max_wait):
        if self.fail:
            raise ConnectionError("down")
        return True, 0.0


async def test_a_store_without_take_permit_gives_no_remaining_and_a_dead_one_degrades():
    clock = VirtualClock()
    limiter = RateLimiter("api", rate=1, burst=2, clock=clock, shared=_Store())
    permit = await limiter.try_acquire()
    assert permit.granted
    assert permit.remaining is None
    assert permit.reset is None
    assert not permit.local
    down = RateLimiter("api2", rate=1, burst=2, clock=clock, shared=_Store(fail=True))
    permits = [await down.try_acquire() for _ in range(3)]
    assert [p.granted for p in permits] == [True, True, False]
    assert all(p.local for p in permits)
    assert down.degraded_total == 3
    assert not math.isnan(permits[0].reset)
