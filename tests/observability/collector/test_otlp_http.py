"""OTLP/HTTP as the specification says: encodings, compression, status codes, bodies."""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import threading
import time
import zlib

import httpx
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp import T0, make_request, make_span, simple_trace, span_id, trace_id
from shop_trace import SERVICES, flush, make_shop_trace, providers

PB = {"content-type": "application/x-protobuf"}
JS = {"content-type": "application/json"}


async def stored_span_count(client: httpx.AsyncClient) -> int:
    return (await client.get("/api/stats")).json()["spans"]


# --- the official SDK exporter (protobuf) --------------------------------------------


@pytest.mark.parametrize(
    "compression", [None, Compression.Gzip, Compression.Deflate], ids=["none", "gzip", "deflate"]
)
def test_sdk_exporter_trace_round_trip(live, compression):
    by_service = providers(live.traces_url, SERVICES, compression)
    shop = make_shop_trace(by_service, start_ns=time.time_ns() - 60_000_000_000)
    flush(by_service)
    live.wait_for_spans(13)

    trace = live.get(f"/api/traces/{shop.trace_id}").json()
    spans = {s["span_id"]: s for s in trace["spans"]}
    assert len(spans) == 13
    assert trace["summary"]["root_service"] == "gateway"
    assert trace["summary"]["root_name"] == "POST /orders"
    assert trace["summary"]["error_count"] == 1
    assert [s["name"] for s in trace["summary"]["services"]] == SERVICES

    root = spans[shop.span_id("gateway")]
    assert root["parent_span_id"] is None
    assert root["kind"] == "server"
    assert root["attributes"]["http.response.status_code"] == 201
    assert trace["resources"][str(root["resource_id"])]["attributes"]["host.name"] == (
        "gateway-7f9c"
    )
    orders = spans[shop.span_id("orders")]
    assert orders["service"] == "orders"
    assert orders["parent_span_id"] == shop.span_id("gw-client")
    assert orders["attributes"]["order.id"] == shop.order_id

    failed = spans[shop.span_id("psp1")]
    assert failed["status"] == "error"
    assert failed["status_message"] == "timeout"
    [exception] = failed["events"]
    assert exception["name"] == "exception"
    assert exception["attributes"]["exception.type"] == "TimeoutError"
    assert "Traceback" in exception["attributes"]["exception.stacktrace"]
    breaker = spans[shop.span_id("charge")]["events"][0]
    assert breaker["attributes"] == {
        "breaker": "psp",
        "from": "closed",
        "to": "open",
        "failures": 5,
    }

    [link] = spans[shop.span_id("publish")]["links"]
    assert link["trace_id"] == shop.trace_id
    assert link["span_id"] == shop.span_id("commit")
    assert link["attributes"] == {"atoll.link": "committed-by"}
    assert spans[shop.span_id("consume")]["parent_span_id"] == shop.span_id("publish")

    duration = spans[shop.span_id("psp2")]["end_ns"] - spans[shop.span_id("psp2")]["start_ns"]
    assert duration == 6_000_000


def test_sdk_exporter_is_answered_with_partial_success(live):
    """The SDK never sends invalid ids, so send its protobuf with one span broken."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "partial"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")
    for name in ("good", "bad"):
        tracer.start_span(name).end()
    request = encode_spans(memory.get_finished_spans())
    bad = request.resource_spans[0].scope_spans[0].spans[1]
    bad.span_id = b"\x00" * 8
    response = httpx.post(live.traces_url, content=request.SerializeToString(), headers=PB)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-protobuf"
    answer = ExportTraceServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_spans == 1
    assert "invalid span_id" in answer.partial_success.error_message
    assert live.get("/api/stats").json()["spans"] == 1


# --- JSON ---------------------------------------------------------------------------


def otlp_json(tid: str, sid: str, parent: str = "", **span_fields: object) -> dict:
    """An ExportTraceServiceRequest as the OTLP JSON mapping (and the JS SDK) writes it."""
    span = {
        "traceId": tid,
        "spanId": sid,
        "parentSpanId": parent,
        "name": "GET /cart",
        "kind": 2,
        "startTimeUnixNano": str(T0),
        "endTimeUnixNano": str(T0 + 2_500_000),
        "attributes": [
            {"key": "http.request.method", "value": {"stringValue": "GET"}},
            {"key": "http.response.status_code", "value": {"intValue": "200"}},
            {"key": "cart.items", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}},
            {"key": "sampled", "value": {"boolValue": True}},
        ],
        "events": [
            {
                "timeUnixNano": str(T0 + 1_000_000),
                "name": "cache.miss",
                "attributes": [{"key": "key", "value": {"stringValue": "cart:42"}}],
            }
        ],
        "links": [{"traceId": "ab" * 16, "spanId": "cd" * 8, "attributes": []}],
        "status": {"code": 1},
    }
    span.update(span_fields)
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "web-frontend"}},
                        {"key": "telemetry.sdk.language", "value": {"stringValue": "webjs"}},
                    ]
                },
                "scopeSpans": [
                    {"scope": {"name": "@opentelemetry/instrumentation-fetch"}, "spans": [span]}
                ],
            }
        ]
    }


async def test_json_with_hex_ids_as_the_otlp_json_mapping_says(client):
    tid, sid = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    response = await client.post("/v1/traces", json=otlp_json(tid, sid), headers=JS)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {}

    trace = (await client.get(f"/api/traces/{tid}")).json()
    [span] = trace["spans"]
    assert span["span_id"] == sid
    assert span["service"] == "web-frontend"
    assert span["kind"] == "server"
    assert span["status"] == "ok"
    assert span["duration_ns"] == 2_500_000
    assert span["attributes"] == {
        "http.request.method": "GET",
        "http.response.status_code": 200,
        "cart.items": ["a"],
        "sampled": True,
    }
    assert span["events"][0]["name"] == "cache.miss"
    assert span["links"][0]["trace_id"] == "ab" * 16
    assert span["links"][0]["span_id"] == "cd" * 8
    assert span["scope_name"] == "@opentelemetry/instrumentation-fetch"


async def test_json_with_proto_field_names_enum_names_and_numbers(client):
    tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    document = {
        "resource_spans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"string_value": "billing"}}]
                },
                "scope_spans": [
                    {
                        "spans": [
                            {
                                "trace_id": tid.upper(),
                                "span_id": sid,
                                "name": "charge",
                                "kind": "SPAN_KIND_CLIENT",
                                "start_time_unix_nano": T0,
                                "end_time_unix_nano": T0 + 7,
                                "attributes": [{"key": "amount", "value": {"int_value": 1250}}],
                                "status": {"code": "STATUS_CODE_ERROR", "message": "declined"},
                                "unknownField": {"ignored": True},
                            }
                        ]
                    }
                ],
            }
        ]
    }
    response = await client.post("/v1/traces", content=json.dumps(document), headers=JS)
    assert response.status_code == 200, response.text
    [span] = (await client.get(f"/api/traces/{tid}")).json()["spans"]
    assert (span["name"], span["kind"], span["status"], span["status_message"]) == (
        "charge",
        "client",
        "error",
        "declined",
    )
    assert span["attributes"] == {"amount": 1250}
    assert span["duration_ns"] == 7


async def test_json_from_protobuf_json_format_with_base64_ids(client):
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "py-json"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("outer"):
        provider.get_tracer("t").start_span("inner").end()
    finished = memory.get_finished_spans()
    body = json_format.MessageToJson(encode_spans(finished))
    assert "traceId" in body  # camelCase, and ids in base64 as json_format writes them
    response = await client.post("/v1/traces", content=body, headers=JS)
    assert response.status_code == 200, response.text
    tid = format(finished[0].context.trace_id, "032x")
    spans = (await client.get(f"/api/traces/{tid}")).json()["spans"]
    assert {s["span_id"] for s in spans} == {format(s.context.span_id, "016x") for s in finished}
    inner = next(s for s in spans if s["name"] == "inner")
    assert inner["parent_span_id"] == format(finished[1].context.span_id, "016x")


async def test_json_gzip_and_charset_parameter(client):
    tid, sid = "11" * 16, "22" * 8
    body = gzip.compress(json.dumps(otlp_json(tid, sid)).encode())
    response = await client.post(
        "/v1/traces",
        content=body,
        headers={"content-type": "application/json; charset=utf-8", "content-encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    assert (await client.get(f"/api/traces/{tid}")).status_code == 200


async def test_partial_success_rejects_only_the_invalid_spans(client):
    good = "aa" * 16
    document = otlp_json(good, "01" * 8)
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    template = dict(spans[0])
    spans += [
        {**template, "traceId": "00" * 16, "spanId": "02" * 8},  # all-zero trace id
        {**template, "traceId": good, "spanId": "not-an-id"},  # neither hex nor base64
        {**template, "traceId": good, "spanId": "03" * 8, "parentSpanId": "0405"},  # short
        {**template, "traceId": "abc", "spanId": "05" * 8},  # short trace id
        {**template, "traceId": good, "spanId": "06" * 8},  # valid
    ]
    response = await client.post("/v1/traces", json=document, headers=JS)
    assert response.status_code == 200
    partial = response.json()["partialSuccess"]
    assert int(partial["rejectedSpans"]) == 4
    assert "invalid trace_id" in partial["errorMessage"]
    assert "invalid span_id" in partial["errorMessage"]
    assert "invalid parent_span_id" in partial["errorMessage"]
    stored = (await client.get(f"/api/traces/{good}")).json()["spans"]
    assert sorted(s["span_id"] for s in stored) == ["01" * 8, "06" * 8]


async def test_protobuf_partial_success_for_out_of_range_time(client):
    tid = trace_id()
    request = make_request(
        "svc",
        [make_span(tid, span_id()), make_span(tid, span_id(), start_ns=(1 << 63) + 5)],
    )
    response = await client.post("/v1/traces", content=request.SerializeToString(), headers=PB)
    assert response.status_code == 200
    answer = ExportTraceServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_spans == 1
    assert "2^63" in answer.partial_success.error_message
    assert len((await client.get(f"/api/traces/{tid.hex()}")).json()["spans"]) == 1


async def test_a_resent_batch_is_stored_once(client):
    _tid, spans = simple_trace("svc")
    body = make_request("svc", spans).SerializeToString()
    for _ in range(2):
        assert (await client.post("/v1/traces", content=body, headers=PB)).status_code == 200
    assert await stored_span_count(client) == 3
    assert (await client.get("/api/stats")).json()["spans_duplicate"] == 3


# --- malformed, too large, unsupported ---------------------------------------------


def rpc_status(response: httpx.Response) -> tuple[int, str]:
    if response.headers["content-type"] == "application/x-protobuf":
        status = status_pb2.Status.FromString(response.content)
        return status.code, status.message
    document = response.json()
    return document["code"], document["message"]


MALFORMED = [
    ("protobuf", PB, b"\xff\xff\xff\xff garbage", "protobuf"),
    ("truncated-protobuf", PB, b"\x0a\x80\x01\x0a", "protobuf"),
    ("json-syntax", JS, b'{"resourceSpans": [', "not valid JSON"),
    ("json-array", JS, b"[1, 2]", "must be a JSON object"),
    ("json-shape", JS, b'{"resourceSpans": 5}', "OTLP/JSON"),
    (
        "json-types",
        JS,
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 7}]}]}]}',
        "OTLP/JSON",
    ),
    (
        "json-surrogate",
        JS,
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\\ud800"}]}]}]}',
        "",
    ),
    ("json-deep", JS, b"[" * 100_000 + b"]" * 100_000, ""),
    (
        "json-int-overflow",
        JS,
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": '
            b'[{"startTimeUnixNano": "99999999999999999999999"}]}]}]}'
        ),
        "OTLP/JSON",
    ),
]


@pytest.mark.parametrize(
    ("encoding", "headers", "body", "says"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
async def test_malformed_bodies_get_400_with_a_status(client, encoding, headers, body, says):
    tid, spans = simple_trace("before")
    good = make_request("before", spans).SerializeToString()
    assert (await client.post("/v1/traces", content=good, headers=PB)).status_code == 200

    response = await client.post("/v1/traces", content=body, headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == headers["content-type"]
    code, message = rpc_status(response)
    assert code == 3  # INVALID_ARGUMENT
    assert says in message

    assert await stored_span_count(client) == 3
    assert len((await client.get(f"/api/traces/{tid.hex()}")).json()["spans"]) == 3


@pytest.mark.parametrize(
    ("encoding", "body", "says"),
    [
        ("gzip", b"not gzip at all", "corrupt"),
        ("gzip", gzip.compress(b"x" * 1000)[:-12], "truncated"),
        ("deflate", b"plainly not deflate", "corrupt"),
    ],
)
async def test_corrupt_compression_gets_400(client, encoding, body, says):
    response = await client.post(
        "/v1/traces", content=body, headers={**PB, "content-encoding": encoding}
    )
    assert response.status_code == 400
    assert says in rpc_status(response)[1]


async def test_deflate_and_multi_member_gzip_bodies(client):
    _tid, spans = simple_trace("svc")
    body = make_request("svc", spans).SerializeToString()
    response = await client.post(
        "/v1/traces", content=zlib.compress(body), headers={**PB, "content-encoding": "deflate"}
    )
    assert response.status_code == 200
    half = len(body) // 2
    tid2, spans2 = simple_trace("svc")
    body2 = make_request("svc", spans2).SerializeToString()
    members = gzip.compress(body2[:half]) + gzip.compress(body2[half:])
    response = await client.post(
        "/v1/traces", content=members, headers={**PB, "content-encoding": "gzip"}
    )
    assert response.status_code == 200
    assert (await client.get(f"/api/traces/{tid2.hex()}")).status_code == 200


async def test_bodies_over_the_limit_get_413(client, app):
    limit = app.receiver.max_body_bytes
    _tid, spans = simple_trace("before")
    good = make_request("before", spans).SerializeToString()
    assert (await client.post("/v1/traces", content=good, headers=PB)).status_code == 200

    big = make_request("big", [make_span(trace_id(), span_id(), name="x" * (limit + 10))])
    response = await client.post("/v1/traces", content=big.SerializeToString(), headers=PB)
    assert response.status_code == 413
    assert "over the limit" in rpc_status(response)[1]

    # Small on the wire, too large once inflated: the inflater stops at the limit.
    bomb = gzip.compress(big.SerializeToString())
    assert len(bomb) < limit
    response = await client.post(
        "/v1/traces", content=bomb, headers={**JS, "content-encoding": "gzip"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert "decompresses to more than" in rpc_status(response)[1]

    assert await stored_span_count(client) == 3


def test_chunked_body_over_the_limit_gets_413_from_a_real_server(live):
    limit = live.app.receiver.max_body_bytes

    def chunks():
        for _ in range(limit // 65536 + 2):
            yield b"\x00" * 65536

    response = httpx.post(live.traces_url, content=chunks(), headers=PB, timeout=30)
    assert response.status_code == 413
    # The connection was not left in a bad state for the next request.
    _tid, spans = simple_trace("after")
    body = make_request("after", spans).SerializeToString()
    assert httpx.post(live.traces_url, content=body, headers=PB).status_code == 200


def test_sdk_exporter_gets_413_and_does_not_retry(live):
    calls = []
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "huge"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("huge") as span:
        span.set_attribute("blob", "x" * (live.app.receiver.max_body_bytes + 1))
    exporter = OTLPSpanExporter(endpoint=live.traces_url, timeout=10)
    original = exporter._client._submit

    def submit(data, timeout):
        calls.append(len(data))
        return original(data, timeout)

    exporter._client._submit = submit
    started = time.monotonic()
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.FAILURE
    assert len(calls) == 1  # 413 is not retryable
    assert time.monotonic() - started < 5
    exporter.shutdown()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"content-type": "text/plain"}, 415),
        ({}, 415),
        ({"content-type": "application/grpc"}, 415),
        ({**PB, "content-encoding": "br"}, 415),
        ({**PB, "content-encoding": "gzip, br"}, 415),
    ],
)
async def test_unsupported_media_gets_415(client, headers, status):
    response = await client.post("/v1/traces", content=b"{}", headers=headers)
    assert response.status_code == status
    assert rpc_status(response)[0] == 3


async def test_other_methods_and_signals(client):
    response = await client.get("/v1/traces")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    response = await client.post("/v1/metrics", content=b"", headers=PB)
    assert response.status_code == 200  # an empty export (see test_otlp_metrics.py)
    response = await client.post("/v1/profiles", content=b"", headers=PB)
    assert response.status_code == 404
    assert "traces, logs and metrics" in response.json()["message"]


async def test_empty_request_is_a_success(client):
    for headers, body in ((PB, b""), (JS, b"{}")):
        response = await client.post("/v1/traces", content=body, headers=headers)
        assert response.status_code == 200


# --- backpressure and storage failure ----------------------------------------------


async def test_full_write_queue_gets_503_with_retry_after(make_app):
    async with make_app(max_pending_spans=4) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            gate = threading.Event()
            app.store._writer.submit(gate.wait)  # the writer thread is busy until released
            first = make_request("a", simple_trace("a", n_children=2)[1]).SerializeToString()
            second = make_request("b", simple_trace("b", n_children=2)[1]).SerializeToString()
            pending = asyncio.ensure_future(client.post("/v1/traces", content=first, headers=PB))
            deadline = time.monotonic() + 10
            while app.store._queued_spans < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/traces", content=second, headers=PB)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert rpc_status(refused)[0] == 14  # UNAVAILABLE
            gate.set()
            assert (await pending).status_code == 200
            assert (await client.post("/v1/traces", content=second, headers=PB)).status_code == 200
            assert await stored_span_count(client) == 6


async def test_a_failed_transaction_gets_503_and_keeps_nothing_of_it(client, app, monkeypatch):
    _tid, spans = simple_trace("ok")
    assert (
        await client.post(
            "/v1/traces", content=make_request("ok", spans).SerializeToString(), headers=PB
        )
    ).status_code == 200
    original = app.store._write_sync

    def failing(batches, size, now):
        conn = app.store._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(app.store, "_write_sync", failing)
    _tid2, spans2 = simple_trace("lost")
    body = make_request("lost", spans2).SerializeToString()
    response = await client.post("/v1/traces", content=body, headers=PB)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "not stored" in rpc_status(response)[1]

    monkeypatch.setattr(app.store, "_write_sync", original)
    assert (await client.post("/v1/traces", content=body, headers=PB)).status_code == 200
    assert await stored_span_count(client) == 6


async def test_too_many_requests_in_flight_get_503_before_their_body_is_read(client, app):
    app.receiver.max_in_flight = 1
    read = asyncio.Event()
    release = asyncio.Event()

    async def slow_body():
        read.set()
        await release.wait()
        yield make_request("a", simple_trace("a")[1]).SerializeToString()

    first = asyncio.ensure_future(client.post("/v1/traces", content=slow_body(), headers=PB))
    await asyncio.wait_for(read.wait(), 10)
    refused = await client.post("/v1/traces", content=b"", headers=PB)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    release.set()
    assert (await first).status_code == 200
    assert (await client.post("/v1/traces", content=b"", headers=PB)).status_code == 200


async def test_cors_only_for_the_origins_given(make_app):
    async with make_app(cors_origins=["http://localhost:3000"]) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            preflight = await client.options(
                "/v1/traces",
                headers={
                    "origin": "http://localhost:3000",
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "content-type",
                },
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
            assert preflight.headers["access-control-allow-methods"] == "POST"
            posted = await client.post(
                "/v1/traces", content=b"{}", headers={**JS, "origin": "http://localhost:3000"}
            )
            assert posted.status_code == 200
            assert posted.headers["access-control-allow-origin"] == "http://localhost:3000"

            elsewhere = {"origin": "http://evil.example"}
            assert (await client.options("/v1/traces", headers=elsewhere)).status_code == 405
            posted = await client.post("/v1/traces", content=b"{}", headers={**JS, **elsewhere})
            assert "access-control-allow-origin" not in posted.headers
