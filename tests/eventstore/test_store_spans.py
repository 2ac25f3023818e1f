"""Event store spans go to the service whose span is current, not to a global provider:
two services in one process, none of them the process's default."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll.eventstore import EventData, SQLiteEventStore
from atoll.observability import Tracing


def event() -> EventData:
    return EventData(event_id=str(uuid.uuid4()), type="Opened", data=b"{}")


@pytest.fixture
def two_services() -> tuple[Tracing, InMemorySpanExporter, Tracing, InMemorySpanExporter]:
    a_spans, b_spans = InMemorySpanExporter(), InMemorySpanExporter()
    return Tracing("a", exporter=a_spans), a_spans, Tracing("b", exporter=b_spans), b_spans


def finished(tracing: Tracing, exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    tracing.processor.force_flush()
    return {span.name: span for span in exporter.get_finished_spans()}


async def test_a_handler_span_gets_its_event_store_spans_as_children(
    tmp_path: Path,
    two_services: tuple[Tracing, InMemorySpanExporter, Tracing, InMemorySpanExporter],
) -> None:
    a, a_spans, b, b_spans = two_services
    assert a.lean is not None
    assert not trace.get_current_span().is_recording()
    async with SQLiteEventStore.from_path(tmp_path / "events.db") as store:
        with a.lean.span("process Open", parent=None, kind=SpanKind.CONSUMER, attributes={}):
            await store.append("account-1", [event()])
            await store.read_stream("account-1")
    spans = finished(a, a_spans)
    assert {"process Open", "eventstore append", "eventstore read_stream"} <= set(spans)
    handler = spans["process Open"]
    for name in ("eventstore append", "eventstore read_stream"):
        child = spans[name]
        assert child.parent is not None
        assert child.parent.span_id == handler.context.span_id
        assert child.context.trace_id == handler.context.trace_id
        assert child.kind is SpanKind.CLIENT
        assert child.attributes["db.operation.name"] == name.split()[1]
        assert child.attributes["atoll.eventstore.stream"] == "account-1"
    assert not finished(b, b_spans), "another service's exporter got the spans"
    for tracing in (a, b):
        tracing.shutdown()


async def test_a_request_span_gets_its_event_store_spans_in_its_own_service(
    tmp_path: Path,
    two_services: tuple[Tracing, InMemorySpanExporter, Tracing, InMemorySpanExporter],
) -> None:
    a, a_spans, b, b_spans = two_services
    assert b.tracer is not None
    async with SQLiteEventStore.from_path(tmp_path / "events.db") as store:
        with b.tracer.start_as_current_span("GET /accounts/{id}", kind=SpanKind.SERVER) as request:
            await store.append("account-2", [event()])
    spans = finished(b, b_spans)
    assert spans["eventstore append"].parent.span_id == request.get_span_context().span_id
    assert not finished(a, a_spans)
    for tracing in (a, b):
        tracing.shutdown()


async def test_no_span_outside_a_traced_request_or_handler(
    tmp_path: Path,
    two_services: tuple[Tracing, InMemorySpanExporter, Tracing, InMemorySpanExporter],
) -> None:
    a, a_spans, b, b_spans = two_services
    async with SQLiteEventStore.from_path(tmp_path / "events.db") as store:
        await store.append("account-3", [event()])
    assert not finished(a, a_spans)
    assert not finished(b, b_spans)
    for tracing in (a, b):
        tracing.shutdown()
