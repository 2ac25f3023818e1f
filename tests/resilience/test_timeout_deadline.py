import asyncio
from datetime import UTC, datetime

import pytest
from resilience_helpers import settle

from atoll.determinism import SystemClock, VirtualClock
from atoll.messages import Envelope
from atoll.resilience import (
    DEADLINE_HEADER,
    CallTimeoutError,
    Deadline,
    DeadlineExceededError,
    InvalidPolicyError,
    Timeout,
    current_deadline,
    deadline_header,
    deadline_scope,
)


async def test_virtual_timeout_fires_when_the_clock_passes_it(clock):
    timeout = Timeout(1.0, clock=clock)

    async def slow():
        await clock.sleep(5)
        return "late"

    task = asyncio.create_task(timeout.call(slow))
    await settle()
    await clock.advance(0.9)
    assert not task.done()
    await clock.advance(0.1)
    with pytest.raises(CallTimeoutError, match=r"within 1\.000 s") as info:
        await task
    assert isinstance(info.value, TimeoutError)
    assert clock.pending_sleepers == 0  # the slow call was cancelled, not abandoned


async def test_system_clock_timeout_cancels_promptly():
    timeout = Timeout(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(CallTimeoutError):
        await timeout.call(asyncio.sleep, 10)
    assert loop.time() - started < 1.0


async def test_timeout_narrows_the_current_deadline(clock):
    seen = []

    async def look():
        seen.append(current_deadline().remaining())

    assert current_deadline() is None
    await Timeout(2.0, clock=clock).call(look)
    with deadline_scope(Deadline.after(0.5, clock=clock)):
        await Timeout(2.0, clock=clock).call(look)
    assert seen == [2.0, 0.5]
    assert current_deadline() is None


async def test_scopes_never_extend_a_deadline(clock):
    with deadline_scope(Deadline.after(1.0, clock=clock)):
        with deadline_scope(Deadline.after(5.0, clock=clock)) as inner:
            assert inner.remaining() == 1.0
        with deadline_scope(None) as same:
            assert same.remaining() == 1.0


async def test_passed_deadline_fails_fast_without_calling(clock):
    called = False

    async def op():
        nonlocal called
        called = True

    with deadline_scope(Deadline.after(1.0, clock=clock)):
        await clock.advance(1.0)
        with pytest.raises(DeadlineExceededError, match="was not made"):
            await Timeout(10, clock=clock).call(op)
    assert not called


async def test_deadline_shorter_than_timeout_raises_deadline_exceeded(clock):
    async def slow():
        await clock.sleep(5)

    with deadline_scope(Deadline.after(0.5, clock=clock)):
        task = asyncio.create_task(Timeout(3.0, clock=clock).call(slow))
        await settle()
    await clock.advance(0.5)
    with pytest.raises(DeadlineExceededError, match="propagated deadline"):
        await task


async def test_a_timeout_error_of_the_call_itself_is_not_relabelled(clock):
    async def own():
        raise TimeoutError("the call's own")

    with pytest.raises(TimeoutError, match="the call's own") as info:
        await Timeout(1.0, clock=clock).call(own)
    assert not isinstance(info.value, CallTimeoutError)


async def test_test_mode_judges_the_call_afterwards(fast_clock):
    timeout = Timeout(1.0, clock=fast_clock)

    async def slow():
        await fast_clock.sleep(5)

    with pytest.raises(CallTimeoutError):
        await timeout.call(slow)

    async def busy_but_quick():  # many turns of the loop, no virtual time
        for _ in range(50):
            await asyncio.sleep(0)
        return "done"

    assert await timeout.call(busy_but_quick) == "done"


async def test_timeout_as_context_manager(clock):
    async def block():
        async with Timeout(1.0, clock=clock):
            await clock.sleep(3)

    task = asyncio.create_task(block())
    await settle()
    await clock.advance(1.0)
    with pytest.raises(CallTimeoutError):
        await task
    async with Timeout(1.0, clock=clock):
        assert current_deadline().remaining() == 1.0


def test_header_round_trip():
    clock = VirtualClock()
    deadline = Deadline.after(1.2345, clock=clock)
    assert deadline.to_header() == "1234"  # rounded down
    received = Deadline.from_header("1234", clock=clock)
    assert received.remaining() == pytest.approx(1.234)
    with deadline_scope(deadline):
        assert deadline_header() == {DEADLINE_HEADER: "1234"}
    assert deadline_header() == {}


@pytest.mark.parametrize(
    "value", [None, "", "abc", "-5", "1.5", "9" * 12, "99999999", "\uff11\uff12"]
)
def test_malformed_header_is_ignored(value):
    assert Deadline.from_header(value, clock=VirtualClock()) is None


def test_zero_header_is_an_expired_deadline():
    assert Deadline.from_header("0", clock=VirtualClock()).expired


def test_envelope_deadline_round_trip():
    clock = VirtualClock(start=1_700_000_000.0)
    deadline = Deadline.after(30, clock=clock)
    when = deadline.to_datetime()
    assert when == datetime.fromtimestamp(1_700_000_030.0, tz=UTC)
    envelope = Envelope(
        id="1",
        type="t",
        version=1,
        kind="command",
        source="a",
        destination="b",
        correlation_id="c",
        created_at=when,
        payload=b"{}",
        deadline=when,
    )
    back = Deadline.from_datetime(envelope.deadline, clock=clock)
    assert back.remaining() == pytest.approx(30)
    naive = Deadline.from_datetime(when.replace(tzinfo=None), clock=clock)
    assert naive.remaining() == pytest.approx(30)


def test_deadlines_on_different_clocks_compare_by_what_is_left():
    virtual = VirtualClock()
    a = Deadline.after(100, clock=SystemClock())
    b = Deadline.after(5, clock=virtual)
    assert a.earliest(b) is b
    assert b.earliest(a) is b
    assert a.earliest(None) is a


def test_invalid_timeout_is_refused():
    with pytest.raises(InvalidPolicyError, match="timeout"):
        Timeout(-1)
    with pytest.raises(InvalidPolicyError, match="timeout"):
        Timeout(0)
