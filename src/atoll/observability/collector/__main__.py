"""``python -m atoll.observability.collector``: run the collector on its own.

``atoll collector`` and ``atoll up`` start the same thing; this entry point needs nothing
but the package, which is what a separate process (or a benchmark) wants.
"""

from __future__ import annotations

import argparse
import sys

from atoll.observability import configure_logging
from atoll.observability.collector._app import (
    DEFAULT_DB_PATH,
    DEFAULT_NICE,
    DEFAULT_PORT,
    MAX_NICE,
    run_collector,
)
from atoll.observability.collector._errors import CollectorError
from atoll.observability.collector._metrics import DEFAULT_EXPIRY, DEFAULT_MAX_SERIES
from atoll.observability.collector._query import QueryError, parse_lookback
from atoll.observability.collector._receiver import DEFAULT_MAX_BODY_BYTES
from atoll.observability.collector._store import Retention


def _age(text: str) -> float | None:
    if text.strip().lower() in ("", "none", "0"):
        return None
    try:
        return parse_lookback(text)
    except QueryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_age(text: str) -> float:
    age = _age(text)
    if age is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a duration such as 5m")
    return age


def _count(text: str) -> int | None:
    if text.strip().lower() in ("", "none", "0"):
        return None
    return int(text.replace("_", ""))


def _nice(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_NICE:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_NICE}, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atoll.observability.collector",
        description="Receive traces over OTLP/HTTP, store them in SQLite, serve the trace view.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--db", default=DEFAULT_DB_PATH, help="SQLite file for the spans")
    parser.add_argument("--max-age", type=_age, default=24 * 3600.0, help="e.g. 24h; none")
    parser.add_argument("--max-spans", type=_count, default=1_000_000, help="e.g. 1000000; none")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--synchronous", choices=["OFF", "NORMAL", "FULL"], default="NORMAL")
    parser.add_argument(
        "--no-attribute-index",
        action="store_true",
        help="do not index span attributes (faster ingest; attr= searches scan)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="a web origin whose pages may export from the browser (repeatable; * for any)",
    )
    parser.add_argument(
        "--nice",
        type=_nice,
        default=DEFAULT_NICE,
        help="CPU niceness, 0 (normal, the default) to 19: yields the CPU to services, "
        "at the price of dropped spans under lasting load",
    )
    parser.add_argument(
        "--max-metric-series",
        type=_count,
        default=DEFAULT_MAX_SERIES,
        help="OTLP metric series held for GET /metrics (e.g. 10000; none: /v1/metrics is 404)",
    )
    parser.add_argument(
        "--metric-expiry",
        type=_positive_age,
        default=DEFAULT_EXPIRY,
        help="a metric series nobody updates this long is dropped (e.g. 5m)",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(service="collector", level=args.log_level)
    try:
        run_collector(
            args.host,
            args.port,
            args.db,
            log_level=args.log_level,
            retention=Retention(max_age=args.max_age, max_spans=args.max_spans),
            max_body_bytes=args.max_body_bytes,
            synchronous=args.synchronous,
            index_attributes=not args.no_attribute_index,
            cors_origins=args.cors_origin,
            nice=args.nice,
            max_metric_series=args.max_metric_series,
            metric_expiry=args.metric_expiry,
        )
    except CollectorError as exc:
        print(f"collector: {exc}", file=sys.stderr)  # noqa: T201 - a CLI's error line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
