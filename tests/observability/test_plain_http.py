"""The exporter posts over http.client where requests would go straight to the endpoint,
and keeps the SDK's rules: retries, Retry-After, compression, headers."""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
from opentelemetry.sdk.trace.export import SpanExportResult

from atoll.observability._otlp import FastOTLPSpanExporter, PlainHTTPTransport


class Sink(http.server.BaseHTTPRequestHandler):
    """Answers the statuses in ``script`` (then 200), keeping what it was sent."""

    script: ClassVar[list[int]] = []
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    close_after: ClassVar[bool] = False

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status = self.script.pop(0) if self.script else 200
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
        if self.close_after:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        del format, args


@pytest.fixture
def sink() -> Iterator[str]:
    Sink.script, Sink.received, Sink.close_after = [], [], False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    server.protocol_version = "HTTP/1.1"
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    server.shutdown()
    server.server_close()


def test_an_http_endpoint_is_posted_to_over_http_client(sink: str) -> None:
    exporter = FastOTLPSpanExporter(endpoint=sink, headers={"X-Tenant": "t1"})
    assert isinstance(exporter._client._transport, PlainHTTPTransport)
    for _ in range(3):
        assert exporter.export_encoded(b"\x0a\x00") is SpanExportResult.SUCCESS
    assert [body for _, body in Sink.received] == [b"\x0a\x00"] * 3
    headers = Sink.received[0][0]
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["x-tenant"] == "t1"
    assert headers["user-agent"].startswith("OTel-OTLP-Exporter-Python")
    exporter.shutdown()


def test_retryable_statuses_are_retried_as_the_sdk_retries_them(sink: str) -> None:
    Sink.script = [503, 503]
    exporter = FastOTLPSpanExporter(endpoint=sink)
    assert exporter.export_encoded(b"x") is SpanExportResult.SUCCESS
    assert len(Sink.received) == 3
    Sink.script = [400]
    assert exporter.export_encoded(b"x") is SpanExportResult.FAILURE  # not retryable
    assert len(Sink.received) == 4
    exporter.shutdown()


def test_a_connection_the_server_closed_is_opened_again(sink: str) -> None:
    Sink.close_after = True
    exporter = FastOTLPSpanExporter(endpoint=sink)
    for _ in range(3):
        assert exporter.export_encoded(b"x") is SpanExportResult.SUCCESS
    assert len(Sink.received) == 3
    exporter.shutdown()


def test_compression_is_the_sdks(sink: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    exporter = FastOTLPSpanExporter(endpoint=sink)
    assert exporter.export_encoded(b"spans" * 100) is SpanExportResult.SUCCESS
    headers, body = Sink.received[0]
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == b"spans" * 100
    exporter.shutdown()


def test_an_unreachable_endpoint_fails_within_the_timeout(sink: str) -> None:
    unused = sink.rsplit(":", 1)[0] + ":9/v1/traces"  # discard port: nothing listens
    exporter = FastOTLPSpanExporter(endpoint=unused, timeout=0.5)
    assert exporter._client._transport.is_connection_error(ConnectionRefusedError())
    assert exporter.export_encoded(b"x") is SpanExportResult.FAILURE
    exporter.shutdown()


def test_requests_posts_where_it_would_not_go_straight_there(
    sink: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    https = FastOTLPSpanExporter(endpoint="https://collector.example:4318/v1/traces")
    assert isinstance(https._client._transport, RequestsHTTPTransport)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "")
    proxied = FastOTLPSpanExporter(endpoint=sink)
    assert isinstance(proxied._client._transport, RequestsHTTPTransport)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypassed = FastOTLPSpanExporter(endpoint=sink)
    assert isinstance(bypassed._client._transport, PlainHTTPTransport)
    for exporter in (https, proxied, bypassed):
        exporter.shutdown()
