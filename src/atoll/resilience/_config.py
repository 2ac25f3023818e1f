"""Policies from configuration: an ``atoll.toml`` ``[policies.NAME]`` table to a pipeline.

Example (every key optional; the tables present become the pipeline's slots)::

    [policies.payments]
    timeout = 5.0               # seconds for the whole operation, retries included
    attempt_timeout = 1.0       # seconds for one attempt

    [policies.payments.retry]
    max_attempts = 3
    base_delay = 0.1
    max_delay = 2.0
    multiplier = 2.0
    max_total = 4.0
    respect_retry_after = true
    classifier = "http"
    budget = { ratio = 0.2, min_per_second = 10, window = 10.0 }

    [policies.payments.hedge]
    delay = 0.05
    max_hedges = 1
    classifier = "http"

    [policies.payments.breaker]
    window = "count"            # or "time" (window_size is then seconds)
    window_size = 100
    minimum_calls = 20
    failure_rate = 0.5
    slow_call_rate = 1.0
    slow_call_duration = 2.0
    wait = 30.0
    wait_multiplier = 2.0
    max_wait = 300.0
    half_open_calls = 3
    half_open_successes = 3
    classifier = "http"
    shared = false              # true: share through the SharedState given in code

    [policies.payments.rate_limit]
    rate = 100.0
    burst = 20
    max_wait = 0.0
    shared = false
    degraded_rate = 50.0

    [policies.payments.bulkhead]
    max_concurrent = 10
    max_queue = 20
    max_wait = 1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from atoll.config import ConfigError
from atoll.determinism import Clock, RandomSource
from atoll.resilience._breaker import CircuitBreaker
from atoll.resilience._bulkhead import Bulkhead
from atoll.resilience._classify import classifier_named
from atoll.resilience._errors import InvalidPolicyError
from atoll.resilience._hedge import Hedge
from atoll.resilience._pipeline import Pipeline
from atoll.resilience._ratelimit import RateLimiter
from atoll.resilience._retry import Retry, RetryBudget
from atoll.resilience._shared import SharedState
from atoll.resilience._timeout import Timeout

_NUMBER = "a number"
_WHOLE = "a whole number"
_TEXT = "a string"
_FLAG = "true or false"
_TABLE = "a table"

_SCHEMA: dict[str, dict[str, str]] = {
    "": {
        "timeout": _NUMBER,
        "attempt_timeout": _NUMBER,
        "retry": _TABLE,
        "hedge": _TABLE,
        "breaker": _TABLE,
        "rate_limit": _TABLE,
        "bulkhead": _TABLE,
    },
    "retry": {
        "max_attempts": _WHOLE,
        "base_delay": _NUMBER,
        "max_delay": _NUMBER,
        "multiplier": _NUMBER,
        "max_total": _NUMBER,
        "respect_retry_after": _FLAG,
        "classifier": _TEXT,
        "budget": _TABLE,
    },
    "retry.budget": {"ratio": _NUMBER, "min_per_second": _NUMBER, "window": _NUMBER},
    "hedge": {"delay": _NUMBER, "max_hedges": _WHOLE, "classifier": _TEXT},
    "breaker": {
        "window": _TEXT,
        "window_size": _NUMBER,
        "minimum_calls": _WHOLE,
        "failure_rate": _NUMBER,
        "slow_call_rate": _NUMBER,
        "slow_call_duration": _NUMBER,
        "wait": _NUMBER,
        "wait_multiplier": _NUMBER,
        "max_wait": _NUMBER,
        "half_open_calls": _WHOLE,
        "half_open_successes": _WHOLE,
        "classifier": _TEXT,
        "shared": _FLAG,
        "shared_timeout": _NUMBER,
        "sync_interval": _NUMBER,
    },
    "rate_limit": {
        "rate": _NUMBER,
        "burst": _WHOLE,
        "max_wait": _NUMBER,
        "shared": _FLAG,
        "shared_timeout": _NUMBER,
        "degraded_rate": _NUMBER,
    },
    "bulkhead": {"max_concurrent": _WHOLE, "max_queue": _WHOLE, "max_wait": _NUMBER},
}


_REQUIRED = {"hedge": ("delay",), "rate_limit": ("rate",), "bulkhead": ("max_concurrent",)}


def _type_ok(expected: str, value: object) -> bool:
    if expected == _NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected == _WHOLE:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == _TEXT:
        return isinstance(value, str)
    if expected == _FLAG:
        return isinstance(value, bool)
    return isinstance(value, Mapping)


class _Reader:
    """Checks one ``[policies.NAME]`` table and names the key of every problem."""

    def __init__(self, source: str, prefix: str) -> None:
        self.source = source
        self.prefix = prefix

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, f"{self.prefix}{key}" if key else self.prefix[:-1], problem)

    def table(self, section: str, value: object) -> dict[str, Any]:
        """``value`` checked against the schema of ``section``."""
        if not isinstance(value, Mapping):
            raise self.error(section, f"must be a table, not {type(value).__name__}")
        schema = _SCHEMA[section]
        out: dict[str, Any] = {}
        for key, item in value.items():
            dotted = f"{section}.{key}" if section else str(key)
            expected = schema.get(str(key))
            if expected is None:
                raise self.error(dotted, f"unknown key (known: {', '.join(sorted(schema))})")
            if not _type_ok(expected, item):
                raise self.error(dotted, f"must be {expected}, not {_describe(item)}")
            out[str(key)] = item
        for key in _REQUIRED.get(section, ()):
            if key not in out:
                raise self.error(f"{section}.{key}", "is required")
        return out

    def build(self, section: str, make: Callable[..., Any], options: dict[str, Any]) -> Any:
        """``make(**options)``, with a bad value reported under its key."""
        if "classifier" in options:
            try:
                options["classifier"] = classifier_named(options["classifier"])
            except InvalidPolicyError as exc:
                raise self.error(f"{section}.classifier", exc.problem) from None
        try:
            return make(**options)
        except InvalidPolicyError as exc:
            raise self.error(f"{section}.{exc.field}", exc.problem) from None


def _describe(value: object) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return type(value).__name__


def policy_from_config(
    mapping: Mapping[str, Any],
    *,
    source: str,
    name: str | None = None,
    clock: Clock | None = None,
    random: RandomSource | None = None,
    shared: SharedState | None = None,
) -> Pipeline:
    """The :class:`Pipeline` a ``[policies.NAME]`` table describes (keys in the module doc).

    Every problem (an unknown key, a value of the wrong type, a negative duration, a rate
    outside ``(0, 1]``, an unknown classifier, ``shared = true`` without a ``shared``
    store) raises :class:`atoll.config.ConfigError` naming ``source`` and the key, as
    ``policies.NAME.breaker.failure_rate`` when ``name`` is given. ``name`` also names
    the breaker, bulkhead, rate limiter and retry (default ``"default"``).
    """
    policy = name or "default"
    reader = _Reader(source, f"policies.{name}." if name else "")
    top = reader.table("", mapping)
    slots: dict[str, Any] = {}
    for key in ("timeout", "attempt_timeout"):
        if key in top:
            slots[key] = _timeout(reader, key, top[key], f"{policy}.{key}", clock)
    if "retry" in top:
        options = reader.table("retry", top["retry"])
        if "budget" in options:
            budget_options = reader.table("retry.budget", options.pop("budget"))
            options["budget"] = reader.build(
                "retry.budget",
                lambda **kw: RetryBudget(name=f"{policy}.retry", clock=clock, **kw),
                budget_options,
            )
        slots["retry"] = reader.build(
            "retry", lambda **kw: Retry(name=policy, clock=clock, random=random, **kw), options
        )
    if "hedge" in top:
        options = reader.table("hedge", top["hedge"])
        slots["hedge"] = reader.build(
            "hedge", lambda **kw: Hedge(name=policy, clock=clock, **kw), options
        )
    if "breaker" in top:
        options = reader.table("breaker", top["breaker"])
        store = _store(reader, "breaker", options, shared)
        slots["breaker"] = reader.build(
            "breaker", lambda **kw: CircuitBreaker(policy, clock=clock, shared=store, **kw), options
        )
    if "rate_limit" in top:
        options = reader.table("rate_limit", top["rate_limit"])
        store = _store(reader, "rate_limit", options, shared)
        slots["rate_limiter"] = reader.build(
            "rate_limit", lambda **kw: RateLimiter(policy, clock=clock, shared=store, **kw), options
        )
    if "bulkhead" in top:
        options = reader.table("bulkhead", top["bulkhead"])
        slots["bulkhead"] = reader.build(
            "bulkhead", lambda **kw: Bulkhead(policy, clock=clock, **kw), options
        )
    return Pipeline(name=policy, **slots)


def _timeout(reader: _Reader, key: str, value: Any, name: str, clock: Clock | None) -> Timeout:
    try:
        return Timeout(value, name=name, clock=clock)
    except InvalidPolicyError as exc:
        raise reader.error(key, exc.problem) from None


def _store(
    reader: _Reader, section: str, options: dict[str, Any], shared: SharedState | None
) -> SharedState | None:
    if not options.pop("shared", False):
        return None
    if shared is None:
        raise reader.error(
            f"{section}.shared",
            "is true but no shared state store was given (pass shared=RedisSharedState(...))",
        )
    return shared
