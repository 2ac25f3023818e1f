"""A registry of the named policies of a process, for metrics and status endpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from atoll.resilience._breaker import CircuitBreaker
from atoll.resilience._bulkhead import Bulkhead
from atoll.resilience._errors import InvalidPolicyError
from atoll.resilience._pipeline import Pipeline
from atoll.resilience._policy import Policy
from atoll.resilience._ratelimit import RateLimiter
from atoll.resilience._retry import Retry

_P = TypeVar("_P", bound=Policy)


class ResilienceRegistry:
    """The breakers, bulkheads, rate limiters and retries a process reports on.

    Breakers, bulkheads and rate limiters are keyed by name, which must be unique among
    their kind (two different breakers called ``payments`` would make their metrics and
    states ambiguous). Several retries may share a name (a service's retry and its
    variant for unsafe requests); their counts add up.
    """

    __slots__ = ("_breaker_hooks", "_breakers", "_bulkheads", "_limiters", "_retries")

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._breaker_hooks: list[Callable[[CircuitBreaker], None]] = []
        self._breakers: dict[str, CircuitBreaker] = {}
        self._bulkheads: dict[str, Bulkhead] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._retries: list[Retry] = []
        for policy in policies:
            self.add(policy)

    def add(self, policy: Policy) -> None:
        """Register ``policy`` (a pipeline registers its parts). Idempotent."""
        if isinstance(policy, Pipeline):
            for part in policy.policies:
                self.add(part)
        elif isinstance(policy, CircuitBreaker):
            if _put(self._breakers, policy, "circuit breaker"):
                for hook in self._breaker_hooks:
                    hook(policy)
        elif isinstance(policy, Bulkhead):
            _put(self._bulkheads, policy, "bulkhead")
        elif isinstance(policy, RateLimiter):
            _put(self._limiters, policy, "rate limiter")
        elif isinstance(policy, Retry) and all(r is not policy for r in self._retries):
            self._retries.append(policy)

    def on_breaker(self, hook: Callable[[CircuitBreaker], None]) -> None:
        """Call ``hook`` with every breaker registered, now and later (for instrumentation)."""
        self._breaker_hooks.append(hook)
        for breaker in self._breakers.values():
            hook(breaker)

    def breaker(self, name: str) -> CircuitBreaker | None:
        """The breaker called ``name``, if registered."""
        return self._breakers.get(name)

    @property
    def breakers(self) -> list[CircuitBreaker]:
        """The registered breakers, by name."""
        return [self._breakers[name] for name in sorted(self._breakers)]

    @property
    def bulkheads(self) -> list[Bulkhead]:
        """The registered bulkheads, by name."""
        return [self._bulkheads[name] for name in sorted(self._bulkheads)]

    @property
    def rate_limiters(self) -> list[RateLimiter]:
        """The registered rate limiters, by name."""
        return [self._limiters[name] for name in sorted(self._limiters)]

    @property
    def retries(self) -> list[Retry]:
        """The registered retries, in registration order."""
        return list(self._retries)


def _put(table: dict[str, _P], policy: _P, kind: str) -> bool:
    """Register ``policy``; ``True`` if it was new."""
    existing = table.get(policy.name)
    if existing is not None and existing is not policy:
        raise InvalidPolicyError(
            "name", f"another {kind} called {policy.name!r} is already registered"
        )
    table[policy.name] = policy
    return existing is None
