"""Clocks: the only way framework code reads time or sleeps."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """The source of time for everything atoll does.

    Contract:

    * ``time()`` must return wall-clock seconds since the Unix epoch. It is used for
      values that leave the process (timestamps in envelopes, leases shared between
      processes, scheduled deliveries) and may jump.
    * ``monotonic()`` must never decrease. It is used for durations inside one process
      (timeouts, windows, backoff).
    * ``sleep(seconds)`` must suspend the calling task until ``monotonic()`` has advanced
      by at least ``seconds``; ``sleep(0)`` must yield to the event loop once. It must be
      cancellable like :func:`asyncio.sleep`.
    """

    def time(self) -> float:
        """Return wall-clock seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock: :func:`time.time`, :func:`time.monotonic` and :func:`asyncio.sleep`."""

    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


class VirtualClock:
    """A clock that moves only when told to, for tests and simulation.

    Sleepers wake in deadline order when :meth:`advance` moves time past their deadline.
    With ``auto_advance=True`` a sleep returns at once and moves the clock by its duration
    ("test mode that turns off waiting"), which keeps retries and backoff instantaneous
    while their arithmetic stays observable.
    """

    def __init__(self, start: float = 1_700_000_000.0, *, auto_advance: bool = False) -> None:
        self._wall_offset = start
        self._now = 0.0
        self._auto_advance = auto_advance
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def time(self) -> float:
        return self._wall_offset + self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        if self._auto_advance:
            self._now += seconds
            await asyncio.sleep(0)
            return
        if seconds == 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._counter), future))
        await future

    @property
    def auto_advance(self) -> bool:
        """``True`` if every sleep returns at once and moves the clock (test mode)."""
        return self._auto_advance

    @property
    def pending_sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        """The monotonic time at which the next sleeper wakes, if any."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper whose deadline passes.

        Sleepers are woken one deadline at a time and the event loop runs between them,
        so work scheduled by an earlier sleeper sees the time it expects.
        """
        if seconds < 0:
            raise ValueError("a clock cannot move backwards")
        target = self._now + seconds
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            self._now = max(self._now, deadline)
            while self._sleepers and self._sleepers[0][0] <= self._now:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now!r})"
