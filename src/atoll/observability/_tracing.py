"""Tracing with OpenTelemetry: one trace across HTTP, outboxes, transports and handlers.

Propagation is W3C (``traceparent``, ``tracestate``, ``baggage``) in HTTP headers and in
each message envelope's ``trace`` field. A message carries the context of the span that
committed it (the request or handler that sent it); the consumer's ``process`` span is
that span's child, so the trace continues across the outbox, and the relay's ``publish``
span links to every message's committing span.

Export is OTLP over HTTP to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` (the standard variables, including
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` and ``OTEL_RESOURCE_ATTRIBUTES``),
batched on a background thread: an unreachable collector never slows a request; when the
queue is full spans are dropped and counted. Without an endpoint, or without the
``atoll[otel]`` extra, tracing is off and costs nothing.

Instrumenting more of atoll (the hook): take ``tracing.tracer`` from the service's
runtime (``runtime.tracing``) or :func:`get_tracer` and use the attribute names in
:mod:`atoll.observability._attributes`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.observability._logs import limit_exporter_logs

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import ReadableSpan, Span, TracerProvider
    from opentelemetry.trace import Tracer

    from atoll.resilience import CircuitBreaker, StateChange

__all__ = [
    "OTEL_AVAILABLE",
    "SpanKind",
    "Tracing",
    "annotate",
    "current_span",
    "extract",
    "get_tracer",
    "inject_current",
    "link_from_traceparent",
    "otlp_endpoint",
    "parse_traceparent",
    "tracing_disabled",
    "unsupported_protocol",
]

log = logging.getLogger("atoll.tracing")

try:
    from opentelemetry import baggage, propagate, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

    from atoll.observability._lean import LeanTracer, parse_traceparent

    OTEL_AVAILABLE = True
    _DEFAULT_TEXTMAP = propagate.get_global_textmap()
    _DEFAULT_PROPAGATORS = os.environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").replace(
        " ", ""
    ) in ("tracecontext,baggage", "baggage,tracecontext", "tracecontext")
except ImportError:  # the otel extra (the SDK) is not installed: tracing is off
    OTEL_AVAILABLE = False
    try:
        from opentelemetry.trace import SpanKind  # the API alone (FastAPI brings it)
    except ImportError:  # pragma: no cover - neither the API
        SpanKind = None  # type: ignore[assignment,misc] # read only where a tracer exists

    def parse_traceparent(carrier: Mapping[str, str]) -> Any:  # type: ignore[misc]
        """Without OpenTelemetry there is no span context to parse into."""
        del carrier


def tracing_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard variables turn traces off (``OTEL_SDK_DISABLED=true`` or
    ``OTEL_TRACES_EXPORTER=none``), whatever endpoint is set."""
    env = os.environ if environ is None else environ
    return (
        env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        or env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none"
    )


#: The one OTLP protocol atoll's exporter speaks.
SUPPORTED_PROTOCOL = "http/protobuf"


def unsupported_protocol(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The variable and value of an OTLP protocol other than ``http/protobuf``, if one is
    set (``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` first, as the SDK reads them)."""
    env = os.environ if environ is None else environ
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(name, "").strip()
        if value:
            return None if value.lower() == SUPPORTED_PROTOCOL else (name, value)
    return None


def otlp_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The traces endpoint the standard OpenTelemetry variables name, if any."""
    return otlp_signal_endpoint("traces", environ)


def otlp_signal_endpoint(signal: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The endpoint of ``signal`` (``traces``, ``logs``) the standard variables name, as
    the SDK reads them: none with ``OTEL_SDK_DISABLED=true`` or an
    ``OTEL_<SIGNAL>_EXPORTER`` list without ``otlp`` (``none``, ``console``); else
    ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`` as it is, or ``OTEL_EXPORTER_OTLP_ENDPOINT``
    + ``/v1/<signal>``."""
    env = os.environ if environ is None else environ
    name = signal.upper()
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    # A list (OTEL_TRACES_EXPORTER=otlp,console); atoll exports OTLP when it names otlp.
    listed = env.get(f"OTEL_{name}_EXPORTER", "").strip().lower() or "otlp"
    if "otlp" not in {part.strip() for part in listed.split(",")}:
        return None
    explicit = env.get(f"OTEL_EXPORTER_OTLP_{name}_ENDPOINT")
    if explicit:
        return explicit
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + f"/v1/{signal}"
    return None


if OTEL_AVAILABLE:

    class _FailureCountingExporter(SpanExporter):
        """Delegates to ``exporter``, counting the spans of exports that failed."""

        def __init__(self, exporter: SpanExporter) -> None:
            self.exporter = exporter
            self.failed = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            try:
                result = self.exporter.export(spans)
            except Exception:
                self.failed += len(spans)
                raise
            if result is not SpanExportResult.SUCCESS:
                self.failed += len(spans)
            return result

        def shutdown(self) -> None:
            self.exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.exporter.force_flush(timeout_millis)

    class DropCountingSpanProcessor(SpanProcessor):
        """A :class:`BatchSpanProcessor` that counts the spans it drops on a full queue
        (:attr:`dropped`) and those of exports that failed (:attr:`failed`)."""

        def __init__(self, exporter: SpanExporter, *, max_queue_size: int | None = None) -> None:
            from atoll.observability._otlp import env_int  # noqa: PLC0415 - otlp extra

            max_queue_size = max_queue_size or env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
            batch = env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
            self._counting = _FailureCountingExporter(exporter)
            self.batch = BatchSpanProcessor(
                self._counting,
                max_queue_size=max_queue_size,
                max_export_batch_size=min(batch, max_queue_size),
            )
            self.max_queue_size = max_queue_size
            self.dropped = 0
            inner = getattr(self.batch, "_batch_processor", None)
            self._queue = getattr(inner, "_queue", None)

        @property
        def failed(self) -> int:
            """Spans lost because their export failed (after the exporter's retries)."""
            return self._counting.failed

        def on_start(self, span: Span, parent_context: OtelContext | None = None) -> None:
            self.batch.on_start(span, parent_context)

        def on_end(self, span: ReadableSpan) -> None:
            if self._queue is not None and len(self._queue) >= self.max_queue_size:
                self.dropped += 1
            self.batch.on_end(span)

        @property
        def exporter(self) -> SpanExporter:
            """The exporter batches go to (wrapped to count failures)."""
            return self._counting

        def shutdown(self) -> None:
            self.batch.shutdown()  # type: ignore[no-untyped-call]

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.batch.force_flush(timeout_millis)


class Tracing:
    """Tracing for one service: its tracer provider, tracer and propagation helpers.

    ``enabled`` is ``False`` when no exporter is configured; every helper then does
    nothing, cheaply.
    """

    def __init__(
        self,
        service: str,
        *,
        exporter: SpanExporter | None = None,
        endpoint: str | None = None,
        max_queue_size: int | None = None,
        clock: Clock | None = None,
        random: RandomSource | None = None,
    ) -> None:
        self.service = service
        self.provider: TracerProvider | None = None
        self.processor: Any = None
        self.tracer: Tracer | None = None
        self.lean: LeanTracer | None = None
        self.resource: Resource | None = None
        #: The service's log export, once :meth:`make_global` started it.
        self.logs: Any = None
        if not OTEL_AVAILABLE:
            return
        if exporter is None:
            endpoint = endpoint or otlp_endpoint()
            if endpoint is None:
                return
            wrong = unsupported_protocol()
            if wrong is not None:
                # Spans would go to a port speaking another protocol and be lost quietly.
                log.warning(
                    "%s=%s is not supported: atoll exports OTLP as %s (a collector's OTLP/HTTP"
                    " port, usually 4318); exporting to %s that way",
                    *wrong,
                    SUPPORTED_PROTOCOL,
                    endpoint,
                )
            from atoll.observability._otlp import FastOTLPSpanExporter  # noqa: PLC0415

            exporter = FastOTLPSpanExporter(endpoint=endpoint)
        limit_exporter_logs(clock=clock)
        resource = Resource.create({"service.name": service})
        self.resource = resource
        self.provider = SdkTracerProvider(resource=resource)
        from atoll.observability._otlp import (  # noqa: PLC0415 - otlp extra
            FastBatchSpanProcessor,
            FastOTLPSpanExporter,
        )

        if isinstance(exporter, FastOTLPSpanExporter) and hasattr(exporter, "_client"):
            self.processor = FastBatchSpanProcessor(exporter, max_queue_size=max_queue_size)
        else:
            self.processor = DropCountingSpanProcessor(exporter, max_queue_size=max_queue_size)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("atoll")
        #: For spans atoll makes under this service's SDK spans (``service_tracer``).
        self.library_tracer = self.provider.get_tracer("atoll.library")
        _BY_RESOURCE[id(resource)] = (weakref.ref(resource), weakref.ref(self.library_tracer))
        # The entry goes with the resource (before its id can be used again).
        weakref.finalize(resource, _BY_RESOURCE.pop, id(resource), None)
        clock = clock or SystemClock()
        self.lean = LeanTracer(
            processor=self.processor,
            resource=resource,
            sampler=self.provider.sampler,
            clock=clock,
            random=random or RandomSource(clock=clock),
        )

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded and exported."""
        return self.tracer is not None

    @property
    def dropped_spans(self) -> int:
        """Spans dropped because the export queue was full."""
        return 0 if self.processor is None else int(self.processor.dropped)

    @property
    def failed_spans(self) -> int:
        """Spans lost because their export failed (the collector refused them, or could
        not be reached within the exporter's retries)."""
        return 0 if self.processor is None else int(self.processor.failed)

    @property
    def dropped_log_records(self) -> int:
        """Log records dropped because their export queue was full."""
        return 0 if self.logs is None else int(self.logs.dropped)

    @property
    def failed_log_records(self) -> int:
        """Log records lost because their export failed."""
        return 0 if self.logs is None else int(self.logs.failed)

    def make_global(self) -> None:
        """Make this the process's default tracer provider (one service per process), and
        send the process's logs where its traces go when the standard variables name a
        logs endpoint (see ``_log_export``): one resource for the process's records."""
        if self.provider is None:
            return
        trace.set_tracer_provider(self.provider)
        from atoll.observability._log_export import (  # noqa: PLC0415 - otlp extra
            LogExport,
            otlp_logs_endpoint,
        )

        endpoint = otlp_logs_endpoint()
        if endpoint is not None and self.logs is None and self.resource is not None:
            self.logs = LogExport(self.resource, endpoint)
            self.logs.install()

    def flush(self, timeout: float = 3.0) -> None:
        """Export what is queued, for ``timeout`` seconds at most (see :meth:`shutdown`);
        tracing goes on."""
        if self.processor is not None:
            _bounded(self.processor.force_flush, "atoll-otlp-traces-flush", timeout)

    def shutdown(self, timeout: float = 3.0) -> None:
        """Export what is queued, for ``timeout`` seconds at most, and stop.

        As :meth:`LogExport.shutdown`: an exporter retries each batch for its own timeout
        (10 s by default), batch after batch, so with a collector down a flush on the
        caller's thread would hold a service's stop for tens of seconds. It runs on a
        daemon thread, waited for ``timeout``; then the exporter is shut down, which ends
        its retries, and what is left is lost (and counted as failed).
        """
        if self.logs is not None:
            self.logs.shutdown()
            self.logs = None
        provider = self.provider
        if provider is None:
            return
        stopping = _bounded(provider.shutdown, "atoll-otlp-traces-stop", timeout)
        if stopping.is_alive():
            exporter = getattr(self.processor, "exporter", None)
            if exporter is not None:
                with contextlib.suppress(Exception):
                    exporter.shutdown()
            stopping.join(0.5)


def _bounded(work: Callable[[], object], name: str, timeout: float) -> threading.Thread:
    """Run ``work`` on a daemon thread and wait ``timeout`` seconds at most for it (an
    exporter's retries are not interrupted from outside; the process does not wait for
    the thread at exit). The thread, to see whether it finished."""
    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread


#: A service's resource (by identity) -> its library tracer, both weakly held: how code
#: below a service (the event store) finds the tracer of the span it runs under when
#: several services share a process and none is the global provider.
_BY_RESOURCE: dict[int, tuple[weakref.ref[Any], weakref.ref[Any]]] = {}


def service_tracer(span: Any) -> Tracer | None:
    """The tracer of the service whose SDK span ``span`` is, or ``None`` if unknown."""
    resource = getattr(span, "resource", None)
    if resource is None:
        return None
    entry = _BY_RESOURCE.get(id(resource))
    if entry is None or entry[0]() is not resource:
        return None
    tracer: Tracer | None = entry[1]()
    return tracer


def inject_current() -> dict[str, str]:
    """The current span's context as W3C headers (empty without OpenTelemetry).

    With the default propagators and no baggage, the headers are written directly: the
    generic propagator path costs several microseconds a message.
    """
    if not OTEL_AVAILABLE:
        return {}
    if propagate.get_global_textmap() is _DEFAULT_TEXTMAP and _DEFAULT_PROPAGATORS:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return {}
        if not baggage.get_all():
            carrier = {
                "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-"
                f"{int(context.trace_flags):02x}"
            }
            if context.trace_state:
                carrier["tracestate"] = context.trace_state.to_header()
            return carrier
    carrier = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str]) -> OtelContext | None:
    """The context W3C headers carry (``None`` without OpenTelemetry)."""
    if not OTEL_AVAILABLE or not carrier:
        return None
    return propagate.extract(carrier)


def link_from_traceparent(traceparent: str | None) -> Any:
    """A span link to the context a W3C ``traceparent`` names, or ``None``."""
    if not OTEL_AVAILABLE or not traceparent:
        return None
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        context = SpanContext(
            trace_id=int(parts[1], 16),
            span_id=int(parts[2], 16),
            is_remote=True,
            trace_flags=TraceFlags(int(parts[3], 16)),
        )
    except ValueError:
        return None
    return Link(context)


def trace_breaker_changes(breaker: CircuitBreaker) -> None:
    """Record each of ``breaker``'s state changes as an event on the span current when it
    happens: the call (service) or request (gateway) that caused it."""
    from atoll.observability import attributes as names  # noqa: PLC0415 - no import cycle

    def on_change(change: StateChange) -> None:
        span = current_span()
        if span is not None:
            span.add_event(
                "breaker state change",
                {
                    names.BREAKER: change.breaker,
                    names.BREAKER_STATE: change.current.value,
                    "atoll.breaker.previous_state": change.previous.value,
                    "atoll.breaker.reason": change.reason,
                },
            )

    breaker.add_listener(on_change)


def annotate(**attributes: str | float | bool) -> None:
    """Set attributes on the current span (e.g. ``annotate(**{"order.id": order_id})``),
    so traces can be searched by them. Does nothing without a recording span."""
    span = current_span()
    if span is not None:
        span.set_attributes(attributes)


def current_span() -> Any:
    """The recording span of the current context, or ``None``."""
    if not OTEL_AVAILABLE:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


def get_tracer(name: str = "atoll") -> Tracer | None:
    """The process's default tracer, for code outside a service runtime."""
    if not OTEL_AVAILABLE:
        return None
    return trace.get_tracer(name)
