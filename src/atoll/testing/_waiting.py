"""Waiting in tests: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from atoll.determinism import SystemClock

_clock = SystemClock()


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Return once ``condition()`` is true; fail the test after ``timeout`` seconds."""
    deadline = _clock.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if _clock.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await _clock.sleep(interval)
