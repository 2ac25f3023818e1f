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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
