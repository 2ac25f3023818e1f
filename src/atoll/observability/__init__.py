"""Observability: structured logs (tracing and metrics build on this package)."""

from atoll.observability._logs import LogFormat, add_log_processor, configure_logging

__all__ = ["LogFormat", "add_log_processor", "configure_logging"]
