import asyncio

import httpx
import pytest
from resilience_helpers import BoomError, fail, ok

from atoll.resilience import (
    HTTP,
    BreakerOpenError,
    BreakerState,
    BulkheadFullError,
    CircuitBreaker,
    Classifier,
    DeadlineExceededError,
    InvalidPolicyError,
    RateLimitedError,
)


async def outcomes(breaker, pattern):
    """Run calls per ``pattern``: 'S' success, 'F' failure. Return what was refused."""
    refused = 0
    for ch in pattern:
        try:
            await breaker.call(ok if ch == "S" else fail)
        except BoomError:
            pass
        except BreakerOpenError:
            refused += 1
    return refused


async def test_opens_on_failure_rate_once_minimum_calls_reached(clock):
    breaker = CircuitBreaker("b", window_size=10, minimum_calls=5, failure_rate=0.5, clock=clock)
    await outcomes(breaker, "FFFF")
    assert breaker.state is BreakerState.CLOSED  # 100 % failures, but only 4 calls
    await outcomes(breaker, "S")
    assert breaker.state is BreakerState.OPEN  # 4 of 5 failed


async def test_a_success_that_reaches_minimum_calls_can_open(clock):
    breaker = CircuitBreaker("b", window_size=10, minimum_calls=4, failure_rate=0.5, clock=clock)
    await outcomes(breaker, "FFS")
    assert breaker.state is BreakerState.CLOSED
    await outcomes(breaker, "S")  # 2 of 4 = 50 %
    assert breaker.state is BreakerState.OPEN


async def test_stays_closed_below_the_failure_rate(clock):
    breaker = CircuitBreaker("b", window_size=10, minimum_calls=4, failure_rate=0.5, clock=clock)
    await outcomes(breaker, "FSSSFSSSFS")
    assert breaker.state is BreakerState.CLOSED
    snap = breaker.snapshot()
    assert (snap.window_calls, snap.window_failures) == (10, 3)
    assert snap.failure_rate == pytest.approx(0.3)


async def test_count_window_forgets_the_oldest_calls(clock):
    breaker = CircuitBreaker("b", window_size=4, minimum_calls=4, failure_rate=0.5, clock=clock)
    await outcomes(breaker, "FSSS")  # 25 %
    await outcomes(breaker, "S")  # the F is evicted
    assert breaker.snapshot().window_failures == 0
    await outcomes(breaker, "F")  # S S S F: 25 %
    assert breaker.state is BreakerState.CLOSED
    await outcomes(breaker, "F")  # S S F F: 50 %
    assert breaker.state is BreakerState.OPEN


async def test_lean_path_counts_like_the_general_path(clock):
    """The inlined success path must keep the same window as the general one."""
    lean = CircuitBreaker("lean", window_size=7, minimum_calls=7, failure_rate=0.9, clock=clock)
    timed = CircuitBreaker(
        "timed",
        window_size=7,
        minimum_calls=7,
        failure_rate=0.9,
        slow_call_duration=5.0,
        clock=clock,
    )
    pattern = "SSFSSSSSSFFSSSSSSSSSSFSS"
    for breaker in (lean, timed):
        await outcomes(breaker, pattern)
        await outcomes(breaker, "SSS")
    a, b = lean.snapshot(), timed.snapshot()
    assert (a.window_calls, a.window_failures) == (b.window_calls, b.window_failures) == (7, 1)
    assert a.successes_total == b.successes_total
    assert a.failures_total == b.failures_total == 4


async def test_time_window_expires_old_outcomes(clock):
    breaker = CircuitBreaker(
        "b", window="time", window_size=10, minimum_calls=3, failure_rate=0.5, clock=clock
    )
    await outcomes(breaker, "FF")
    await clock.advance(11)
    await outcomes(breaker, "SSF")  # the two old failures are gone: 1 of 3
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().window_calls == 3
    await clock.advance(5)
    await outcomes(breaker, "F")  # 2 of 4
    assert breaker.state is BreakerState.OPEN


async def test_time_window_expires_bucket_by_bucket(clock):
    breaker = CircuitBreaker(
        "b", window="time", window_size=10, minimum_calls=100, failure_rate=1.0, clock=clock
    )
    for second in range(10):
        if second:
            await clock.advance(1)
        await outcomes(breaker, "F")  # one failure at t = 0, 1, ..., 9
    assert breaker.snapshot().window_calls == 10
    await clock.advance(0.5)  # t = 9.5: still the same ten seconds
    assert breaker.snapshot().window_calls == 10
    await clock.advance(0.5)  # t = 10: the failure of t = 0 is 10 s old
    assert breaker.snapshot().window_calls == 9
    await clock.advance(5)  # t = 15: those of t = 6 to 9 remain
    assert breaker.snapshot().window_calls == 4


async def test_opens_on_slow_call_rate(fast_clock):
    breaker = CircuitBreaker(
        "b",
        minimum_calls=2,
        window_size=10,
        slow_call_duration=1.0,
        slow_call_rate=0.5,
        clock=fast_clock,
    )

    async def slow():
        await fast_clock.sleep(2.0)
        return "late"

    assert await breaker.call(ok) == 1
    assert await breaker.call(slow) == "late"  # slow calls still return their result
    assert breaker.state is BreakerState.OPEN
    snap = breaker.snapshot()
    assert snap.slow_successes_total == 1
    assert snap.successes_total == 1


async def test_a_quick_success_that_reaches_minimum_calls_can_open_on_slow_calls(fast_clock):
    """Found by the model test: the inlined success path must weigh slow calls too."""
    breaker = CircuitBreaker(
        "b",
        window_size=2,
        minimum_calls=2,
        slow_call_duration=1.0,
        slow_call_rate=0.5,
        failure_rate=1.0,
        clock=fast_clock,
    )
    await breaker.call(fast_clock.sleep, 1.0)  # slow, but only 1 call so far
    assert breaker.state is BreakerState.CLOSED
    await breaker.call(ok)  # 1 of 2 calls slow: 50 %
    assert breaker.state is BreakerState.OPEN


async def test_open_breaker_fails_fast_naming_itself_and_when(clock):
    breaker = CircuitBreaker("payments", window_size=2, minimum_calls=2, wait=12.5, clock=clock)
    await outcomes(breaker, "FF")
    called = False

    async def op():
        nonlocal called
        called = True

    await clock.advance(2.5)
    with pytest.raises(BreakerOpenError) as info:
        await breaker.call(op)
    assert not called
    err = info.value
    assert err.breaker == "payments"
    assert err.retry_after == pytest.approx(10.0)
    assert err.retry_at == pytest.approx(clock.time() + 10.0)
    assert "'payments' is open" in str(err)
    assert "in 10.000 s" in str(err)
    assert breaker.snapshot().rejected_total == 1


async def test_half_open_needs_the_success_threshold(clock):
    breaker = CircuitBreaker(
        "b",
        window_size=2,
        minimum_calls=2,
        wait=10,
        half_open_calls=3,
        half_open_successes=2,
        clock=clock,
    )
    await outcomes(breaker, "FF")
    await clock.advance(10)
    await outcomes(breaker, "S")
    assert breaker.state is BreakerState.HALF_OPEN  # one success is not enough (pybreaker #96)
    await outcomes(breaker, "S")
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().window_calls == 0  # a fresh window


async def test_half_open_tolerates_failures_until_success_is_impossible(clock):
    breaker = CircuitBreaker(
        "b",
        window_size=2,
        minimum_calls=2,
        wait=10,
        half_open_calls=3,
        half_open_successes=2,
        clock=clock,
    )
    await outcomes(breaker, "FF")
    await clock.advance(10)
    await outcomes(breaker, "F")
    assert breaker.state is BreakerState.HALF_OPEN  # 2 successes are still possible
    await outcomes(breaker, "F")
    assert breaker.state is BreakerState.OPEN


async def test_half_open_admits_only_the_permitted_trial_calls(clock):
    breaker = CircuitBreaker(
        "b", window_size=2, minimum_calls=2, wait=10, half_open_calls=2, clock=clock
    )
    await outcomes(breaker, "FF")
    await clock.advance(10)
    release = asyncio.Event()

    async def probe():
        await release.wait()
        return "ok"

    first = asyncio.create_task(breaker.call(probe))
    second = asyncio.create_task(breaker.call(probe))
    await asyncio.sleep(0)
    with pytest.raises(BreakerOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_at is None
    assert "trial calls are in flight" in str(info.value)
    release.set()
    assert await first == await second == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_cancelled_trial_call_gives_its_permit_back(clock):
    breaker = CircuitBreaker(
        "b", window_size=2, minimum_calls=2, wait=1, half_open_calls=1, clock=clock
    )
    await outcomes(breaker, "FF")
    await clock.advance(1)
    task = asyncio.create_task(breaker.call(asyncio.Event().wait))
    await asyncio.sleep(0)
    with pytest.raises(BreakerOpenError):
        await breaker.call(ok)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await breaker.call(ok) == 1  # the permit came back
    assert breaker.state is BreakerState.CLOSED


async def test_wait_grows_after_failed_recoveries_and_resets_on_close(clock):
    breaker = CircuitBreaker(
        "b",
        window_size=2,
        minimum_calls=2,
        wait=10,
        wait_multiplier=2,
        max_wait=30,
        half_open_calls=1,
        clock=clock,
    )
    await outcomes(breaker, "FF")
    waits = []
    for _ in range(3):
        with pytest.raises(BreakerOpenError) as info:
            await breaker.call(ok)
        waits.append(info.value.retry_after)
        await clock.advance(info.value.retry_after)
        await outcomes(breaker, "F")  # the trial fails: open again
    assert waits == [10, 20, 30]
    with pytest.raises(BreakerOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_after == 30  # capped
    await clock.advance(30)
    await outcomes(breaker, "S")
    assert breaker.state is BreakerState.CLOSED
    await outcomes(breaker, "FF")
    with pytest.raises(BreakerOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_after == 10


async def test_calls_started_in_an_earlier_state_do_not_count(clock):
    breaker = CircuitBreaker(
        "b", window_size=2, minimum_calls=2, wait=5, half_open_calls=1, clock=clock
    )
    release = asyncio.Event()

    async def slow_failure():
        await release.wait()
        raise BoomError

    straggler = asyncio.create_task(breaker.call(slow_failure))
    await asyncio.sleep(0)
    await outcomes(breaker, "FF")
    assert breaker.state is BreakerState.OPEN
    await clock.advance(5)
    probe_release = asyncio.Event()

    async def probe():
        await probe_release.wait()
        return "ok"

    probe_task = asyncio.create_task(breaker.call(probe))
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(BoomError):
        await straggler  # started while closed: not a failed trial
    assert breaker.state is BreakerState.HALF_OPEN
    probe_release.set()
    assert await probe_task == "ok"
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().failures_total == 3  # still counted in the totals


async def test_classifier_by_type_and_predicate(clock):
    classifier = Classifier(
        "io",
        failure_types=(OSError,),
        ignore_types=(KeyError,),
        exception_predicate=lambda exc: not isinstance(exc, FileNotFoundError),
    )
    breaker = CircuitBreaker(
        "b", window_size=2, minimum_calls=2, failure_rate=1.0, classifier=classifier, clock=clock
    )
    for exc in (ValueError("mine"), FileNotFoundError(), KeyError("x")):
        with pytest.raises(type(exc)):
            await breaker.call(fail, exc)
    snap = breaker.snapshot()
    assert (snap.successes_total, snap.failures_total, snap.ignored_total) == (2, 0, 1)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(fail, ConnectionError())
    assert breaker.state is BreakerState.OPEN


async def test_http_classifier_503_counts_404_does_not(clock):
    breaker = CircuitBreaker("b", window_size=4, minimum_calls=2, classifier=HTTP, clock=clock)
    request = httpx.Request("GET", "http://inventory/items")

    async def respond(status):
        return httpx.Response(status, request=request)

    assert (await breaker.call(respond, 404)).status_code == 404
    assert (await breaker.call(respond, 404)).status_code == 404
    assert breaker.state is BreakerState.CLOSED
    snap = breaker.snapshot()
    assert (snap.successes_total, snap.failures_total) == (2, 0)

    async def raising(status):
        (await respond(status)).raise_for_status()

    with pytest.raises(httpx.HTTPStatusError):
        await breaker.call(raising, 404)
    assert breaker.snapshot().failures_total == 0
    assert (await breaker.call(respond, 503)).status_code == 503  # returned, but a failure
    with pytest.raises(httpx.HTTPStatusError):
        await breaker.call(raising, 503)
    assert breaker.snapshot().failures_total == 2
    assert breaker.state is BreakerState.OPEN


async def test_local_refusals_and_passed_deadlines_are_ignored(clock):
    breaker = CircuitBreaker("b", window_size=2, minimum_calls=2, clock=clock)
    for exc in (
        BulkheadFullError("bh", "full"),
        RateLimitedError("rl", 1.0),
        DeadlineExceededError("late"),
    ):
        with pytest.raises(type(exc)):
            await breaker.call(fail, exc)
    snap = breaker.snapshot()
    assert snap.ignored_total == 3
    assert snap.window_calls == 0


async def test_state_change_events_in_order(clock):
    breaker = CircuitBreaker(
        "b", window_size=2, minimum_calls=2, wait=1, half_open_calls=1, clock=clock
    )
    events = []
    breaker.add_listener(events.append)

    def broken(change):
        raise RuntimeError("listener bug")

    breaker.add_listener(broken)  # must not fail the calls
    await outcomes(breaker, "FF")
    await clock.advance(1)
    await outcomes(breaker, "S")
    assert [(e.previous.value, e.current.value) for e in events] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert "failure rate 100.0%" in events[0].reason
    assert events[0].breaker == "b"
    assert events[0].at == clock.time() - 1
    assert breaker.snapshot().transitions_total == 3


async def test_as_context_manager_and_decorator(clock):
    breaker = CircuitBreaker("b", window_size=2, minimum_calls=2, failure_rate=1.0, clock=clock)

    @breaker
    async def double(x: int) -> int:
        return 2 * x

    assert await double(4) == 8
    assert double.__name__ == "double"
    assert asyncio.iscoroutinefunction(double)
    with pytest.raises(BoomError):
        async with breaker:
            raise BoomError
    with pytest.raises(BoomError):
        async with breaker:
            raise BoomError
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(BreakerOpenError):
        async with breaker:
            pytest.fail("the block must not run")
    with pytest.raises(BreakerOpenError):
        await double(1)


async def test_reset_closes_and_forgets(clock):
    breaker = CircuitBreaker("b", window_size=2, minimum_calls=2, clock=clock)
    await outcomes(breaker, "FF")
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().window_calls == 0
    assert await breaker.call(ok) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": 0}, "failure_rate"),
        ({"slow_call_rate": -0.1}, "slow_call_rate"),
        ({"wait": -1}, "wait"),
        ({"slow_call_duration": -2}, "slow_call_duration"),
        ({"window": "sliding"}, "window"),
        ({"window_size": 0}, "window_size"),
        ({"window_size": 2.5}, "window_size"),
        ({"minimum_calls": 200}, "minimum_calls"),
        ({"half_open_calls": 2, "half_open_successes": 3}, "half_open_successes"),
        ({"wait_multiplier": 0.5}, "wait_multiplier"),
        ({"wait": 10, "max_wait": 5}, "max_wait"),
        ({"minimum_calls": True}, "minimum_calls"),
        ({"wait": float("nan")}, "wait"),
        ({"shared": object(), "window": "time"}, "shared"),
        ({"sync_interval": 0}, "sync_interval"),
        ({"shared_timeout": -1}, "shared_timeout"),
    ],
)
def test_invalid_configuration_is_refused(kwargs, field):
    with pytest.raises(InvalidPolicyError) as info:
        CircuitBreaker("b", **kwargs)
    assert info.value.field == field


async def test_one_breaker_as_context_manager_in_overlapping_tasks(clock):
    """Each task's ``async with`` exits the guard it entered, whatever the interleaving."""
    breaker = CircuitBreaker("b", window_size=10, minimum_calls=10, clock=clock)
    first_in, second_in, release_first = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first():
        async with breaker:
            first_in.set()
            await release_first.wait()
            raise BoomError

    async def second():
        await first_in.wait()
        async with breaker, breaker:  # nested in one task too
            second_in.set()

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await second_in.wait()
    await asyncio.sleep(0)
    release_first.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], BoomError)
    assert results[1] is None
    snap = breaker.snapshot()
    assert (snap.successes_total, snap.failures_total) == (2, 1)
