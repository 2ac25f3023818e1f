"""The gateway starts the trace, passes W3C context upstream, and logs each request."""

import httpx
import structlog
from gateway_support import base_config, running_gateway, url, write_config
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll.observability import Tracing
from atoll.testing import wait_until


def config(tmp_path, stub, access_log=True):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "item", "match": {"path": "/items/{id}"}, "upstream": "a"}],
            server={"port": 8080, "access_log": access_log},
        ),
    )


async def test_a_server_span_per_request_and_context_injected_upstream(tmp_path, stub):
    exporter = InMemorySpanExporter()
    tracing = Tracing("gateway", exporter=exporter)
    try:
        async with (
            running_gateway(config(tmp_path, stub, access_log=False), tracing=tracing) as gw,
            httpx.AsyncClient() as client,
        ):
            assert (await client.get(url(gw, "/items/1"))).status_code == 200
            sent = stub.hits[-1]["headers"]["traceparent"]
            # A caller's trace is continued.
            parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            await client.get(url(gw, "/items/2"), headers={"traceparent": parent})
            continued = stub.hits[-1]["headers"]["traceparent"]
        tracing.processor.force_flush()
        await wait_until(lambda: len(exporter.get_finished_spans()) >= 2, timeout=5)
    finally:
        tracing.shutdown()
    first, second = exporter.get_finished_spans()[:2]
    assert first.kind == SpanKind.SERVER
    assert first.name == "GET /items/{id}"
    assert first.parent is None  # the gateway started this trace
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["atoll.gateway.route"] == "item"
    # The upstream's parent is the gateway's span.
    assert sent.split("-")[1] == f"{first.context.trace_id:032x}"
    assert sent.split("-")[2] == f"{first.context.span_id:016x}"
    assert second.parent is not None
    assert f"{second.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert continued.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


async def test_access_log_has_one_structured_line_per_request(tmp_path, stub):
    async with running_gateway(config(tmp_path, stub)) as gw, httpx.AsyncClient() as client:
        with structlog.testing.capture_logs() as logs:
            await client.get(url(gw, "/items/7"), headers={"x-request-id": "req-7"})
            await client.get(url(gw, "/nothing"))
    [line] = [entry for entry in logs if entry.get("request_id") == "req-7"]
    assert line["event"] == "request"
    assert line["status"] == 200
    assert line["route"] == "item"
    assert line["upstream"] == "a"
    assert line["method"] == "GET"
    assert line["path"] == "/items/7"
    assert line["duration_ms"] >= 0
    [unrouted] = [entry for entry in logs if entry.get("path") == "/nothing"]
    assert unrouted["status"] == 404
    assert unrouted["route"] is None
