"""A lean span (every message handler's span) treats attributes, limits and exceptions as
an SDK span does."""

import uuid
from decimal import Decimal

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll import Command, Context, Service
from atoll.observability import Tracing, annotate
from atoll.observability._otlp import FastOTLPSpanExporter
from atoll.testing import wait_until
from support import System


class Recording(FastOTLPSpanExporter):
    """What atoll's default processor (FastBatchSpanProcessor) would post."""

    def __init__(self) -> None:  # no super(): no HTTP
        self._client = None
        self.spans: list = []

    def export_encoded(self, data: bytes) -> SpanExportResult:
        for rs in ExportTraceServiceRequest.FromString(data).resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class Pay(Command):
    message_type = "attrs.Pay"
    n: int


async def test_a_handler_span_with_a_uuid_attribute_is_still_exported(tmp_path):
    order_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    service = Service("payments")

    @service.handles(Pay)
    async def on_pay(pay: Pay, ctx: Context) -> None:
        trace.get_current_span().set_attribute("order.id", order_id)
        annotate(**{"order.total": Decimal("9.99")})

    exporter = Recording()
    tracing = Tracing("payments", exporter=exporter)
    system = System(tmp_path)
    [runtime] = await system.start(service, tracing=tracing)
    try:
        async with service.unit_of_work() as ctx:
            ctx.send(Pay(n=1), to="payments")
        await wait_until(lambda: runtime.stats.handled == 1, what="the payment")
        tracing.processor.force_flush()
        # An SDK span (1.45) keeps both values as str(); the lean span is dropped whole.
        names = [s.name for s in exporter.spans]
        assert "process attrs.Pay" in names, (names, tracing.dropped_spans)
    finally:
        await system.stop()


class OutOfStockError(Exception):
    pass


def sdk_and_lean(monkeypatch, **limits):
    for name, value in limits.items():
        monkeypatch.setenv(name, value)
    exporter = InMemorySpanExporter()
    tracing = Tracing("parity", exporter=exporter)
    for make in (
        lambda: tracing.tracer.start_as_current_span("sdk"),
        lambda: tracing.lean.span("lean", parent=None, kind=SpanKind.CONSUMER, attributes={}),
    ):
        with pytest.raises(OutOfStockError), make() as span:
            for n in range(5):
                span.add_event(f"retry {n}")
            span.set_attribute("payload", "x" * 1000)
            raise OutOfStockError("sku-1")
    tracing.processor.force_flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    tracing.shutdown()
    return spans["sdk"], spans["lean"]


def test_the_span_limits_hold_on_a_lean_span(monkeypatch):
    sdk, lean = sdk_and_lean(
        monkeypatch, OTEL_SPAN_EVENT_COUNT_LIMIT="2", OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="8"
    )
    assert (len(sdk.events), sdk.attributes["payload"]) == (2, "x" * 8)
    assert (len(lean.events), lean.attributes["payload"]) == (2, "x" * 8)  # 6 and 1000 chars


def test_the_exception_type_is_fully_qualified(monkeypatch):
    sdk, lean = sdk_and_lean(monkeypatch)
    [sdk_type] = [e.attributes["exception.type"] for e in sdk.events if e.name == "exception"]
    [lean_type] = [e.attributes["exception.type"] for e in lean.events if e.name == "exception"]
    assert sdk_type == "test_lean_parity.OutOfStockError"
    assert lean_type == sdk_type  # the lean span writes "OutOfStockError"
