"""Timeouts that narrow the deadline travelling with the call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from atoll.determinism import Clock, SystemClock
from atoll.resilience import _check
from atoll.resilience._deadline import Deadline, _current
from atoll.resilience._errors import CallTimeoutError, DeadlineExceededError
from atoll.resilience._policy import Policy
from atoll.resilience._timer import FifoTimer, race, skips_waiting, uses_loop_timer

T = TypeVar("T")


class Timeout(Policy):
    """Cancel the call after ``seconds``, or when the propagated deadline passes if sooner.

    Inside, :func:`~atoll.resilience.current_deadline` is the earlier of the two, so
    every policy, client and message below sees how much time is really left. If no time
    is left when the call would start, it does not start: :class:`DeadlineExceededError`.
    Otherwise a call cut short raises :class:`CallTimeoutError` (a :class:`TimeoutError`),
    or :class:`DeadlineExceededError` when the propagated deadline was the shorter limit.

    With a test-mode clock (``VirtualClock(auto_advance=True)``) nothing races the call;
    it fails with :class:`CallTimeoutError` afterwards if the clock moved past the
    deadline while it ran.
    """

    __slots__ = ("_clock", "_fifo", "_loop_timer", "_name", "_seconds", "_test_mode")

    def __init__(
        self, seconds: float, *, name: str = "timeout", clock: Clock | None = None
    ) -> None:
        self._seconds = _check.duration("timeout", seconds, positive=True)
        self._name = _check.name("name", name)
        self._clock: Clock = clock or SystemClock()
        self._loop_timer = uses_loop_timer(self._clock)
        self._test_mode = skips_waiting(self._clock)
        self._fifo = FifoTimer(self._seconds)

    @property
    def name(self) -> str:
        return self._name

    @property
    def seconds(self) -> float:
        """The longest the call may take, deadline aside."""
        return self._seconds

    def _limit(self) -> tuple[float, bool]:
        """Seconds allowed now, and whether the propagated deadline is what limits them."""
        seconds = self._seconds
        parent = _current.get()
        if parent is not None:
            left = parent.remaining()
            if left <= 0:
                raise DeadlineExceededError(
                    f"{self._name}: the deadline passed before the call started; it was not made"
                )
            if left < seconds:
                return left, True
        return seconds, False

    def _expired(self, seconds: float, by_deadline: bool) -> CallTimeoutError:
        if by_deadline:
            return DeadlineExceededError(
                f"{self._name}: the propagated deadline passed after {seconds:.3f} s; "
                "the call was cancelled"
            )
        return CallTimeoutError(
            f"{self._name}: the call did not finish within {seconds:.3f} s and was cancelled"
        )

    async def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        seconds, by_deadline = self._limit()
        clock = self._clock
        token = _current.set(Deadline(clock.monotonic() + seconds, clock))
        timeout: asyncio.Timeout | None = None
        try:
            if self._loop_timer and not by_deadline:
                ticket = self._fifo.enter()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    if self._fifo.settle(ticket, exc):
                        raise self._expired(seconds, by_deadline) from exc
                    raise
                self._fifo.settle(ticket, None)
                return result
            if self._loop_timer:  # a shorter deadline: not in this policy's FIFO order
                timeout = asyncio.timeout(seconds)
                async with timeout:
                    return await fn(*args, **kwargs)
            if not self._test_mode:
                async with race(clock, seconds) as timeout:
                    return await fn(*args, **kwargs)
            started = clock.monotonic()
            result = await fn(*args, **kwargs)
            if clock.monotonic() - started > seconds:
                raise self._expired(seconds, by_deadline)
            return result  # noqa: TRY300 - the except clause must not see this return
        except TimeoutError as exc:
            if timeout is not None and timeout.expired():
                raise self._expired(seconds, by_deadline) from exc
            raise
        finally:
            _current.reset(token)

    def guard(self) -> AbstractAsyncContextManager[None]:
        return self._guard()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        seconds, by_deadline = self._limit()
        clock = self._clock
        token = _current.set(Deadline(clock.monotonic() + seconds, clock))
        started = clock.monotonic()
        timeout: asyncio.Timeout | None = None
        try:
            async with race(clock, seconds) as timeout:
                yield
            if self._test_mode and clock.monotonic() - started > seconds:
                raise self._expired(seconds, by_deadline)
        except TimeoutError as exc:
            if timeout is not None and timeout.expired():
                raise self._expired(seconds, by_deadline) from exc
            raise
        finally:
            _current.reset(token)

    def __repr__(self) -> str:
        return f"Timeout({self._seconds!r})"
