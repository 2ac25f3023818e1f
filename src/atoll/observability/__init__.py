"""Observability: structured logs, OpenTelemetry tracing and Prometheus metrics."""

from atoll.observability import _attributes as attributes
from atoll.observability._logs import LogFormat, add_log_processor, configure_logging
from atoll.observability._metrics import ServiceMetrics
from atoll.observability._tracing import (
    OTEL_AVAILABLE,
    Tracing,
    annotate,
    extract,
    get_tracer,
    inject_current,
    otlp_endpoint,
    tracing_disabled,
)

__all__ = [
    "OTEL_AVAILABLE",
    "LogFormat",
    "ServiceMetrics",
    "Tracing",
    "add_log_processor",
    "annotate",
    "attributes",
    "configure_logging",
    "extract",
    "get_tracer",
    "inject_current",
    "otlp_endpoint",
    "tracing_disabled",
]
