import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from resilience_helpers import BoomError, fail, ok

from atoll.resilience import (
    BreakerOpenError,
    Bulkhead,
    CircuitBreaker,
    InvalidPolicyError,
    Pipeline,
    RateLimiter,
    ResilienceRegistry,
    Retry,
    RetryBudget,
    breakers_router,
    install_metrics,
)


@pytest.fixture
def policies(fast_clock):
    budget = RetryBudget(name="payments", clock=fast_clock)
    pipeline = Pipeline(
        retry=Retry(max_attempts=2, name="payments", budget=budget, clock=fast_clock),
        breaker=CircuitBreaker("payments", window_size=4, minimum_calls=4, clock=fast_clock),
        rate_limiter=RateLimiter("payments", rate=100, burst=100, clock=fast_clock),
        bulkhead=Bulkhead("payments", max_concurrent=2, clock=fast_clock),
    )
    other = CircuitBreaker("inventory", clock=fast_clock)
    return pipeline, other, ResilienceRegistry([pipeline, other])


async def test_prometheus_metrics_from_the_registry(policies):
    pipeline, _, registry = policies
    prometheus = CollectorRegistry()
    install_metrics(registry, prometheus)
    await pipeline.call(ok)
    for _ in range(2):
        with pytest.raises((BoomError, BreakerOpenError)):
            await pipeline.call(fail)
    text = generate_latest(prometheus).decode()
    assert 'atoll_breaker_state{breaker="payments",state="open"} 1.0' in text
    assert 'atoll_breaker_state{breaker="payments",state="closed"} 0.0' in text
    assert 'atoll_breaker_state{breaker="inventory",state="closed"} 1.0' in text
    assert 'atoll_breaker_calls_total{breaker="payments",outcome="success"} 1.0' in text
    assert 'atoll_breaker_calls_total{breaker="payments",outcome="failure"} 3.0' in text
    assert 'atoll_breaker_calls_total{breaker="payments",outcome="rejected"} 1.0' in text
    assert 'atoll_breaker_transitions_total{breaker="payments"} 1.0' in text
    assert 'atoll_retry_retries_total{retry="payments"} 2.0' in text
    assert 'atoll_bulkhead_active{bulkhead="payments"} 0.0' in text
    assert 'atoll_rate_limiter_rejected_total{limiter="payments"} 0.0' in text
    assert "# TYPE atoll_breaker_calls_total counter" in text
    assert "# TYPE atoll_breaker_state gauge" in text


def test_metrics_collector_cannot_be_registered_twice(policies):
    _, _, registry = policies
    prometheus = CollectorRegistry()
    install_metrics(registry, prometheus)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        install_metrics(registry, prometheus)


def test_two_breakers_with_one_name_are_refused(policies):
    _, _, registry = policies
    registry.add(registry.breaker("inventory"))  # the same one again: fine
    with pytest.raises(InvalidPolicyError, match="another circuit breaker called 'inventory'"):
        registry.add(CircuitBreaker("inventory"))


async def test_breakers_endpoint_lists_states(policies, fast_clock):
    pipeline, _, registry = policies
    for _ in range(4):
        with pytest.raises((BoomError, BreakerOpenError)):
            await pipeline.breaker.call(fail)
    app = FastAPI()
    app.include_router(breakers_router(registry))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as http:
        listing = (await http.get("/atoll/breakers")).json()["breakers"]
        one = await http.get("/atoll/breakers/payments")
        missing = await http.get("/atoll/breakers/nope")
        write = await http.post("/atoll/breakers/payments")
    assert [b["name"] for b in listing] == ["inventory", "payments"]
    payments = one.json()
    assert payments["state"] == "open"
    assert payments["window"]["failures"] == 4
    assert payments["window"]["failure_rate"] == 1.0
    assert payments["retry_at"] == pytest.approx(fast_clock.time() + 30)
    assert payments["retry_at_iso"].endswith("+00:00")
    assert payments["totals"]["failure"] == 4
    assert payments["sharing"] == "local"
    assert listing[0]["state"] == "closed"
    assert listing[0]["window"]["failure_rate"] is None
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert write.status_code == 405  # read-only
