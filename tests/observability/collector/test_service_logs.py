"""A service's logs go over OTLP to the collector its traces go to, each record with the
trace and span it was written in; the standard variables choose it or turn it off."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time

import pytest
import structlog
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll.observability import Tracing, configure_logging
from atoll.observability._log_export import LogExport, otlp_logs_endpoint, severity_number

pytest.importorskip("opentelemetry.sdk")


def test_the_logs_endpoint_follows_the_standard_variables():
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert otlp_logs_endpoint(base) == "http://collector:4318/v1/logs"
    explicit = {**base, "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://logs:9000/in"}
    assert otlp_logs_endpoint(explicit) == "http://logs:9000/in"
    assert otlp_logs_endpoint({**base, "OTEL_LOGS_EXPORTER": "none"}) is None
    assert otlp_logs_endpoint({**base, "OTEL_SDK_DISABLED": "true"}) is None
    assert otlp_logs_endpoint({}) is None


def test_levels_map_to_otel_severities():
    numbers = [
        severity_number(level).value
        for level in (5, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 50)
    ]
    assert numbers == [1, 5, 9, 13, 17, 21]


def unknown_sku() -> None:
    raise LookupError("sku-9 is unknown")


def wait_for_logs(collector, count: int, **params: str) -> list[dict]:
    deadline = time.monotonic() + 15
    while True:
        found = collector.get("/api/logs", **params).json()["logs"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


async def test_service_logs_reach_the_collector_with_their_span(live, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", live.url)
    tracing = Tracing("inventory", exporter=InMemorySpanExporter())
    tracing.make_global()
    assert tracing.logs is not None
    configure_logging(service="inventory", fmt="json", level="INFO")
    assert tracing.logs.handler in logging.getLogger().handlers, "reconfiguring dropped it"
    log = structlog.get_logger("shop.inventory")
    try:
        assert tracing.lean is not None
        with tracing.lean.span(
            "process inventory.ReserveStock", parent=None, kind=SpanKind.CONSUMER, attributes={}
        ) as span:
            log.info(
                "stock reserved",
                order_id="o-42",
                skus=["apple", "pear"],
                qty=3,
                note=None,
                big=1 << 70,
                thing=LookupError("x"),
            )
            logging.getLogger("shop.inventory.db").warning("slow query: %d ms", 250)
            try:
                unknown_sku()
            except LookupError:
                log.exception("reservation failed", order_id="o-42")
        logging.getLogger("shop.inventory").debug("below the root's level: not sent")
        logging.getLogger("urllib3.connectionpool").warning("the exporter's own: not sent")
        structlog.get_logger("atoll.gateway.access").info("an access log line: not sent")
        log.info("outside any span")
    finally:
        tracing.shutdown()
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    context = span.get_span_context()
    trace_hex = f"{context.trace_id:032x}"
    span_hex = f"{context.span_id:016x}"

    in_span = wait_for_logs(live, 3, trace_id=trace_hex)
    by_body = {record["body"]: record for record in in_span}
    assert set(by_body) == {"stock reserved", "slow query: 250 ms", "reservation failed"}
    assert {record["span_id"] for record in in_span} == {span_hex}
    assert {record["service"] for record in in_span} == {"inventory"}

    reserved = by_body["stock reserved"]
    assert reserved["level"] == "info"
    assert reserved["severity_text"] == "INFO"
    assert reserved["scope_name"] == "shop.inventory"
    assert reserved["attributes"]["order_id"] == "o-42"
    assert reserved["attributes"]["skus"] == ["apple", "pear"]
    assert reserved["attributes"]["qty"] == 3
    assert reserved["attributes"]["code.function.name"] == (
        "test_service_logs_reach_the_collector_with_their_span"
    )
    assert "trace_id" not in reserved["attributes"]  # carried as the record's own ids
    assert "note" not in reserved["attributes"]  # OTLP has no null
    assert reserved["attributes"]["big"] == str(1 << 70)  # past int64: as text
    assert reserved["attributes"]["thing"] == "x"  # anything else: as text

    assert by_body["slow query: 250 ms"]["level"] == "warn"
    failed = by_body["reservation failed"]
    assert failed["level"] == "error"
    assert failed["attributes"]["exception.type"] == "LookupError"
    assert failed["attributes"]["exception.message"] == "sku-9 is unknown"
    assert "Traceback" in failed["attributes"]["exception.stacktrace"]

    everything = wait_for_logs(live, 4)
    assert [r["body"] for r in everything if r["trace_id"] is None] == ["outside any span"]
    assert len(everything) == 4


def test_a_full_queue_drops_records_and_counts_them(monkeypatch):
    monkeypatch.setenv("OTEL_BLRP_MAX_QUEUE_SIZE", "100")
    export = LogExport(Resource.create({"service.name": "busy"}), "http://127.0.0.1:9/v1/logs")
    export.install()
    logger = logging.getLogger("test.busy")
    logger.setLevel(logging.INFO)
    try:
        for i in range(1000):
            logger.info("line %d", i)
        # 100 are taken; their export to the refused port retries meanwhile, and a batch
        # in export still counts against the queue, so the rest are dropped and counted.
        assert export.handler.accepted == 100
        assert export.dropped == 900
    finally:
        export.shutdown(timeout=1.0)


def test_refused_exports_are_counted_as_failed():
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(400)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            del args

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/logs"
        export = LogExport(Resource.create({"service.name": "refused"}), url)
        export.install()
        logger = logging.getLogger("test.refused")
        logger.setLevel(logging.INFO)
        for i in range(30):
            logger.info("line %d", i)
        export.shutdown(timeout=5.0)  # flushes: the collector answers 400, not retried
        assert export.failed == 30
        assert export.dropped == 0
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_collector_neither_blocks_nor_raises(caplog):
    resource = Resource.create({"service.name": "lonely"})
    export = LogExport(resource, "http://127.0.0.1:9/v1/logs")  # discard port: refused
    export.install()
    logger = logging.getLogger("test.lonely")
    logger.setLevel(logging.INFO)
    try:
        started = time.monotonic()
        for i in range(2000):
            logger.info("line %d", i)
        assert time.monotonic() - started < 2, "logging waited for the exporter"
        started = time.monotonic()
    finally:
        export.shutdown(timeout=1.0)
    assert time.monotonic() - started < 5, "stopping waited for the unreachable collector"
    assert export.handler not in logging.getLogger().handlers


def test_a_silent_collector_does_not_hold_up_a_stop():
    # Accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        export = LogExport(
            Resource.create({"service.name": "patient"}), f"http://127.0.0.1:{port}/v1/logs"
        )
        export.install()
        logger = logging.getLogger("test.patient")
        logger.setLevel(logging.INFO)
        for i in range(100):
            logger.info("line %d", i)
        started = time.monotonic()
        export.shutdown(timeout=1.0)
        assert time.monotonic() - started < 2.5
