"""Fallbacks: an answer when the call (and every policy inside the fallback) failed."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from atoll.resilience import _check
from atoll.resilience._classify import DEFAULT, FAILURE, Classifier
from atoll.resilience._errors import InvalidPolicyError, ResilienceError, UnacceptableResultError
from atoll.resilience._policy import Policy

T = TypeVar("T")


class Fallback(Policy):
    """Replace a failure with what ``handler(error)`` returns (or awaits to).

    It falls back on exceptions the ``classifier`` counts as failures, on every error of
    the resilience policies (an open breaker, a full bulkhead, a timeout, a passed
    deadline) and on results the classifier flags, which the handler receives as an
    :class:`UnacceptableResultError` carrying the ``result``. The handler's return value
    must have the call's result type; nothing can check that for you. Cancellation is
    never replaced.
    """

    __slots__ = ("_classifier", "_handler", "_name", "fallbacks_total")

    def __init__(
        self,
        handler: Callable[[Exception], Awaitable[Any] | Any],
        *,
        classifier: Classifier = DEFAULT,
        name: str = "fallback",
    ) -> None:
        if not callable(handler):
            raise InvalidPolicyError("handler", f"must be callable, not {handler!r}")
        if not isinstance(classifier, Classifier):
            raise InvalidPolicyError("classifier", f"must be a Classifier, not {classifier!r}")
        self._handler = handler
        self._classifier = classifier
        self._name = _check.name("name", name)
        #: Calls answered by the handler.
        self.fallbacks_total = 0

    @property
    def name(self) -> str:
        return self._name

    async def _handle(self, error: Exception) -> Any:
        self.fallbacks_total += 1
        value = self._handler(error)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, ResilienceError) or (
                self._classifier.classify_exception(exc) == FAILURE
            ):
                value: T = await self._handle(exc)
                return value
            raise
        if self._classifier.is_failure_result(result):
            replaced: T = await self._handle(UnacceptableResultError(result))
            return replaced
        return result

    def __repr__(self) -> str:
        return f"Fallback({self._handler!r})"
