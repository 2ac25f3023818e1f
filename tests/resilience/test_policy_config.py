import tomllib

import pytest

from atoll.config import ConfigError
from atoll.determinism import VirtualClock
from atoll.resilience import (
    HTTP,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    Classifier,
    Hedge,
    Pipeline,
    RateLimiter,
    Retry,
    SharedState,
    Timeout,
    policy_from_config,
    register_classifier,
)

FULL = """
[policies.payments]
timeout = 5.0
attempt_timeout = 1.0

[policies.payments.retry]
max_attempts = 4
base_delay = 0.1
max_delay = 2.0
multiplier = 3
max_total = 4.0
respect_retry_after = false
classifier = "http"
budget = { ratio = 0.1, min_per_second = 2, window = 5.0 }

[policies.payments.hedge]
delay = 0.05
max_hedges = 2

[policies.payments.breaker]
window = "time"
window_size = 60
minimum_calls = 10
failure_rate = 0.25
slow_call_rate = 0.5
slow_call_duration = 2.0
wait = 15
wait_multiplier = 2.0
max_wait = 120.0
half_open_calls = 5
half_open_successes = 3
classifier = "http"

[policies.payments.rate_limit]
rate = 100.0
burst = 20
max_wait = 0.5

[policies.payments.bulkhead]
max_concurrent = 10
max_queue = 20
max_wait = 1.0
"""


def table():
    return tomllib.loads(FULL)["policies"]["payments"]


def test_a_full_table_builds_every_slot():
    clock = VirtualClock()
    pipeline = policy_from_config(table(), source="atoll.toml", name="payments", clock=clock)
    assert isinstance(pipeline, Pipeline)
    assert pipeline.name == "payments"
    assert isinstance(pipeline.timeout, Timeout)
    assert pipeline.timeout.seconds == 5.0
    assert pipeline.attempt_timeout.seconds == 1.0
    assert isinstance(pipeline.retry, Retry)
    assert pipeline.retry.classifier is HTTP
    assert pipeline.retry.budget is not None
    assert isinstance(pipeline.hedge, Hedge)
    breaker = pipeline.breaker
    assert isinstance(breaker, CircuitBreaker)
    assert breaker.name == "payments"
    assert breaker.classifier is HTTP
    assert breaker.state is BreakerState.CLOSED
    assert isinstance(pipeline.rate_limiter, RateLimiter)
    assert isinstance(pipeline.bulkhead, Bulkhead)
    assert pipeline.bulkhead.max_concurrent == 10


async def test_configured_values_take_effect():
    clock = VirtualClock()
    pipeline = policy_from_config(
        {"breaker": {"window_size": 2, "minimum_calls": 2, "wait": 7}},
        source="atoll.toml",
        name="inventory",
        clock=clock,
    )

    async def fail():
        raise RuntimeError

    for _ in range(2):
        with pytest.raises(RuntimeError):
            await pipeline.call(fail)
    assert pipeline.breaker.state is BreakerState.OPEN
    assert pipeline.breaker.snapshot().retry_at == pytest.approx(clock.time() + 7)


def test_an_empty_table_is_a_pass_through_pipeline():
    assert policy_from_config({}, source="atoll.toml").policies == ()


def edit(path, value):
    data = table()
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("timeout", -1.0, "must not be negative"),
        ("attempt_timeout", 0, "must be greater than 0"),
        ("breaker.failure_rate", 1.5, "must be in (0, 1]"),
        ("breaker.slow_call_rate", 0, "must be in (0, 1]"),
        ("breaker.wait", -3, "must not be negative"),
        ("breaker.classifier", "magic", "unknown classifier 'magic' (known: "),
        ("breaker.window", "sliding", "must be 'count' or 'time'"),
        ("breaker.minimum_calls", 2.5, "must be a whole number, not float"),
        ("breaker.half_open_successes", 9, "could never close"),
        ("breaker.max_wait", 1.0, "must be at least wait"),
        ("breaker.failure_ratio", 0.5, "unknown key (known: "),
        ("breaker.shared", True, "no shared state store was given"),
        ("retry.max_attempts", 0, "must be at least 1"),
        ("retry.max_attempts", True, "must be a whole number, not true"),
        ("retry.base_delay", "100ms", "must be a number, not the string '100ms'"),
        ("retry.classifier", "nope", "unknown classifier 'nope'"),
        ("retry.budget.ratio", 2.0, "must be in (0, 1]"),
        ("retry.budget.window", -1.0, "must not be negative"),
        ("retry.budget", 0.2, "must be a table, not float"),
        ("hedge.delay", -0.01, "must not be negative"),
        ("rate_limit.rate", 0, "must be greater than 0"),
        ("rate_limit.burst", 0, "must be at least 1"),
        ("bulkhead.max_concurrent", 0, "must be at least 1"),
        ("bulkhead.max_queue", -1, "must be at least 0"),
        ("bulkhead", "ten", "must be a table"),
        ("circuit", {}, "unknown key (known: "),
        ("hedge.delay", DELETE, "is required"),
        ("rate_limit.rate", DELETE, "is required"),
        ("bulkhead.max_concurrent", DELETE, "is required"),
    ],
)
def test_bad_values_are_refused_naming_the_key(path, value, problem):
    with pytest.raises(ConfigError) as info:
        policy_from_config(edit(path, value), source="atoll.toml", name="payments")
    err = info.value
    assert err.source == "atoll.toml"
    assert err.key == f"policies.payments.{path}"
    assert problem in err.problem
    assert str(err).startswith(f"atoll.toml: policies.payments.{path}: ")


def test_keys_without_a_policy_name():
    with pytest.raises(ConfigError) as info:
        policy_from_config({"breaker": {"wait": -1}}, source="env")
    assert info.value.key == "breaker.wait"
    with pytest.raises(ConfigError) as info:
        policy_from_config([], source="env", name="x")  # type: ignore[arg-type]
    assert info.value.key == "policies.x"


class MemoryStore(SharedState):
    async def sync_window(self, name, **kw):
        raise NotImplementedError

    async def open_circuit(self, name, **kw):
        raise NotImplementedError

    async def reserve_permit(self, name, **kw):
        raise NotImplementedError


def test_shared_needs_a_time_window_and_a_store():
    store = MemoryStore()
    pipeline = policy_from_config(
        {"breaker": {"window": "time", "window_size": 30, "shared": True}},
        source="atoll.toml",
        shared=store,
    )
    assert pipeline.breaker.snapshot().sharing == "degraded"  # not synced yet
    with pytest.raises(ConfigError) as info:
        policy_from_config({"breaker": {"shared": True}}, source="atoll.toml", shared=store)
    assert info.value.key == "breaker.shared"
    assert "only a time window can be shared" in info.value.problem


def test_registered_classifiers_can_be_named():
    mine = Classifier("only-oserror", failure_types=(OSError,))
    register_classifier(mine)
    register_classifier(mine)  # idempotent
    pipeline = policy_from_config({"breaker": {"classifier": "only-oserror"}}, source="x")
    assert pipeline.breaker.classifier is mine
    with pytest.raises(ValueError, match="already registered"):
        register_classifier(Classifier("only-oserror"))
