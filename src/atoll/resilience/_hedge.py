"""Hedging: when a call is slow, start another; the first success wins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from atoll.determinism import Clock, SystemClock
from atoll.resilience import _check
from atoll.resilience._classify import DEFAULT, FAILURE, Classifier
from atoll.resilience._errors import InvalidPolicyError
from atoll.resilience._policy import Policy
from atoll.resilience._timer import skips_waiting, uses_loop_timer

T = TypeVar("T")


class Hedge(Policy):
    """Start up to ``max_hedges`` extra attempts, each ``delay`` seconds after the last.

    The first attempt to succeed wins; the others are cancelled (and awaited, so none
    outlives the call). An attempt that fails (per ``classifier``) while others run is
    set aside; when every started attempt has failed the next hedge starts at once
    without waiting for the delay, and when none are left the last failure is raised
    (or the last failed result returned). An exception the classifier does not count as
    a failure (the service answered, say with a 404) ends the call at once.

    Only hedge calls that are safe to make twice (reads, idempotent writes). With a
    test-mode clock (``auto_advance``), hedges start only when an attempt fails.
    """

    __slots__ = ("_classifier", "_clock", "_delay", "_max_hedges", "_name", "hedges_total")

    def __init__(
        self,
        *,
        delay: float,
        max_hedges: int = 1,
        classifier: Classifier = DEFAULT,
        name: str = "hedge",
        clock: Clock | None = None,
    ) -> None:
        self._delay = _check.duration("delay", delay)
        self._max_hedges = _check.count("max_hedges", max_hedges)
        if not isinstance(classifier, Classifier):
            raise InvalidPolicyError("classifier", f"must be a Classifier, not {classifier!r}")
        self._classifier = classifier
        self._name = _check.name("name", name)
        self._clock: Clock = clock or SystemClock()
        #: Extra attempts started.
        self.hedges_total = 0

    @property
    def name(self) -> str:
        return self._name

    def _failed(self, task: asyncio.Task[Any]) -> bool:
        if task.cancelled():
            return True
        exc = task.exception()
        if exc is not None:
            return self._classifier.classify_exception(exc) == FAILURE
        return self._classifier.is_failure_result(task.result())

    async def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        async def attempt() -> T:
            return await fn(*args, **kwargs)

        race = _Race(self, attempt)
        try:
            return await race.run()
        finally:
            await race.cancel_all()

    def __repr__(self) -> str:
        return f"Hedge(delay={self._delay!r}, max_hedges={self._max_hedges})"


class _Race(Generic[T]):
    """One hedged call: the attempts in flight and the timer for the next one."""

    __slots__ = ("_attempt", "_hedge", "_last", "_loop", "_next_at", "_running", "_timer")

    def __init__(self, hedge: Hedge, attempt: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._hedge = hedge
        self._attempt = attempt
        self._loop = asyncio.get_running_loop()
        self._running: set[asyncio.Task[T]] = set()
        self._timer: asyncio.Task[None] | None = None  # for clocks other than the loop's
        self._next_at = 0.0  # for the loop's own timer
        self._last: asyncio.Task[T] | None = None

    def _start(self) -> None:
        self._running.add(self._loop.create_task(self._attempt()))
        self._next_at = self._loop.time() + self._hedge._delay
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _next_event(self, hedges_left: int) -> tuple[set[asyncio.Task[T]], bool]:
        """Wait for attempts to finish or the next hedge to fall due; return the finished
        attempts and whether a hedge is due."""
        hedge = self._hedge
        clock = hedge._clock
        waiting: set[asyncio.Future[Any]] = set(self._running)
        timeout: float | None = None
        if hedges_left and not skips_waiting(clock):
            if uses_loop_timer(clock):
                timeout = max(0.0, self._next_at - self._loop.time())
            else:
                if self._timer is None:
                    self._timer = self._loop.create_task(clock.sleep(hedge._delay))
                waiting.add(self._timer)
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        due = not done or (self._timer is not None and self._timer in done)
        return {task for task in self._running if task in done}, due

    async def run(self) -> T:
        hedge = self._hedge
        hedges_left = hedge._max_hedges
        self._start()
        while True:
            finished, due = await self._next_event(hedges_left)
            for task in finished:
                self._running.discard(task)
                if not hedge._failed(task):
                    return task.result()  # the winner, or an error that is not a failure
                self._last = task
            if hedges_left and (due or not self._running):
                hedges_left -= 1
                hedge.hedges_total += 1
                self._start()
            elif not self._running:
                assert self._last is not None
                return self._last.result()  # every attempt failed: the last failure

    async def cancel_all(self) -> None:
        """Cancel the losers and wait for them to unwind (our own cancellation still
        propagates)."""
        leftovers: list[asyncio.Task[Any]] = [*self._running]
        if self._timer is not None:
            leftovers.append(self._timer)
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers)
            for task in leftovers:
                if not task.cancelled():
                    task.exception()  # retrieved, so asyncio does not log it
