"""FastBatchSpanProcessor keeps the SDK batch processor's contract, with spans encoded
as they end; a lean span's encoding is the SDK encoder's."""

from __future__ import annotations

import threading

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from atoll.determinism import RandomSource, VirtualClock
from atoll.observability._lean import LeanTracer, parse_traceparent
from atoll.observability._otlp import FastBatchSpanProcessor, FastOTLPSpanExporter

PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


class RecordingExporter(FastOTLPSpanExporter):
    """Keeps the requests it would post (decoded), instead of posting them."""

    def __init__(self, *, block: threading.Event | None = None) -> None:  # no super(): no HTTP
        self.requests: list[ExportTraceServiceRequest] = []
        self.block = block
        self.closed = False

    def export_encoded(self, data: bytes) -> SpanExportResult:
        if self.block is not None:
            self.block.wait(10)
        request = ExportTraceServiceRequest()
        request.ParseFromString(data)
        self.requests.append(request)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.closed = True

    def spans(self) -> list[object]:
        return [
            span
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


def lean_tracer(processor: object) -> LeanTracer:
    clock = VirtualClock(start=1_700_000_000.0)
    return LeanTracer(
        processor=processor,  # type: ignore[arg-type]
        resource=Resource.create({"service.name": "orders"}),
        sampler=TracerProvider().sampler,
        clock=clock,
        random=RandomSource(seed=7, clock=clock),
    )


def test_a_lean_span_is_encoded_as_the_sdk_encodes_it():
    captured: list[ReadableSpan] = []

    class Capture:
        def on_end(self, span: ReadableSpan) -> None:
            captured.append(span)

    exporter = RecordingExporter()
    fast = FastBatchSpanProcessor(exporter)
    for processor in (fast, Capture()):
        tracer = lean_tracer(processor)
        with tracer.span(
            "process shop.OrderPlaced",
            parent=parse_traceparent(PARENT),
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "atoll", "messaging.delivery.attempt": 2},
        ) as span:
            span.set_attribute("order.id", "o-1")
            span.add_event("retrying", {"attempt": 1})
            span.set_status(Status(StatusCode.ERROR, "boom"))
    assert fast.force_flush()
    [ours] = exporter.spans()
    theirs = encode_spans(captured).resource_spans[0].scope_spans[0].spans[0]
    assert ours == theirs
    assert ours.SerializeToString() == theirs.SerializeToString()
    fast.shutdown()


def test_full_batches_go_out_without_waiting_for_the_delay():
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(
        exporter, max_queue_size=100, max_export_batch_size=10, schedule_delay_millis=60_000
    )
    tracer = lean_tracer(processor)
    for n in range(30):
        with tracer.span(f"s{n}", parent=None, kind=SpanKind.INTERNAL, attributes={}):
            pass
    deadline = threading.Event()
    for _ in range(100):
        if len(exporter.spans()) == 30:
            break
        deadline.wait(0.05)
    assert len(exporter.spans()) == 30
    assert all(len(r.resource_spans[0].scope_spans[0].spans) <= 10 for r in exporter.requests)
    processor.shutdown()


def test_a_full_queue_drops_and_counts_and_never_blocks():
    gate = threading.Event()
    exporter = RecordingExporter(block=gate)
    processor = FastBatchSpanProcessor(
        exporter, max_queue_size=5, max_export_batch_size=5, schedule_delay_millis=60_000
    )
    tracer = lean_tracer(processor)
    for n in range(5):  # a full batch: the thread takes it and blocks in the exporter
        with tracer.span(f"s{n}", parent=None, kind=SpanKind.INTERNAL, attributes={}):
            pass
    for _ in range(100):
        if not processor._queue:
            break
        threading.Event().wait(0.02)
    for n in range(12):
        with tracer.span(f"t{n}", parent=None, kind=SpanKind.INTERNAL, attributes={}):
            pass
    assert processor.dropped == 7  # 5 fit in the queue again
    gate.set()
    assert processor.force_flush()
    assert len(exporter.spans()) == 10
    processor.shutdown()


def test_shutdown_exports_what_waits_and_closes_the_exporter():
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    tracer = lean_tracer(processor)
    for n in range(3):
        with tracer.span(f"s{n}", parent=None, kind=SpanKind.INTERNAL, attributes={}):
            pass
    processor.shutdown()
    assert [s.name for s in exporter.spans()] == ["s0", "s1", "s2"]
    assert exporter.closed
    with tracer.span("late", parent=None, kind=SpanKind.INTERNAL, attributes={}):
        pass
    assert processor.dropped == 1


def test_sdk_spans_and_unsampled_spans(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "3")
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    assert processor.max_export_batch_size == 3
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    provider.add_span_processor(processor)
    with provider.get_tracer("test").start_as_current_span("GET /orders") as span:
        span.set_attribute("http.route", "/orders")
    unsampled = parse_traceparent({"traceparent": PARENT["traceparent"][:-2] + "00"})
    with lean_tracer(processor).span(
        "skipped", parent=unsampled, kind=SpanKind.CONSUMER, attributes={}
    ):
        pass
    assert processor.force_flush()
    [span] = exporter.spans()
    assert span.name == "GET /orders"
    assert span.attributes[0].key == "http.route"
    processor.shutdown()


def test_a_lean_span_propagates_its_own_context_and_the_incoming_baggage():
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(exporter)
    tracer = lean_tracer(processor)
    incoming = {**PARENT, "tracestate": "vendor=sender", "baggage": "tenant=t1"}
    with tracer.span(
        "process shop.OrderPlaced",
        parent=parse_traceparent(incoming),
        kind=SpanKind.CONSUMER,
        attributes={},
    ) as span:
        outgoing = span.propagated(incoming)
    context = span.get_span_context()
    assert outgoing == {
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-01",
        "tracestate": "vendor=sender",  # the trace's state goes on with the trace
        "baggage": "tenant=t1",
    }
    assert outgoing["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert incoming["traceparent"] == PARENT["traceparent"]  # the message's are untouched
    processor.shutdown()


def test_a_span_ending_alone_is_exported_after_the_delay():
    # Lean spans are encoded in runs; a run that never fills still goes out.
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(exporter, schedule_delay_millis=50)
    with lean_tracer(processor).span("alone", parent=None, kind=SpanKind.INTERNAL, attributes={}):
        pass
    for _ in range(100):
        if exporter.spans():
            break
        threading.Event().wait(0.05)
    assert [s.name for s in exporter.spans()] == ["alone"]
    processor.shutdown()


def test_an_ended_span_ignores_later_changes():
    # It is encoded some time after it ends: what it was at its end must be what goes out.
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    with lean_tracer(processor).span(
        "process shop.OrderPlaced", parent=None, kind=SpanKind.CONSUMER, attributes={"a": "1"}
    ) as span:
        pass
    span.set_attribute("a", "changed")
    span.set_attributes({"b": "2"})
    span.add_event("late")
    span.set_status(Status(StatusCode.ERROR, "late"))
    span.update_name("renamed")
    assert processor.force_flush()
    [exported] = exporter.spans()
    assert exported.name == "process shop.OrderPlaced"
    assert [(a.key, a.value.string_value) for a in exported.attributes] == [("a", "1")]
    assert not exported.events
    assert exported.status.code == 0
    processor.shutdown()


def test_a_span_that_cannot_be_encoded_is_dropped_and_counted_alone():
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(exporter, schedule_delay_millis=60_000)
    tracer = lean_tracer(processor)
    for name, value in (("before", "x"), ("bad", object()), ("after", "y")):
        with tracer.span(name, parent=None, kind=SpanKind.INTERNAL, attributes={"v": value}):  # type: ignore[dict-item]
            pass
    assert processor.force_flush()
    assert [s.name for s in exporter.spans()] == ["before", "after"]
    assert processor.dropped == 1
    processor.shutdown()


def test_spans_ended_on_many_threads_while_exports_run_are_all_exported():
    # The ending threads and the export thread encode from the same runs at once.
    exporter = RecordingExporter()
    processor = FastBatchSpanProcessor(
        exporter, max_queue_size=100_000, max_export_batch_size=100, schedule_delay_millis=1
    )
    tracer = lean_tracer(processor)

    def end_spans(thread: int) -> None:
        for n in range(2_000):
            with tracer.span(f"t{thread}-{n}", parent=None, kind=SpanKind.INTERNAL, attributes={}):
                pass

    threads = [threading.Thread(target=end_spans, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert processor.force_flush()
    names = [s.name for s in exporter.spans()]
    assert len(names) == len(set(names)) == 8_000
    assert processor.dropped == 0
    processor.shutdown()
