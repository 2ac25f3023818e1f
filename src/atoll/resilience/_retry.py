"""Retries: exponential backoff with full jitter, bounded by attempts, time, deadline and budget."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.resilience import _check
from atoll.resilience._classify import DEFAULT, FAILURE, Classifier, retry_after
from atoll.resilience._deadline import _current
from atoll.resilience._errors import DeadlineExceededError, InvalidPolicyError, RejectedError
from atoll.resilience._policy import Policy

log = logging.getLogger("atoll.resilience")

T = TypeVar("T")

_BUCKETS = 10


class RetryBudget:
    """A cap on retries relative to traffic, so retries cannot multiply an outage.

    Over the last ``window`` seconds, retries may number at most ``ratio`` times the calls
    made (first attempts), plus ``min_per_second * window`` so that a quiet caller can
    still retry at all. This is Finagle's and gRPC's retry budget, and what Envoy's
    ``retry_budget`` approximates with concurrency: with ``ratio=0.2`` a dependency that
    fails every call sees at most 1.2 times its normal load, not ``max_attempts`` times.

    Share one budget between the :class:`Retry` policies that call the same dependency.
    """

    __slots__ = (
        "_calls",
        "_calls_in_window",
        "_clock",
        "_end",
        "_floor",
        "_head",
        "_name",
        "_ratio",
        "_retries",
        "_retries_in_window",
        "_slot",
        "_width",
        "exhausted_total",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        name: str = "retry-budget",
        clock: Clock | None = None,
    ) -> None:
        self._name = _check.name("name", name)
        self._ratio = _check.fraction("ratio", ratio)
        per_second = _check.duration("min_per_second", min_per_second)
        seconds = _check.duration("window", window, positive=True)
        self._floor = per_second * seconds
        self._clock: Clock = clock or SystemClock()
        self._width = seconds / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._head = 0
        self._slot = 0
        self._end = self._width
        self._calls_in_window = 0
        self._retries_in_window = 0
        #: Retries refused because the budget was spent.
        self.exhausted_total = 0

    @property
    def name(self) -> str:
        """The budget's name."""
        return self._name

    @property
    def calls_in_window(self) -> int:
        """Calls (first attempts) counted in the current window."""
        self._refresh()
        return self._calls_in_window

    @property
    def retries_in_window(self) -> int:
        """Retries taken in the current window."""
        self._refresh()
        return self._retries_in_window

    def _refresh(self) -> None:
        now = self._clock.monotonic()
        if now >= self._end:
            self._roll(now)

    def _roll(self, now: float) -> None:
        epoch = int(now // self._width)
        if epoch - self._head >= _BUCKETS:
            self._calls = [0] * _BUCKETS
            self._retries = [0] * _BUCKETS
            self._calls_in_window = self._retries_in_window = 0
        else:
            for k in range(self._head + 1, epoch + 1):
                slot = k % _BUCKETS
                self._calls_in_window -= self._calls[slot]
                self._retries_in_window -= self._retries[slot]
                self._calls[slot] = self._retries[slot] = 0
        self._head = epoch
        self._slot = epoch % _BUCKETS
        self._end = (epoch + 1) * self._width

    def deposit(self) -> None:
        """Count one call (a first attempt)."""
        now = self._clock.monotonic()
        if now >= self._end:
            self._roll(now)
        self._calls[self._slot] += 1
        self._calls_in_window += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; ``False`` (and nothing taken) if it is spent."""
        now = self._clock.monotonic()
        if now >= self._end:
            self._roll(now)
        if self._retries_in_window + 1 > self._floor + self._ratio * self._calls_in_window:
            self.exhausted_total += 1
            return False
        self._retries[self._slot] += 1
        self._retries_in_window += 1
        return True

    def __repr__(self) -> str:
        return f"RetryBudget(ratio={self._ratio}, floor={self._floor})"


class Retry(Policy):
    """Run the call again when it fails with something worth retrying.

    The delay before retry ``n`` (``n = 1`` after the first attempt failed) is drawn
    uniformly from ``[0, min(max_delay, base_delay * multiplier**(n-1))]`` ("full
    jitter"), or is the server's ``Retry-After`` if that is longer (when
    ``respect_retry_after``; if the server asks for more than ``max_delay``, the retry
    is abandoned instead).

    Only outcomes the ``classifier`` counts as failures are retried: exceptions, and
    results its ``result_predicate`` flags (the last such result is returned once retries
    stop). Never retried: refusals by a breaker, bulkhead or rate limiter
    (:class:`~atoll.resilience.RejectedError`: they have their own waiting rules) and a
    passed deadline. Retrying stops, and the last outcome is returned or raised (with a
    note saying why), when any of these runs out: ``max_attempts`` (the first attempt
    included), ``max_total`` seconds since the first attempt started, the propagated
    deadline (no sleep that would end past it), or the ``budget``.
    """

    __slots__ = (
        "_base",
        "_budget",
        "_cap",
        "_classifier",
        "_clock",
        "_max_attempts",
        "_max_total",
        "_multiplier",
        "_name",
        "_random",
        "_respect_retry_after",
        "_result_predicate",
        "gave_up_total",
        "retries_total",
    )

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        multiplier: float = 2.0,
        max_total: float | None = None,
        respect_retry_after: bool = True,
        classifier: Classifier = DEFAULT,
        budget: RetryBudget | None = None,
        name: str = "retry",
        clock: Clock | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self._name = _check.name("name", name)
        self._max_attempts = _check.count("max_attempts", max_attempts)
        self._base = _check.duration("base_delay", base_delay)
        self._cap = _check.duration("max_delay", max_delay)
        if self._cap < self._base:
            raise InvalidPolicyError("max_delay", f"must be at least base_delay ({self._base})")
        self._multiplier = _check.factor("multiplier", multiplier)
        self._max_total = _check.optional_duration("max_total", max_total, positive=True)
        if not isinstance(respect_retry_after, bool):
            raise InvalidPolicyError("respect_retry_after", "must be true or false")
        self._respect_retry_after = respect_retry_after
        if not isinstance(classifier, Classifier):
            raise InvalidPolicyError("classifier", f"must be a Classifier, not {classifier!r}")
        self._classifier = classifier
        self._result_predicate = classifier.result_predicate
        if budget is not None and not isinstance(budget, RetryBudget):
            raise InvalidPolicyError("budget", f"must be a RetryBudget, not {budget!r}")
        self._budget = budget
        self._clock: Clock = clock or SystemClock()
        self._random = random or RandomSource()
        #: Retries made (attempts after the first).
        self.retries_total = 0
        #: Calls that still failed when retrying had to stop for a limit.
        self.gave_up_total = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def budget(self) -> RetryBudget | None:
        """The retry budget this policy draws on, if any."""
        return self._budget

    @property
    def classifier(self) -> Classifier:
        """What this policy retries."""
        return self._classifier

    def with_classifier(self, classifier: Classifier) -> Retry:
        """The same policy (and budget, clock, random source) retrying per ``classifier``."""
        return Retry(
            max_attempts=self._max_attempts,
            base_delay=self._base,
            max_delay=self._cap,
            multiplier=self._multiplier,
            max_total=self._max_total,
            respect_retry_after=self._respect_retry_after,
            classifier=classifier,
            budget=self._budget,
            name=self._name,
            clock=self._clock,
            random=self._random,
        )

    def backoff(self, retry: int) -> float:
        """The jittered delay before retry number ``retry`` (1 for the first retry)."""
        ceiling = self._base * self._multiplier ** (retry - 1)
        ceiling = min(ceiling, self._cap)
        return self._random.random() * ceiling

    async def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        if self._budget is not None:
            self._budget.deposit()
        started = self._clock.monotonic() if self._max_total is not None else 0.0
        attempt = 1
        while True:
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, RejectedError | DeadlineExceededError):
                    raise
                if self._classifier.classify_exception(exc) != FAILURE:
                    raise
                delay = self._next_delay(attempt, exc, started)
                if delay is None:
                    raise
            else:
                predicate = self._result_predicate
                if predicate is None or not predicate(result):
                    return result
                delay = self._next_delay(attempt, result, started)
                if delay is None:
                    return result
            self.retries_total += 1
            await self._clock.sleep(delay)
            attempt += 1

    def _next_delay(self, attempt: int, outcome: object, started: float) -> float | None:
        """The delay before the next attempt, or ``None`` to stop (with the reason noted)."""
        if attempt >= self._max_attempts:
            return self._give_up(outcome, f"{attempt} attempts made (max_attempts)")
        delay = self.backoff(attempt)
        if self._respect_retry_after:
            asked = retry_after(outcome, self._clock.time())
            if asked is not None:
                if asked > self._cap:
                    return self._give_up(
                        outcome, f"the server asked to wait {asked:.3f} s, more than max_delay"
                    )
                delay = max(delay, asked)
        if self._max_total is not None:
            elapsed = self._clock.monotonic() - started
            if elapsed + delay > self._max_total:
                return self._give_up(
                    outcome, f"the next attempt would start after max_total ({self._max_total} s)"
                )
        deadline = _current.get()
        if deadline is not None and deadline.remaining() <= delay:
            return self._give_up(outcome, "the next attempt would start after the deadline")
        if self._budget is not None and not self._budget.try_spend():
            return self._give_up(outcome, f"retry budget {self._budget.name!r} is spent")
        return delay

    def _give_up(self, outcome: object, reason: str) -> float | None:
        """Stop retrying: count it, note why on the exception, and return ``None``."""
        self.gave_up_total += 1
        if isinstance(outcome, BaseException):
            outcome.add_note(f"atoll: {self._name} stopped retrying: {reason}")
        else:
            log.debug("%s stopped retrying: %s", self._name, reason)
        return None

    def __repr__(self) -> str:
        return f"Retry(max_attempts={self._max_attempts})"
