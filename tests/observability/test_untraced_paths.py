"""Only /healthz, /readyz and /metrics go untraced, not every URL containing those words."""

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll import Service
from atoll.observability import Tracing
from support import System


@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("shop", "/reports/metrics"),
        ("shop", "/orders/readyz-check"),
        ("shop", "/healthzone"),
        ("metrics-api", "/orders"),
    ],
)
async def test_a_url_that_only_contains_a_probes_name_is_traced(tmp_path, host, path):
    service = Service("shop")
    service.http.get(path)(lambda: {"ok": True})
    exporter = InMemorySpanExporter()
    tracing = Tracing("shop", exporter=exporter)
    system = System(tmp_path)
    await system.start(service, tracing=tracing)
    try:
        transport = httpx.ASGITransport(app=service.http)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            assert (await client.get(path)).status_code == 200
        tracing.processor.force_flush()
        assert [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER], path
    finally:
        await system.stop()
