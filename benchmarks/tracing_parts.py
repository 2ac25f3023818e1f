"""The parts of tracing one message, each against what the OpenTelemetry SDK does.

    .venv/bin/python benchmarks/tracing_parts.py [--quick]

In one process, no collector:

* ``lean-span-vs-sdk-span``: a consumer span from a W3C parent to its end (the runtime's
  eight messaging attributes, the ``traceparent`` it passes on), atoll's lean span ending
  into :class:`FastBatchSpanProcessor` (encoded as it ends) against the SDK's
  ``start_as_current_span`` ending into the SDK's ``BatchSpanProcessor``; µs per span on
  the calling thread (the export threads' work is not in it).
* ``encode-span-vs-sdk-encoder``: encoding such spans for an export request, atoll's
  ``encode_span`` against the SDK exporter's ``encode_spans(...).SerializeToString()``;
  µs per span.
* ``exporter-post-vs-sdk-requests`` (reported): CPU of posting one 512-span request to
  a local HTTP sink through atoll's exporter (the SDK exporter's client on
  :class:`~atoll.observability._otlp.PlainHTTPTransport`, what an ``http://`` endpoint
  gets) against the same exporter on the SDK's own ``requests`` session; the export
  thread's cost per batch. Bare ``http.client`` is printed as the floor.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import threading
import time
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from atoll.determinism import RandomSource, SystemClock
from atoll.observability._lean import UNSET_STATUS, LeanTracer, parse_traceparent
from atoll.observability._otlp import (
    FastBatchSpanProcessor,
    FastOTLPSpanExporter,
    encode_encoded,
    encode_span,
)

CARRIER = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
RESOURCE = Resource.create({"service.name": "bench-consumer"})


def attributes(i: int) -> dict[str, Any]:
    return {
        "messaging.system": "atoll",
        "messaging.operation.type": "process",
        "messaging.destination.name": "bench-consumer.commands",
        "messaging.message.id": f"0190a3b4-{i:012d}-7abc-8def",
        "messaging.message.conversation_id": f"0190a3b4-{i:012d}-7abc-8000",
        "messaging.consumer.group.name": "bench-consumer",
        "messaging.delivery.attempt": 1,
        "atoll.message.type": "bench.Ping",
    }


class NullExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        del spans
        return SpanExportResult.SUCCESS


class NullEncodedExporter(FastOTLPSpanExporter):
    def __init__(self) -> None:  # no super(): nothing is posted
        pass

    def export_encoded(self, data: bytes) -> SpanExportResult:
        del data
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class Keep(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def lean_spans(n: int) -> float:
    processor = FastBatchSpanProcessor(NullEncodedExporter())
    clock = SystemClock()
    tracer = LeanTracer(
        processor=processor,
        resource=RESOURCE,
        sampler=TracerProvider().sampler,
        clock=clock,
        random=RandomSource(clock=clock),
    )
    start = time.thread_time()
    for i in range(n):
        with tracer.span(
            "process bench.Ping",
            parent=parse_traceparent(CARRIER),
            kind=SpanKind.CONSUMER,
            attributes=attributes(i),
        ) as span:
            span.headers()
    elapsed = time.thread_time() - start
    processor.shutdown()
    return elapsed / n * 1e6


def sdk_spans(n: int) -> float:
    provider = TracerProvider(resource=RESOURCE)
    processor = BatchSpanProcessor(NullExporter())
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("bench")
    propagator = TraceContextTextMapPropagator()
    start = time.thread_time()
    for i in range(n):
        context = propagator.extract(CARRIER)
        with tracer.start_as_current_span(
            "process bench.Ping", context=context, kind=SpanKind.CONSUMER, attributes=attributes(i)
        ) as span:
            carrier: dict[str, str] = {}
            propagator.inject(carrier, context=set_span_in_context(span))
    elapsed = time.thread_time() - start
    provider.shutdown()
    return elapsed / n * 1e6


def readable_spans(n: int) -> list[ReadableSpan]:
    keep = Keep()
    clock = SystemClock()
    tracer = LeanTracer(
        processor=keep,
        resource=RESOURCE,
        sampler=TracerProvider().sampler,
        clock=clock,
        random=RandomSource(clock=clock),
    )
    for i in range(n):
        with tracer.span(
            "process bench.Ping",
            parent=parse_traceparent(CARRIER),
            kind=SpanKind.CONSUMER,
            attributes=attributes(i),
        ) as span:
            span.set_status(Status(StatusCode.UNSET))
    return keep.spans


def lean_arguments(span: ReadableSpan) -> tuple[Any, ...]:
    """``encode_span``'s arguments for ``span`` as ``LeanSpan.end`` passes them: a plain
    dict of attributes and, for a span whose status nobody set, the shared UNSET status
    (a ReadableSpan carries a BoundedAttributes and a Status of its own)."""
    assert span.context is not None
    status = UNSET_STATUS if span.status.status_code is StatusCode.UNSET else span.status
    return (
        span.context,
        span.parent,
        span.name,
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        (),
        (),
        status,
    )


def encode_ours(spans: list[ReadableSpan]) -> float:
    calls = [lean_arguments(span) for span in spans]
    start = time.thread_time()
    for call in calls:
        encode_span(*call)
    return (time.thread_time() - start) / len(spans) * 1e6


def encode_sdk(spans: list[ReadableSpan]) -> float:
    start = time.thread_time()
    for i in range(0, len(spans), 512):
        encode_spans(spans[i : i + 512]).SerializeToString()
    return (time.thread_time() - start) / len(spans) * 1e6


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        del format, args


def posts(spans: list[ReadableSpan], rounds: int) -> tuple[float, float, float]:
    """CPU ms per 512-span POST: atoll's exporter, on requests, bare http.client."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    server.protocol_version = "HTTP/1.1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    items = [(RESOURCE, None, encode_span(*lean_arguments(span))) for span in spans[:512]]
    data = encode_encoded(items)
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    timed = []
    # A session of the caller's keeps the SDK's requests transport (see the exporter).
    for session in (None, requests.Session()):
        exporter = FastOTLPSpanExporter(endpoint=endpoint, session=session)
        exporter.export_encoded(data)  # connect outside the timing
        start = time.thread_time()
        for _ in range(rounds):
            exporter.export_encoded(data)
        timed.append((time.thread_time() - start) / rounds * 1e3)
        exporter.shutdown()
    conn = http.client.HTTPConnection("127.0.0.1", port)
    start = time.thread_time()
    for _ in range(rounds):
        conn.request(
            "POST", "/v1/traces", body=data, headers={"Content-Type": "application/x-protobuf"}
        )
        conn.getresponse().read()
    plain = (time.thread_time() - start) / rounds * 1e3
    conn.close()
    server.shutdown()
    return timed[0], timed[1], plain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 20_000 if args.quick else 100_000
    rounds = 3
    lean = min(lean_spans(n) for _ in range(rounds))
    sdk = min(sdk_spans(n) for _ in range(rounds))
    print(f"span, calling thread: lean {lean:.2f} us, SDK {sdk:.2f} us")
    spans = readable_spans(n)
    ours = min(encode_ours(spans) for _ in range(rounds))
    theirs = min(encode_sdk(spans) for _ in range(rounds))
    print(f"encoding per span: encode_span {ours:.2f} us, SDK encoder {theirs:.2f} us")
    atoll_post, requests_post, plain_post = posts(spans, 20 if args.quick else 60)
    print(
        f"posting 512 spans (CPU): atoll's exporter {atoll_post:.2f} ms, on requests"
        f" {requests_post:.2f} ms, bare http.client {plain_post:.2f} ms"
    )
    cases = {
        "lean-span-vs-sdk-span": {
            "atoll": round(lean, 2),
            "peer": round(sdk, 2),
            "unit": "us per span on the calling thread",
            "ratio": round(sdk / lean, 2),
        },
        "encode-span-vs-sdk-encoder": {
            "atoll": round(ours, 2),
            "peer": round(theirs, 2),
            "unit": "us per span",
            "ratio": round(theirs / ours, 2),
        },
        "exporter-post-vs-sdk-requests": {
            "atoll": round(atoll_post, 3),
            "peer": round(requests_post, 3),
            "unit": "ms of CPU per 512-span request (reported)",
            "ratio": round(requests_post / atoll_post, 2),
        },
    }
    print(json.dumps({"benchmark": "tracing_parts", "cases": cases}))


if __name__ == "__main__":
    main()
