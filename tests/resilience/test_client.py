import asyncio
import contextlib

import httpx
import pytest
from resilience_helpers import settle

from atoll.determinism import RandomSource
from atoll.resilience import (
    DEADLINE_HEADER,
    HTTP,
    BreakerOpenError,
    BreakerState,
    CircuitBreaker,
    Deadline,
    DeadlineExceededError,
    InvalidPolicyError,
    Pipeline,
    ResilienceRegistry,
    Retry,
    ServiceClient,
    UnknownServiceError,
    deadline_scope,
    trace_scope,
)


class Recorder:
    """A mock service: answers from a script of statuses (or exceptions), records requests."""

    def __init__(self, *script):
        self.script = list(script)
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return httpx.Response(step, json={"path": request.url.path})


def client_for(recorder, clock, **kwargs):
    policy = Pipeline(
        name="inventory",
        retry=Retry(
            max_attempts=3, base_delay=0.01, classifier=HTTP, clock=clock, random=RandomSource(1)
        ),
        breaker=CircuitBreaker(
            "inventory",
            window_size=4,
            minimum_calls=4,
            failure_rate=1.0,
            classifier=HTTP,
            clock=clock,
        ),
    )
    return ServiceClient(
        {"inventory": "http://inventory.internal:8001/"},
        policies={"inventory": policy},
        transport=httpx.MockTransport(recorder),
        clock=clock,
        **kwargs,
    )


async def test_transient_statuses_are_retried_for_idempotent_requests(fast_clock):
    recorder = Recorder(503, 502, 200)
    async with client_for(recorder, fast_clock) as client:
        response = await client.get("inventory", "/items/1")
    assert response.status_code == 200
    assert len(recorder.requests) == 3
    assert str(recorder.requests[0].url) == "http://inventory.internal:8001/items/1"


async def test_a_404_is_an_answer(fast_clock):
    recorder = Recorder(404)
    async with client_for(recorder, fast_clock) as client:
        assert (await client.get("inventory", "/items/x")).status_code == 404
        breaker = client.registry.breaker("inventory")
    assert len(recorder.requests) == 1
    assert breaker.snapshot().successes_total == 1


async def test_unsafe_requests_are_retried_only_when_nothing_was_sent(fast_clock):
    recorder = Recorder(503)
    async with client_for(recorder, fast_clock) as client:
        assert (await client.post("inventory", "/reservations", json={})).status_code == 503
        assert len(recorder.requests) == 1  # a POST that may have been applied: not repeated
        connect_failed = httpx.ConnectError("refused")
        recorder.script = [connect_failed, 201]
        assert (await client.post("inventory", "/reservations", json={})).status_code == 201
        assert len(recorder.requests) == 3
        recorder.script = [503, 201]
        keyed = await client.post(
            "inventory", "/reservations", json={}, headers={"Idempotency-Key": "k1"}
        )
        assert keyed.status_code == 201  # an idempotency key makes it safe to repeat


async def test_breaker_opens_and_refuses_without_sending(fast_clock):
    recorder = Recorder(503)
    async with client_for(recorder, fast_clock) as client:
        for _ in range(2):  # 2 calls x up to 3 attempts; the 4th failure opens the breaker
            with contextlib.suppress(BreakerOpenError):
                await client.get("inventory", "/items")
        sent = len(recorder.requests)
        assert client.registry.breaker("inventory").state is BreakerState.OPEN
        with pytest.raises(BreakerOpenError, match="'inventory'"):
            await client.get("inventory", "/items")
        assert len(recorder.requests) == sent == 4


async def test_deadline_and_trace_headers_travel_with_the_request(clock):
    recorder = Recorder(200)
    async with client_for(recorder, clock, headers={"User-Agent": "orders"}) as client:
        with (
            deadline_scope(Deadline.after(1.5, clock=clock)),
            trace_scope({"traceparent": "00-abc-def-01", "Baggage": "k=v", "X-Other": "no"}),
        ):
            await client.get("inventory", "/items", headers={"X-Request": "1"})
        await client.get("inventory", "/items")
    first, second = recorder.requests
    assert first.headers[DEADLINE_HEADER] == "1500"
    assert first.headers["traceparent"] == "00-abc-def-01"
    assert first.headers["baggage"] == "k=v"
    assert "x-other" not in first.headers
    assert first.headers["x-request"] == "1"
    assert first.headers["user-agent"] == "orders"
    assert DEADLINE_HEADER not in second.headers
    assert "traceparent" not in second.headers


async def test_trace_hook_replaces_the_default(clock):
    recorder = Recorder(200)
    async with client_for(
        recorder, clock, trace_headers=lambda: {"traceparent": "from-otel"}
    ) as client:
        await client.get("inventory", "/")
    assert recorder.requests[0].headers["traceparent"] == "from-otel"


async def test_no_request_once_the_deadline_has_passed(clock):
    recorder = Recorder(200)
    async with client_for(recorder, clock) as client:
        with deadline_scope(Deadline.after(0.2, clock=clock)):
            await clock.advance(0.2)
            with pytest.raises(DeadlineExceededError, match="not sent"):
                await client.get("inventory", "/")
    assert recorder.requests == []


async def test_a_request_never_waits_past_the_deadline(clock):
    stuck = asyncio.Event()

    async def hang(request):
        await stuck.wait()
        return httpx.Response(200)

    async with ServiceClient(
        {"inventory": "http://inventory"},
        transport=httpx.MockTransport(hang),
        clock=clock,
        default_policy=lambda service: Pipeline(),
    ) as client:
        with deadline_scope(Deadline.after(0.5, clock=clock)):
            task = asyncio.create_task(client.get("inventory", "/"))
            await settle()
        await clock.advance(0.5)
        with pytest.raises(DeadlineExceededError, match="cancelled"):
            await task


async def test_unknown_services_and_bad_addresses(clock):
    async with ServiceClient({"a": "http://a"}, clock=clock) as client:
        with pytest.raises(UnknownServiceError, match=r"'b' \(known: a\)"):
            await client.get("b", "/")
    with pytest.raises(InvalidPolicyError, match=r"addresses\.bad"):
        ServiceClient({"bad": "ftp://user:secret@host"})
    with pytest.raises(InvalidPolicyError) as info:
        ServiceClient({"bad": "redis://user:secret@host"})
    assert "secret" not in str(info.value)


async def test_default_policy_per_service_is_registered(fast_clock):
    registry = ResilienceRegistry()
    recorder = Recorder(200)
    async with ServiceClient(
        {"inventory": "http://i", "payments": "http://p"},
        transport=httpx.MockTransport(recorder),
        registry=registry,
        clock=fast_clock,
    ) as client:
        await client.get("inventory", "/")
        await client.get("payments", "/")
        assert client.policy("inventory") is client.policy("inventory")
        assert client.policy("inventory").breaker is not client.policy("payments").breaker
    assert [b.name for b in registry.breakers] == ["inventory", "payments"]


async def test_a_service_with_several_instances_gets_them_in_turn(clock):
    recorder = Recorder(200)
    async with ServiceClient(
        {"inventory": ["http://i1:8001/", "http://i2:8002"]},
        transport=httpx.MockTransport(recorder),
        clock=clock,
        default_policy=lambda service: Pipeline(),
    ) as client:
        for _ in range(4):
            assert (await client.get("inventory", "/stock")).status_code == 200
    assert [r.url.host for r in recorder.requests] == ["i1", "i2", "i1", "i2"]
    assert {r.url.path for r in recorder.requests} == {"/stock"}


async def test_a_retry_goes_to_the_next_instance(fast_clock):
    recorder = Recorder(httpx.ConnectError("refused"), 200)
    policy = Pipeline(
        name="inventory",
        retry=Retry(
            max_attempts=3,
            base_delay=0.01,
            classifier=HTTP,
            clock=fast_clock,
            random=RandomSource(1),
        ),
    )
    async with ServiceClient(
        {"inventory": ["http://i1", "http://i2"]},
        policies={"inventory": policy},
        transport=httpx.MockTransport(recorder),
        clock=fast_clock,
    ) as client:
        assert (await client.get("inventory", "/stock")).status_code == 200
    # The instance that refused is not tried again for the retry.
    assert [r.url.host for r in recorder.requests] == ["i1", "i2"]


def test_a_service_needs_at_least_one_address():
    with pytest.raises(InvalidPolicyError, match=r"addresses\.inventory"):
        ServiceClient({"inventory": []})
