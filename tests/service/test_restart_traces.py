"""A runtime started again after a stop (its state "stopped" allows start()) still
traces: its HTTP requests and handlers after the restart are exported."""

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll import Service
from atoll.observability import Tracing
from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.transport.memory import InMemoryTransport


async def test_a_restarted_service_still_exports_its_spans(tmp_path):
    service = Service("web")

    @service.http.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    exporter = InMemorySpanExporter()
    tracing = Tracing("web", exporter=exporter)
    runtime = ServiceRuntime(
        service,
        database=SQLiteDatabase(tmp_path / "web.db"),
        transport=InMemoryTransport(),
        tracing=tracing,
    )
    for _ in range(2):
        await runtime.start()
        transport = httpx.ASGITransport(app=service.http)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            assert (await client.get("/hello")).status_code == 200
        tracing.processor.force_flush()
        await runtime.stop()
    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(servers) == 2, "the second run's request was not traced (nor counted as lost)"
