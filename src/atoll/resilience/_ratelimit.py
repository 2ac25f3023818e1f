"""Rate limiting with the generic cell rate algorithm (GCRA), locally or shared."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, NamedTuple, TypeVar

from atoll.determinism import Clock, SystemClock
from atoll.resilience import _check
from atoll.resilience._deadline import _current
from atoll.resilience._errors import InvalidPolicyError, RateLimitedError
from atoll.resilience._policy import Policy
from atoll.resilience._shared import SharedState, StoreLink

T = TypeVar("T")

# Float arithmetic on the arrival time leaves dust: a permit due "1e-17 s from now" is due.
_EPSILON = 1e-9


class Permit(NamedTuple):
    """The outcome of :meth:`RateLimiter.try_acquire`, with what rate-limit headers need.

    ``wait`` is 0 for a granted permit, else the seconds until one would be granted.
    ``remaining`` is how many more permits are available right now and ``reset`` the
    seconds until the whole ``limit`` (the burst) is available again; both are ``None``
    when a shared store does not report them. (A named tuple: made on every request.)
    """

    granted: bool
    wait: float
    limit: int
    remaining: int | None
    reset: float | None
    #: Decided locally (no store, or the store was unavailable).
    local: bool


_new_permit = tuple.__new__  # Permit(...) without the named tuple's __new__


class RateLimiter(Policy):
    """At most ``rate`` calls per second on average, with bursts of up to ``burst`` calls.

    GCRA (a token bucket without a refill timer): the limiter keeps a "theoretical
    arrival time" and each permit moves it ``1/rate`` seconds on. A call without a
    permit waits for one if that takes at most ``max_wait`` seconds (and ends before the
    propagated deadline), and is refused with :class:`RateLimitedError` otherwise, which
    says when a permit is free. Waiters are served in arrival order: each reserves its
    permit before sleeping, and gives it back if cancelled.

    ``shared`` makes instances share one limit through a :class:`SharedState` (each permit
    is one store round trip bounded by ``shared_timeout``). While the store is slow or
    down each instance limits itself locally to ``degraded_rate`` (default: ``rate``;
    set it to ``rate / instances`` to keep the total), and never fails a call because
    the store did.
    """

    __slots__ = (
        "_burst",
        "_clock",
        "_degraded_interval",
        "_interval",
        "_link",
        "_max_wait",
        "_name",
        "_tat",
        "_tolerance",
        "degraded_total",
        "rejected_total",
    )

    def __init__(
        self,
        name: str,
        *,
        rate: float,
        burst: int = 1,
        max_wait: float = 0.0,
        clock: Clock | None = None,
        shared: SharedState | None = None,
        shared_timeout: float = 0.05,
        degraded_rate: float | None = None,
    ) -> None:
        self._name = _check.name("name", name)
        per_second = _check.duration("rate", rate, positive=True)
        self._burst = _check.count("burst", burst)
        self._max_wait = _check.duration("max_wait", max_wait)
        self._interval = 1.0 / per_second
        self._tolerance = (self._burst - 1) * self._interval
        degraded = per_second if degraded_rate is None else degraded_rate
        self._degraded_interval = 1.0 / _check.duration("degraded_rate", degraded, positive=True)
        self._clock: Clock = clock or SystemClock()
        self._tat = float("-inf")
        shared_timeout = _check.duration("shared_timeout", shared_timeout, positive=True)
        self._link: StoreLink | None = None
        if shared is not None:
            if not isinstance(shared, SharedState):
                raise InvalidPolicyError("shared", f"must be a SharedState, not {shared!r}")
            self._link = StoreLink(
                shared,
                what=f"rate limiter {name!r}",
                clock=self._clock,
                timeout=shared_timeout,
                retry_interval=1.0,
            )
        #: Calls refused for want of a permit.
        self.rejected_total = 0
        #: Permits decided locally because the shared store was unavailable.
        self.degraded_total = 0

    @property
    def name(self) -> str:
        return self._name

    def _max_wait_now(self) -> float:
        deadline = _current.get()
        if deadline is None:
            return self._max_wait
        return min(self._max_wait, deadline.remaining())

    def _reserve_local(self, interval: float, max_wait: float) -> float:
        now = self._clock.monotonic()
        tat = max(now, self._tat)
        wait = tat - self._tolerance - now
        if wait > max_wait + _EPSILON:
            self.rejected_total += 1
            raise RateLimitedError(self._name, wait)
        self._tat = tat + interval
        return wait if wait > _EPSILON else 0.0

    async def _reserve(self) -> tuple[float, bool]:
        """Seconds to wait for a permit, and whether it was reserved locally."""
        max_wait = self._max_wait_now()
        link = self._link
        if link is None:
            return self._reserve_local(self._interval, max_wait), True
        if link.available:
            clock = self._clock
            reply = await link.run(
                lambda: link.store.reserve_permit(
                    self._name,
                    now=clock.time(),
                    interval=self._interval,
                    tolerance=self._tolerance,
                    max_wait=max_wait,
                )
            )
            if reply is not None:
                granted, seconds = reply
                if not granted:
                    self.rejected_total += 1
                    raise RateLimitedError(self._name, seconds)
                return seconds, False
        self.degraded_total += 1
        return self._reserve_local(self._degraded_interval, max_wait), True

    def _permit(self, granted: bool, wait: float, ahead: float, local: bool) -> Permit:
        """A :class:`Permit` from the theoretical arrival time ``ahead`` seconds from now."""
        if not math.isfinite(ahead):
            return Permit(granted, wait, self._burst, None, None, local)
        interval = self._interval
        remaining = 0 if not granted else int((self._tolerance - ahead) / interval + 1 + 1e-6)
        return Permit(granted, wait, self._burst, max(0, remaining), max(0.0, ahead), local)

    async def try_acquire(self) -> Permit:
        """Take a permit if one is free now; never waits and never raises for want of one.

        For request handlers that answer a refusal themselves (an HTTP 429 with
        ``Retry-After`` and ``RateLimit-*`` headers) instead of waiting. ``max_wait`` and
        the deadline do not apply: a permit is granted only if it is usable at once.
        """
        link = self._link
        if link is None:
            return self.try_acquire_local()
        if link.available:
            clock = self._clock
            reply = await link.run(
                lambda: link.store.take_permit(
                    self._name,
                    now=clock.time(),
                    interval=self._interval,
                    tolerance=self._tolerance,
                )
            )
            if reply is not None:
                granted, seconds, ahead = reply
                if not granted:
                    self.rejected_total += 1
                return self._permit(granted, seconds if not granted else 0.0, ahead, False)
        self.degraded_total += 1
        return self._take_local(self._degraded_interval)

    def try_acquire_local(self) -> Permit:
        """:meth:`try_acquire` for a limiter without a shared store, without a coroutine.

        Raises :class:`TypeError` on a shared limiter (its permits need the store).
        """
        if self._link is not None:
            raise TypeError(f"rate limiter {self._name!r} is shared: use try_acquire()")
        return self._take_local(self._interval)

    def _take_local(self, interval: float) -> Permit:
        # A gateway calls this on every request: the granted case is spelled out inline
        # (it is what ``_permit(True, 0.0, ahead, True)`` returns) and the Permit is made
        # with tuple.__new__, skipping the named tuple's Python-level __new__ (660 to
        # 360 ns a call, timeit).
        now = self._clock.monotonic()
        tat = self._tat
        if tat < now:  # noqa: PLR1730 - max() is a call, and this runs per request
            tat = now
        tolerance = self._tolerance
        wait = tat - tolerance - now
        if wait > _EPSILON:
            self.rejected_total += 1
            return self._permit(False, wait, tat - now, True)
        tat += interval
        self._tat = tat
        ahead = tat - now
        remaining = int((tolerance - ahead) / self._interval + 1.000001)
        return _new_permit(
            Permit,
            (True, 0.0, self._burst, remaining if remaining > 0 else 0, ahead, True),  # noqa: FURB136 - no call
        )

    async def _wait(self, seconds: float, local: bool) -> None:
        try:
            await self._clock.sleep(seconds)
        except asyncio.CancelledError:
            if local:  # give the reserved permit back
                self._tat -= self._interval if self._link is None else self._degraded_interval
            raise

    async def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        if self._link is None:
            wait = self._reserve_local(self._interval, self._max_wait_now())
            local = True
        else:
            wait, local = await self._reserve()
        if wait > 0:
            await self._wait(wait, local)
        return await fn(*args, **kwargs)

    def guard(self) -> AbstractAsyncContextManager[None]:
        return self._guard()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        wait, local = await self._reserve()
        if wait > 0:
            await self._wait(wait, local)
        yield

    async def aclose(self) -> None:
        """Nothing runs in the background; here for symmetry with the breaker."""

    def __repr__(self) -> str:
        return f"RateLimiter({self._name!r}, rate={1 / self._interval:g}/s, burst={self._burst})"
