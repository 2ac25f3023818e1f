"""Search parameters and metric values at their edges: what a user can type or push must
never make a page or the API answer 500 (found by a review; each failed before its fix)."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from otlp import kvs, make_request, make_span, simple_trace, span_id, trace_id

PB = {"content-type": "application/x-protobuf"}


@pytest.fixture
async def http(app):
    # A 500 comes back as a response instead of an exception raised in the test.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://collector") as client:
        yield client


async def send(http, service, spans):
    body = make_request(service, spans).SerializeToString()
    response = await http.post("/v1/traces", content=body, headers=PB)
    assert response.status_code == 200, response.content


# 1. Numbers past SQLite's int64 reach sqlite3 as bound parameters: OverflowError, 500.


async def test_attribute_search_for_a_long_numeric_id_is_not_a_500(http):
    tid = trace_id()
    order = "12345678901234567890"  # a 20-digit order number, stored as a string
    await send(http, "orders", [make_span(tid, span_id(), attributes={"order.id": order})])
    api = await http.get("/api/traces", params={"attr": f"order.id={order}"})
    assert api.status_code == 200, api.text
    assert [t["trace_id"] for t in api.json()["traces"]] == [tid.hex()]
    page = await http.get("/", params={"attrs": f"order.id={order}"})
    assert page.status_code == 200
    assert tid.hex() in page.text


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/traces", {"end": "9999-12-31"}),
        ("/api/traces", {"start": "0001-01-01"}),
        ("/api/traces", {"lookback": "999999w"}),
        ("/api/traces", {"min_duration_ms": "1e13"}),
        ("/", {"end": "9999-12-31"}),
        ("/", {"max_duration_ms": "1e13"}),
        ("/api/logs", {"end": "9999-12-31"}),
        ("/logs", {"start": "1e30"}),
    ],
)
async def test_time_and_duration_bounds_past_int64_answer_400_or_200_not_500(http, path, params):
    _tid, spans = simple_trace("svc")
    await send(http, "svc", spans)
    response = await http.get(path, params=params)
    assert response.status_code in (200, 400), (params, response.status_code, response.text)


# 2. The logs page's limit: "²".isdigit() is True, int("²") raises ValueError.


async def test_logs_page_limit_that_is_not_a_number_is_a_400(http):
    response = await http.get("/logs", params={"limit": "²"})
    assert response.status_code == 400, response.status_code
    assert "limit" in response.text


# 3. The page's attribute filter goes through shlex, which eats backslashes.


async def test_page_attribute_filter_keeps_backslashes(http):
    tid = trace_id()
    value = r"App\Errors\Boom"
    await send(http, "php", [make_span(tid, span_id(), attributes={"exception.type": value})])
    api = await http.get("/api/traces", params={"attr": f"exception.type={value}"})
    assert [t["trace_id"] for t in api.json()["traces"]] == [tid.hex()]
    page = await http.get("/", params={"attrs": f"exception.type={value}"})
    assert f"/traces/{tid.hex()}" in page.text  # it searched AppErrorsBoom


# 4. The Metrics page reads every *_seconds value as a duration.


async def push_gauge(http, name, unit, value):
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.extend(kvs({"service.name": "gateway"}))
    metric = resource_metrics.scope_metrics.add().metrics.add(name=name, unit=unit)
    metric.gauge.data_points.add(as_double=value, time_unix_nano=1)
    response = await http.post("/v1/metrics", content=request.SerializeToString(), headers=PB)
    assert response.status_code == 200


async def test_metrics_page_survives_a_huge_seconds_gauge(http):
    await push_gauge(http, "job.backlog", "s", 1e300)
    response = await http.get("/series")
    assert response.status_code == 200, response.status_code  # was round(inf): a 500


async def test_metrics_page_shows_a_unix_time_gauge_as_a_time(http):
    # What atoll's own gateway pushes: when its TLS certificate expires (Unix time).
    await push_gauge(http, "atoll_gateway_tls_certificate_not_after_seconds", "", 1.8e9)
    page = (await http.get("/series")).text
    assert "30000000 min" not in page  # was shown as a duration
    assert "2027-01-15 08:00:00 UTC" in page
