"""The gateway starts the trace, passes W3C context upstream, and logs each request."""

import httpx
import structlog
from gateway_support import base_config, raw_request, running_gateway, url, write_config
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


async def test_requests_answered_early_are_in_the_access_log_too(tmp_path, stub):
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "item", "match": {"prefix": "/items"}, "upstream": "a", "max_body": 100}],
            server={"port": 8080, "access_log": True, "max_header_bytes": 1024},
            cors={"allow_origins": ["https://shop.example"]},
        ),
    )
    requests = {
        "431": b"GET /items/1 HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n",
        "400": b"POST /items/2 HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
        "garbage": b"\x16\x03\x01\x02\x00 hello\r\n\r\n",
        "413": b"POST /items/3 HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"a" * 5000,
        "504": (
            b"GET /items/4 HTTP/1.1\r\nhost: x\r\nx-atoll-deadline: 0\r\nconnection: close\r\n\r\n"
        ),
        "preflight": (
            b"OPTIONS /items/5 HTTP/1.1\r\nhost: x\r\norigin: https://shop.example\r\n"
            b"access-control-request-method: POST\r\nconnection: close\r\n\r\n"
        ),
    }
    async with running_gateway(path) as gw:
        with structlog.testing.capture_logs() as logs:
            for data in requests.values():
                await raw_request(gw.port, data, read_timeout=2)
    lines = [entry for entry in logs if entry.get("event") == "request"]
    # One each, in the order sent (each answered and closed before the next).
    assert [line["status"] for line in lines] == [431, 400, 400, 413, 504, 204], lines
    big, bad_length, garbage, too_large, expired, preflight = lines
    assert (big["method"], big["path"], big["client"]) == ("GET", "/items/1", "127.0.0.1")
    assert (bad_length["method"], bad_length["path"]) == ("POST", "/items/2")
    assert garbage["method"] is None
    assert (too_large["route"], too_large["path"]) == ("item", "/items/3")
    assert (expired["route"], expired["path"]) == ("item", "/items/4")
    assert (preflight["method"], preflight["path"]) == ("OPTIONS", "/items/5")
    assert not stub.hits


async def test_no_access_log_lines_when_it_is_off(tmp_path, stub):
    async with running_gateway(config(tmp_path, stub, access_log=False)) as gw:
        with structlog.testing.capture_logs() as logs:
            await raw_request(gw.port, b"GET / HTTP/9.9\r\nhost: x\r\n\r\n", read_timeout=2)
            await raw_request(
                gw.port, b"GET /items/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
    assert not [entry for entry in logs if entry.get("event") == "request"]
