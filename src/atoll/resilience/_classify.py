"""Classifying outcomes: which exceptions and results count as failures.

A breaker asks "did the dependency fail?", a retry asks "is this worth trying again?",
a hedge and a fallback ask "is this a success?". They all ask a :class:`Classifier`.
"""

from __future__ import annotations

import email.utils
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from atoll.resilience._errors import InvalidPolicyError


class Verdict(enum.IntEnum):
    """How one outcome counts."""

    SUCCESS = 0
    FAILURE = 1
    #: Neither: the call says nothing about the dependency's health (a breaker does not
    #: record it; a retry does not retry it).
    IGNORE = 2


SUCCESS = Verdict.SUCCESS
FAILURE = Verdict.FAILURE
IGNORE = Verdict.IGNORE


@dataclass(frozen=True, slots=True)
class Classifier:
    """Decides whether an exception or a result is a failure.

    An exception that is an instance of ``ignore_types`` is ignored. Otherwise one that is
    an instance of ``failure_types`` is a failure, unless ``exception_predicate`` is given
    and returns ``False`` for it, which makes it a success ("the dependency answered").
    Any other exception is a success for the same reason: a ``KeyError`` in your own code
    says nothing about the service you called. A returned value is a failure when
    ``result_predicate`` returns ``True`` for it.

    Predicates must be fast and must not raise: they run on every call.
    """

    name: str
    failure_types: tuple[type[BaseException], ...] = (Exception,)
    ignore_types: tuple[type[BaseException], ...] = ()
    exception_predicate: Callable[[BaseException], bool] | None = None
    result_predicate: Callable[[Any], bool] | None = None

    def classify_exception(self, exc: BaseException) -> Verdict:
        """How ``exc`` counts."""
        if self.ignore_types and isinstance(exc, self.ignore_types):
            return IGNORE
        if not isinstance(exc, self.failure_types):
            return SUCCESS
        predicate = self.exception_predicate
        if predicate is None or predicate(exc):
            return FAILURE
        return SUCCESS

    def is_failure_result(self, result: object) -> bool:
        """``True`` if returning ``result`` counts as a failure."""
        predicate = self.result_predicate
        return predicate is not None and predicate(result)


def is_transient_status(status: int) -> bool:
    """``True`` for HTTP statuses that say "the service failed or is overloaded, try later".

    408, 429 and every 5xx except 501 (Not Implemented, which will not change). A 404 or
    any other 4xx is the caller's problem and not a failure of the service.
    """
    return status in (408, 429) or (500 <= status <= 599 and status != 501)


def _http_exception(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return is_transient_status(exc.response.status_code)
    return True


def _http_result(result: object) -> bool:
    return isinstance(result, httpx.Response) and is_transient_status(result.status_code)


#: Every exception is a failure; every result is a success.
DEFAULT = Classifier("default")

#: For HTTP calls with httpx: transport errors, timeouts and transient statuses
#: (:func:`is_transient_status`) are failures, whether raised (``raise_for_status``) or
#: returned as a response. A 404 is a success: the service answered.
HTTP = Classifier(
    "http",
    failure_types=(httpx.TransportError, httpx.HTTPStatusError, TimeoutError),
    exception_predicate=_http_exception,
    result_predicate=_http_result,
)

#: For requests that must not be sent twice (a POST without an idempotency key): only
#: errors that prove the request never reached the server are failures worth retrying.
CONNECT_ONLY = Classifier("connect-only", failure_types=(httpx.ConnectError, httpx.ConnectTimeout))

_registry: dict[str, Classifier] = {c.name: c for c in (DEFAULT, HTTP, CONNECT_ONLY)}


def register_classifier(classifier: Classifier) -> None:
    """Make ``classifier`` available by its name to :func:`policy_from_config`."""
    if classifier.name in _registry and _registry[classifier.name] is not classifier:
        raise InvalidPolicyError("classifier", f"{classifier.name!r} is already registered")
    _registry[classifier.name] = classifier


def classifier_named(name: str, *, field: str = "classifier") -> Classifier:
    """The registered classifier called ``name``."""
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry))
        raise InvalidPolicyError(field, f"unknown classifier {name!r} (known: {known})") from None


def known_classifiers() -> Mapping[str, Classifier]:
    """The registered classifiers by name."""
    return dict(_registry)


def _response_of(outcome: object) -> httpx.Response | None:
    if isinstance(outcome, httpx.Response):
        return outcome
    if isinstance(outcome, httpx.HTTPStatusError):
        return outcome.response
    return None


def _parse_retry_after(header: str, now: float) -> float | None:
    header = header.strip()
    if header.isascii() and header.isdigit():
        return float(header)
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT; obsolete forms may omit it
        return None
    seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


def retry_after(outcome: object, now: float) -> float | None:
    """Seconds the server asked us to wait, from a ``Retry-After`` header, if any.

    ``outcome`` is an :class:`httpx.Response`, an :class:`httpx.HTTPStatusError`, or any
    exception with a numeric ``retry_after`` attribute. ``now`` is the wall-clock time
    (Unix seconds) against which an HTTP-date is measured. Malformed values are ignored.
    """
    response = _response_of(outcome)
    if response is not None:
        header = response.headers.get("retry-after")
        return None if header is None else _parse_retry_after(header, now)
    if isinstance(outcome, BaseException):
        value = getattr(outcome, "retry_after", None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None
