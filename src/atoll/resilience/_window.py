"""Sliding windows of call outcomes, for circuit breakers.

An outcome is coded in two bits: ``FAILED`` and ``SLOW``. A window keeps running totals
(``calls``, ``failures``, ``slow``) so reading them costs nothing; recording an outcome
updates them in constant time.
"""

from __future__ import annotations

FAILED = 1
SLOW = 2


class CountWindow:
    """The outcomes of the last ``size`` calls, in a ring buffer."""

    __slots__ = ("_pos", "_ring", "_size", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._size = size
        self._ring = [0] * size
        self._pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    @property
    def size(self) -> int:
        """How many calls the window holds."""
        return self._size

    def record(self, code: int, now: float) -> None:  # noqa: ARG002 - same shape as TimeWindow
        """Add one outcome, evicting the oldest once the window is full."""
        ring = self._ring
        pos = self._pos
        old = ring[pos]
        if old != code:
            ring[pos] = code
            self.failures += (code & FAILED) - (old & FAILED)
            self.slow += ((code & SLOW) - (old & SLOW)) >> 1
        pos += 1
        self._pos = 0 if pos == self._size else pos
        if self.calls != self._size:
            self.calls += 1

    def refresh(self, now: float) -> None:
        """Nothing to expire in a count window."""

    def reset(self) -> None:
        """Forget every outcome."""
        self._ring = [0] * self._size
        self._pos = 0
        self.calls = self.failures = self.slow = 0


class TimeWindow:
    """The outcomes of the last ``seconds``, in ``buckets`` buckets of equal width.

    Outcomes expire a bucket at a time, so the window covers between
    ``seconds * (1 - 1/buckets)`` and ``seconds`` of history. Time must not go backwards
    (a monotonic clock).
    """

    __slots__ = (
        "_c",
        "_end",
        "_f",
        "_head",
        "_n",
        "_s",
        "_slot",
        "_width",
        "calls",
        "failures",
        "slow",
    )

    def __init__(self, seconds: float, buckets: int = 10) -> None:
        self._n = buckets
        self._width = seconds / buckets
        self._c = [0] * buckets
        self._f = [0] * buckets
        self._s = [0] * buckets
        self._head = 0  # the epoch (bucket number since time 0) of the current bucket
        self._slot = 0  # its index in the lists
        self._end = self._width  # the time at which it ends
        self.calls = 0
        self.failures = 0
        self.slow = 0

    @property
    def bucket_width(self) -> float:
        """Seconds covered by one bucket."""
        return self._width

    @property
    def buckets(self) -> int:
        """How many buckets the window has."""
        return self._n

    def refresh(self, now: float) -> None:
        """Expire the buckets that ``now`` has left behind."""
        if now < self._end:
            return
        epoch = int(now // self._width)
        head = self._head
        n = self._n
        if epoch - head >= n:
            self._c = [0] * n
            self._f = [0] * n
            self._s = [0] * n
            self.calls = self.failures = self.slow = 0
        else:
            c, f, s = self._c, self._f, self._s
            for k in range(head + 1, epoch + 1):
                slot = k % n
                self.calls -= c[slot]
                self.failures -= f[slot]
                self.slow -= s[slot]
                c[slot] = f[slot] = s[slot] = 0
        self._head = epoch
        self._slot = epoch % n
        self._end = (epoch + 1) * self._width

    def record(self, code: int, now: float) -> None:
        """Add one outcome at time ``now``."""
        if now >= self._end:
            self.refresh(now)
        slot = self._slot
        self._c[slot] += 1
        self.calls += 1
        if code:
            if code & FAILED:
                self._f[slot] += 1
                self.failures += 1
            if code & SLOW:
                self._s[slot] += 1
                self.slow += 1

    def reset(self) -> None:
        """Forget every outcome."""
        n = self._n
        self._c = [0] * n
        self._f = [0] * n
        self._s = [0] * n
        self.calls = self.failures = self.slow = 0
