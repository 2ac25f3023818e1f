"""The circuit breaker: stop calling a dependency that is failing, and find out when it is back.

States (resilience4j's model):

* **closed**: calls go through; their outcomes fill a sliding window (the last N calls,
  or the last N seconds). Once the window holds at least ``minimum_calls`` and the share
  of failures reaches ``failure_rate`` (or the share of slow calls reaches
  ``slow_call_rate``), the breaker opens.
* **open**: calls fail at once with :class:`BreakerOpenError`. After ``wait`` seconds
  (growing by ``wait_multiplier`` after each failed recovery, up to ``max_wait``) the
  next call finds it half-open.
* **half-open**: up to ``half_open_calls`` trial calls go through, the rest are refused.
  Once ``half_open_successes`` of them succeed the breaker closes with an empty window;
  as soon as that has become impossible it opens again.

Calls that started before a state change do not count towards the new state: a slow
call started while closed and failing while half-open is not a failed trial. Cancelled
calls count for nothing and give back their trial permit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from atoll.determinism import Clock, SystemClock
from atoll.resilience import _check
from atoll.resilience._classify import DEFAULT, FAILURE, IGNORE, Classifier
from atoll.resilience._errors import (
    BreakerOpenError,
    BulkheadFullError,
    DeadlineExceededError,
    InvalidPolicyError,
    RateLimitedError,
)
from atoll.resilience._policy import P, Policy
from atoll.resilience._shared import SharedState, SharedWindow, StoreLink
from atoll.resilience._window import FAILED, SLOW, CountWindow, TimeWindow

log = logging.getLogger("atoll.resilience")

T = TypeVar("T")

_CLOSED = 0
_OPEN = 1
_HALF_OPEN = 2

# Refusals by atoll's own local policies, and a caller's deadline that ran out, say
# nothing about the dependency's health: a breaker never records them.
_ALWAYS_IGNORED = (BulkheadFullError, RateLimitedError, DeadlineExceededError)


class BreakerState(enum.Enum):
    """The state of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_STATES = (BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN)


@dataclass(frozen=True, slots=True)
class StateChange:
    """A breaker changed state. ``at`` is wall-clock Unix seconds."""

    breaker: str
    previous: BreakerState
    current: BreakerState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What a breaker knows, for metrics and the ``/atoll/breakers`` endpoint.

    Window figures are those the breaker decides on (shared across instances when the
    breaker is shared and the store is reachable). ``failure_rate`` and ``slow_call_rate``
    are ``None`` until the window holds ``minimum_calls``. The ``*_total`` counters are
    cumulative since the breaker was made, whatever its state.
    """

    name: str
    state: BreakerState
    window_calls: int
    window_failures: int
    window_slow: int
    failure_rate: float | None
    slow_call_rate: float | None
    retry_at: float | None
    sharing: Literal["local", "shared", "degraded"]
    successes_total: int
    failures_total: int
    slow_successes_total: int
    slow_failures_total: int
    ignored_total: int
    rejected_total: int
    transitions_total: int


def _make_window(kind: str, size: float) -> CountWindow | TimeWindow:
    if kind == "count":
        if isinstance(size, float) and size.is_integer():
            size = int(size)
        return CountWindow(_check.count("window_size", size))
    if kind == "time":
        return TimeWindow(_check.duration("window_size", size, positive=True))
    raise InvalidPolicyError("window", f"must be 'count' or 'time', got {kind!r}")


class CircuitBreaker(Policy):
    """A circuit breaker named ``name``; see the module docstring for the state machine.

    * ``window``: ``"count"`` (the last ``window_size`` calls) or ``"time"`` (the last
      ``window_size`` seconds, in 10 buckets).
    * ``slow_call_duration``: calls taking at least this long are slow; ``None`` turns
      slow-call detection off (and with a count window, successful calls then read no
      clock at all).
    * ``classifier``: which exceptions and results are failures; see :class:`Classifier`.
    * ``shared``: a :class:`SharedState` to share the window and the open state with other
      instances (time windows only); ``shared_timeout`` bounds each store operation and
      ``sync_interval`` is how often an instance with traffic exchanges counts. While the
      store is unreachable the breaker decides on its own window.
    """

    __slots__ = (
        "_classifier",
        "_clock",
        "_count",
        "_failure_rate",
        "_gen",
        "_half_open_calls",
        "_half_open_successes",
        "_lean",
        "_listeners",
        "_max_wait",
        "_min_calls",
        "_monotonic",
        "_name",
        "_needs_now",
        "_open_until",
        "_open_until_wall",
        "_probe_failures",
        "_probe_successes",
        "_probes",
        "_reopens",
        "_result_predicate",
        "_shared",
        "_slow_duration",
        "_slow_rate",
        "_state",
        "_wait",
        "_wait_multiplier",
        "_window",
        "_window_kind",
        "failures_total",
        "ignored_total",
        "rejected_total",
        "slow_failures_total",
        "slow_successes_total",
        "successes_total",
        "transitions_total",
    )

    def __init__(
        self,
        name: str,
        *,
        window: Literal["count", "time"] = "count",
        window_size: float = 100,
        minimum_calls: int = 20,
        failure_rate: float = 0.5,
        slow_call_rate: float = 1.0,
        slow_call_duration: float | None = None,
        wait: float = 30.0,
        wait_multiplier: float = 1.0,
        max_wait: float | None = None,
        half_open_calls: int = 3,
        half_open_successes: int | None = None,
        classifier: Classifier = DEFAULT,
        clock: Clock | None = None,
        shared: SharedState | None = None,
        shared_timeout: float = 0.05,
        sync_interval: float = 0.25,
    ) -> None:
        self._name = _check.name("name", name)
        self._window_kind = window
        self._window = _make_window(window, window_size)
        self._min_calls = _check.count("minimum_calls", minimum_calls)
        if isinstance(self._window, CountWindow) and self._min_calls > self._window.size:
            raise InvalidPolicyError(
                "minimum_calls",
                f"{minimum_calls} is more than window_size ({window_size}) of a count window: "
                "the breaker could never open",
            )
        self._failure_rate = _check.fraction("failure_rate", failure_rate)
        self._slow_rate = _check.fraction("slow_call_rate", slow_call_rate)
        self._slow_duration = _check.optional_duration(
            "slow_call_duration", slow_call_duration, positive=True
        )
        self._wait = _check.duration("wait", wait)
        self._wait_multiplier = _check.factor("wait_multiplier", wait_multiplier)
        self._max_wait = self._wait if max_wait is None else _check.duration("max_wait", max_wait)
        if self._max_wait < self._wait:
            raise InvalidPolicyError("max_wait", f"must be at least wait ({self._wait})")
        self._half_open_calls = _check.count("half_open_calls", half_open_calls)
        successes = half_open_calls if half_open_successes is None else half_open_successes
        self._half_open_successes = _check.count("half_open_successes", successes)
        if self._half_open_successes > self._half_open_calls:
            raise InvalidPolicyError(
                "half_open_successes",
                f"{successes} is more than half_open_calls ({half_open_calls}): "
                "the breaker could never close",
            )
        if not isinstance(classifier, Classifier):
            raise InvalidPolicyError("classifier", f"must be a Classifier, not {classifier!r}")
        self._classifier = classifier
        self._result_predicate = classifier.result_predicate
        self._clock: Clock = clock or SystemClock()
        self._monotonic = self._clock.monotonic
        # Whether recording an outcome needs the time: for slow calls, or to find the
        # bucket of a time window. A count window without slow calls needs none.
        self._needs_now = window == "time" or self._slow_duration is not None
        # Lean: a count window, not shared. Successes (not slow) then take the inlined
        # path of ``_record_lean_success``; ``_count`` is only read then.
        self._lean = window == "count" and shared is None
        self._count = self._window if isinstance(self._window, CountWindow) else CountWindow(1)
        self._state = _CLOSED
        self._gen = 0
        self._open_until = 0.0
        self._open_until_wall = 0.0
        self._reopens = 0
        self._probes = 0
        self._probe_successes = 0
        self._probe_failures = 0
        self._listeners: list[Callable[[StateChange], None]] = []
        self.successes_total = 0
        self.failures_total = 0
        self.slow_successes_total = 0
        self.slow_failures_total = 0
        self.ignored_total = 0
        self.rejected_total = 0
        self.transitions_total = 0
        shared_timeout = _check.duration("shared_timeout", shared_timeout, positive=True)
        sync_interval = _check.duration("sync_interval", sync_interval, positive=True)
        self._shared: _SharedBreaker | None = None
        if shared is not None:
            self._shared = self._share(shared, shared_timeout, sync_interval)

    def _share(
        self, store: SharedState, shared_timeout: float, sync_interval: float
    ) -> _SharedBreaker:
        if not isinstance(store, SharedState):
            raise InvalidPolicyError("shared", f"must be a SharedState, not {store!r}")
        if not isinstance(self._window, TimeWindow):
            raise InvalidPolicyError(
                "shared",
                "only a time window can be shared: instances agree on time buckets, "
                "not on which calls are 'the last N'",
            )
        link = StoreLink(
            store,
            what=f"circuit breaker {self._name!r}",
            clock=self._clock,
            timeout=shared_timeout,
            retry_interval=1.0,
        )
        return _SharedBreaker(self, link, sync_interval)

    # -- introspection ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def classifier(self) -> Classifier:
        """How this breaker classifies outcomes."""
        return self._classifier

    @property
    def state(self) -> BreakerState:
        """The current state. An open breaker whose wait is over reports ``OPEN`` until a
        call arrives and finds it half-open."""
        return _STATES[self._state]

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's state and counts, for metrics and status endpoints."""
        now = self._monotonic()
        calls, failures, slow = self._totals(now)
        enough = calls >= self._min_calls and calls > 0
        sharing: Literal["local", "shared", "degraded"] = "local"
        if self._shared is not None:
            sharing = "shared" if self._shared.fresh(now) else "degraded"
        return BreakerSnapshot(
            name=self._name,
            state=_STATES[self._state],
            window_calls=calls,
            window_failures=failures,
            window_slow=slow,
            failure_rate=failures / calls if enough else None,
            slow_call_rate=slow / calls if enough and self._slow_duration is not None else None,
            retry_at=self._open_until_wall if self._state == _OPEN else None,
            sharing=sharing,
            successes_total=self.successes_total,
            failures_total=self.failures_total,
            slow_successes_total=self.slow_successes_total,
            slow_failures_total=self.slow_failures_total,
            ignored_total=self.ignored_total,
            rejected_total=self.rejected_total,
            transitions_total=self.transitions_total,
        )

    def add_listener(self, listener: Callable[[StateChange], None]) -> None:
        """Call ``listener`` on every state change.

        Listeners run synchronously inside the call that caused the change; they must be
        quick. An exception in a listener is logged and never fails the call.
        """
        self._listeners.append(listener)

    def reset(self) -> None:
        """Close the breaker and forget its window (an operator's override)."""
        if self._state != _CLOSED:
            self._transition(_CLOSED, self._monotonic(), "reset")
        else:
            self._window.reset()

    async def aclose(self) -> None:
        """Stop background exchanges with the shared store, if any."""
        if self._shared is not None:
            await self._shared.aclose()

    # -- the call path ------------------------------------------------------------------

    async def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        # The hot path; ``wrap`` has a copy of it, kept in step, to save a call frame.
        gen = self._acquire() if self._state else self._gen
        start = self._monotonic() if self._slow_duration is not None else 0.0
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self._on_exception(gen, start, exc)
            raise
        except BaseException:
            self._on_abandoned(gen)
            raise
        predicate = self._result_predicate
        if predicate is not None and predicate(result):
            self._on_outcome(gen, start, FAILED)
        elif self._lean and gen == self._gen and not self._state:
            slow = self._slow_duration
            if slow is not None:
                now = self._monotonic()
                if now - start >= slow:
                    self._record(gen, now, SLOW)
                    return result
            self.successes_total += 1
            window = self._count
            pos = window._pos + 1
            if window._ring[pos - 1] or window.calls != window._size:
                self._record_lean_success()
            else:  # a full window of successes: evicting a success changes nothing
                window._pos = 0 if pos == window._size else pos
        else:
            self._on_outcome(gen, start, 0)
        return result

    def wrap(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        breaker = self
        lean = self._lean
        slow = self._slow_duration
        timed = slow is not None
        predicate = self._result_predicate
        monotonic = self._monotonic
        on_exception = self._on_exception
        on_abandoned = self._on_abandoned
        on_outcome = self._on_outcome
        record = self._record
        record_lean_success = self._record_lean_success
        window = self._count
        size = window._size

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            gen = breaker._acquire() if breaker._state else breaker._gen
            start = monotonic() if timed else 0.0
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                on_exception(gen, start, exc)
                raise
            except BaseException:
                on_abandoned(gen)
                raise
            if predicate is not None and predicate(result):
                on_outcome(gen, start, FAILED)
            elif lean and gen == breaker._gen and not breaker._state:
                if slow is not None:
                    now = monotonic()
                    if now - start >= slow:
                        record(gen, now, SLOW)
                        return result
                breaker.successes_total += 1
                pos = window._pos + 1
                if window._ring[pos - 1] or window.calls != size:
                    record_lean_success()
                else:
                    window._pos = 0 if pos == size else pos
            else:
                on_outcome(gen, start, 0)
            return result

        return wrapper

    def _record_lean_success(self) -> None:
        """Record a success (not slow) in a count window while the breaker is closed.

        Equivalent to ``_record(gen, now, 0)`` in that case, minus the branches that
        cannot apply; a success can only open the breaker by bringing the window up to
        ``minimum_calls`` while it holds failures or slow calls, so only then is it
        evaluated.
        """
        window = self._count
        ring = window._ring
        pos = window._pos
        if ring[pos]:
            window.record(0, 0.0)
        else:
            pos += 1
            window._pos = 0 if pos == window._size else pos
            if window.calls == window._size:
                return
            window.calls += 1
        if window.failures or window.slow:
            self._evaluate(0.0)

    def guard(self) -> AbstractAsyncContextManager[None]:
        """The breaker around a block; it sees exceptions only, not results."""
        return self._guard()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        gen = self._acquire() if self._state else self._gen
        start = self._monotonic() if self._slow_duration is not None else 0.0
        try:
            yield
        except Exception as exc:
            self._on_exception(gen, start, exc)
            raise
        except BaseException:
            self._on_abandoned(gen)
            raise
        self._on_outcome(gen, start, 0)

    def _acquire(self) -> int:
        """Admit a call while not closed, or raise :class:`BreakerOpenError`."""
        if self._state == _OPEN:
            now = self._monotonic()
            if now < self._open_until:
                self.rejected_total += 1
                left = self._open_until - now
                raise BreakerOpenError(self._name, retry_after=left, retry_at=self._open_until_wall)
            self._transition(_HALF_OPEN, now, f"waited {self._current_wait():.3f} s")
        if self._probes >= self._half_open_calls:
            self.rejected_total += 1
            raise BreakerOpenError(self._name, retry_after=None, retry_at=None)
        self._probes += 1
        return self._gen

    def _on_exception(self, gen: int, start: float, exc: Exception) -> None:
        if isinstance(exc, _ALWAYS_IGNORED):
            verdict = IGNORE
        else:
            verdict = self._classifier.classify_exception(exc)
        if verdict == IGNORE:
            self.ignored_total += 1
            self._on_abandoned(gen)
            return
        self._on_outcome(gen, start, FAILED if verdict == FAILURE else 0)

    def _on_abandoned(self, gen: int) -> None:
        """A call that counts for nothing: give back its trial permit, if it had one."""
        if gen == self._gen and self._state == _HALF_OPEN:
            self._probes -= 1

    def _on_outcome(self, gen: int, start: float, code: int) -> None:
        now = 0.0
        if self._needs_now:
            now = self._monotonic()
            slow = self._slow_duration
            if slow is not None and now - start >= slow:
                code |= SLOW
        self._record(gen, now, code)

    def _record(self, gen: int, now: float, code: int) -> None:
        if not code:
            self.successes_total += 1
        elif code == FAILED:
            self.failures_total += 1
        elif code == SLOW:
            self.slow_successes_total += 1
        else:
            self.slow_failures_total += 1
        if gen != self._gen:
            return  # the call started in an earlier state
        if self._state:
            self._on_probe(code, now)
            return
        window = self._window
        window.record(code, now)
        if self._shared is not None:
            self._shared.note(code, now)
            self._evaluate(now)
        elif window.failures or window.slow:
            self._evaluate(now)

    def _on_probe(self, code: int, now: float) -> None:
        # A slow trial call is not a success: the dependency has not recovered.
        if code == 0:
            self._probe_successes += 1
            if self._probe_successes >= self._half_open_successes:
                self._transition(
                    _CLOSED,
                    now or self._monotonic(),
                    f"{self._probe_successes} of {self._probes} trial calls succeeded",
                )
        else:
            self._probe_failures += 1
            if self._probe_failures > self._half_open_calls - self._half_open_successes:
                self._transition(
                    _OPEN,
                    now or self._monotonic(),
                    f"{self._probe_failures} trial calls failed or were slow",
                )

    def _totals(self, now: float) -> tuple[int, int, int]:
        window = self._window
        window.refresh(now)
        shared = self._shared
        if shared is not None and shared.fresh(now):
            return shared.totals()
        return window.calls, window.failures, window.slow

    def _evaluate(self, now: float) -> None:
        if self._state != _CLOSED:
            return
        calls, failures, slow = self._totals(now)
        if calls < self._min_calls or calls == 0:
            return
        if failures >= self._failure_rate * calls:
            reason = f"failure rate {failures / calls:.1%} >= {self._failure_rate:.1%}"
        elif self._slow_duration is not None and slow >= self._slow_rate * calls:
            reason = f"slow-call rate {slow / calls:.1%} >= {self._slow_rate:.1%}"
        else:
            return
        self._transition(_OPEN, now or self._monotonic(), f"{reason} over {calls} calls")
        if self._shared is not None:
            self._shared.publish_open(self._open_until_wall)

    def _current_wait(self) -> float:
        wait = self._wait * self._wait_multiplier**self._reopens
        return min(wait, self._max_wait) if math.isfinite(wait) else self._max_wait

    def _transition(self, to: int, now: float, reason: str, *, wait: float | None = None) -> None:
        previous = self._state
        self._state = to
        self._gen += 1
        self._probes = self._probe_successes = self._probe_failures = 0
        if to == _OPEN:
            self._reopens = self._reopens + 1 if previous == _HALF_OPEN else 0
            if wait is None:
                wait = self._current_wait()
            self._open_until = now + wait
            self._open_until_wall = self._clock.time() + wait
        elif to == _CLOSED:
            self._reopens = 0
            self._window.reset()
            if self._shared is not None:
                self._shared.reset()
        self.transitions_total += 1
        change = StateChange(self._name, _STATES[previous], _STATES[to], reason, self._clock.time())
        log.info(
            "circuit breaker %r: %s -> %s (%s)",
            self._name,
            change.previous.value,
            change.current.value,
            reason,
        )
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("circuit breaker %r: a state-change listener failed", self._name)

    def _adopt_shared_open(self, open_until: float) -> None:
        """Another instance opened the breaker: open here too, until the same time."""
        if self._state != _CLOSED:
            return
        left = open_until - self._clock.time()
        if left > 0:
            self._transition(_OPEN, self._monotonic(), "opened by another instance", wait=left)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self._name!r}, state={self.state.value})"


class _SharedBreaker:
    """A breaker's exchange with the shared store.

    Outcomes are counted locally and sent in the background every ``sync_interval``
    seconds of traffic; the reply carries every instance's totals. The breaker decides
    on ``shared totals + what it sent since + what it has not sent yet`` while the last
    reply is fresh, and on its own window otherwise: a call never waits for the store.
    """

    __slots__ = (
        "_breaker",
        "_calls",
        "_failures",
        "_flight",
        "_last_ok",
        "_link",
        "_next_sync",
        "_open_task",
        "_remote",
        "_slow",
        "_stale_after",
        "_sync_interval",
        "_task",
    )

    def __init__(self, breaker: CircuitBreaker, link: StoreLink, sync_interval: float) -> None:
        self._breaker = breaker
        self._link = link
        self._sync_interval = sync_interval
        # Totals older than this are not trusted (the reply may predate expired buckets).
        self._stale_after = 3 * sync_interval + link.timeout
        self._calls = self._failures = self._slow = 0
        self._flight = (0, 0, 0)
        self._remote = SharedWindow(0, 0, 0, 0.0)
        self._last_ok = float("-inf")
        self._next_sync = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._open_task: asyncio.Task[None] | None = None

    def fresh(self, now: float) -> bool:
        return now - self._last_ok <= self._stale_after

    def totals(self) -> tuple[int, int, int]:
        remote, flight = self._remote, self._flight
        return (
            remote.calls + flight[0] + self._calls,
            remote.failures + flight[1] + self._failures,
            remote.slow + flight[2] + self._slow,
        )

    def note(self, code: int, now: float) -> None:
        self._calls += 1
        if code & FAILED:
            self._failures += 1
        if code & SLOW:
            self._slow += 1
        if now >= self._next_sync and self._task is None and self._link.available:
            self._next_sync = now + self._sync_interval
            self._task = asyncio.get_running_loop().create_task(self._sync())

    def reset(self) -> None:
        self._calls = self._failures = self._slow = 0
        self._flight = (0, 0, 0)
        self._remote = SharedWindow(0, 0, 0, 0.0)
        self._last_ok = float("-inf")

    async def _sync(self) -> None:
        breaker = self._breaker
        window = breaker._window
        assert isinstance(window, TimeWindow)
        flight = self._flight = (self._calls, self._failures, self._slow)
        self._calls = self._failures = self._slow = 0
        clock = breaker._clock
        try:
            reply = await self._link.run(
                lambda: self._link.store.sync_window(
                    breaker.name,
                    now=clock.time(),
                    bucket_width=window.bucket_width,
                    buckets=window.buckets,
                    calls=flight[0],
                    failures=flight[1],
                    slow=flight[2],
                )
            )
        finally:
            self._task = None
            self._flight = (0, 0, 0)
        # On failure the counts in flight are dropped from the shared view rather than
        # sent again: they may have been applied before the reply was lost, and the
        # local window still has them for local decisions.
        if reply is None:
            return
        self._remote = reply
        self._last_ok = clock.monotonic()
        if reply.open_until > clock.time():
            breaker._adopt_shared_open(reply.open_until)
        else:
            breaker._evaluate(clock.monotonic())

    def publish_open(self, until: float) -> None:
        if self._open_task is not None or not self._link.available:
            return
        self._open_task = asyncio.get_running_loop().create_task(self._publish_open(until))

    async def _publish_open(self, until: float) -> None:
        breaker = self._breaker
        window = breaker._window
        assert isinstance(window, TimeWindow)
        clock = breaker._clock
        try:
            await self._link.run(
                lambda: self._link.store.open_circuit(
                    breaker.name,
                    now=clock.time(),
                    until=until,
                    bucket_width=window.bucket_width,
                    buckets=window.buckets,
                )
            )
        finally:
            self._open_task = None

    async def aclose(self) -> None:
        for task in (self._task, self._open_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
