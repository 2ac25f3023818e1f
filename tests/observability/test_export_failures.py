"""Spans whose export failed are counted (``atoll_trace_spans_export_failed``), apart from
those dropped on a full queue: a collector that refuses them must not lose them silently."""

from __future__ import annotations

import http.server
import importlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from atoll import Command, Context, Service
from atoll.determinism import VirtualClock
from atoll.observability import Tracing
from atoll.observability._logs import EXPORTER_LOGGERS, RepeatLimit
from atoll.observability._otlp import FastBatchSpanProcessor
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.testing import wait_until
from atoll.transport.sqlite import SQLiteTransport


class Refusing(http.server.BaseHTTPRequestHandler):
    """An OTLP endpoint that refuses every export with 400 (not retried)."""

    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts += 1
        self.send_response(400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        del format, args


@pytest.fixture
def refusing() -> Iterator[str]:
    Refusing.posts = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    server.shutdown()
    server.server_close()


def spans(tracing: Tracing, count: int) -> None:
    assert tracing.lean is not None
    for _ in range(count):
        with tracing.lean.span("work", parent=None, kind=SpanKind.INTERNAL, attributes={}):
            pass


def test_a_refused_export_counts_its_spans_as_failed(refusing: str) -> None:
    tracing = Tracing("svc", endpoint=refusing)
    try:
        assert isinstance(tracing.processor, FastBatchSpanProcessor)
        spans(tracing, 7)
        tracing.processor.force_flush()
        assert Refusing.posts >= 1
        assert tracing.failed_spans == 7
        assert tracing.dropped_spans == 0
    finally:
        tracing.shutdown()


def _drop_repeat_limits() -> None:
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        for found in [f for f in logger.filters if isinstance(f, RepeatLimit)]:
            logger.removeFilter(found)


@pytest.fixture
def fresh_repeat_limits() -> Iterator[None]:
    """The limit is per process: earlier tests' records must not count here."""
    _drop_repeat_limits()
    yield
    _drop_repeat_limits()


@pytest.mark.usefixtures("fresh_repeat_limits")
def test_an_exporter_failing_batch_after_batch_logs_once_a_minute(
    refusing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK exporter logs every failed batch; under load with a collector down that
    is lines by the second. The first gets through; the rest are counted, not logged."""
    tracing = Tracing("svc", endpoint=refusing)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                spans(tracing, 3)
                tracing.processor.force_flush()
        assert Refusing.posts == 5
        assert tracing.failed_spans == 15
        from_exporters = [r for r in caplog.records if r.name in EXPORTER_LOGGERS]
        assert len(from_exporters) == 1, [r.getMessage() for r in from_exporters]
        assert "400" in from_exporters[0].getMessage()
    finally:
        tracing.shutdown()


def test_the_limited_loggers_are_the_exporters_own() -> None:
    """The names are the SDK modules' (a filter sees its own logger's records only)."""
    for module in (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.proto.http.metric_exporter",
        "opentelemetry.exporter.otlp.proto.http._log_exporter",
    ):
        assert importlib.import_module(module)._logger.name in EXPORTER_LOGGERS


async def test_a_repeat_limit_says_how_many_it_held_back() -> None:
    clock = VirtualClock()
    limit = RepeatLimit(60.0, clock=clock)
    logger = logging.getLogger("atoll.test.repeat_limit")
    logger.propagate = False
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(limit)
    try:
        for delay in (0.5, 0.7, 1.9):
            logger.warning("retrying in %.2fs", delay)
        logger.error("another kind")
        await clock.advance(61)
        logger.warning("retrying in %.2fs", 3.1)
        assert [r.getMessage() for r in records] == [
            "retrying in 0.50s",
            "another kind",
            "retrying in 3.10s (2 more like this in the last 60 s)",
        ]
    finally:
        logger.removeFilter(limit)
        logger.removeHandler(handler)


class FailingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        del spans
        self.calls += 1
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def test_any_exporters_failures_are_counted_too() -> None:
    exporter = FailingExporter()
    tracing = Tracing("svc", exporter=exporter)
    try:
        spans(tracing, 5)
        tracing.processor.force_flush()
        assert exporter.calls >= 1
        assert tracing.failed_spans == 5
        assert tracing.dropped_spans == 0
    finally:
        tracing.shutdown()


class Ping(Command):
    message_type = "exportfail.Ping"
    n: int


async def test_a_services_metrics_show_the_failed_spans(tmp_path: Path) -> None:
    worker = Service("worker")
    seen: list[int] = []

    @worker.handles(Ping)
    async def on_ping(ping: Ping, ctx: Context) -> None:
        seen.append(ping.n)

    tracing = Tracing("worker", exporter=FailingExporter())
    runtime = ServiceRuntime(
        worker,
        database=SQLiteDatabase(tmp_path / "worker.db"),
        transport=SQLiteTransport(tmp_path / "bus.db", poll_interval=0.05),
        tracing=tracing,
    )
    await runtime.start()
    try:
        async with worker.unit_of_work() as ctx:
            ctx.send(Ping(n=1), to="worker")
        await wait_until(lambda: seen == [1], what="the message handled")
        tracing.processor.force_flush()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=worker.http), base_url="http://worker"
        ) as client:
            metrics = (await client.get("/metrics")).text
    finally:
        await runtime.stop()
    [line] = [
        line
        for line in metrics.splitlines()
        if line.startswith('atoll_trace_spans_export_failed_total{service="worker"}')
    ]
    assert float(line.split()[-1]) >= 1.0
