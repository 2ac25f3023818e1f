"""Pipelines: several policies around one call, always in the same documented order.

Outermost first::

    fallback > timeout > retry > hedge > breaker > rate_limiter > bulkhead > attempt_timeout > call

* ``fallback`` is outermost so it can answer for every failure, including an open
  breaker, a full bulkhead and a timeout.
* ``timeout`` bounds the whole operation, retries and their backoff included, and
  narrows the propagated deadline for everything inside, so a retry never sleeps past it.
* ``retry`` outside ``hedge`` and ``breaker``: every attempt (and every hedged attempt)
  is a separate call the breaker sees, so the breaker measures the dependency's real
  failure rate; an open breaker's refusal is not retried.
* ``breaker`` outside ``rate_limiter`` and ``bulkhead``: while open it refuses at once
  without taking a permit or a slot; their refusals, being local, are never counted by
  the breaker as the dependency's failures.
* ``attempt_timeout`` innermost: it bounds one attempt of the dependency, not time spent
  queueing in the bulkhead (which has its own ``max_wait``), so a slow dependency counts
  as a failure in the breaker and can be retried, while local queueing does not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from atoll.determinism import Clock
from atoll.resilience import _check
from atoll.resilience._breaker import CircuitBreaker
from atoll.resilience._bulkhead import Bulkhead
from atoll.resilience._errors import InvalidPolicyError
from atoll.resilience._fallback import Fallback
from atoll.resilience._hedge import Hedge
from atoll.resilience._policy import Policy
from atoll.resilience._ratelimit import RateLimiter
from atoll.resilience._retry import Retry
from atoll.resilience._timeout import Timeout

T = TypeVar("T")

#: The slots of a pipeline, outermost first.
ORDER = (
    "fallback",
    "timeout",
    "retry",
    "hedge",
    "breaker",
    "rate_limiter",
    "bulkhead",
    "attempt_timeout",
)
_TYPES: dict[str, type[Policy]] = {
    "fallback": Fallback,
    "timeout": Timeout,
    "retry": Retry,
    "hedge": Hedge,
    "breaker": CircuitBreaker,
    "rate_limiter": RateLimiter,
    "bulkhead": Bulkhead,
    "attempt_timeout": Timeout,
}
# Slots whose policies cannot guard a ``with`` block.
_NOT_FOR_BLOCKS = ("fallback", "retry", "hedge")
# Passed as the keyword arguments of inner stages, which only ever unpack it.
_NO_KWARGS: dict[str, Any] = {}

_Stage = Callable[
    [Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]], Coroutine[Any, Any, Any]
]


def _link(execute: _Stage, inner: _Stage) -> _Stage:
    def stage(
        fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, Any]:
        return execute(inner, (fn, args, kwargs), _NO_KWARGS)

    return stage


async def _direct(
    fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> T:
    return await fn(*args, **kwargs)


class Pipeline(Policy):
    """Policies composed around a call in the order of :data:`ORDER` (see the module doc).

    Every slot is optional. ``timeout`` and ``attempt_timeout`` accept seconds as a
    shorthand for a :class:`Timeout` on ``clock``. Use it like any policy: ``await
    pipeline.call(fn, ...)``, ``@pipeline``, or ``async with pipeline:`` when it has no
    fallback, retry or hedge (a ``with`` block cannot be re-run or replaced).

    Per call the pipeline adds one coroutine per policy and no closures: the chain of
    stages is built once, here.
    """

    __slots__ = (
        "_name",
        "_run",
        "attempt_timeout",
        "breaker",
        "bulkhead",
        "fallback",
        "hedge",
        "rate_limiter",
        "retry",
        "timeout",
    )

    def __init__(
        self,
        *,
        name: str = "pipeline",
        fallback: Fallback | None = None,
        timeout: Timeout | float | None = None,
        retry: Retry | None = None,
        hedge: Hedge | None = None,
        breaker: CircuitBreaker | None = None,
        rate_limiter: RateLimiter | None = None,
        bulkhead: Bulkhead | None = None,
        attempt_timeout: Timeout | float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._name = _check.name("name", name)
        if timeout is not None and not isinstance(timeout, Timeout):
            timeout = Timeout(
                _check.duration("timeout", timeout, positive=True),
                name=f"{name}.timeout",
                clock=clock,
            )
        if attempt_timeout is not None and not isinstance(attempt_timeout, Timeout):
            attempt_timeout = Timeout(
                _check.duration("attempt_timeout", attempt_timeout, positive=True),
                name=f"{name}.attempt_timeout",
                clock=clock,
            )
        given = {
            "fallback": fallback,
            "timeout": timeout,
            "retry": retry,
            "hedge": hedge,
            "breaker": breaker,
            "rate_limiter": rate_limiter,
            "bulkhead": bulkhead,
            "attempt_timeout": attempt_timeout,
        }
        for slot, candidate in given.items():
            if candidate is not None and not isinstance(candidate, _TYPES[slot]):
                raise InvalidPolicyError(
                    slot, f"must be a {_TYPES[slot].__name__}, not {type(candidate).__name__}"
                )
        self.fallback = fallback
        self.timeout = timeout
        self.retry = retry
        self.hedge = hedge
        self.breaker = breaker
        self.rate_limiter = rate_limiter
        self.bulkhead = bulkhead
        self.attempt_timeout = attempt_timeout
        policies = self.policies
        if not policies:
            self._run: _Stage = _direct
        else:
            run: _Stage = policies[-1]._execute
            for policy in reversed(policies[:-1]):
                run = _link(policy._execute, run)
            self._run = run

    @property
    def name(self) -> str:
        return self._name

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The policies present, outermost first."""
        found = (getattr(self, slot) for slot in ORDER)
        return tuple(policy for policy in found if policy is not None)

    def replace(self, **changes: Policy | float | None) -> Pipeline:
        """A pipeline with some slots changed (``None`` empties one); the rest are shared."""
        unknown = set(changes) - set(ORDER)
        if unknown:
            raise InvalidPolicyError(
                min(unknown), f"not a pipeline slot (slots: {', '.join(ORDER)})"
            )
        slots: dict[str, Any] = {slot: getattr(self, slot) for slot in ORDER}
        slots.update(changes)
        return Pipeline(name=self._name, **slots)

    def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, T]:
        return self._run(fn, args, kwargs)

    def guard(self) -> AbstractAsyncContextManager[None]:
        for slot in _NOT_FOR_BLOCKS:
            if getattr(self, slot) is not None:
                raise TypeError(
                    f"pipeline {self._name!r} has a {slot} and cannot guard a 'with' block: "
                    "the block cannot be run again or have its result replaced; "
                    "use call() or the decorator"
                )
        return self._guard()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for policy in self.policies:
                await stack.enter_async_context(policy.guard())
            yield

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{slot}={getattr(self, slot)!r}" for slot in ORDER if getattr(self, slot)
        )
        return f"Pipeline({self._name!r}, {inner})"
