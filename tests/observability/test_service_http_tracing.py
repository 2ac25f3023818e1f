"""A service's HTTP spans use the stable semantic conventions (as the gateway's do), and
a message's baggage is current in its handler and goes on with the HTTP calls it makes."""

from __future__ import annotations

import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import httpx
import pytest
from opentelemetry import baggage
from opentelemetry.instrumentation._semconv import _OpenTelemetrySemanticConventionStability
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll import Command, Context, Service
from atoll.observability import Tracing
from atoll.resilience import ServiceClient
from atoll.service._context import outgoing_trace_headers
from atoll.service._http import SEMCONV_OPT_IN
from atoll.testing import wait_until
from support import System, serve

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers 200 to any GET, keeping the headers it was sent."""

    received: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        self.received.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        del format, args


@pytest.fixture
def echo() -> Iterator[str]:
    Echo.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Job(Command):
    message_type = "bag.Job"
    n: int


class Next(Command):
    message_type = "bag.Next"
    n: int


@pytest.fixture
async def front(tmp_path, echo) -> AsyncIterator[tuple[str, Tracing, InMemorySpanExporter]]:
    """A traced service whose ``/call`` route calls the echo server through its client."""
    service = Service("front")

    @service.http.get("/call")
    async def call() -> dict[str, int]:
        response = await service.client.get("echo", "/hello?x=1")
        return {"status": response.status_code}

    exporter = InMemorySpanExporter()
    system = System(tmp_path)
    client = ServiceClient({"echo": echo}, trace_headers=outgoing_trace_headers)
    tracing = Tracing("front", exporter=exporter)
    await system.start(service, tracing=tracing, client=client)
    url, stop = await serve(service.http)
    try:
        yield url, tracing, exporter
    finally:
        await stop()
        await system.stop()


async def http_spans(url: str, tracing: Tracing, exporter: InMemorySpanExporter) -> tuple[Any, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/call", headers={"traceparent": PARENT})
    assert response.json() == {"status": 200}

    def kinds() -> set[SpanKind]:
        tracing.processor.force_flush()
        return {s.kind for s in exporter.get_finished_spans()}

    await wait_until(lambda: {SpanKind.SERVER, SpanKind.CLIENT} <= kinds(), what="http spans")
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    client_span = next(s for s in spans if s.kind == SpanKind.CLIENT)
    assert client_span.context.trace_id == server.context.trace_id == int(PARENT[3:35], 16)
    return server.attributes, client_span.attributes


@pytest.fixture
def opt_in_unset(monkeypatch):
    monkeypatch.setenv(SEMCONV_OPT_IN, "")  # recorded, so deleted again afterwards
    monkeypatch.delenv(SEMCONV_OPT_IN)


async def test_http_spans_use_the_stable_semantic_conventions(opt_in_unset, front):
    # Left to themselves, the instrumentations would use the old names.
    server, client = await http_spans(*front)
    for attributes in (server, client):
        assert attributes["http.request.method"] == "GET"
        assert attributes["http.response.status_code"] == 200
        assert "http.method" not in attributes
        assert "http.status_code" not in attributes
    assert server["url.path"] == "/call"
    assert server["http.route"] == "/call"
    assert "http.target" not in server
    assert client["url.full"].endswith("/hello?x=1")
    assert client["server.address"] == "127.0.0.1"
    assert "http.url" not in client
    assert "net.peer.name" not in client


@pytest.fixture
def opt_in_dup(monkeypatch):
    monkeypatch.setenv(SEMCONV_OPT_IN, "http/dup")
    # As in a process started with it: the instrumentations have not read it yet.
    monkeypatch.setattr(_OpenTelemetrySemanticConventionStability, "_initialized", False)


async def test_a_users_own_opt_in_is_kept(opt_in_dup, front):
    server, client = await http_spans(*front)
    for attributes in (server, client):  # both names, as http/dup asks
        assert attributes["http.request.method"] == attributes["http.method"] == "GET"
        assert attributes["http.response.status_code"] == attributes["http.status_code"] == 200


async def test_a_messages_baggage_is_current_in_its_handler_and_goes_on_over_http(tmp_path, echo):
    worker = Service("worker")
    seen: set[tuple[str, int, object]] = set()

    @worker.handles(Job)
    async def on_job(job: Job, ctx: Context) -> None:
        seen.add(("job", job.n, baggage.get_baggage("tenant")))
        response = await worker.client.get("echo", f"/jobs/{job.n}")
        assert response.status_code == 200
        ctx.send(Next(n=job.n), to="worker")

    @worker.handles(Next)
    async def on_next(message: Next, ctx: Context) -> None:
        seen.add(("next", message.n, baggage.get_baggage("tenant")))

    exporter = InMemorySpanExporter()
    system = System(tmp_path)
    client = ServiceClient({"echo": echo}, trace_headers=outgoing_trace_headers)
    await system.start(worker, tracing=Tracing("worker", exporter=exporter), client=client)
    try:
        trace = {"traceparent": PARENT, "baggage": "tenant=acme,plan=gold"}
        async with worker.unit_of_work(trace=trace) as ctx:
            ctx.send(Job(n=1), to="worker")
        async with worker.unit_of_work() as ctx:  # and one without baggage
            ctx.send(Job(n=2), to="worker")
        await wait_until(lambda: len(seen) == 4, what="both jobs and what they sent")
    finally:
        await system.stop()
    assert seen == {("job", 1, "acme"), ("next", 1, "acme"), ("job", 2, None), ("next", 2, None)}
    [with_baggage] = [h for h in Echo.received if h.get("baggage")]
    assert dict(e.split("=") for e in with_baggage["baggage"].split(",")) == {
        "tenant": "acme",
        "plan": "gold",
    }
    # Still the message's trace, and no baggage leaks into the call made without it.
    assert with_baggage["traceparent"][3:35] == PARENT[3:35]
    assert len(Echo.received) == 2
    # The handler's baggage is gone once it has run.
    assert baggage.get_all() == {}


async def test_baggage_a_handler_adds_goes_on_with_what_it_sends(tmp_path):
    from opentelemetry import context as otel_context  # noqa: PLC0415

    worker = Service("worker")
    seen: list[tuple[str, dict[str, object]]] = []

    @worker.handles(Job)
    async def on_job(job: Job, ctx: Context) -> None:
        token = otel_context.attach(baggage.set_baggage("step", f"job-{job.n}"))
        try:
            ctx.send(Next(n=job.n), to="worker")
        finally:
            otel_context.detach(token)

    @worker.handles(Next)
    async def on_next(message: Next, ctx: Context) -> None:
        seen.append(("next", dict(baggage.get_all())))

    system = System(tmp_path)
    await system.start(worker, tracing=Tracing("worker", exporter=InMemorySpanExporter()))
    try:
        trace = {"traceparent": PARENT, "baggage": "tenant=acme"}
        async with worker.unit_of_work(trace=trace) as ctx:
            ctx.send(Job(n=1), to="worker")
        await wait_until(lambda: len(seen) == 1, what="the message the handler sent")
    finally:
        await system.stop()
    # The message's baggage goes on, with what its handler added.
    assert seen == [("next", {"tenant": "acme", "step": "job-1"})]
