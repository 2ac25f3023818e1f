"""OTLP logs: ``POST /v1/logs`` from the official SDK exporter and by hand, stored with
their trace, searchable, bounded by retention, and bad input answered as for traces."""

from __future__ import annotations

import gzip
import json
import logging
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from otlp import T0, any_value, kvs, make_request, make_span, span_id, trace_id

from atoll.observability.collector import LogQuery, Retention, SpanStore
from atoll.observability.collector._decode import DecodedBatch, Interner, OTLPDecoder
from atoll.observability.collector._errors import MalformedRequestError
from atoll.observability.collector._terms import term_hash

PB = {"content-type": "application/x-protobuf"}
JS = {"content-type": "application/json"}


def log_request(
    records: list[LogRecord], *, service: str = "orders", scope: str = "orders.app"
) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    resource_logs = ResourceLogs()
    resource_logs.resource.attributes.extend(kvs({"service.name": service}))
    scope_logs = ScopeLogs()
    scope_logs.scope.name = scope
    scope_logs.log_records.extend(records)
    resource_logs.scope_logs.append(scope_logs)
    request.resource_logs.append(resource_logs)
    return request


def record(
    body: object = "hello",
    *,
    time_ns: int = T0,
    severity: int = 9,
    tid: bytes = b"",
    sid: bytes = b"",
    **attributes: object,
) -> LogRecord:
    found = LogRecord(
        time_unix_nano=time_ns,
        observed_time_unix_nano=time_ns,
        severity_number=severity,  # type: ignore[arg-type]
        severity_text=logging.getLevelName(10 + (severity - 5) // 4 * 10) if severity else "",
        trace_id=tid,
        span_id=sid,
    )
    found.body.CopyFrom(any_value(body))
    found.attributes.extend(kvs(attributes))
    return found


# --- the official SDK exporter ------------------------------------------------------


@pytest.mark.parametrize("compression", [None, Compression.Gzip], ids=["none", "gzip"])
def test_sdk_log_exporter_stores_logs_with_their_trace(live, compression):
    resource = Resource.create({"service.name": "payments", "host.name": "pay-1"})
    tracers = TracerProvider(resource=resource)
    loggers = LoggerProvider(resource=resource)
    exporter = OTLPLogExporter(endpoint=f"{live.url}/v1/logs", compression=compression)
    loggers.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = loggers.get_logger(f"test.collector.logs.{compression}")
    try:
        with tracers.get_tracer("payments").start_as_current_span("charge") as span:
            context = span.get_span_context()
            logger.emit(
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
                body="charging order o-17",
                attributes={"order.id": "o-17"},
            )
            logger.emit(
                severity_number=SeverityNumber.WARN,
                severity_text="WARN",
                body='the PSP said "slow down"',
            )
        logger.emit(severity_number=SeverityNumber.ERROR, body="outside any span")
    finally:
        loggers.shutdown()
        tracers.shutdown()
    trace_hex = f"{context.trace_id:032x}"
    span_hex = f"{context.span_id:016x}"

    stats = live.get("/api/stats").json()
    assert stats["logs"] == stats["logs_stored"] == stats["logs_received"] == 3
    assert stats["logs_rejected"] == 0

    found = live.get("/api/logs", trace_id=trace_hex).json()["logs"]
    assert [r["body"] for r in found] == ['the PSP said "slow down"', "charging order o-17"]
    warning, info = found
    assert (warning["severity"], warning["level"], warning["severity_text"]) == (
        13,
        "warn",
        "WARN",
    )
    assert (info["severity"], info["level"]) == (9, "info")
    assert info["trace_id"] == trace_hex
    assert info["span_id"] == span_hex
    assert info["service"] == "payments"
    assert info["attributes"]["order.id"] == "o-17"
    assert info["scope_name"] == f"test.collector.logs.{compression}"

    [outside] = live.get("/api/logs", severity="error").json()["logs"]
    assert outside["body"] == "outside any span"
    assert outside["trace_id"] is None
    assert outside["span_id"] is None


def test_trace_api_and_page_show_the_logs_of_a_trace(live):
    tid, sid = trace_id(), span_id()
    spans = make_request("inventory", [make_span(tid, sid, name="reserve")])
    response = httpx.post(f"{live.url}/v1/traces", content=spans.SerializeToString(), headers=PB)
    assert response.status_code == 200
    logs = log_request(
        [
            record("reserved 2 of sku-9", time_ns=T0 + 500_000, tid=tid, sid=sid),
            record("<b>not markup</b>", time_ns=T0 + 200_000, severity=17, tid=tid, sid=sid),
            record("another trace", tid=trace_id(), sid=span_id()),
        ],
        service="inventory",
    )
    response = httpx.post(f"{live.url}/v1/logs", content=logs.SerializeToString(), headers=PB)
    assert response.status_code == 200
    assert ExportLogsServiceResponse.FromString(response.content) == ExportLogsServiceResponse()

    trace = live.get(f"/api/traces/{tid.hex()}").json()
    assert [r["body"] for r in trace["logs"]] == ["<b>not markup</b>", "reserved 2 of sku-9"]
    assert {r["span_id"] for r in trace["logs"]} == {sid.hex()}

    page = live.get(f"/traces/{tid.hex()}").text
    assert "reserved 2 of sku-9" in page
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page
    assert "<b>not markup</b>" not in page
    assert "another trace" not in page


# --- OTLP/JSON --------------------------------------------------------------------------


def test_json_logs_with_hex_ids_and_enum_names(live):
    tid, sid = trace_id(), span_id()
    document = {
        "resourceLogs": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "web"}}]
                },
                "scopeLogs": [
                    {
                        "scope": {"name": "browser"},
                        "logRecords": [
                            {
                                "timeUnixNano": str(T0),
                                "severityNumber": "SEVERITY_NUMBER_ERROR",
                                "severityText": "Error",
                                "body": {
                                    "kvlistValue": {
                                        "values": [
                                            {"key": "msg", "value": {"stringValue": "boom"}},
                                            {"key": "n", "value": {"intValue": "3"}},
                                        ]
                                    }
                                },
                                "attributes": [
                                    {"key": "url.path", "value": {"stringValue": "/cart"}}
                                ],
                                "traceId": tid.hex(),
                                "spanId": sid.hex(),
                                "eventName": "browser.error",
                            },
                            {"severityNumber": 5, "body": {"stringValue": "no time at all"}},
                        ],
                    }
                ],
            }
        ]
    }
    before = time.time_ns()
    response = httpx.post(f"{live.url}/v1/logs", json=document)
    after = time.time_ns()
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {}

    [error] = live.get("/api/logs", trace_id=tid.hex()).json()["logs"]
    assert error["body"] == {"msg": "boom", "n": 3}
    assert (error["severity"], error["level"], error["severity_text"]) == (17, "error", "Error")
    assert error["span_id"] == sid.hex()
    assert error["event_name"] == "browser.error"
    assert error["attributes"] == {"url.path": "/cart"}
    assert error["time_ns"] == T0

    [debug] = live.get("/api/logs", text="no time").json()["logs"]
    # Neither time given: the collector's receive time stands in for both.
    assert before <= debug["time_ns"] == debug["observed_ns"] <= after
    assert debug["level"] == "debug"


# --- bad input -------------------------------------------------------------------------


async def test_invalid_records_are_a_partial_success(client):
    good = record("kept", tid=trace_id(), sid=span_id())
    short_trace = record("short trace id", tid=b"\x01\x02\x03")
    short_span = record("short span id", tid=trace_id(), sid=b"\x01")
    too_late = record("too late", time_ns=1 << 63)
    bad_severity = record("severity 99", severity=99)
    no_ids = record("zero ids are none", tid=bytes(16), sid=bytes(8))
    body = log_request([good, short_trace, short_span, too_late, bad_severity, no_ids])

    response = await client.post("/v1/logs", content=body.SerializeToString(), headers=PB)
    assert response.status_code == 200
    answer = ExportLogsServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_log_records == 4
    message = answer.partial_success.error_message
    assert message.startswith("4 log records rejected: ")
    assert "must be empty or 16 bytes" in message
    assert "must be empty or 8 bytes" in message
    assert "2^63-1" in message
    assert "0 to 24" in message

    stored = (await client.get("/api/logs")).json()["logs"]
    assert sorted(r["body"] for r in stored) == ["kept", "zero ids are none"]
    zero = next(r for r in stored if r["body"] == "zero ids are none")
    assert zero["trace_id"] is None
    assert zero["span_id"] is None
    stats = (await client.get("/api/stats")).json()
    assert (stats["logs_received"], stats["logs_rejected"], stats["logs_stored"]) == (6, 4, 2)

    response = await client.post(
        "/v1/logs",
        json={
            "resourceLogs": [
                {
                    "scopeLogs": [
                        {"logRecords": [{"traceId": "zz", "body": {"stringValue": "bad hex"}}]}
                    ]
                }
            ]
        },
    )
    assert response.status_code == 200
    assert response.json()["partialSuccess"]["rejectedLogRecords"] == "1"


@pytest.mark.parametrize(
    ("headers", "body", "status", "says"),
    [
        (PB, b"\xff\xff\xff", 400, "not a protobuf ExportLogsServiceRequest"),
        (JS, b"{not json", 400, "not valid JSON"),
        (JS, b"[]", 400, "ExportLogsServiceRequest"),
        (JS, b'{"resourceLogs": 7}', 400, "ExportLogsServiceRequest"),
        ({**PB, "content-encoding": "gzip"}, b"not gzip", 400, "gzip"),
        ({"content-type": "text/plain"}, b"hello", 415, "unsupported content type"),
    ],
)
async def test_malformed_log_exports_are_refused_with_a_reason(client, headers, body, status, says):
    response = await client.post("/v1/logs", content=body, headers=headers)
    assert response.status_code == status
    message = (
        response.json()["message"]
        if response.headers["content-type"] == "application/json"
        else response.text
    )
    assert says in message
    assert (await client.get("/api/stats")).json()["logs"] == 0


async def test_oversized_log_export_gets_413(client):
    # The app fixture's limit is 256 KiB; this gzip body inflates to far more.
    records = [record("x" * 1000) for _ in range(400)]
    raw = log_request(records).SerializeToString()
    response = await client.post(
        "/v1/logs", content=gzip.compress(raw), headers={**PB, "content-encoding": "gzip"}
    )
    assert response.status_code == 413
    response = await client.post("/v1/logs", content=raw, headers=PB)
    assert response.status_code == 413
    assert (await client.get("/api/stats")).json()["logs"] == 0


async def test_other_signals_are_refused_naming_those_taken(client):
    response = await client.post("/v1/profiles", content=b"", headers=PB)
    assert response.status_code == 404
    assert "traces, logs and metrics" in response.json()["message"]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"severity": "loud"}, "severity 'loud'"),
        ({"severity": "25"}, "severity '25'"),
        ({"severity": "\u00b2"}, "is not one of"),
        ({"severity": "1" * 5000}, "is not one of"),
        ({"trace_id": "xyz"}, "trace"),
        ({"start": "yesterday"}, "start 'yesterday'"),
        ({"limit": "0"}, "limit"),
    ],
)
async def test_bad_log_search_parameters_are_problems(client, params, says):
    response = await client.get("/api/logs", params=params)
    assert response.status_code in (400, 422)
    assert response.headers["content-type"].startswith("application/problem+json")
    assert says in json.dumps(response.json())


# --- search ------------------------------------------------------------------------------


async def test_log_search_by_service_severity_text_and_time(client):
    orders = log_request(
        [
            record("order o-1 placed", time_ns=T0 + 1_000_000),
            record("order o-2 failed: card declined", time_ns=T0 + 2_000_000, severity=17),
            record('quoted "50%_off" code', time_ns=T0 + 3_000_000, severity=13),
        ]
    )
    payments = log_request([record("charged o-1", time_ns=T0 + 4_000_000)], service="payments")
    for request in (orders, payments):
        response = await client.post("/v1/logs", content=request.SerializeToString(), headers=PB)
        assert response.status_code == 200

    async def bodies(**params: str) -> list[str]:
        response = await client.get("/api/logs", params=params)
        assert response.status_code == 200, response.text
        return [r["body"] for r in response.json()["logs"]]

    assert await bodies() == [
        "charged o-1",
        'quoted "50%_off" code',
        "order o-2 failed: card declined",
        "order o-1 placed",
    ]
    assert await bodies(service="payments") == ["charged o-1"]
    assert await bodies(service="nobody") == []
    assert await bodies(severity="warn") == [
        'quoted "50%_off" code',
        "order o-2 failed: card declined",
    ]
    assert await bodies(severity="17") == ["order o-2 failed: card declined"]
    assert await bodies(text="O-1") == ["charged o-1", "order o-1 placed"]
    # LIKE's wildcards and JSON's escaped quotes are matched as the text says.
    assert await bodies(text='"50%_off"') == ['quoted "50%_off" code']
    assert await bodies(text="50%x") == []
    assert await bodies(text="o_1") == []
    start_ms = str((T0 + 2_000_000) // 1_000_000)
    assert await bodies(start=start_ms, service="orders") == [
        'quoted "50%_off" code',
        "order o-2 failed: card declined",
    ]
    assert await bodies(limit="2") == ["charged o-1", 'quoted "50%_off" code']


# --- the store: segments, retention, upgrade --------------------------------------------


async def write_logs(store: SpanStore, count: int, *, start: int = 0) -> None:
    decoder = OTLPDecoder(store.resources, store.scopes)
    records = [record(f"line {start + i}", time_ns=T0 + start + i) for i in range(count)]
    batch = decoder.convert_logs(log_request(records), time.time_ns())
    await store.write(batch)


async def test_logs_fill_segments_and_retention_drops_them(tmp_path: Path):
    retention = Retention(max_age=None, max_spans=100, segments=4)  # 25 records a segment
    store = SpanStore(tmp_path / "t.db", retention=retention)
    await store.open()
    try:
        for i in range(12):
            await write_logs(store, 10, start=i * 10)
        stats = await store.stats()
        assert stats.logs <= 100
        assert stats.logs >= 75  # (segments - 1) / segments of the limit at least
        assert stats.segments_dropped >= 1
        found = await store.search_logs(LogQuery(limit=1000))
        assert len(found) == stats.logs
        assert found[0].body == "line 119"  # the newest kept, the oldest dropped
        assert "line 0" not in {r.body for r in found}
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "t.db") as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
        segments = {n for (n,) in conn.execute("SELECT id FROM segments")}
    assert {t for t in tables if t.startswith("logs_") and "trace" not in t} == {
        f"logs_{n}" for n in segments
    }


async def test_a_schema_1_file_is_upgraded_in_place(tmp_path: Path):
    path = tmp_path / "old.db"
    store = SpanStore(path)
    await store.open()
    tid, sid = trace_id(), span_id()
    decoder = OTLPDecoder(store.resources, store.scopes)
    await store.write(decoder.convert(make_request("orders", [make_span(tid, sid)])))
    await store.close()
    # What atoll wrote before logs: no logs_N tables, no segments.log_count, version 1.
    with sqlite3.connect(path) as conn:
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 'logs_%'"
        ).fetchall():
            conn.execute(f"DROP TABLE {name}")
        conn.execute("ALTER TABLE segments DROP COLUMN log_count")
        conn.execute("PRAGMA user_version=1")

    store = SpanStore(path)
    await store.open()
    try:
        await write_logs(store, 3)
        assert (await store.get_trace(tid)) is not None
        stats = await store.stats()
        assert (stats.spans, stats.logs, stats.segments) == (1, 3, 1)
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3  # through 2


async def test_the_logs_page_searches_and_escapes(client):
    tid, sid = trace_id(), span_id()
    request = log_request(
        [
            record("<script>alert(1)</script>", time_ns=T0, severity=17, tid=tid, sid=sid),
            record("all good", time_ns=T0 + 1_000_000),
        ]
    )
    response = await client.post("/v1/logs", content=request.SerializeToString(), headers=PB)
    assert response.status_code == 200

    page = await client.get("/logs")
    assert page.status_code == 200
    assert page.text.count('class="log-row') == 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>alert(1)</script>" not in page.text

    errors = await client.get("/logs", params={"severity": "error"})
    assert errors.text.count('class="log-row') == 1
    assert f'href="/traces/{tid.hex()}#span-{sid.hex()}"' in errors.text

    none = await client.get("/logs", params={"text": "nothing like this"})
    assert 'id="no-logs"' in none.text
    assert "No log record matches" in none.text

    bad = await client.get("/logs", params={"severity": "loud"})
    assert bad.status_code == 400
    assert "severity &#x27;loud&#x27;" in bad.text or "severity 'loud'" in bad.text
    bad = await client.get("/logs", params={"limit": "many"})
    assert bad.status_code == 400
    assert "limit" in bad.text


async def test_a_trace_with_only_logs_is_shown_with_its_logs(client):
    tid, sid = trace_id(), span_id()
    request = log_request(
        [
            record("spans sampled out", time_ns=T0 + 2_000_000, tid=tid, sid=sid),
            record("but the logs are here", time_ns=T0 + 5_000_000, tid=tid, sid=sid),
        ]
    )
    response = await client.post("/v1/logs", content=request.SerializeToString(), headers=PB)
    assert response.status_code == 200
    trace = (await client.get(f"/api/traces/{tid.hex()}")).json()
    assert trace["spans"] == []
    assert [r["body"] for r in trace["logs"]] == ["spans sampled out", "but the logs are here"]
    assert trace["summary"]["span_count"] == 0
    assert trace["summary"]["root_missing"] is True
    assert trace["summary"]["duration_ns"] == 3_000_000
    page = await client.get(f"/traces/{tid.hex()}")
    assert page.status_code == 200
    assert 'id="no-spans"' in page.text
    assert "but the logs are here" in page.text
    assert (await client.get(f"/api/traces/{trace_id().hex()}")).status_code == 404


async def test_log_batches_keep_the_attribute_index_fed_from_the_decoder(tmp_path: Path):
    store = SpanStore(tmp_path / "t.db")
    await store.open()
    try:
        decoder = OTLPDecoder(store.resources, store.scopes)
        spans = make_request("orders", [make_span(trace_id(), span_id(), attributes={"k": "v"})])
        await store.write(decoder.convert(spans))
        await write_logs(store, 3)
        # A log batch has no attribute terms and must not make the indexer read the rows.
        assert store._segments[-1].terms == {term_hash("k", "v")}
    finally:
        await store.close()


# --- any input: decoded to valid rows, or refused with a reason --------------------------

_decoder = OTLPDecoder(Interner(), Interner())
_valid_logs = log_request(
    [
        record({"msg": "hi", "n": [1, 2.5, True]}, tid=trace_id(), sid=span_id(), k="v"),
        record("plain", severity=13),
    ]
).SerializeToString()
_log_keys = st.sampled_from(
    [
        "resourceLogs",
        "scopeLogs",
        "logRecords",
        "traceId",
        "spanId",
        "timeUnixNano",
        "observedTimeUnixNano",
        "severityNumber",
        "severityText",
        "body",
        "attributes",
        "key",
        "value",
        "stringValue",
        "kvlistValue",
        "values",
        "eventName",
        "x",
    ]
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(_log_keys, children, max_size=5)
    ),
    max_leaves=40,
)


def check_rows(batch: DecodedBatch) -> None:
    """What the logs_N table's columns take: the rows a store will insert."""
    for row in batch.logs:
        time_ns, observed, severity, _, body, attributes, tid, sid, flags, *_ = row
        assert 0 <= time_ns < 1 << 63
        assert 0 <= observed < 1 << 63
        assert 0 <= severity <= 24
        assert tid is None or len(tid) == 16
        assert sid is None or len(sid) == 8
        assert isinstance(flags, int)
        for text in (body, attributes):
            assert text is None or isinstance(json.loads(text), object)
    assert not batch.spans


def decode_or_refuse(fn, body: bytes) -> None:
    try:
        batch = fn(body, T0)
    except MalformedRequestError as exc:
        message = str(exc)
    else:
        check_rows(batch)
        return
    assert message.startswith("the body")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_are_log_rows_or_refused(body):
    decode_or_refuse(_decoder.decode_logs_protobuf, body)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_valid_logs) - 1), st.integers(0, 255))
def test_mutated_log_protobuf_is_log_rows_or_refused(position, byte):
    body = bytearray(_valid_logs)
    body[position] = byte
    decode_or_refuse(_decoder.decode_logs_protobuf, bytes(body))


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_any_json_is_log_rows_or_refused(document):
    decode_or_refuse(_decoder.decode_logs_json, json.dumps(document).encode())
