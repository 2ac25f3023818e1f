"""The collector's CPU per span, decoding and storing, on the tracing benchmark's spans.

    .venv/bin/python benchmarks/collector_store.py [--quick]

In one process, no HTTP: consumer spans as atoll's services make them (the runtime's
eight messaging attributes, random message and conversation ids), encoded by atoll's
exporter into requests of 512 spans, as ``benchmarks/tracing.py`` sends them.

* ``decode-c-vs-python``: µs of CPU per span to turn a request into rows, the C walk
  (``_native.c``, the default) against the Python decoder below.
* ``decode-raw-vs-upb``: µs of CPU per span to turn a request into rows in Python,
  ``OTLPDecoder(native=False).decode_protobuf`` (attributes read from their raw bytes) against upb's
  full parse of the same request then the same conversion (how it was done before).
* ``store-10k-vs-100k-segments``: µs of CPU per span (all threads) for
  ``SpanStore.write``, one request at a time, attribute index on, with the default cap of
  10,000 spans a segment against segments of 100,000 (the earlier default). The bytes
  written per span and a trace lookup's time are printed with it.
* ``bind-adapted-vs-stock``: µs per row to ``executemany`` the decoded span rows (as full
  rows with ``bytes`` ids, as the Python decoder gives them) into an unindexed in-memory
  table, with atoll's identity adapters for ``bytes`` and ``None``
  (``atoll.persistence._sqlite.register_identity_adapters``) against the stock
  ``sqlite3`` module (adapters removed for the run).

200,000 spans (60,000 with ``--quick``). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from atoll.determinism import RandomSource, SystemClock
from atoll.observability._lean import LeanTracer
from atoll.observability._otlp import encode_encoded
from atoll.observability.collector._decode import Interner, OTLPDecoder
from atoll.observability.collector._store import _INSERT_COLUMNS, Retention, SpanStore

RESOURCE = Resource.create({"service.name": "bench-consumer"})
BATCH = 512


class Capture:
    """A processor that keeps the encoded spans (what FastBatchSpanProcessor queues)."""

    def __init__(self) -> None:
        self.spans: list[tuple[Resource, InstrumentationScope | None, bytes]] = []

    def add_ended(self, resource: Resource, scope: InstrumentationScope | None, span: Any) -> None:
        self.spans.append((resource, scope, span.encoded()))

    def on_end(self, span: ReadableSpan) -> None:
        raise AssertionError(span)


def request_bodies(count: int) -> list[bytes]:
    capture = Capture()
    random = RandomSource(seed=7)
    tracer = LeanTracer(
        processor=capture,  # type: ignore[arg-type]
        resource=RESOURCE,
        sampler=ParentBased(ALWAYS_ON),
        clock=SystemClock(),
        random=random,
    )
    for _ in range(count):
        attributes: dict[str, Any] = {
            "messaging.system": "atoll",
            "messaging.operation.type": "process",
            "messaging.destination.name": "bench-consumer.commands",
            "messaging.message.id": str(uuid.UUID(int=random.getrandbits(128))),
            "messaging.message.conversation_id": str(uuid.UUID(int=random.getrandbits(128))),
            "messaging.consumer.group.name": "bench-consumer",
            "messaging.delivery.attempt": 1,
            "atoll.message.type": "bench.Ping",
        }
        with tracer.span(
            "process bench.Ping", parent=None, kind=SpanKind.CONSUMER, attributes=attributes
        ):
            pass
    spans = capture.spans
    return [encode_encoded(spans[i : i + BATCH]) for i in range(0, len(spans), BATCH)]


def decode_cost(bodies: list[bytes], count: int) -> tuple[float, float, float]:
    """µs of CPU a span: the C walk, the Python decoder, upb's full parse then Python."""
    results = []
    for native in (True, False):
        decoder = OTLPDecoder(Interner(), Interner(), native=native)
        start = time.process_time()
        for body in bodies:
            decoder.decode_protobuf(body)
        results.append(time.process_time() - start)
    decoder = OTLPDecoder(Interner(), Interner())
    start = time.process_time()
    for body in bodies:
        decoder.convert(ExportTraceServiceRequest.FromString(body))
    results.append(time.process_time() - start)
    native, raw, upb = (elapsed / count * 1e6 for elapsed in results)
    return native, raw, upb


def bind_cost(bodies: list[bytes]) -> float:
    decoder = OTLPDecoder(Interner(), Interner())
    # Full rows with bytes ids, as the Python decoder gives them: what the adapters are
    # for (the C decoder's short rows and bytearray ids avoid most adapter calls).
    rows = [
        tuple(bytes(v) if isinstance(v, bytearray) else v for v in row) + (None,) * (17 - len(row))
        for body in bodies
        for row in decoder.decode_protobuf(body).spans
    ]
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE spans ({_INSERT_COLUMNS})")
    marks = ",".join("?" * len(rows[0]))
    start = time.process_time()
    conn.executemany(f"INSERT INTO spans VALUES ({marks})", rows)
    elapsed = time.process_time() - start
    conn.close()
    return elapsed / len(rows) * 1e6


def stock_bind_cost(bodies: list[bytes]) -> float:
    keys = [(bytes, sqlite3.PrepareProtocol), (type(None), sqlite3.PrepareProtocol)]
    saved = {key: sqlite3.adapters.pop(key) for key in keys if key in sqlite3.adapters}
    try:
        return bind_cost(bodies)
    finally:
        sqlite3.adapters.update(saved)


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


async def store_cost(bodies: list[bytes], count: int, segment_spans: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SpanStore(
            Path(tmp) / "traces.db", retention=Retention(max_segment_spans=segment_spans)
        )
        await store.open()
        decoder = OTLPDecoder(store.resources, store.scopes)
        batches = [decoder.decode_protobuf(body) for body in bodies]
        wrote = written_bytes()
        start = time.process_time()
        for batch in batches:
            await store.write(batch)
        await store.index_now()
        cpu = time.process_time() - start
        wrote = written_bytes() - wrote
        trace_id = batches[len(batches) // 2].spans[7][0]
        began = time.perf_counter()
        for _ in range(10):
            assert await store.get_trace(trace_id) is not None
        lookup = (time.perf_counter() - began) / 10
        segments = (await store.stats()).segments
        await store.close()
    return {
        "us_per_span": cpu / count * 1e6,
        "bytes_per_span": wrote / count,
        "get_trace_ms": lookup * 1e3,
        "segments": segments,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count = 60_000 if args.quick else 200_000
    bodies = request_bodies(count)
    native, raw, upb = decode_cost(bodies, count)
    print(
        f"decode: C {native:.2f} us/span, Python with raw attributes {raw:.2f},"
        f" upb's full parse {upb:.2f}"
    )
    # Alternated, best of three each: the first inserts of a process also pay for memory.
    binds = [(bind_cost(bodies), stock_bind_cost(bodies)) for _ in range(3)]
    adapted, stock = min(a for a, _ in binds), min(s for _, s in binds)
    print(f"binding span rows: {adapted:.2f} us/row with identity adapters, {stock:.2f} without")
    small = asyncio.run(store_cost(bodies, count, 10_000))
    large = asyncio.run(store_cost(bodies, count, 100_000))
    for label, result in (("10,000", small), ("100,000", large)):
        print(
            f"store, segments of {label} spans: {result['us_per_span']:.2f} us/span,"
            f" {result['bytes_per_span']:,.0f} bytes written/span, {result['segments']:.0f}"
            f" segments, a trace looked up in {result['get_trace_ms']:.1f} ms"
        )
    cases = {
        "decode-c-vs-python": {
            "atoll": round(native, 2),
            "peer": round(raw, 2),
            "unit": "us of CPU per span",
            "ratio": round(raw / native, 3),
        },
        "decode-raw-vs-upb": {
            "atoll": round(raw, 2),
            "peer": round(upb, 2),
            "unit": "us of CPU per span",
            "ratio": round(upb / raw, 3),
        },
        "bind-adapted-vs-stock": {
            "atoll": round(adapted, 2),
            "peer": round(stock, 2),
            "unit": "us of CPU per row",
            "ratio": round(stock / adapted, 3),
        },
        "store-10k-vs-100k-segments": {
            "atoll": round(small["us_per_span"], 2),
            "peer": round(large["us_per_span"], 2),
            "unit": "us of CPU per span",
            "ratio": round(large["us_per_span"] / small["us_per_span"], 3),
            "bytes_per_span": [round(small["bytes_per_span"]), round(large["bytes_per_span"])],
            "get_trace_ms": [round(small["get_trace_ms"], 2), round(large["get_trace_ms"], 2)],
        },
    }
    print(json.dumps({"benchmark": "collector_store", "cases": cases}))


if __name__ == "__main__":
    sys.exit(main())
