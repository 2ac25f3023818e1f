"""The shared-state seam: breakers and rate limiters on several instances meeting in a store.

Sharing is opt-in and must never make a call fail: every operation on the store runs
with a short timeout, and while the store is slow or down each instance decides on its
own local state (see :class:`StoreLink`).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from atoll.determinism import Clock
from atoll.resilience._errors import ResilienceError

log = logging.getLogger("atoll.resilience")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SharedWindow:
    """The totals of a breaker's window across every instance, and its shared state.

    ``open_until`` is a wall-clock time (Unix seconds): while it is in the future some
    instance has opened the breaker; ``0.0`` if none has.
    """

    calls: int
    failures: int
    slow: int
    open_until: float


class SharedState(abc.ABC):
    """A store that instances of a service use to share breaker windows and rate limits.

    Contract (the Redis backend, ``atoll.resilience.redis.RedisSharedState``, is the
    reference implementation):

    * Every method must be atomic with respect to the same ``name`` on other instances.
    * Times are wall-clock Unix seconds from the caller's :class:`~atoll.determinism.Clock`,
      so instances must keep their clocks synchronised (NTP); windows are cut into
      buckets of ``bucket_width`` seconds aligned on the epoch, the same on every instance.
    * :meth:`sync_window` must add the counts to the bucket containing ``now`` (unless that
      bucket is older than the breaker's last opening), and return the totals of the
      ``buckets`` most recent buckets that are not older than the last opening.
    * :meth:`open_circuit` must record that the breaker is open until ``until`` (keeping a
      later time already recorded) and start a fresh window: buckets up to and including
      the one containing ``now`` no longer count. It returns the recorded ``open_until``.
    * :meth:`reserve_permit` is one step of the generic cell rate algorithm: with ``tat``
      the stored theoretical arrival time (``now`` if none or past), the permit is granted
      when ``tat - tolerance - now <= max_wait``, and then ``tat`` becomes
      ``tat + interval``. It returns ``(True, seconds to wait before using the permit)``,
      or ``(False, seconds until a permit would be granted)`` with ``tat`` unchanged.
    * Methods may raise anything on failure; callers treat every error as "store
      unavailable" and fall back to local state. They must not retry internally for long:
      callers bound them with a short timeout.
    """

    @abc.abstractmethod
    async def sync_window(
        self,
        name: str,
        *,
        now: float,
        bucket_width: float,
        buckets: int,
        calls: int,
        failures: int,
        slow: int,
    ) -> SharedWindow:
        """Add this instance's new outcomes and read the totals of every instance."""

    @abc.abstractmethod
    async def open_circuit(
        self, name: str, *, now: float, until: float, bucket_width: float, buckets: int
    ) -> float:
        """Record that breaker ``name`` is open until ``until``; return the recorded time."""

    @abc.abstractmethod
    async def reserve_permit(
        self, name: str, *, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[bool, float]:
        """Take a permit of rate limiter ``name``: whether granted, and seconds to wait."""

    async def take_permit(
        self, name: str, *, now: float, interval: float, tolerance: float
    ) -> tuple[bool, float, float]:
        """:meth:`reserve_permit` with ``max_wait = 0``, also returning ``tat - now``.

        The third value is the stored theoretical arrival time (after the grant, if
        granted) minus ``now`` in seconds, from which the caller derives the remaining
        permits; ``nan`` if the store cannot tell. The default implementation cannot.
        """
        granted, seconds = await self.reserve_permit(
            name, now=now, interval=interval, tolerance=tolerance, max_wait=0.0
        )
        return granted, seconds, math.nan

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Release connections."""


class SharedStateDownError(ResilienceError):
    """Raised by a store (or a wrapper of one) that knows it is down and has reported it:
    a :class:`StoreLink` counts it without logging, so one outage is not one warning per
    component and interval."""


class StoreLink:
    """One component's link to a :class:`SharedState`, with a short fuse.

    :meth:`run` gives up on an operation after ``timeout`` seconds of real time (network
    time, so the event loop's timer, whatever the component's clock) and then leaves the
    store alone for ``retry_interval`` seconds of the component's clock: a store that is
    down costs one timeout per interval, not one per call.
    """

    __slots__ = ("_clock", "_down_until", "_what", "errors", "retry_interval", "store", "timeout")

    def __init__(
        self, store: SharedState, *, what: str, clock: Clock, timeout: float, retry_interval: float
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._clock = clock
        self._what = what
        self._down_until = float("-inf")
        #: Operations that failed or timed out since the link was made.
        self.errors = 0

    @property
    def available(self) -> bool:
        """``False`` while the store is being left alone after a failure."""
        return self._clock.monotonic() >= self._down_until

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T | None:
        """The result of ``operation()``, or ``None`` if the store failed or was too slow."""
        if not self.available:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                result = await operation()
        except SharedStateDownError:
            self.errors += 1
            self._down_until = self._clock.monotonic() + self.retry_interval
            return None
        except Exception as exc:
            # Logged once per interval at most: the link is left alone until it ends.
            self.errors += 1
            self._down_until = self._clock.monotonic() + self.retry_interval
            log.warning(
                "%s: shared state unavailable (%s: %s); deciding locally for %.1f s",
                self._what,
                type(exc).__name__,
                exc,
                self.retry_interval,
            )
            return None
        self._down_until = float("-inf")
        return result
