"""OTLP metrics in, Prometheus text out (``POST /v1/metrics``, ``GET /metrics``)."""

from __future__ import annotations

import gzip
import json
import math
import sys
import threading

import httpx
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import Observation
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from otlp import kvs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from atoll.determinism import VirtualClock
from atoll.observability.collector._metrics import MetricStore, label_name, prometheus_name

PB = {"content-type": "application/x-protobuf"}
JS = {"content-type": "application/json"}


def scrape_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus scrape: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def types_of(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def sdk_meters(url: str, *, temporality=None, views=(), compression=None):
    exporter = OTLPMetricExporter(
        endpoint=f"{url}/v1/metrics",
        compression=compression,
        preferred_temporality=temporality or {},
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    resource = Resource.create(
        {
            "service.name": "payments",
            "service.namespace": "shop",
            "service.instance.id": "pay-1",
            "deployment.environment": "test",
        }
    )
    return MeterProvider(metric_readers=[reader], resource=resource, views=list(views))


@pytest.mark.parametrize("compression", [None, Compression.Gzip], ids=["none", "gzip"])
def test_the_sdk_exporters_metrics_are_scraped_as_prometheus(live, compression):
    provider = sdk_meters(live.url, compression=compression)
    meter = provider.get_meter("payments.app", "1.2")
    charges = meter.create_counter("payments.charges", unit="{charge}", description="Charges")
    in_flight = meter.create_up_down_counter("payments.in_flight")
    latency = meter.create_histogram("payments.duration", unit="s")
    meter.create_observable_gauge(
        "payments.queue.ratio",
        callbacks=[lambda _: [Observation(0.25, {"queue": "psp"})]],
        unit="1",
    )
    try:
        charges.add(3, {"currency": "EUR", "http.status_code": 200})
        charges.add(2, {"currency": "USD", "http.status_code": 200})
        in_flight.add(5)
        in_flight.add(-2)
        for seconds in (0.004, 0.02, 0.3, 7.0):
            latency.record(seconds, {"route": "/charge"})
        provider.force_flush()
    finally:
        provider.shutdown()
    response = httpx.get(f"{live.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples = scrape_text(text)
    base = (
        ("instance", "pay-1"),
        ("job", "shop/payments"),
        ("otel_scope_name", "payments.app"),
        ("otel_scope_version", "1.2"),
    )

    def at(name, **labels):
        return samples[(name, tuple(sorted((*base, *labels.items()))))]

    assert at("payments_charges_total", currency="EUR", http_status_code="200") == 3
    assert at("payments_charges_total", currency="USD", http_status_code="200") == 2
    assert at("payments_in_flight") == 3
    assert at("payments_queue_ratio", queue="psp") == 0.25
    assert at("payments_duration_seconds_count", route="/charge") == 4
    assert at("payments_duration_seconds_sum", route="/charge") == pytest.approx(7.324)
    # The SDK's default bounds (0, 5, 10, 25, ...), cumulative as Prometheus counts.
    assert at("payments_duration_seconds_bucket", route="/charge", le="0.0") == 0
    assert at("payments_duration_seconds_bucket", route="/charge", le="5.0") == 3
    assert at("payments_duration_seconds_bucket", route="/charge", le="10.0") == 4
    assert at("payments_duration_seconds_bucket", route="/charge", le="+Inf") == 4
    types = types_of(text)
    assert types["payments_charges"] == "counter"
    assert types["payments_in_flight"] == "gauge"
    assert types["payments_duration_seconds"] == "histogram"
    (info,) = [dict(labels) for (name, labels) in samples if name == "target_info"]
    assert info["job"] == "shop/payments"
    assert info["instance"] == "pay-1"
    assert info["deployment_environment"] == "test"
    assert info["telemetry_sdk_language"] == "python"
    assert "service_name" not in info


def test_delta_temporality_is_added_up(live):
    delta = {Counter: AggregationTemporality.DELTA, Histogram: AggregationTemporality.DELTA}
    provider = sdk_meters(live.url, temporality=delta)
    meter = provider.get_meter("payments.app")
    charges = meter.create_counter("payments.charges")
    latency = meter.create_histogram("payments.duration", unit="ms")
    try:
        for amount in (2, 5):
            charges.add(amount)
            latency.record(12.0)
            provider.force_flush()  # one delta export each
    finally:
        provider.shutdown()
    samples = {
        name: value
        for (name, _), value in scrape_text(httpx.get(f"{live.url}/metrics").text).items()
    }
    assert samples["payments_charges_total"] == 7
    assert samples["payments_duration_milliseconds_count"] == 2
    assert samples["payments_duration_milliseconds_sum"] == 24.0


def test_exponential_histograms_are_refused_as_a_partial_success(live):
    provider = sdk_meters(
        live.url,
        views=[View(instrument_name="*", aggregation=ExponentialBucketHistogramAggregation())],
    )
    latency = provider.get_meter("x").create_histogram("latency")
    try:
        latency.record(1.0)
        provider.force_flush()
    finally:
        provider.shutdown()
    assert "latency" not in httpx.get(f"{live.url}/metrics").text


def metric_request(metrics: list[dict], resource: dict | None = None) -> dict:
    """An OTLP/JSON ExportMetricsServiceRequest."""
    return {
        "resourceMetrics": [
            {
                "resource": {
                    "attributes": [
                        {"key": k, "value": {"stringValue": v}}
                        for k, v in (resource or {"service.name": "orders"}).items()
                    ]
                },
                "scopeMetrics": [{"scope": {"name": "orders.app"}, "metrics": metrics}],
            }
        ]
    }


def gauge(name: str, value: float, **attributes: str) -> dict:
    return {
        "name": name,
        "gauge": {
            "dataPoints": [
                {
                    "asDouble": value,
                    "timeUnixNano": "1700000000000000000",
                    "attributes": [
                        {"key": k, "value": {"stringValue": v}} for k, v in attributes.items()
                    ],
                }
            ]
        },
    }


async def test_json_exports_and_refused_points_answer_partial_success(client):
    body = metric_request(
        [
            gauge("orders.open", 4, region="eu"),
            {
                "name": "orders.open",
                "sum": {
                    "isMonotonic": True,
                    "aggregationTemporality": 2,
                    "dataPoints": [{"asInt": "9"}],
                },
            },
            {
                "name": "orders.size",
                "exponentialHistogram": {
                    "aggregationTemporality": 2,
                    "dataPoints": [{"count": "1"}, {"count": "2"}],
                },
            },
        ]
    )
    response = await client.post("/v1/metrics", json=body)
    assert response.status_code == 200
    partial = response.json()["partialSuccess"]
    assert partial["rejectedDataPoints"] == "3"
    assert "orders_open as a counter (it is a gauge)" in partial["errorMessage"]
    assert "exponential histogram" in partial["errorMessage"]
    text = (await client.get("/metrics")).text
    assert (
        scrape_text(text)[
            (
                "orders_open",
                (
                    ("instance", ""),
                    ("job", "orders"),
                    ("otel_scope_name", "orders.app"),
                    ("region", "eu"),
                ),
            )
        ]
        == 4
    )
    # The same export in protobuf, gzipped: the answer is a protobuf response.
    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add()
    metric.resource.attributes.extend(kvs({"service.name": "orders"}))
    point = (
        metric.scope_metrics.add()
        .metrics.add(name="orders.size")
        .exponential_histogram.data_points.add()
    )
    point.count = 1
    response = await client.post(
        "/v1/metrics",
        content=gzip.compress(request.SerializeToString()),
        headers={**PB, "content-encoding": "gzip"},
    )
    assert response.status_code == 200
    answer = ExportMetricsServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_data_points == 1


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        (PB, b"\xff\xff\xff", 400),
        (JS, b"{not json", 400),
        (JS, b'{"resourceMetrics": 3}', 400),
        ({"content-type": "text/plain"}, b"x", 415),
    ],
)
async def test_malformed_metric_exports_are_refused(client, headers, body, status):
    response = await client.post("/v1/metrics", content=body, headers=headers)
    assert response.status_code == status
    assert (await client.get("/metrics")).text.strip() == ""


async def test_series_expire_and_are_bounded(make_app):
    clock = VirtualClock()
    async with make_app(clock=clock, max_metric_series=2, metric_expiry=60) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            body = metric_request([gauge("temp", 1, room=r) for r in ("a", "b", "c")])
            response = await client.post("/v1/metrics", json=body)
            assert "past the limit of 2" in response.json()["partialSuccess"]["errorMessage"]
            assert app.receiver.metrics.series == 2
            await clock.advance(30)
            await client.post("/v1/metrics", json=metric_request([gauge("temp", 5, room="a")]))
            await clock.advance(45)  # b is 75 s old, a 45 s
            rooms = [
                dict(labels)["room"]
                for (_, labels) in scrape_text((await client.get("/metrics")).text)
            ]
            assert rooms == ["a"]
            assert app.receiver.metrics.series == 1


async def test_metrics_can_be_turned_off(make_app):
    async with make_app(max_metric_series=None) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            response = await client.post("/v1/metrics", content=b"", headers=PB)
            assert response.status_code == 404
            assert "without OTLP metrics" in response.json()["message"]
            assert (await client.get("/metrics")).status_code == 404


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        ("http.server.duration", "s", "histogram", "http_server_duration_seconds"),
        ("queue.depth", "{message}", "gauge", "queue_depth"),
        ("cpu.utilization", "1", "gauge", "cpu_utilization_ratio"),
        ("requests", "1", "counter", "requests"),
        ("requests_total", "", "counter", "requests"),
        ("net.io", "By/s", "counter", "net_io_bytes_per_second"),
        ("latency_seconds", "s", "histogram", "latency_seconds"),
        ("2xx.count", "", "gauge", "_2xx_count"),
        ("odd-name", "", "gauge", "odd_name"),
        ("rx", "{packet}/s", "gauge", "rx_per_second"),
        ("rx", "1/s", "gauge", "rx_per_second"),
        ("busy_seconds_total", "s", "counter", "busy_seconds"),
    ],
)
def test_names_follow_the_prometheus_compatibility_spec(name, unit, kind, expected):
    assert prometheus_name(name, unit, kind) == expected


def test_label_names_are_made_valid():
    assert label_name("http.status_code") == "http_status_code"
    assert label_name("1st") == "key_1st"
    assert label_name("__secret") == "key__secret"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_refused_or_taken_never_a_crash(data):
    store = MetricStore(clock=VirtualClock())
    request = ExportMetricsServiceRequest()
    try:
        request.ParseFromString(data)
    except DecodeError:  # what the receiver answers 400
        return
    store.apply(request)
    json.dumps([m.name for m in store.collect()])


# --- MetricStore directly ---------------------------------------------------------------


def request_of(*metrics, resource=None):
    """An ExportMetricsServiceRequest of ``metrics`` (Metric messages) for one resource."""
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.extend(kvs(resource or {"service.name": "svc"}))
    resource_metrics.scope_metrics.add().metrics.extend(metrics)
    return request


def a_metric(name, kind, *, value=1.0, unit="", attributes=None, time_ns=0, **histogram):
    metric = Metric(name=name, unit=unit)
    if kind == "histogram":
        metric.histogram.aggregation_temporality = 2
        point = metric.histogram.data_points.add(time_unix_nano=time_ns, **histogram)
    else:
        data = metric.sum if kind == "sum" else metric.gauge
        if kind == "sum":
            metric.sum.is_monotonic = True
            metric.sum.aggregation_temporality = 2
        point = data.data_points.add(as_double=value, time_unix_nano=time_ns)
    point.attributes.extend(kvs(attributes or {}))
    return metric


def rendered(store):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    return generate_latest(registry).decode()


def test_names_that_would_share_samples_are_refused():
    store = MetricStore(clock=VirtualClock())
    outcome = store.apply(
        request_of(
            a_metric("x", "sum", value=1),
            a_metric("x_total", "gauge", value=2),
            a_metric("h", "histogram", count=1, sum=1.0),
            a_metric("h_count", "gauge"),
            a_metric("target_info", "gauge"),
            resource={"service.name": "svc", "host.name": "a"},
        )
    )
    assert outcome.rejected == 3
    assert "x_total is x's already" in outcome.error_message()
    assert "h_count is h's already" in outcome.error_message()
    assert "target_info is atoll's already" in outcome.error_message()
    text = rendered(store)
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines)) == 3  # x, h and target
    assert len(list(text_string_to_metric_families(text))) == 3


def test_histograms_whose_buckets_do_not_add_up_are_refused():
    store = MetricStore(clock=VirtualClock())
    bad = [
        {"explicit_bounds": [1.0, math.inf], "bucket_counts": [1, 0, 0], "count": 1},
        {"explicit_bounds": [5.0, 1.0], "bucket_counts": [1, 0, 0], "count": 1},
        {"explicit_bounds": [1.0], "bucket_counts": [1, 2], "count": 10},
        {"explicit_bounds": [1.0, 2.0], "bucket_counts": [1, 2], "count": 3},
    ]
    outcome = store.apply(
        request_of(*(a_metric(f"h{i}", "histogram", **b) for i, b in enumerate(bad)))
    )
    assert outcome.rejected == 4
    assert outcome.accepted == 0
    good = {"explicit_bounds": [1.0, 2.0], "bucket_counts": [1, 2, 0], "count": 3, "sum": 3.5}
    assert store.apply(request_of(a_metric("ok", "histogram", **good))).accepted == 1
    samples = scrape_text(rendered(store))
    assert samples[("ok_bucket", (("instance", ""), ("job", "svc"), ("le", "+Inf")))] == 3


def test_an_older_cumulative_point_does_not_replace_a_newer_one():
    store = MetricStore(clock=VirtualClock())
    store.apply(request_of(a_metric("x", "sum", value=10, time_ns=2000)))
    store.apply(request_of(a_metric("x", "sum", value=5, time_ns=1000)))  # a late retry
    assert scrape_text(rendered(store))[("x_total", (("instance", ""), ("job", "svc")))] == 10


def test_attributes_cannot_stand_for_the_collectors_labels():
    store = MetricStore(clock=VirtualClock())
    store.apply(
        request_of(
            a_metric("x", "gauge", attributes={"job": "evil", "otel.scope.name": "evil"}),
            resource={"service.name": "svc", "job": "other", "host.name": "h"},
        )
    )
    samples = scrape_text(rendered(store))
    ((_, labels),) = [key for key in samples if key[0] == "x"]
    assert dict(labels)["job"] == "svc"
    ((_, info),) = [key for key in samples if key[0] == "target_info"]
    assert dict(info) == {"job": "svc", "instance": "", "host_name": "h"}


def test_a_scrape_while_exports_change_the_series_reads_whole_values():
    store = MetricStore(clock=VirtualClock())
    stop = threading.Event()

    def export():
        flip = False
        while not stop.is_set():
            flip = not flip
            bounds = [1.0, 2.0, 3.0] if flip else [1.0]
            counts = [1, 1, 1, 1] if flip else [3, 3]
            store.apply(
                request_of(
                    a_metric(
                        "h",
                        "histogram",
                        explicit_bounds=bounds,
                        bucket_counts=counts,
                        count=sum(counts),
                    )
                )
            )

    thread = threading.Thread(target=export)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, to land inside apply
    thread.start()
    try:
        for _ in range(20_000):
            for family in store.collect():
                if family.name == "h":
                    values = {
                        (sample.name, sample.labels.get("le")): sample.value
                        for sample in family.samples
                    }
                    assert values["h_bucket", "+Inf"] == values["h_count", None]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
