"""A service's logs over OTLP: each record, with the trace and span it was written in,
sent to the collector its traces go to, so the trace view shows a span's logs beside it.

The standard variables choose it, as the OpenTelemetry SDK reads them:
``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT``, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/logs``;
``OTEL_LOGS_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` turns it off. Records are
batched and posted by the SDK's ``BatchLogRecordProcessor`` on its own thread, off the
code that logs; when the collector cannot keep up, its queue drops records rather than
slowing the service.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.resources import Resource

from atoll.observability._logs import limit_exporter_logs
from atoll.observability._otlp import env_int
from atoll.observability._tracing import otlp_signal_endpoint

#: Keys of a structlog event that the OTLP record carries elsewhere (its body, time,
#: severity, trace context, resource) or that only the console renderer needs.
_NOT_ATTRIBUTES: Final = frozenset(
    {
        "event",
        "timestamp",
        "level",
        "logger",
        "trace_id",
        "span_id",
        "service",
        "exc_info",
        "exception",  # structlog's format_exc_info text: sent as exception.stacktrace
    }
)
#: Loggers whose records are not exported: the exporter's own (a failed export logs a
#: warning, which must not become another record to export), and the collector's (which
#: ``atoll run`` may host in the same process: it would log about its own writes).
_SKIPPED_LOGGERS: Final = ("opentelemetry", "urllib3", "requests", "atoll.collector")
#: Access logs (``atoll.gateway.access``, ``uvicorn.access``) stay on the console: each
#: request's SERVER span already carries what they say, and a record costs about 20 µs of
#: the request's own CPU (the gateway spends 30 to 40 on a whole request).
_ACCESS_LOG_SUFFIX: Final = ".access"
_MAX_INT64: Final = (1 << 63) - 1


def otlp_logs_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The logs endpoint the standard OpenTelemetry variables name, if any."""
    return otlp_signal_endpoint("logs", environ)


def severity_number(levelno: int) -> SeverityNumber:
    """OpenTelemetry's severity for a ``logging`` level, as its data model maps them."""
    if levelno >= logging.CRITICAL:
        return SeverityNumber.FATAL
    if levelno >= logging.ERROR:
        return SeverityNumber.ERROR
    if levelno >= logging.WARNING:
        return SeverityNumber.WARN
    if levelno >= logging.INFO:
        return SeverityNumber.INFO
    if levelno >= logging.DEBUG:
        return SeverityNumber.DEBUG
    return SeverityNumber.TRACE


def _attribute(value: object) -> Any:
    """A value as an OTLP attribute takes it: scalars as they are, else as text."""
    if isinstance(value, str | bool | float):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT64 - 1 <= value <= _MAX_INT64 else str(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return str(value)


class OTLPLogHandler(logging.Handler):
    """Hands ``logging`` records (structlog's included) to an OpenTelemetry logger
    provider, which batches and exports them.

    A structlog record's event is the body and its other keys (``correlation_id``,
    ``message_id``, what the code bound) are attributes; a plain record's message is the
    body. The current span (at the call) gives the trace and span ids. An exception
    logged with the record adds ``exception.type``, ``exception.message`` and
    ``exception.stacktrace``, as the semantic conventions name them.
    """

    #: ``configure_logging`` keeps this handler when it replaces the root's handlers.
    keep_on_reconfigure = True

    def __init__(
        self,
        provider: LoggerProvider,
        level: int = logging.NOTSET,
        *,
        exported: _CountingExporter | None = None,
        max_queue_size: int = 2048,
    ) -> None:
        super().__init__(level)
        self.provider = provider
        #: Records handed to the provider, and dropped here because the batch queue was
        #: full: handed minus done by the exporter, so a batch being exported still
        #: counts (memory stays within the queue's size). ``logging`` calls emit under
        #: the handler's lock, so these counts do not race.
        self.accepted = 0
        self.dropped = 0
        self._exported = exported
        self._max_queue_size = max_queue_size

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        if name.startswith(_SKIPPED_LOGGERS) or name.endswith(_ACCESS_LOG_SUFFIX):
            return
        exported = self._exported
        if exported is not None and self.accepted - exported.done >= self._max_queue_size:
            self.dropped += 1  # the SDK's queue would drop one: counted here instead
            return
        self.accepted += 1
        try:
            self._emit(record)
        except Exception:
            self.handleError(record)

    def _emit(self, record: logging.LogRecord) -> None:
        attributes: dict[str, Any] = {}
        event = record.msg
        exc_info = record.exc_info
        if isinstance(event, dict):  # structlog, through ProcessorFormatter.wrap_for_formatter
            body = str(event.get("event", ""))
            for key, value in event.items():
                if key not in _NOT_ATTRIBUTES and value is not None:  # OTLP has no null
                    attributes[key] = _attribute(value)
            flag = event.get("exc_info")
            if isinstance(flag, tuple):
                exc_info = flag
            elif isinstance(flag, BaseException):
                exc_info = (type(flag), flag, flag.__traceback__)
            elif flag:
                exc_info = sys.exc_info()
        else:
            body = record.getMessage()
        attributes["code.function.name"] = record.funcName
        attributes["code.file.path"] = record.pathname
        attributes["code.line.number"] = record.lineno
        if exc_info and exc_info[0] is not None:
            kind, error, tb = exc_info
            attributes["exception.type"] = kind.__qualname__
            attributes["exception.message"] = str(error)
            attributes["exception.stacktrace"] = "".join(
                traceback.format_exception(kind, error, tb)
            )
        self.provider.get_logger(record.name).emit(
            timestamp=int(record.created * 1e9),
            severity_number=severity_number(record.levelno),
            severity_text=record.levelname,
            body=body,
            attributes=attributes,
        )


class _CountingExporter(LogRecordExporter):
    """Delegates to ``exporter``, counting the records it finished with (``done``) and
    those of exports that failed (``failed``); only the export thread calls it."""

    def __init__(self, exporter: LogRecordExporter) -> None:
        self.exporter = exporter
        self.done = 0
        self.failed = 0

    def export(self, batch: Any) -> LogRecordExportResult:
        try:
            result = self.exporter.export(batch)
        except Exception:
            self.failed += len(batch)
            raise
        finally:
            self.done += len(batch)
        if result is not LogRecordExportResult.SUCCESS:
            self.failed += len(batch)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.exporter.force_flush(timeout_millis))


class LogExport:
    """A service's log export: a logger provider with the service's resource, its batch
    processor and exporter, and the handler on the root logger."""

    def __init__(
        self,
        resource: Resource,
        endpoint: str | None = None,
        *,
        exporter: LogRecordExporter | None = None,
        level: int = logging.INFO,
    ) -> None:
        self.provider = LoggerProvider(resource=resource)
        if exporter is None:
            exporter = OTLPLogExporter(endpoint=endpoint)
        limit_exporter_logs()
        self.exporter = _CountingExporter(exporter)
        queue = env_int("OTEL_BLRP_MAX_QUEUE_SIZE", 2048)
        batch = min(env_int("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", 512), queue)
        self.processor = BatchLogRecordProcessor(
            self.exporter, max_queue_size=queue, max_export_batch_size=batch
        )
        self.provider.add_log_record_processor(self.processor)
        self.handler = OTLPLogHandler(
            self.provider, level, exported=self.exporter, max_queue_size=queue
        )

    @property
    def dropped(self) -> int:
        """Records dropped because the export queue was full."""
        return self.handler.dropped

    @property
    def failed(self) -> int:
        """Records lost because their export failed."""
        return self.exporter.failed

    def install(self) -> None:
        """Send the root logger's records (every logger's, by propagation)."""
        root = logging.getLogger()
        if self.handler not in root.handlers:
            root.addHandler(self.handler)

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop sending and export what is queued, for ``timeout`` seconds at most: an
        unreachable or silent collector must not hold up a service's stop (the exporter
        retries each batch for its own timeout, 10 s by default, and a request already
        waiting on a socket is not interrupted); what is left then is lost."""
        logging.getLogger().removeHandler(self.handler)
        # The SDK's force_flush exports batch after batch, each with its retries, on the
        # calling thread, whatever its timeout says; its shutdown waits for the request in
        # progress. So both run on a daemon thread of their own, waited for ``timeout``;
        # shutting the exporter down then ends the retries, and a request stuck on a
        # socket is left to the thread, which the process does not wait for at exit.
        stopping = threading.Thread(target=self._flush_and_stop, name="atoll-otlp-logs-stop")
        stopping.daemon = True
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            self.exporter.shutdown()
            stopping.join(0.5)

    def _flush_and_stop(self) -> None:
        self.processor.force_flush()
        self.provider.shutdown()
