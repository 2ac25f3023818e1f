import asyncio
import inspect
import time
from pathlib import Path

import pytest
from resilience_helpers import BoomError, fail, ok, settle

from atoll.determinism import RandomSource
from atoll.resilience import (
    ORDER,
    BreakerOpenError,
    BreakerState,
    Bulkhead,
    BulkheadFullError,
    CallTimeoutError,
    CircuitBreaker,
    Fallback,
    Hedge,
    InvalidPolicyError,
    Pipeline,
    RateLimiter,
    Retry,
    Timeout,
    current_deadline,
)


def test_order_is_documented_and_fixed():
    assert ORDER == (
        "fallback",
        "timeout",
        "retry",
        "hedge",
        "breaker",
        "rate_limiter",
        "bulkhead",
        "attempt_timeout",
    )
    pipeline = Pipeline(
        attempt_timeout=1.0,
        bulkhead=Bulkhead("b", max_concurrent=1),
        breaker=CircuitBreaker("c"),
        retry=Retry(),
        timeout=5.0,
        fallback=Fallback(lambda exc: None),
    )
    kinds = [type(p).__name__ for p in pipeline.policies]
    assert kinds == ["Fallback", "Timeout", "Retry", "CircuitBreaker", "Bulkhead", "Timeout"]


async def test_the_breaker_sees_every_retry_attempt(fast_clock):
    breaker = CircuitBreaker("dep", window_size=10, minimum_calls=10, clock=fast_clock)
    pipeline = Pipeline(retry=Retry(max_attempts=3, clock=fast_clock), breaker=breaker)
    with pytest.raises(BoomError):
        await pipeline.call(fail)
    assert breaker.snapshot().failures_total == 3


async def test_an_open_breaker_is_not_retried_and_the_fallback_answers(fast_clock):
    breaker = CircuitBreaker("dep", window_size=2, minimum_calls=2, clock=fast_clock)
    retry = Retry(max_attempts=5, clock=fast_clock)
    pipeline = Pipeline(
        fallback=Fallback(lambda exc: f"fallback: {type(exc).__name__}"),
        retry=retry,
        breaker=breaker,
    )
    assert await pipeline.call(fail) == "fallback: BreakerOpenError"
    # attempts 1 and 2 failed and opened the breaker; attempt 3 was refused; no more
    assert breaker.snapshot().failures_total == 2
    assert breaker.snapshot().rejected_total == 1
    assert retry.retries_total == 2


async def test_total_timeout_bounds_retries_and_backoff(fast_clock):
    retry = Retry(
        max_attempts=50,
        base_delay=1.0,
        multiplier=1.0,
        max_delay=1.0,
        clock=fast_clock,
        random=RandomSource(1),
    )
    pipeline = Pipeline(timeout=Timeout(3.0, clock=fast_clock), retry=retry)
    with pytest.raises(BoomError) as info:
        await pipeline.call(fail)
    assert fast_clock.monotonic() <= 3.0
    assert any("deadline" in note for note in info.value.__notes__)


async def test_attempt_timeout_makes_a_slow_attempt_a_retried_failure(clock):
    breaker = CircuitBreaker("dep", window_size=10, minimum_calls=10, clock=clock)
    attempts = 0

    async def first_attempt_hangs():
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await clock.sleep(100)
        return "second"

    pipeline = Pipeline(
        retry=Retry(max_attempts=2, base_delay=0, max_delay=0, clock=clock),
        breaker=breaker,
        attempt_timeout=Timeout(1.0, clock=clock),
    )
    task = asyncio.create_task(pipeline.call(first_attempt_hangs))
    await settle()
    await clock.advance(1.0)
    assert await task == "second"
    snap = breaker.snapshot()
    assert (snap.failures_total, snap.successes_total) == (1, 1)  # the timeout was a failure


async def test_local_refusals_are_not_the_dependencys_failures(clock):
    breaker = CircuitBreaker("dep", window_size=2, minimum_calls=2, clock=clock)
    bulkhead = Bulkhead("dep", max_concurrent=1, clock=clock)
    pipeline = Pipeline(breaker=breaker, bulkhead=bulkhead)
    gate = asyncio.Event()
    holder = asyncio.create_task(pipeline.call(gate.wait))
    await settle()
    for _ in range(3):
        with pytest.raises(BulkheadFullError):
            await pipeline.call(ok)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().ignored_total == 3
    gate.set()
    await holder


async def test_hedged_attempts_each_pass_the_breaker(clock):
    breaker = CircuitBreaker("dep", window_size=10, minimum_calls=10, clock=clock)
    pipeline = Pipeline(hedge=Hedge(delay=0.1, clock=clock), breaker=breaker)
    release = asyncio.Event()
    calls = 0

    async def op():
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
        return calls

    task = asyncio.create_task(pipeline.call(op))
    await settle()
    await clock.advance(0.1)
    assert await task == 2
    assert breaker.snapshot().successes_total == 1  # the cancelled loser counts for nothing


async def test_decorator_wrapper_and_signature(fast_clock):
    pipeline = Pipeline(retry=Retry(clock=fast_clock), timeout=Timeout(1.0, clock=fast_clock))

    async def lookup(sku: str, *, warehouse: int = 1) -> dict[str, object]:
        """Find an item."""
        return {"sku": sku, "warehouse": warehouse}

    wrapped = pipeline.wrap(lookup)
    decorated = pipeline(lookup)
    assert await wrapped("a", warehouse=2) == {"sku": "a", "warehouse": 2}
    assert await decorated("b") == {"sku": "b", "warehouse": 1}
    assert inspect.signature(wrapped) == inspect.signature(lookup)
    assert wrapped.__doc__ == "Find an item."
    assert inspect.iscoroutinefunction(decorated)
    assert await pipeline.call(lookup, "c", warehouse=3) == {"sku": "c", "warehouse": 3}


def test_decorated_signatures_satisfy_mypy(tmp_path: Path):
    """The wrapper keeps the signature for type checkers: misuse is a type error."""
    mypy_api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from atoll.resilience import CircuitBreaker, Pipeline, Retry\n"
        "pipeline = Pipeline(retry=Retry())\n"
        "breaker = CircuitBreaker('b')\n"
        "@pipeline\n"
        "async def lookup(sku: str, *, warehouse: int = 1) -> int:\n"
        "    return warehouse\n"
        "@breaker\n"
        "async def ping() -> str:\n"
        "    return 'pong'\n"
        "async def main() -> None:\n"
        "    a: int = await lookup('x', warehouse=2)\n"
        "    b: str = await ping()\n"
        "    c: int = await pipeline.call(lookup, 'y')\n"
        "    await lookup(1)\n"
        "    await lookup('x', shelf=3)\n"
        "    d: str = await lookup('x')\n"
    )
    out, _, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out
    assert len(errors) == 3, out
    assert 'Argument 1 to "lookup" has incompatible type "int"' in out
    assert 'Unexpected keyword argument "shelf"' in out
    assert (
        'Incompatible types in assignment (expression has type "int", variable has type "str")'
        in out
    )


async def test_as_context_manager_without_re_running_policies(clock):
    pipeline = Pipeline(
        timeout=Timeout(1.0, clock=clock),
        breaker=CircuitBreaker("dep", window_size=2, minimum_calls=2, failure_rate=1, clock=clock),
        bulkhead=Bulkhead("dep", max_concurrent=1, clock=clock),
    )
    async with pipeline:
        assert current_deadline().remaining() == 1.0
        assert pipeline.bulkhead.active == 1
    for _ in range(2):
        with pytest.raises(BoomError):
            async with pipeline:
                raise BoomError
    with pytest.raises(BreakerOpenError):
        async with pipeline:
            pytest.fail("must not run")
    assert pipeline.bulkhead.active == 0
    with pytest.raises(TypeError, match="has a retry"):
        async with pipeline.replace(retry=Retry()):
            pass


async def test_test_mode_makes_waiting_instant(fast_clock):
    """With VirtualClock(auto_advance=True), backoff, breaker waits and rate limits take no
    real time, but their arithmetic is visible on the clock."""
    breaker = CircuitBreaker(
        "dep", window_size=4, minimum_calls=4, wait=60, clock=fast_clock, half_open_calls=1
    )
    pipeline = Pipeline(
        timeout=Timeout(600, clock=fast_clock),
        retry=Retry(
            max_attempts=4, base_delay=5, max_delay=30, clock=fast_clock, random=RandomSource(2)
        ),
        breaker=breaker,
        rate_limiter=RateLimiter("dep", rate=1, max_wait=10, clock=fast_clock),
        attempt_timeout=Timeout(30, clock=fast_clock),
    )
    started = time.monotonic()
    with pytest.raises(BoomError):
        await pipeline.call(fail)
    assert breaker.state is BreakerState.OPEN
    await fast_clock.sleep(60)
    assert await pipeline.call(ok, "back") == "back"
    assert breaker.state is BreakerState.CLOSED
    assert time.monotonic() - started < 1.0
    assert fast_clock.monotonic() > 60


async def test_replace_shares_the_other_policies():
    breaker = CircuitBreaker("dep")
    pipeline = Pipeline(retry=Retry(), breaker=breaker)
    bare = pipeline.replace(retry=None)
    assert bare.retry is None
    assert bare.breaker is breaker
    with pytest.raises(InvalidPolicyError, match="not a pipeline slot"):
        pipeline.replace(circuit=breaker)


def test_slots_take_only_their_kind():
    with pytest.raises(InvalidPolicyError) as info:
        Pipeline(breaker=Retry())  # type: ignore[arg-type]
    assert info.value.field == "breaker"
    with pytest.raises(InvalidPolicyError) as info:
        Pipeline(timeout=-1)
    assert info.value.field == "timeout"


async def test_empty_pipeline_just_calls():
    assert await Pipeline().call(ok, 5) == 5


async def test_timeout_error_inside_is_reported_as_call_timeout(clock):
    pipeline = Pipeline(attempt_timeout=Timeout(0.5, clock=clock))
    task = asyncio.create_task(pipeline.call(clock.sleep, 5))
    await settle()
    await clock.advance(0.5)
    with pytest.raises(CallTimeoutError):
        await task
