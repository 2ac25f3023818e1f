import asyncio

import httpx
import pytest
from resilience_helpers import BoomError, fail, ok, settle

from atoll.resilience import (
    HTTP,
    BreakerOpenError,
    CallTimeoutError,
    Fallback,
    Hedge,
    UnacceptableResultError,
)


class Attempts:
    """Attempt i waits for gate i and then returns or raises what is set for it."""

    def __init__(self, n):
        self.gates = [asyncio.get_running_loop().create_future() for _ in range(n)]
        self.started = 0
        self.cancelled = []

    async def __call__(self):
        i = self.started
        self.started += 1
        try:
            return await self.gates[i]
        except asyncio.CancelledError:
            self.cancelled.append(i)
            raise


async def test_slow_call_is_hedged_and_the_first_success_wins(clock):
    hedge = Hedge(delay=0.1, clock=clock)
    attempts = Attempts(2)
    task = asyncio.create_task(hedge.call(attempts))
    await settle()
    assert attempts.started == 1
    await clock.advance(0.1)
    await settle()
    assert attempts.started == 2
    attempts.gates[1].set_result("hedge")
    assert await task == "hedge"
    assert attempts.cancelled == [0]  # the loser is cancelled
    assert hedge.hedges_total == 1


async def test_fast_call_is_not_hedged(clock):
    hedge = Hedge(delay=0.1, clock=clock)
    assert await hedge.call(ok, "quick") == "quick"
    assert hedge.hedges_total == 0


async def test_a_failure_starts_the_next_hedge_at_once(clock):
    hedge = Hedge(delay=10, max_hedges=2, clock=clock)
    attempts = Attempts(3)
    task = asyncio.create_task(hedge.call(attempts))
    await settle()
    attempts.gates[0].set_exception(BoomError())
    await settle()
    assert attempts.started == 2  # no waiting for the delay
    attempts.gates[1].set_result("second")
    assert await task == "second"


async def test_all_attempts_failing_raises_the_last_failure(clock):
    hedge = Hedge(delay=0.1, max_hedges=1, clock=clock)
    attempts = Attempts(2)
    task = asyncio.create_task(hedge.call(attempts))
    await settle()
    await clock.advance(0.1)
    await settle()
    attempts.gates[0].set_exception(BoomError("first"))
    await settle()
    assert not task.done()  # the hedge may still succeed
    attempts.gates[1].set_exception(BoomError("second"))
    with pytest.raises(BoomError, match="second"):
        await task


async def test_an_answer_that_is_not_a_failure_ends_the_race(clock):
    hedge = Hedge(delay=0.1, classifier=HTTP, clock=clock)
    attempts = Attempts(2)
    task = asyncio.create_task(hedge.call(attempts))
    await settle()
    response = httpx.Response(404, request=httpx.Request("GET", "http://x/"))
    attempts.gates[0].set_exception(
        httpx.HTTPStatusError("nf", request=response.request, response=response)
    )
    with pytest.raises(httpx.HTTPStatusError):
        await task
    assert attempts.started == 1


async def test_cancelling_a_hedged_call_cancels_every_attempt(clock):
    hedge = Hedge(delay=0.1, clock=clock)
    attempts = Attempts(2)
    task = asyncio.create_task(hedge.call(attempts))
    await settle()
    await clock.advance(0.1)
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(attempts.cancelled) == [0, 1]
    assert clock.pending_sleepers == 0


async def test_hedge_on_the_system_clock():
    hedge = Hedge(delay=0.01)
    calls = 0

    async def first_is_stuck():
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(10)
        return calls

    assert await asyncio.wait_for(hedge.call(first_is_stuck), 5) == 2


async def test_fallback_replaces_failures_and_refusals():
    fallback = Fallback(lambda exc: f"fallback for {type(exc).__name__}")
    assert await fallback.call(ok, "fine") == "fine"
    assert await fallback.call(fail) == "fallback for BoomError"
    refusal = BreakerOpenError("b", retry_after=1.0, retry_at=0.0)
    assert await fallback.call(fail, refusal) == "fallback for BreakerOpenError"
    assert await fallback.call(fail, CallTimeoutError("slow")) == "fallback for CallTimeoutError"
    assert fallback.fallbacks_total == 3


async def test_fallback_handler_may_be_async_and_sees_failed_results():
    async def handler(exc):
        assert isinstance(exc, UnacceptableResultError)
        return f"cached instead of {exc.result.status_code}"

    fallback = Fallback(handler, classifier=HTTP)

    async def unavailable():
        return httpx.Response(503, request=httpx.Request("GET", "http://x/"))

    assert await fallback.call(unavailable) == "cached instead of 503"


async def test_fallback_leaves_non_failures_and_cancellation_alone():
    fallback = Fallback(lambda exc: "replaced", classifier=HTTP)
    with pytest.raises(ValueError):
        await fallback.call(fail, ValueError("a bug"))
    task = asyncio.create_task(fallback.call(asyncio.sleep, 10))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_in_test_mode_hedges_start_only_on_failure(fast_clock):
    hedge = Hedge(delay=0.1, clock=fast_clock)
    calls = 0

    async def slow_then_fine():
        nonlocal calls
        calls += 1
        await fast_clock.sleep(5)  # slow in virtual time: no hedge races it
        return calls

    assert await hedge.call(slow_then_fine) == 1
    assert hedge.hedges_total == 0
    attempts = iter([BoomError(), "second"])

    async def fails_first():
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert await hedge.call(fails_first) == "second"
    assert hedge.hedges_total == 1
