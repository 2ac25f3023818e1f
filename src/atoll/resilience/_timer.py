"""Timers that race work against time on an injected :class:`~atoll.determinism.Clock`.

For the :class:`~atoll.determinism.SystemClock` they are the event loop's own timers
(:func:`asyncio.timeout`): the loop's time is the same monotonic clock, and a loop
timer costs no task. For any other clock a watchdog task sleeps on the clock and then
expires the same :class:`asyncio.Timeout`, so a :class:`~atoll.determinism.VirtualClock`
fires timeouts when a test advances it.

A clock whose ``auto_advance`` attribute is true (``VirtualClock(auto_advance=True)``,
the test mode that turns off waiting) completes every sleep at once, the watchdog's
included; racing against it would cut every call short after one turn of the loop. So
there no timer races the work: a call is judged afterwards, by how far the clock moved
while it ran (see :func:`overran`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from atoll.determinism import Clock, SystemClock


def uses_loop_timer(clock: Clock) -> bool:
    """``True`` if the event loop's timers measure ``clock``'s time."""
    return type(clock) is SystemClock


def skips_waiting(clock: Clock) -> bool:
    """``True`` for a clock in test mode, whose sleeps return at once."""
    return bool(getattr(clock, "auto_advance", False))


async def _expire_after(clock: Clock, seconds: float, timer: asyncio.Timeout) -> None:
    await clock.sleep(seconds)
    timer.reschedule(asyncio.get_running_loop().time())


@asynccontextmanager
async def race(clock: Clock, seconds: float | None) -> AsyncIterator[asyncio.Timeout]:
    """Like :func:`asyncio.timeout`, but ``seconds`` are measured on ``clock``.

    ``None`` means no limit. Raises :class:`TimeoutError` when time runs out; use the
    yielded timeout's ``expired()`` to tell this timer from another.
    """
    if seconds is None or uses_loop_timer(clock) or skips_waiting(clock):
        delay = None if seconds is None or skips_waiting(clock) else seconds
        async with asyncio.timeout(delay) as timeout:
            yield timeout
        return
    async with asyncio.timeout(None) as timeout:
        watchdog = asyncio.get_running_loop().create_task(_expire_after(clock, seconds, timeout))
        try:
            yield timeout
        finally:
            watchdog.cancel()


_RUNNING = 0
_DONE = 1
_EXPIRING = 2
_EXPIRED = 3


class Ticket:
    """One call's place in a :class:`FifoTimer`."""

    __slots__ = ("cancelling", "deadline", "state", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.state = _RUNNING
        # Cancellation requests already pending when the call started: ours is on top.
        self.cancelling = task.cancelling()


class FifoTimer:
    """Timeouts of one fixed duration on the event loop's clock, sharing one loop timer.

    :func:`asyncio.timeout` schedules and cancels a timer handle per call, which costs
    several microseconds on CPython 3.11 (a heap push, a handle, a ``Timeout`` object).
    Every call through one :class:`~atoll.resilience.Timeout` policy gets the same
    duration, so on one loop their deadlines come in the order the calls start: a FIFO
    queue of tickets and at most one armed loop timer suffice. The timer fires at the
    head's deadline, cancels the calls whose deadline has passed and re-arms for the next
    running one; finished calls are dropped from the head as they finish.

    The cancellation protocol is :class:`asyncio.Timeout`'s: the call's task is
    cancelled; when the call then ends with :class:`asyncio.CancelledError` and no other
    cancellation was requested meanwhile (``Task.uncancel``), :meth:`settle` says it was
    this timeout, and the caller raises its :class:`TimeoutError`.
    """

    __slots__ = ("_armed", "_loop", "_queue", "_seconds", "_thread")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._queue: collections.deque[Ticket] = collections.deque()
        self._armed = False

    def enter(self) -> Ticket:
        """Start timing the current task."""
        # The loop of the last call first, if this is its thread: asking for the running
        # loop costs a getpid() system call on Python 3.11, and in the thread that ran
        # that loop, a current task of it means it is the loop running now.
        loop = self._loop
        task = None
        if loop is not None and self._thread == threading.get_ident():
            task = asyncio.current_task(loop)
        if loop is None or task is None:
            loop = asyncio.get_running_loop()
            if loop is not self._loop:  # a policy outliving its loop (tests): start afresh
                self._loop = loop
                self._thread = threading.get_ident()
                self._queue = collections.deque()
                self._armed = False
            task = asyncio.current_task(loop)
            if task is None:
                raise RuntimeError("a Timeout must be used inside a task")
        ticket = Ticket(task, loop.time() + self._seconds)
        self._queue.append(ticket)
        if not self._armed:
            self._armed = True
            loop.call_at(ticket.deadline, self._fire)
        return ticket

    def settle(self, ticket: Ticket, exc: BaseException | None) -> bool:
        """Stop timing; ``True`` if this timer cut the call short (raise a timeout)."""
        if ticket.state == _RUNNING:
            ticket.state = _DONE
            queue = self._queue
            while queue and queue[0].state:
                queue.popleft()
            return False
        if ticket.state == _EXPIRING:
            ticket.state = _EXPIRED
            return ticket.task.uncancel() <= ticket.cancelling and isinstance(
                exc, asyncio.CancelledError
            )
        return False

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None
        queue = self._queue
        now = loop.time()
        while queue:
            ticket = queue[0]
            if ticket.state:
                queue.popleft()
            elif ticket.deadline <= now:
                queue.popleft()
                ticket.state = _EXPIRING
                ticket.task.cancel()
            else:
                loop.call_at(ticket.deadline, self._fire)
                return
        self._armed = False
