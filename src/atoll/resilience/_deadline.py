"""Deadlines that travel with a call, so no downstream call waits past the caller's patience.

Inside a process the deadline is a :class:`~contextvars.ContextVar`: a
:class:`~atoll.resilience.Timeout` narrows it for everything it wraps, tasks started
inside inherit it, and every atoll policy and client reads it. Between processes it
travels as:

* HTTP: the header ``X-Atoll-Deadline`` with the **remaining milliseconds** as a whole
  number (``X-Atoll-Deadline: 1500``), like gRPC's ``grpc-timeout``. A duration, not an
  instant, so the two hosts' clocks need not agree; the receiver starts counting when
  the request arrives, so network transit is not subtracted (the caller's own timeout
  still guards it). Rounded down, so the downstream never gets more time than is left.
* Messages: :attr:`atoll.messages.Envelope.deadline`, an absolute UTC instant, because a
  message can wait in a queue for an unknown time; this needs the hosts' clocks to be
  synchronised (NTP), which the messaging layer already assumes for scheduled delivery.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from atoll.determinism import Clock, SystemClock

#: The HTTP header carrying the remaining time in milliseconds.
DEADLINE_HEADER = "X-Atoll-Deadline"
# More than a day of remaining time is treated as "no deadline" rather than trusted.
_MAX_HEADER_MS = 86_400_000

_SYSTEM_CLOCK = SystemClock()


class Deadline:
    """An instant on a clock's monotonic time after which nobody waits for the result."""

    __slots__ = ("_at", "_clock")

    def __init__(self, at: float, clock: Clock) -> None:
        self._at = at
        self._clock = clock

    @classmethod
    def after(cls, seconds: float, *, clock: Clock | None = None) -> Deadline:
        """The deadline ``seconds`` from now."""
        clock = clock or _SYSTEM_CLOCK
        return cls(clock.monotonic() + seconds, clock)

    @property
    def at(self) -> float:
        """The instant, on :attr:`clock`'s monotonic time."""
        return self._at

    @property
    def clock(self) -> Clock:
        """The clock this deadline is measured on."""
        return self._clock

    def remaining(self) -> float:
        """Seconds left, never negative."""
        left = self._at - self._clock.monotonic()
        return left if left > 0 else 0.0

    @property
    def expired(self) -> bool:
        """``True`` once no time is left."""
        return self._clock.monotonic() >= self._at

    def earliest(self, other: Deadline | None) -> Deadline:
        """The earlier of this deadline and ``other``."""
        if other is None or self.remaining() <= other.remaining():
            return self
        return other

    def to_header(self) -> str:
        """The value of :data:`DEADLINE_HEADER`: remaining whole milliseconds, rounded down."""
        return str(int(self.remaining() * 1000))

    @classmethod
    def from_header(cls, value: str | None, *, clock: Clock | None = None) -> Deadline | None:
        """The deadline a received :data:`DEADLINE_HEADER` value gives, counted from now.

        A missing or malformed value (not a whole number of milliseconds, or more than a
        day) gives ``None``: a peer's bad header must not fail the request.
        """
        if value is None:
            return None
        value = value.strip()
        if not value.isascii() or not value.isdigit() or len(value) > 9:
            return None
        millis = int(value)
        if millis > _MAX_HEADER_MS:
            return None
        return cls.after(millis / 1000, clock=clock)

    def to_datetime(self) -> datetime:
        """The deadline as an absolute UTC instant, for :attr:`Envelope.deadline`."""
        clock = self._clock
        return datetime.fromtimestamp(clock.time() + (self._at - clock.monotonic()), tz=UTC)

    @classmethod
    def from_datetime(cls, when: datetime, *, clock: Clock | None = None) -> Deadline:
        """The deadline at the absolute instant ``when`` (a message's deadline).

        A naive ``when`` is taken as UTC.
        """
        clock = clock or _SYSTEM_CLOCK
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return cls(clock.monotonic() + (when.timestamp() - clock.time()), clock)

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3f}s)"


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "atoll_deadline", default=None
)


def current_deadline() -> Deadline | None:
    """The deadline of the call being handled, if it has one."""
    return _current.get()


@contextmanager
def deadline_scope(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Run the block under ``deadline``, or under the current one if that is earlier.

    A scope can only shorten the time available, never extend it: a handler cannot give
    its downstream calls more time than its own caller allowed. Yields the deadline in
    force inside the block.
    """
    current = _current.get()
    effective = deadline.earliest(current) if deadline is not None else current
    token = _current.set(effective)
    try:
        yield effective
    finally:
        _current.reset(token)


def deadline_header() -> dict[str, str]:
    """``{DEADLINE_HEADER: ...}`` for the current deadline, or ``{}`` if there is none."""
    deadline = _current.get()
    return {} if deadline is None else {DEADLINE_HEADER: deadline.to_header()}
