"""Search parameters, shared by the JSON API and the HTML page."""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from atoll.observability.collector._store import LogQuery, TraceQuery

MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 20
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: Level names a log search takes for ``min_severity``, as OpenTelemetry numbers them.
SEVERITY_NAMES: Final = {"trace": 1, "debug": 5, "info": 9, "warn": 13, "error": 17, "fatal": 21}
_LOOKBACK: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")


class QueryError(ValueError):
    """A search parameter is invalid; the message names it."""


#: Times and durations are stored as SQLite integers (int64): bounds past it are clamped
#: (``end=9999-12-31`` means no end; ``start=0001-01-01``, from the beginning).
_MAX_NS: Final = 2**63 - 1


def _clamp_ns(value: float) -> int:
    return 0 if value <= 0 else min(int(value), _MAX_NS)


def parse_lookback(text: str) -> float:
    """Seconds in ``"15m"``, ``"1h"``, ``"7d"`` (units ms, s, m, h, d, w)."""
    match = _LOOKBACK.match(text)
    if match is None:
        raise QueryError(f"lookback {text!r} is not a duration like 15m, 1h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_time(name: str, text: str) -> int:
    """Unix nanoseconds from Unix milliseconds or an ISO 8601 date and time (UTC if naive)."""
    text = text.strip()
    try:
        millis = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(millis) or millis < 0:
            raise QueryError(f"{name} {text!r} is not a time")
        return _clamp_ns(millis * 1_000_000)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(
            f"{name} {text!r} is neither Unix milliseconds nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _clamp_ns(int(moment.timestamp() * 1_000_000) * 1000)


def parse_attribute(text: str) -> tuple[str, str]:
    """``key=value`` (split at the first ``=``; the value may contain more)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise QueryError(f"attribute filter {text!r} is not key=value")
    return key, value.strip()


def split_attributes(text: str) -> list[str]:
    """The page's one-line filter: ``key=value`` pairs separated by spaces, shell-quoted
    where a value has spaces (``http.route="/a b"``)."""
    # Quotes group; a backslash is kept as typed (Windows paths, PHP class names), not
    # taken as an escape the way shlex.split would.
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    lexer.escape = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise QueryError(f"attribute filters {text!r}: {exc}") from None


def _duration_ns(name: str, millis: float | None) -> int | None:
    if millis is None:
        return None
    if not math.isfinite(millis) or millis < 0:
        raise QueryError(f"{name} must be a non-negative number of milliseconds")
    return _clamp_ns(round(millis * 1_000_000))


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}")


def time_range(
    now: float, start: str | None, end: str | None, lookback: str | None
) -> tuple[int | None, int | None]:
    """(start, end) in Unix ns from ``start``/``end`` (ms or ISO 8601) or ``lookback``
    (``start`` wins); ``None`` for an open end."""
    start_ns = parse_time("start", start) if start else None
    if start_ns is None and lookback and lookback.strip() not in ("", "all"):
        start_ns = _clamp_ns((now - parse_lookback(lookback)) * 1e9)
    end_ns = parse_time("end", end) if end else None
    return start_ns, end_ns


def build_query(
    *,
    now: float,
    service: str | None = None,
    operation: str | None = None,
    min_duration_ms: float | None = None,
    max_duration_ms: float | None = None,
    status: str | None = None,
    start: str | None = None,
    end: str | None = None,
    lookback: str | None = None,
    attributes: Sequence[str] = (),
    limit: int = DEFAULT_LIMIT,
) -> TraceQuery:
    """A :class:`TraceQuery` from request parameters; empty strings mean "not given"."""
    status = (status or "").strip().lower() or None
    if status not in (None, "ok", "error"):
        raise QueryError(f"status {status!r} is not ok or error")
    check_limit(limit)
    start_ns, end_ns = time_range(now, start, end, lookback)
    min_ns = _duration_ns("min_duration_ms", min_duration_ms)
    max_ns = _duration_ns("max_duration_ms", max_duration_ms)
    pairs = [parse_attribute(item) for item in attributes if item.strip()]
    return TraceQuery(
        service=service or None,
        operation=operation or None,
        min_duration_ns=min_ns,
        max_duration_ns=max_ns,
        status="ok" if status == "ok" else "error" if status == "error" else None,
        start_ns=start_ns,
        end_ns=end_ns,
        attributes=tuple(pairs),
        limit=limit,
    )


def parse_severity(text: str) -> int:
    """A severity number from ``"warn"`` (a level name) or ``"13"`` (1 to 24)."""
    text = text.strip().lower()
    if text in SEVERITY_NAMES:
        return SEVERITY_NAMES[text]
    if text == "warning":
        return SEVERITY_NAMES["warn"]
    # isdigit() also holds for "²" and other digits int() refuses: ASCII, two at most.
    if text.isascii() and text.isdigit() and len(text) <= 2 and 1 <= int(text) <= 24:
        return int(text)
    names = ", ".join(SEVERITY_NAMES)
    raise QueryError(f"severity {text!r} is not one of {names} or a number from 1 to 24")


def build_log_query(
    *,
    now: float,
    service: str | None = None,
    severity: str | None = None,
    trace_id: bytes | None = None,
    text: str | None = None,
    start: str | None = None,
    end: str | None = None,
    lookback: str | None = None,
    limit: int = 100,
) -> LogQuery:
    """A :class:`LogQuery` from request parameters; empty strings mean "not given"."""
    check_limit(limit)
    start_ns, end_ns = time_range(now, start, end, lookback)
    return LogQuery(
        service=service or None,
        min_severity=parse_severity(severity) if severity and severity.strip() else None,
        trace_id=trace_id,
        text=text or None,
        start_ns=start_ns,
        end_ns=end_ns,
        limit=limit,
    )
