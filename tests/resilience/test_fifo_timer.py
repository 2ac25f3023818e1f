"""The shared FIFO timer behind Timeout on the system clock: asyncio.timeout's semantics."""

import asyncio

import pytest

from atoll.resilience import (
    CallTimeoutError,
    Deadline,
    DeadlineExceededError,
    Timeout,
    deadline_scope,
)


async def test_only_the_calls_that_overrun_are_cut_and_each_at_its_own_deadline():
    timeout = Timeout(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = {}

    async def call(name, delay, duration):
        await asyncio.sleep(delay)
        begun = loop.time()
        try:
            await timeout.call(asyncio.sleep, duration)
            results[name] = ("ok", loop.time() - begun)
        except CallTimeoutError:
            results[name] = ("timeout", loop.time() - begun)

    await asyncio.gather(
        call("quick", 0.0, 0.01),
        call("hangs-first", 0.0, 5),
        call("quick-later", 0.05, 0.01),
        call("hangs-later", 0.1, 5),
        call("just-in-time", 0.1, 0.15),
    )
    assert results["quick"][0] == results["quick-later"][0] == results["just-in-time"][0] == "ok"
    for name in ("hangs-first", "hangs-later"):
        outcome, took = results[name]
        assert outcome == "timeout"
        assert 0.19 <= took < 0.5, (name, took)  # cut at its own deadline, not the first one
    assert loop.time() - started < 1.0


async def test_outer_cancellation_is_not_turned_into_a_timeout():
    timeout = Timeout(5)
    task = asyncio.create_task(timeout.call(asyncio.sleep, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancellation_racing_the_timeout_stays_a_cancellation():
    timeout = Timeout(5)
    task = asyncio.create_task(timeout.call(asyncio.sleep, 10))
    await asyncio.sleep(0)  # the call is waiting inside the timeout
    task.cancel()  # someone cancels it...
    fifo = timeout._fifo
    fifo._queue[0].deadline = float("-inf")  # ...and, before it runs again, time is up
    fifo._fire()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_after_a_timeout_the_task_is_not_left_cancelling():
    timeout = Timeout(0.02)
    with pytest.raises(CallTimeoutError):
        await timeout.call(asyncio.sleep, 1)
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0.01)  # later awaits are not cancelled


async def test_a_call_that_swallows_the_cancellation_returns_its_value():
    timeout = Timeout(0.02)

    async def stubborn():
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return "kept"
        return "slept"

    assert await timeout.call(stubborn) == "kept"
    assert asyncio.current_task().cancelling() == 0


async def test_inner_timeout_does_not_disturb_an_outer_one():
    inner = Timeout(0.02)
    async with asyncio.timeout(5):
        with pytest.raises(CallTimeoutError):
            await inner.call(asyncio.sleep, 1)
        await asyncio.sleep(0.01)


async def test_a_shorter_propagated_deadline_is_honoured_on_the_system_clock():
    timeout = Timeout(5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with deadline_scope(Deadline.after(0.05)), pytest.raises(DeadlineExceededError):
        await timeout.call(asyncio.sleep, 1)
    assert loop.time() - started < 0.5


def test_one_policy_across_event_loops():
    timeout = Timeout(0.02)

    async def once():
        with pytest.raises(CallTimeoutError):
            await timeout.call(asyncio.sleep, 1)
        return await timeout.call(asyncio.sleep, 0, "fine")

    loop_a = asyncio.new_event_loop()
    loop_b = asyncio.new_event_loop()
    try:
        assert loop_a.run_until_complete(once()) == "fine"
        assert loop_b.run_until_complete(once()) == "fine"
    finally:
        loop_a.close()
        loop_b.close()
