"""Bulkheads: a cap on concurrent calls, with a bounded queue of waiting callers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from atoll.determinism import Clock, SystemClock
from atoll.resilience import _check
from atoll.resilience._deadline import _current
from atoll.resilience._errors import BulkheadFullError
from atoll.resilience._policy import Policy
from atoll.resilience._timer import race

T = TypeVar("T")


class Bulkhead(Policy):
    """At most ``max_concurrent`` calls run at once; up to ``max_queue`` more wait, in order.

    A call that finds every slot taken waits for one, for at most ``max_wait`` seconds
    (``None``: no limit of its own) and never past the propagated deadline. It is refused
    with :class:`BulkheadFullError` when the queue is full or the wait runs out. A slot
    freed by a finishing call passes straight to the first waiter, so a burst of new
    calls cannot overtake the queue. Cancelled waiters leave the queue; a waiter
    cancelled just after being handed a slot passes it on.
    """

    __slots__ = (
        "_active",
        "_clock",
        "_limit",
        "_max_queue",
        "_max_wait",
        "_name",
        "_waiters",
        "rejected_total",
    )

    def __init__(
        self,
        name: str,
        *,
        max_concurrent: int,
        max_queue: int = 0,
        max_wait: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._name = _check.name("name", name)
        self._limit = _check.count("max_concurrent", max_concurrent)
        self._max_queue = _check.count("max_queue", max_queue, minimum=0)
        self._max_wait = _check.optional_duration("max_wait", max_wait)
        self._clock: Clock = clock or SystemClock()
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Calls refused because the bulkhead was full.
        self.rejected_total = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def active(self) -> int:
        """Calls holding a slot now."""
        return self._active

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return len(self._waiters)

    @property
    def max_concurrent(self) -> int:
        """The number of slots."""
        return self._limit

    async def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        if self._active < self._limit and not self._waiters:
            self._active += 1
        else:
            await self._wait_for_slot()
        try:
            return await fn(*args, **kwargs)
        finally:
            self._release()

    def guard(self) -> AbstractAsyncContextManager[None]:
        return self._guard()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        if self._active < self._limit and not self._waiters:
            self._active += 1
        else:
            await self._wait_for_slot()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; ``_active`` stays the same
                return
        self._active -= 1

    def _reject(self, reason: str) -> BulkheadFullError:
        self.rejected_total += 1
        return BulkheadFullError(self._name, reason)

    async def _wait_for_slot(self) -> None:
        if len(self._waiters) >= self._max_queue:
            raise self._reject(
                f"{self._active} calls running and {len(self._waiters)} waiting (max_queue)"
            )
        wait = self._max_wait
        deadline = _current.get()
        if deadline is not None:
            left = deadline.remaining()
            wait = left if wait is None else min(wait, left)
        if wait is not None and wait <= 0:
            raise self._reject(f"{self._active} calls running and no time left to wait")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        timeout: asyncio.Timeout | None = None
        try:
            async with race(self._clock, wait) as timeout:
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot at the last moment: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):  # already taken off by _release
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError) and timeout is not None and timeout.expired():
                raise self._reject(f"no slot came free within {wait:.3f} s") from None
            raise

    def __repr__(self) -> str:
        return f"Bulkhead({self._name!r}, active={self._active}, queued={len(self._waiters)})"
