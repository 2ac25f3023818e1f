"""The gateway starts the trace, passes W3C context upstream, and logs each request."""

import re

import httpx
import structlog
import websockets
from gateway_support import (
    admin_url,
    base_config,
    raw_request,
    running_gateway,
    url,
    write_config,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from atoll.determinism import SystemClock
from atoll.observability import Tracing
from atoll.testing import wait_until
from support import free_port

CLOCK = SystemClock()


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
            # A query may hold a credential: it reaches the upstream, never the span.
            assert (await client.get(url(gw, "/items/1?token=s3cret"))).status_code == 200
            assert stub.hits[-1]["query"] == "token=s3cret"
            sent = stub.hits[-1]["headers"]["traceparent"]
            # A caller's trace is continued.
            parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            await client.get(url(gw, "/items/2"), headers={"traceparent": parent})
            continued = stub.hits[-1]["headers"]["traceparent"]
        tracing.processor.force_flush()
        await wait_until(lambda: len(exporter.get_finished_spans()) >= 4, timeout=5)
    finally:
        tracing.shutdown()
    spans = exporter.get_finished_spans()
    first, second = (span for span in spans if span.kind == SpanKind.SERVER)
    first_client, second_client = (span for span in spans if span.kind == SpanKind.CLIENT)
    assert first.kind == SpanKind.SERVER
    assert first.name == "GET /items/{id}"
    assert first.parent is None  # the gateway started this trace
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["atoll.gateway.route"] == "item"
    # One CLIENT span per attempt under it, with OpenTelemetry's HTTP client attributes.
    assert first_client.parent.span_id == first.context.span_id
    assert first_client.name == "GET"
    assert first_client.attributes["http.request.method"] == "GET"
    assert first_client.attributes["server.address"] == "127.0.0.1"
    assert first_client.attributes["server.port"] == stub.port
    assert first_client.attributes["url.full"] == f"http://{stub.address}/items/1"
    assert first_client.attributes["http.response.status_code"] == 200
    assert "http.request.resend_count" not in first_client.attributes
    # The upstream's parent is the CLIENT span.
    assert sent.split("-")[1] == f"{first.context.trace_id:032x}"
    assert sent.split("-")[2] == f"{first_client.context.span_id:016x}"
    assert second.parent is not None
    assert f"{second.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert continued.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert continued.split("-")[2] == f"{second_client.context.span_id:016x}"


async def test_each_retry_is_its_own_client_span(tmp_path, stub):
    exporter = InMemorySpanExporter()
    tracing = Tracing("gateway", exporter=exporter)
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {
                "a": {
                    "targets": [stub.address],
                    "policy": {"retry": {"max_attempts": 3, "base_delay": 0, "max_delay": 0}},
                    "passive": {"failures": 1000},
                }
            },
            [{"name": "item", "match": {"path": "/items/{id}"}, "upstream": "a"}],
            server={"port": 8080, "access_log": False},
        ),
    )
    stub.status = 503
    try:
        async with running_gateway(path, tracing=tracing) as gw, httpx.AsyncClient() as client:
            assert (await client.get(url(gw, "/items/1"))).status_code == 503
        tracing.processor.force_flush()
        await wait_until(lambda: len(exporter.get_finished_spans()) >= 4, timeout=5)
    finally:
        tracing.shutdown()
    spans = exporter.get_finished_spans()
    [server] = [span for span in spans if span.kind == SpanKind.SERVER]
    clients = [span for span in spans if span.kind == SpanKind.CLIENT]
    assert [c.attributes.get("http.request.resend_count") for c in clients] == [None, 1, 2]
    assert all(c.parent.span_id == server.context.span_id for c in clients)
    assert all(c.attributes["error.type"] == "503" for c in clients)
    assert all(c.status.status_code.name == "ERROR" for c in clients)
    # Each attempt told the upstream its own span.
    sent = [hit["headers"]["traceparent"].split("-")[2] for hit in stub.hits]
    assert sent == [f"{c.context.span_id:016x}" for c in clients]


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


async def test_an_unexpected_error_is_a_500_in_the_access_log(tmp_path, stub, monkeypatch):
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "item", "match": {"prefix": "/items"}, "upstream": "a"}],
            server={"port": 8080, "access_log": True},
        ),
    )
    async with running_gateway(path) as gw:

        class Broken:
            def getrandbits(self, bits: int) -> int:
                raise RuntimeError(f"a bug ({bits} bits)")

        monkeypatch.setattr(gw, "random", Broken())  # the request id: made on every request
        with structlog.testing.capture_logs() as logs:
            answer = await raw_request(
                gw.port, b"GET /items/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
    assert answer.startswith(b"HTTP/1.1 500"), answer[:200]
    lines = [entry for entry in logs if entry.get("event") == "request"]
    assert [(line["status"], line["path"]) for line in lines] == [(500, "/items/1")], lines


async def test_no_access_log_lines_when_it_is_off(tmp_path, stub):
    async with running_gateway(config(tmp_path, stub, access_log=False)) as gw:
        with structlog.testing.capture_logs() as logs:
            await raw_request(gw.port, b"GET / HTTP/9.9\r\nhost: x\r\n\r\n", read_timeout=2)
            await raw_request(
                gw.port, b"GET /items/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
    assert not [entry for entry in logs if entry.get("event") == "request"]


CLIENT_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENT_STATE = "vendor=abc,other=xyz"
CLIENT_BAGGAGE = "tenant=shop,user=alice"


async def test_without_tracing_the_clients_trace_context_passes_through(tmp_path, stub):
    headers = {"traceparent": CLIENT_PARENT, "tracestate": CLIENT_STATE, "baggage": CLIENT_BAGGAGE}
    async with (
        running_gateway(config(tmp_path, stub, access_log=False)) as gw,
        httpx.AsyncClient() as client,
    ):
        assert (await client.get(url(gw, "/items/1"), headers=headers)).status_code == 200
        received = stub.hits[-1]["headers"]
        assert (await client.get(url(gw, "/items/2"))).status_code == 200
        assert "traceparent" not in stub.hits[-1]["headers"]  # the gateway adds none
    # Unchanged, as a proxy without tracing passes them: the client's trace goes on.
    assert received["traceparent"] == CLIENT_PARENT
    assert received["tracestate"] == CLIENT_STATE
    assert received["baggage"] == CLIENT_BAGGAGE


async def test_with_tracing_the_gateway_span_is_the_upstreams_parent(tmp_path, stub):
    exporter = InMemorySpanExporter()
    tracing = Tracing("gateway", exporter=exporter)
    untrusting = write_config(
        tmp_path / "untrusting.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "item", "match": {"path": "/items/{id}"}, "upstream": "a"}],
            server={"port": 8080, "access_log": False, "trust_trace": False},
        ),
    )
    headers = {"traceparent": CLIENT_PARENT, "tracestate": CLIENT_STATE, "baggage": CLIENT_BAGGAGE}
    received = []
    try:
        for path in (config(tmp_path, stub, access_log=False), untrusting):
            async with running_gateway(path, tracing=tracing) as gw, httpx.AsyncClient() as client:
                assert (await client.get(url(gw, "/items/1"), headers=headers)).status_code == 200
                received.append(stub.hits[-1]["headers"])
        tracing.processor.force_flush()
        await wait_until(lambda: len(exporter.get_finished_spans()) >= 4, timeout=5)
    finally:
        tracing.shutdown()
    spans = exporter.get_finished_spans()
    trusted, untrusted = (span for span in spans if span.kind == SpanKind.SERVER)
    trusted_client, untrusted_client = (span for span in spans if span.kind == SpanKind.CLIENT)
    client_trace, client_span = CLIENT_PARENT.split("-")[1:3]
    # trust_trace: the client's span is the gateway's parent, the gateway's (through its
    # CLIENT span) the upstream's.
    assert f"{trusted.parent.span_id:016x}" == client_span
    assert trusted_client.parent.span_id == trusted.context.span_id
    _, trace_id, span_id, _ = received[0]["traceparent"].split("-")
    assert (trace_id, span_id) == (client_trace, f"{trusted_client.context.span_id:016x}")
    assert received[0]["tracestate"] == CLIENT_STATE
    # Not trusted: a new trace, started by the gateway; the client's state is not kept.
    assert untrusted.parent is None
    _, trace_id, span_id, _ = received[1]["traceparent"].split("-")
    assert trace_id == f"{untrusted.context.trace_id:032x}" != client_trace
    assert span_id == f"{untrusted_client.context.span_id:016x}"
    assert "tracestate" not in received[1]
    # Baggage is the caller's business: it always goes on.
    assert received[0]["baggage"] == received[1]["baggage"] == CLIENT_BAGGAGE


async def test_several_tracestate_fields_are_one_list(tmp_path, stub):
    tracing = Tracing("gateway", exporter=InMemorySpanExporter())
    headers = [("traceparent", CLIENT_PARENT), ("tracestate", "a=1"), ("tracestate", "b=2")]
    try:
        path = config(tmp_path, stub, access_log=False)
        async with running_gateway(path, tracing=tracing) as gw, httpx.AsyncClient() as client:
            assert (await client.get(url(gw, "/items/1"), headers=headers)).status_code == 200
    finally:
        tracing.shutdown()
    assert stub.hits[-1]["headers"]["tracestate"] == "a=1,b=2"


async def test_breaker_state_changes_are_events_on_the_gateway_span(tmp_path, stub):
    exporter = InMemorySpanExporter()
    tracing = Tracing("gateway", exporter=exporter)
    policy = {
        "breaker": {
            "window_size": 4,
            "minimum_calls": 4,
            "failure_rate": 0.5,
            "wait": 0.3,
            "half_open_calls": 1,
            "half_open_successes": 1,
        }
    }
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address], "policy": policy, "passive": {"failures": 1000}}},
            [{"name": "item", "match": {"path": "/items/{id}"}, "upstream": "a"}],
        ),
    )
    stub.status = 500
    try:
        async with running_gateway(path, tracing=tracing) as gw, httpx.AsyncClient() as client:
            for n in range(4):
                assert (await client.get(url(gw, f"/items/{n}"))).status_code == 500
            assert (await client.get(url(gw, "/items/refused"))).status_code == 503
            stub.status = 200
            breaker = gw.gen.upstreams["a"].breaker

            async def admitted():
                return (await client.get(url(gw, "/items/probe"))).status_code == 200

            await wait_until(admitted, timeout=5, what="the breaker to let a probe through")
            assert breaker.snapshot().state.value == "closed"
        tracing.processor.force_flush()
    finally:
        tracing.shutdown()
    spans = {
        span.attributes["url.path"]: span
        for span in exporter.get_finished_spans()
        if span.kind == SpanKind.SERVER
    }

    def changes(path):
        return [
            (
                event.attributes["atoll.breaker.name"],
                event.attributes["atoll.breaker.previous_state"],
                event.attributes["atoll.breaker.state"],
            )
            for event in spans[path].events
            if event.name == "breaker state change"
        ]

    assert changes("/items/0") == changes("/items/2") == []
    # The request whose failure opened it carries the change, with the breaker's reason.
    assert changes("/items/3") == [("a", "closed", "open")]
    [opened] = [e for e in spans["/items/3"].events if e.name == "breaker state change"]
    assert opened.attributes["atoll.breaker.reason"]
    assert changes("/items/refused") == []
    assert changes("/items/probe") == [("a", "open", "half_open"), ("a", "half_open", "closed")]


async def test_spans_dropped_by_the_exporter_are_counted_in_the_metrics(
    tmp_path, stub, monkeypatch
):
    # A queue of two and a collector nobody listens for: the export thread is stuck
    # retrying while spans keep ending, so most of them find the queue full.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "1000")
    tracing = Tracing("gateway", endpoint=f"http://127.0.0.1:{free_port()}/v1/traces")
    assert tracing.enabled
    slowest = 0.0
    try:
        async with (
            running_gateway(config(tmp_path, stub, access_log=False), tracing=tracing) as gw,
            httpx.AsyncClient() as client,
        ):
            for n in range(60):
                started = CLOCK.monotonic()
                assert (await client.get(url(gw, f"/items/{n}"))).status_code == 200
                slowest = max(slowest, CLOCK.monotonic() - started)
            await wait_until(lambda: tracing.dropped_spans > 0, timeout=5, what="drops")
            # The batch the export thread was retrying fails too, and is counted apart.
            await wait_until(lambda: tracing.failed_spans > 0, timeout=5, what="failures")
            metrics = (await client.get(admin_url(gw, "/metrics"))).text
    finally:
        tracing.shutdown()
    # The dead collector costs the requests nothing.
    assert slowest < 0.5, slowest
    found = re.search(
        r'^atoll_trace_spans_dropped_total\{service="gateway"\} (\S+)$', metrics, re.MULTILINE
    )
    assert found is not None, metrics
    assert float(found[1]) >= 1
    failed = re.search(
        r'^atoll_trace_spans_export_failed_total\{service="gateway"\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert failed is not None, metrics
    assert float(failed[1]) >= 1


async def test_a_websocket_handshake_carries_the_gateways_span_upstream(tmp_path, stub):
    exporter = InMemorySpanExporter()
    tracing = Tracing("gateway", exporter=exporter)
    path = write_config(
        tmp_path / "ws.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "ws", "match": {"prefix": "/"}, "upstream": "a", "websocket": True}],
            server={"port": 8080, "access_log": False},
        ),
    )
    try:
        async with running_gateway(path, tracing=tracing) as gw:
            async with websockets.connect(
                f"ws://127.0.0.1:{gw.port}/ws", additional_headers={"traceparent": CLIENT_PARENT}
            ) as ws:
                await ws.send("hi")
                assert await ws.recv() == "a:hi"
            received = stub.hits[-1]["headers"]
        await wait_until(exporter.get_finished_spans, timeout=5, what="the span")
    finally:
        tracing.shutdown()
    [span] = exporter.get_finished_spans()
    _, trace_id, span_id, _ = received["traceparent"].split("-")
    assert trace_id == CLIENT_PARENT.split("-")[1] == f"{span.context.trace_id:032x}"
    assert span_id == f"{span.context.span_id:016x}"
    assert span.attributes["http.response.status_code"] == 101
