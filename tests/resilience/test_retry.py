import email.utils

import httpx
import pytest
from resilience_helpers import BoomError

from atoll.determinism import RandomSource
from atoll.resilience import (
    HTTP,
    BreakerOpenError,
    Deadline,
    DeadlineExceededError,
    InvalidPolicyError,
    Retry,
    RetryBudget,
    deadline_scope,
    retry_after,
)


class Flaky:
    """Fails ``failures`` times with ``exc``, then returns ``value``."""

    def __init__(self, failures, exc=BoomError, value="ok"):
        self.failures = failures
        self.exc = exc
        self.value = value
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc("flaky")
        return self.value


async def test_retries_with_full_jitter_exponential_backoff(fast_clock):
    retry = Retry(
        max_attempts=4,
        base_delay=0.1,
        multiplier=2.0,
        max_delay=0.3,
        clock=fast_clock,
        random=RandomSource(7),
    )
    op = Flaky(3)
    assert await retry.call(op) == "ok"
    assert op.calls == 4
    draws = RandomSource(7)
    expected = [draws.random() * ceiling for ceiling in (0.1, 0.2, 0.3)]  # capped at 0.3
    assert fast_clock.monotonic() == pytest.approx(sum(expected))
    assert retry.retries_total == 3


async def test_backoff_is_drawn_below_the_capped_ceiling():
    retry = Retry(base_delay=1.0, multiplier=3.0, max_delay=5.0, random=RandomSource(1))
    for n, ceiling in ((1, 1.0), (2, 3.0), (3, 5.0), (10, 5.0)):
        for _ in range(50):
            assert 0 <= retry.backoff(n) <= ceiling


async def test_gives_up_after_max_attempts_with_a_note(fast_clock):
    retry = Retry(max_attempts=3, clock=fast_clock)
    op = Flaky(10)
    with pytest.raises(BoomError) as info:
        await retry.call(op)
    assert op.calls == 3
    assert any("3 attempts made" in note for note in info.value.__notes__)
    assert retry.gave_up_total == 1


async def test_only_classified_failures_are_retried(fast_clock):
    retry = Retry(max_attempts=5, classifier=HTTP, clock=fast_clock)
    op = Flaky(1, exc=ValueError)  # a bug of ours, not a transient failure
    with pytest.raises(ValueError):
        await retry.call(op)
    assert op.calls == 1
    op = Flaky(2, exc=httpx.ConnectError)
    assert await retry.call(op) == "ok"
    assert op.calls == 3


async def test_refusals_and_passed_deadlines_are_never_retried(fast_clock):
    retry = Retry(max_attempts=5, clock=fast_clock)
    for exc in (
        BreakerOpenError("b", retry_after=1.0, retry_at=1.0),
        DeadlineExceededError("late"),
    ):
        calls = 0

        async def refused(exc=exc):
            nonlocal calls
            calls += 1
            raise exc

        with pytest.raises(type(exc)):
            await retry.call(refused)
        assert calls == 1


def response(status, headers=None):
    return httpx.Response(status, headers=headers, request=httpx.Request("GET", "http://x/"))


async def test_retries_failed_results_and_returns_the_last(fast_clock):
    retry = Retry(max_attempts=3, classifier=HTTP, clock=fast_clock)
    statuses = iter([503, 503, 503])

    async def op():
        return response(next(statuses))

    result = await retry.call(op)
    assert result.status_code == 503
    assert retry.retries_total == 2
    statuses = iter([503, 404])
    assert (await retry.call(op)).status_code == 404  # a 404 is an answer: not retried


async def test_honours_retry_after_seconds(fast_clock):
    retry = Retry(max_attempts=2, base_delay=0.01, max_delay=5.0, classifier=HTTP, clock=fast_clock)
    statuses = iter([(429, {"Retry-After": "3"}), (200, None)])

    async def op():
        status, headers = next(statuses)
        return response(status, headers)

    assert (await retry.call(op)).status_code == 200
    assert fast_clock.monotonic() == pytest.approx(3.0)


async def test_honours_retry_after_http_date(fast_clock):
    when = email.utils.formatdate(fast_clock.time() + 2, usegmt=True)
    assert retry_after(response(503, {"Retry-After": when}), fast_clock.time()) == pytest.approx(2)
    assert retry_after(response(503, {"Retry-After": "soon"}), 0) is None
    assert retry_after(response(503), 0) is None
    assert (
        retry_after(
            httpx.HTTPStatusError("x", request=None, response=response(503, {"Retry-After": "4"})),
            0,
        )
        == 4
    )  # type: ignore[arg-type]


async def test_retry_after_longer_than_max_delay_stops_retrying(fast_clock):
    retry = Retry(max_attempts=5, max_delay=2.0, classifier=HTTP, clock=fast_clock)
    calls = 0

    async def op():
        nonlocal calls
        calls += 1
        return response(503, {"Retry-After": "60"})

    assert (await retry.call(op)).status_code == 503
    assert calls == 1
    assert fast_clock.monotonic() == 0


async def test_stops_before_max_total(fast_clock):
    retry = Retry(
        max_attempts=100,
        base_delay=1.0,
        multiplier=1.0,
        max_delay=1.0,
        max_total=5.0,
        clock=fast_clock,
        random=RandomSource(3),
    )
    op = Flaky(1000)
    with pytest.raises(BoomError) as info:
        await retry.call(op)
    assert fast_clock.monotonic() <= 5.0
    assert op.calls > 3
    assert any("max_total" in note for note in info.value.__notes__)


async def test_never_sleeps_past_the_deadline(fast_clock):
    retry = Retry(max_attempts=100, base_delay=1.0, multiplier=1.0, max_delay=1.0, clock=fast_clock)
    op = Flaky(1000)
    with deadline_scope(Deadline.after(4.0, clock=fast_clock)), pytest.raises(BoomError) as info:
        await retry.call(op)
    assert fast_clock.monotonic() < 4.0
    assert any("deadline" in note for note in info.value.__notes__)


async def test_budget_caps_retries_to_a_fraction_of_calls(fast_clock):
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10.0, clock=fast_clock)
    retry = Retry(max_attempts=5, base_delay=0, max_delay=0, budget=budget, clock=fast_clock)
    op = Flaky(10**9)
    for _ in range(100):
        with pytest.raises(BoomError):
            await retry.call(op)
    # Without the budget: 500 attempts. With it: 100 calls and 20 % of them as retries.
    assert op.calls == 120
    assert budget.exhausted_total == 100  # each call was refused one retry in the end
    assert retry.retries_total == 20


async def test_budget_refills_as_its_window_moves_and_has_a_floor(clock):
    budget = RetryBudget(ratio=0.1, min_per_second=0.5, window=10.0, clock=clock)
    # The floor: 0.5 per second over 10 s = 5 retries even without traffic.
    assert [budget.try_spend() for _ in range(6)] == [True] * 5 + [False]
    for _ in range(10):
        budget.deposit()
    assert budget.try_spend()  # 5 + 0.1 * 10 = 6
    assert not budget.try_spend()
    await clock.advance(10.5)
    assert budget.calls_in_window == budget.retries_in_window == 0
    assert budget.try_spend()


async def test_decorator_keeps_signature(fast_clock):
    retry = Retry(clock=fast_clock)

    @retry
    async def add(a: int, b: int = 2) -> int:
        return a + b

    assert await add(1) == 3
    assert add.__name__ == "add"
    assert add.__wrapped__.__name__ == "add"


async def test_retry_cannot_guard_a_block():
    with pytest.raises(TypeError, match="cannot guard a 'with' block"):
        async with Retry():
            pass


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"base_delay": -0.1}, "base_delay"),
        ({"base_delay": 2, "max_delay": 1}, "max_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"max_total": 0}, "max_total"),
        ({"respect_retry_after": "yes"}, "respect_retry_after"),
        ({"classifier": "http"}, "classifier"),
    ],
)
def test_invalid_retry_is_refused(kwargs, field):
    with pytest.raises(InvalidPolicyError) as info:
        Retry(**kwargs)
    assert info.value.field == field


def test_invalid_budget_is_refused():
    with pytest.raises(InvalidPolicyError, match="ratio"):
        RetryBudget(ratio=1.5)
    with pytest.raises(InvalidPolicyError, match="window"):
        RetryBudget(window=-1)
