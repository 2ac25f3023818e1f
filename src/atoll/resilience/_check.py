"""Validation of policy parameters, shared by the constructors and ``policy_from_config``.

Each check raises :class:`InvalidPolicyError` naming the parameter, whose name is also
its ``atoll.toml`` key, so one message serves both ways of configuring a policy.
"""

from __future__ import annotations

import math

from atoll.resilience._errors import InvalidPolicyError


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidPolicyError(field, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidPolicyError(field, f"must be finite, not {value!r}")
    return float(value)


def duration(field: str, value: object, *, positive: bool = False) -> float:
    """A number of seconds: finite, ``>= 0`` (``> 0`` if ``positive``)."""
    seconds = _number(field, value)
    if seconds < 0:
        raise InvalidPolicyError(field, f"must not be negative, got {value!r}")
    if positive and seconds == 0:
        raise InvalidPolicyError(field, "must be greater than 0")
    return seconds


def optional_duration(field: str, value: object, *, positive: bool = False) -> float | None:
    """A duration, or ``None`` for "no limit"."""
    return None if value is None else duration(field, value, positive=positive)


def fraction(field: str, value: object) -> float:
    """A rate threshold in ``(0, 1]``."""
    ratio = _number(field, value)
    if not 0 < ratio <= 1:
        raise InvalidPolicyError(field, f"must be in (0, 1], got {value!r}")
    return ratio


def count(field: str, value: object, *, minimum: int = 1) -> int:
    """A whole number ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPolicyError(field, f"must be a whole number, not {value!r}")
    if value < minimum:
        raise InvalidPolicyError(field, f"must be at least {minimum}, got {value}")
    return value


def factor(field: str, value: object) -> float:
    """A growth factor ``>= 1``."""
    number = _number(field, value)
    if number < 1:
        raise InvalidPolicyError(field, f"must be at least 1, got {value!r}")
    return number


def name(field: str, value: object) -> str:
    """A non-empty name without surrounding whitespace."""
    if not isinstance(value, str) or not value or value.strip() != value:
        raise InvalidPolicyError(field, f"must be a non-empty name, got {value!r}")
    return value
