"""The embedded OTLP collector: traces over OTLP/HTTP into SQLite, with a trace view.

Any OpenTelemetry SDK's OTLP/HTTP exporter (protobuf or JSON) can send to
``http://HOST:4318/v1/traces``; the search and waterfall pages are at ``http://HOST:4318/``
and the JSON API under ``/api``. ``docs/collector.md`` describes endpoints, storage,
retention and durability.
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
