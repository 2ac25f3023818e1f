"""Structured logs: JSON for machines, colours for people, one format for every logger."""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
from typing import Final, Literal

import structlog

from atoll.determinism import Clock, SystemClock

LogFormat = Literal["json", "console"]


def configure_logging(
    *, service: str | None = None, fmt: LogFormat | None = None, level: str | None = None
) -> None:
    """Route stdlib ``logging`` and structlog through one renderer.

    ``fmt`` defaults to ``$ATOLL_LOG_FORMAT`` or, failing that, ``console`` on a terminal
    and ``json`` otherwise. Every record carries ``service`` when given.
    """
    chosen = (
        fmt or os.environ.get("ATOLL_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    )
    level_name = (level or os.environ.get("ATOLL_LOG_LEVEL") or "INFO").upper()

    def add_service(
        _: object, __: str, event: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        if service is not None:
            event.setdefault("service", service)
        return event

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_service,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
        add_message_context,
        # structlog's own %-style arguments (log.info("charged %s", n)).
        structlog.stdlib.PositionalArgumentsFormatter(),
        *_extra_processors,
    ]
    renderer: structlog.types.Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        colors = os.environ.get("NO_COLOR") is None and (
            sys.stderr.isatty() or os.environ.get("ATOLL_LOG_COLOR") == "1"
        )
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # A stdlib record's extra={...} fields become fields of its line.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Handlers that export records elsewhere (OTLP logs) stay; the console one is new.
    kept = [h for h in root.handlers if getattr(h, "keep_on_reconfigure", False)]
    root.handlers[:] = [handler, *kept]
    root.setLevel(level_name)
    # uvicorn's access lines and httpx's line per request say what the SERVER and CLIENT
    # spans say; from these two loggers only warnings and errors are kept.
    for noisy in ("uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: (correlation id, message id) of the message being handled: one context variable set
#: per message (structlog's bound_contextvars costs two per key).
message_context: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "atoll_message_context", default=None
)

#: The correlation id of the HTTP request being served: its ``X-Request-ID`` (which the
#: gateway sets), bound by the service's HTTP middleware.
request_correlation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "atoll_request_correlation", default=None
)


def add_message_context(
    _: object, __: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """``correlation_id`` and ``message_id`` of the message being handled, or the
    ``correlation_id`` of the HTTP request being served, if any."""
    current = message_context.get()
    if current is not None:
        event.setdefault("correlation_id", current[0])
        event.setdefault("message_id", current[1])
    else:
        request = request_correlation.get()
        if request is not None:
            event.setdefault("correlation_id", request)
    return event


def add_trace_ids(
    _: object, __: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """``trace_id`` and ``span_id`` of the current span, when there is one."""
    if _get_current_span is not None:
        context = _get_current_span().get_span_context()
        if context.is_valid:
            event.setdefault("trace_id", f"{context.trace_id:032x}")
            event.setdefault("span_id", f"{context.span_id:016x}")
    return event


try:
    from opentelemetry.trace import get_current_span as _get_current_span
except ImportError:  # pragma: no cover - without the otel extra
    _get_current_span = None  # type: ignore[assignment]

#: Processors added by other parts of atoll (tracing adds trace and span ids).
_extra_processors: list[structlog.types.Processor] = []


def add_log_processor(processor: structlog.types.Processor) -> None:
    """Add a processor to every record, e.g. one that adds the current trace id."""
    _extra_processors.append(processor)


#: The OpenTelemetry exporters' loggers. While a collector is down they log every failed
#: batch and every retry, several lines a second under load (a filter on a logger sees
#: only its own records, not its children's, hence each by name).
EXPORTER_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
)


class RepeatLimit(logging.Filter):
    """Let the first record of each kind through, then at most one each ``interval``
    seconds, which says how many like it were held back meanwhile.

    A kind is a logger, a level and a message template (``record.msg`` before its
    arguments), so "retrying in 0.98s" and "retrying in 1.93s" are one kind.
    """

    def __init__(self, interval: float = 60.0, *, clock: Clock | None = None) -> None:
        super().__init__()
        self.interval = interval
        self.clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        #: kind -> (when one was last let through, how many were held back since).
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        kind = (record.name, record.levelno, template)
        now = self.clock.monotonic()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.interval:
                self._seen[kind] = (seen[0], seen[1] + 1)
                return False
            self._seen[kind] = (now, 0)
        held = seen[1] if seen is not None else 0
        if held and isinstance(record.msg, str):
            # Appended to the template: no "%" in it, so the arguments still fit.
            record.msg += f" ({held} more like this in the last {self.interval:.0f} s)"
        return True


def limit_exporter_logs(interval: float = 60.0, *, clock: Clock | None = None) -> None:
    """Put a :class:`RepeatLimit` on each of :data:`EXPORTER_LOGGERS` (once: later calls
    leave the first in place). The exporters' failures stay counted in metrics."""
    shared = RepeatLimit(interval, clock=clock)
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatLimit) for f in logger.filters):
            logger.addFilter(shared)
