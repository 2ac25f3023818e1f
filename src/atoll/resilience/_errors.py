"""The exceptions of resilience policies: fail fast, say who refused and until when."""

from __future__ import annotations

from datetime import UTC, datetime

from atoll._errors import AtollError


class ResilienceError(AtollError):
    """Base of every error a resilience policy raises on its own account."""


class InvalidPolicyError(ResilienceError, ValueError):
    """A policy was configured with a value it cannot work with.

    ``field`` is the parameter (and ``atoll.toml`` key) that is wrong; ``problem`` says why.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _at(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=UTC).isoformat(timespec="milliseconds")


class RejectedError(ResilienceError):
    """A policy refused the call before it started: nothing was sent.

    ``retry_after`` is how many seconds until the policy may accept a call again, when it
    knows; ``policy`` names the refusing policy.
    """

    def __init__(self, message: str, *, policy: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.policy = policy
        self.retry_after = retry_after


class BreakerOpenError(RejectedError):
    """The circuit breaker ``breaker`` is open (or its half-open trial calls are all taken).

    ``retry_at`` is the wall-clock time (Unix seconds) at which it lets a trial call
    through, or ``None`` when it is half-open and waits for its trial calls to finish.
    """

    def __init__(self, breaker: str, *, retry_after: float | None, retry_at: float | None) -> None:
        if retry_after is None or retry_at is None:
            message = (
                f"circuit breaker {breaker!r} is half-open and all its trial calls are in "
                "flight; it admits calls again when they finish"
            )
        else:
            message = (
                f"circuit breaker {breaker!r} is open; it lets a trial call through in "
                f"{retry_after:.3f} s (at {_at(retry_at)})"
            )
        super().__init__(message, policy=breaker, retry_after=retry_after)
        self.breaker = breaker
        self.retry_at = retry_at


class BulkheadFullError(RejectedError):
    """The bulkhead ``bulkhead`` has no free slot and its wait queue is full or timed out."""

    def __init__(self, bulkhead: str, reason: str) -> None:
        super().__init__(
            f"bulkhead {bulkhead!r} is full: {reason}", policy=bulkhead, retry_after=None
        )
        self.bulkhead = bulkhead


class RateLimitedError(RejectedError):
    """The rate limiter ``limiter`` has no permit now; one is free in ``retry_after`` seconds."""

    def __init__(self, limiter: str, retry_after: float) -> None:
        super().__init__(
            f"rate limiter {limiter!r} refused the call; a permit is free in {retry_after:.3f} s",
            policy=limiter,
            retry_after=retry_after,
        )
        self.limiter = limiter


class CallTimeoutError(ResilienceError, TimeoutError):
    """The call did not finish in time and was cancelled.

    It is a :class:`TimeoutError`, so code that catches the builtin keeps working.
    """


class DeadlineExceededError(CallTimeoutError):
    """The deadline that travels with the call has passed: the caller has given up.

    Raised before a call starts when no time is left (nothing is sent), and instead of
    :class:`CallTimeoutError` when the propagated deadline, not the local timeout, cut
    the call short.
    """


class UnacceptableResultError(ResilienceError):
    """A call returned a result its classifier counts as a failure (an HTTP 503, say).

    Only a :class:`~atoll.resilience.Fallback` hands this to its handler, with the
    ``result`` attached, so one handler type covers raised and returned failures.
    """

    def __init__(self, result: object) -> None:
        super().__init__(f"the call returned a result classified as a failure: {result!r}")
        self.result = result
