"""Wake-up hints for readers of the global log.

A hint says "something may have been committed"; it never carries data, so a lost or
spurious hint costs latency, not correctness. Readers always poll as well.
"""

from __future__ import annotations

import asyncio
from typing import Self

from atoll.determinism import Clock


class Waiter:
    """One reader's wake-up flag.

    Clear it *before* reading, then :meth:`wait` after a short read: a hint that arrives
    while the reader reads leaves the flag set, so no hint is lost between the two.
    """

    __slots__ = ("_event", "_hub")

    def __init__(self, hub: WakeHub) -> None:
        self._hub = hub
        self._event = asyncio.Event()

    def clear(self) -> None:
        """Forget hints received so far."""
        self._event.clear()

    def set(self) -> None:
        """Deliver a hint."""
        self._event.set()

    @property
    def is_set(self) -> bool:
        """Whether a hint arrived since the last :meth:`clear`."""
        return self._event.is_set()

    async def wait(self, timeout: float, clock: Clock) -> bool:
        """Return ``True`` on a hint, ``False`` after ``timeout`` seconds of ``clock``."""
        if self._event.is_set():
            return True
        if timeout <= 0:
            return False
        hinted = asyncio.ensure_future(self._event.wait())
        sleeper = asyncio.ensure_future(clock.sleep(timeout))
        try:
            await asyncio.wait([hinted, sleeper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hinted.cancel()
            sleeper.cancel()
        return self._event.is_set()

    def close(self) -> None:
        """Stop receiving hints."""
        self._hub.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WakeHub:
    """The waiters of one event store; :meth:`wake` hints all of them."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: set[Waiter] = set()

    def waiter(self) -> Waiter:
        """Register a new waiter (close it when done)."""
        waiter = Waiter(self)
        self._waiters.add(waiter)
        return waiter

    def discard(self, waiter: Waiter) -> None:
        """Unregister ``waiter``."""
        self._waiters.discard(waiter)

    def wake(self) -> None:
        """Hint every registered waiter."""
        for waiter in self._waiters:
            waiter.set()

    def __len__(self) -> int:
        return len(self._waiters)
