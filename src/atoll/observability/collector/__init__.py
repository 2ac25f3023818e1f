"""The embedded OTLP collector: traces and logs over OTLP/HTTP into SQLite, a trace view.

Any OpenTelemetry SDK's OTLP/HTTP exporters (protobuf or JSON) can send to
``http://HOST:4318/v1/traces`` and ``/v1/logs``; the search and waterfall pages are at
``http://HOST:4318/`` and the JSON API under ``/api``. ``docs/collector.md`` describes
endpoints, storage, retention and durability.
"""

from atoll.observability.collector._app import (
    DEFAULT_DB_PATH,
    DEFAULT_NICE,
    DEFAULT_PORT,
    CollectorApp,
    create_collector_app,
    lower_priority,
    run_collector,
    serve_collector,
)
from atoll.observability.collector._errors import (
    CollectorClosedError,
    CollectorError,
    CollectorOverloadedError,
    CollectorStorageError,
    MalformedRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from atoll.observability.collector._store import (
    LogQuery,
    LogRecord,
    Retention,
    ServiceInfo,
    SpanRecord,
    SpanStore,
    StoreStats,
    Trace,
    TraceQuery,
    TraceSummary,
)

__all__ = [
    "DEFAULT_DB_PATH",
    "DEFAULT_NICE",
    "DEFAULT_PORT",
    "CollectorApp",
    "CollectorClosedError",
    "CollectorError",
    "CollectorOverloadedError",
    "CollectorStorageError",
    "LogQuery",
    "LogRecord",
    "MalformedRequestError",
    "PayloadTooLargeError",
    "Retention",
    "ServiceInfo",
    "SpanRecord",
    "SpanStore",
    "StoreStats",
    "Trace",
    "TraceQuery",
    "TraceSummary",
    "UnsupportedMediaTypeError",
    "create_collector_app",
    "lower_priority",
    "run_collector",
    "serve_collector",
]
