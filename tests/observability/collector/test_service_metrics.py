"""A service's Prometheus metrics pushed over OTLP to the collector its traces go to: the
collector's ``/metrics`` then shows the names and values the service's own shows."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from atoll import Command, Context, Service
from atoll.determinism import VirtualClock
from atoll.observability._metric_export import (
    MetricExport,
    encode_metrics,
    export_interval,
    otlp_metrics_endpoint,
    service_resource,
)
from atoll.observability.collector._metrics import MetricStore
from atoll.observability.collector._pages import (
    MAX_RENDERED_SERIES,
    format_number,
    metrics_page,
    service_filter,
    service_value,
)
from atoll.testing import wait_until
from support import System

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class _Families(Collector):
    """Hand-made families, as atoll's runtime collector yields them."""

    def collect(self):
        family = CounterMetricFamily("shop_orders", "Orders placed.", labels=["status"])
        family.add_metric(["paid"], 7)
        family.add_metric(["failed"], 2)
        yield family


def a_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("shop_requests", "Requests.", ["route"], registry=registry).labels("/a").inc(3)
    Gauge("shop_queue_depth", "Depth.", registry=registry).set(4.5)
    latency = Histogram(
        "shop_latency_seconds", "Latency.", ["route"], buckets=(0.1, 1.0), registry=registry
    )
    for value in (0.05, 0.5, 0.7, 3.0):
        latency.labels("/a").observe(value)
    Summary("shop_size_bytes", "Sizes.", registry=registry).observe(120)
    Info("shop_build", "Build.", registry=registry).info({"version": "1.2.3"})
    registry.register(_Families())
    return registry


def test_what_a_service_pushes_reads_back_as_its_own_exposition():
    registry = a_registry()
    clock = VirtualClock()
    request = encode_metrics(
        {"service.name": "shop", "service.instance.id": "host:1"},
        registry.collect(),
        start_ns=10**18,
        now_ns=int(clock.time() * 1e9),
    )
    store = MetricStore(clock=clock)
    outcome = store.apply(request)
    assert outcome.rejected == 0, outcome.error_message()
    pushed = CollectorRegistry()
    pushed.register(store)
    theirs = samples(generate_latest(pushed).decode())
    ours = samples(generate_latest(registry).decode())
    own = (("instance", "host:1"), ("job", "shop"), ("otel_scope_name", "atoll"))
    compared = 0
    for (name, labels), value in ours.items():
        if name.endswith("_created"):
            continue  # a start time in Prometheus, a field of the point in OTLP
        key = (name, tuple(sorted((*labels, *own, *_version_label(theirs)))))
        assert key in theirs, f"{name}{dict(labels)} was not pushed"
        assert theirs[key] == pytest.approx(value), name
        compared += 1
    # Counters with and without _created, the histogram's 3 buckets + sum + count, the
    # summary's sum and count, the gauge, the info: all of them made the trip.
    assert compared == len([k for k in ours if not k[0].endswith("_created")]) >= 12


def _version_label(theirs):
    for _, labels in theirs:
        for key, value in labels:
            if key == "otel_scope_version":
                return ((key, value),)
    return ()


def test_the_metrics_endpoint_follows_the_standard_variables():
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert otlp_metrics_endpoint(base) == "http://collector:4318/v1/metrics"
    explicit = {**base, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:9/in"}
    assert otlp_metrics_endpoint(explicit) == "http://m:9/in"
    assert otlp_metrics_endpoint({**base, "OTEL_METRICS_EXPORTER": "none"}) is None
    assert otlp_metrics_endpoint({**base, "OTEL_SDK_DISABLED": "true"}) is None
    assert otlp_metrics_endpoint({}) is None


def test_the_push_interval_follows_the_standard_variable():
    assert export_interval({}) == 60.0
    assert export_interval({"OTEL_METRIC_EXPORT_INTERVAL": "100"}) == 0.1
    assert export_interval({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}) == 60.0
    assert export_interval({"OTEL_METRIC_EXPORT_INTERVAL": "-5"}) == 60.0


def test_the_resource_is_made_as_the_traces_one(monkeypatch):
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "service.namespace=shop,deployment.environment=dev"
    )
    resource = service_resource("orders")
    assert resource["service.name"] == "orders"
    assert resource["service.namespace"] == "shop"
    assert resource["service.instance.id"]  # tells the replicas of one service apart
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=orders-7")
    assert service_resource("orders")["service.instance.id"] == "orders-7"


async def test_a_push_reaches_the_collector_and_a_failed_one_is_counted(live):
    registry = a_registry()
    export = MetricExport(
        {"service.name": "shop", "service.instance.id": "a"},
        registry.collect,
        endpoint=f"{live.url}/v1/metrics",
        interval=3600,
    )
    assert await export.push()
    text = live.get("/metrics").text
    assert 'shop_requests_total{instance="a",job="shop"' in text
    assert export.pushed == 1
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    down = MetricExport(
        {"service.name": "shop"},
        registry.collect,
        # A short timeout bounds the exporter's retries (10 s by default).
        exporter=OTLPMetricExporter(endpoint=f"http://127.0.0.1:{port}/v1/metrics", timeout=0.5),
        interval=3600,
    )
    assert not await down.push()
    assert down.failed == 1


class Ping(Command):
    message_type = "metricexport.Ping"
    n: int


def pinged_service(name: str) -> Service:
    """A service that takes Pings and does nothing with them."""
    service = Service(name)

    @service.handles(Ping)
    async def on_ping(ping: Ping, ctx: Context) -> None:
        return

    return service


async def test_a_running_service_pushes_its_metrics(live, tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", live.url)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    worker = pinged_service("pinged")
    system = System(tmp_path)
    try:
        (runtime,) = await system.start(worker)
        assert runtime.metric_export is not None
        async with worker.unit_of_work() as ctx:
            for n in range(3):
                ctx.send(Ping(n=n), to="pinged")

        def pushed() -> bool:
            text = httpx.get(f"{live.url}/metrics", timeout=5).text
            return "atoll_messages_in_total{" in text and (
                'message_type="metricexport.Ping"' in text
                and 'outcome="handled"' in text
                and "} 3.0" in text
            )

        await wait_until(pushed, timeout=15, what="the service's counters at the collector")
        text = httpx.get(f"{live.url}/metrics", timeout=5).text
        assert "atoll_handler_duration_seconds_count{" in text
        assert 'job="pinged"' in text
    finally:
        await system.stop()
    assert runtime.metric_export is None  # stopped, after a last push


def push_into(store: MetricStore, registry: CollectorRegistry, now_ns: int, instance: str = "a"):
    request = encode_metrics(
        {"service.name": "shop", "service.instance.id": instance},
        registry.collect(),
        start_ns=0,
        now_ns=now_ns,
    )
    return store.apply(request)


class _Total(Collector):
    """A counter whose total the test sets."""

    def __init__(self) -> None:
        self.total = 0.0

    def collect(self):
        family = CounterMetricFamily("shop_orders", "Orders.")
        family.add_metric([], self.total)
        yield family


def test_a_pushed_counter_shows_its_rate_between_two_pushes():
    total = _Total()
    registry = CollectorRegistry()
    registry.register(total)
    store = MetricStore(clock=VirtualClock())
    rates = []
    for second, value in ((10, 10), (20, 20), (30, 35), (30, 35), (40, 5)):
        total.total = value
        push_into(store, registry, second * 10**9)
        (family,) = store.view(text="shop_orders")
        rates.append(family.series[0].rate)
    # None before a second point; then per second; a repeated point (an exporter's
    # retry) keeps the rate; after a restart the counter counts again from 0.
    assert rates == [None, 1.0, 1.5, 1.5, 0.5]


def test_a_series_own_job_or_instance_label_is_kept_apart():
    registry = CollectorRegistry()
    healthy = Gauge("up_healthy", "Healthy.", ["instance"], registry=registry)
    healthy.labels("10.0.0.1:80").set(1)
    healthy.labels("10.0.0.2:80").set(0)
    store = MetricStore(clock=VirtualClock())
    assert push_into(store, registry, 10**9).rejected == 0
    (family,) = store.view(text="up_healthy")
    assert sorted(s.labels["exported_instance"] for s in family.series) == [
        "10.0.0.1:80",
        "10.0.0.2:80",
    ]
    assert {s.instance for s in family.series} == {"a"}


class _Odd(Collector):
    def collect(self):
        # OpenMetrics lets a histogram with negative bounds leave out _count and _sum.
        yield HistogramMetricFamily(
            "odd_offsets", "Offsets.", buckets=[("-1.0", 1), ("0.0", 2), ("+Inf", 3)]
        )
        # A count past uint64: no OTLP point can hold it.
        yield SummaryMetricFamily("odd_huge", "Too many.", count_value=1e20, sum_value=1)


def test_one_family_that_cannot_be_encoded_does_not_stop_the_others():
    registry = a_registry()
    registry.register(_Odd())
    store = MetricStore(clock=VirtualClock())
    assert push_into(store, registry, 10**9).rejected == 0
    names = {family.name for family in store.view()}
    assert "odd_offsets" in names  # its count taken from its buckets
    assert "odd_huge" not in names  # left out, and logged
    assert {"shop_requests", "shop_queue_depth", "shop_latency_seconds"} <= names


def test_only_an_otlp_metrics_exporter_pushes():
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert otlp_metrics_endpoint({**base, "OTEL_METRICS_EXPORTER": "prometheus"}) is None
    assert otlp_metrics_endpoint({**base, "OTEL_METRICS_EXPORTER": "console,otlp"}) is not None


def test_values_read_as_people_write_them():
    assert format_number(float("inf")) == "+Inf"
    assert format_number(float("-inf"), "free_bytes") == "-Inf"
    assert format_number(float("nan")) == "NaN"
    assert format_number(-0.5, "offset_seconds") == "-500 ms"
    assert format_number(5000, "uptime_seconds") == "83 min 20 s"
    assert format_number(2048, "size_bytes") == "2 KiB"
    assert format_number(7) == "7"


async def test_a_collector_that_never_answers_does_not_hold_up_a_stop():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # takes connections, never answers
        port = silent.getsockname()[1]
        export = MetricExport(
            {"service.name": "shop"},
            a_registry().collect,
            endpoint=f"http://127.0.0.1:{port}/v1/metrics",
            interval=3600,
        )
        export.start()
        started = time.monotonic()
        await export.stop(timeout=0.5)
        assert time.monotonic() - started < 2.0
        assert export.failed == 1
        # The POST still waiting is on a daemon thread: the interpreter will not wait.
        assert all(t.daemon for t in threading.enumerate() if t.name == "atoll-metric-push")


async def test_a_push_that_cannot_be_set_up_does_not_stop_a_service(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the exporter could not be made")

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("atoll.service._runtime.MetricExport", broken)
    worker = pinged_service("unpushed")
    system = System(tmp_path)
    try:
        (runtime,) = await system.start(worker)
        assert runtime.ready
        assert runtime.metric_export is None
    finally:
        await system.stop()


def test_the_metrics_page_shows_a_bounded_number_of_series():
    registry = CollectorRegistry()
    gauge = Gauge("wide_family", "Many series.", ["n"], registry=registry)
    for n in range(MAX_RENDERED_SERIES + 500):
        gauge.labels(str(n)).set(n)
    Gauge("after_it", "Past the cut.", registry=registry).set(1)
    store = MetricStore(clock=VirtualClock(), max_series=10_000)
    assert push_into(store, registry, 10**9).rejected == 0
    page = metrics_page(jobs=store.jobs(), form={}, families=store.view(), stats=None)
    assert page.count('class="series-row"') == MAX_RENDERED_SERIES
    assert f"of {MAX_RENDERED_SERIES + 501:,} series" in page
    assert 'id="metrics-cut"' in page


def test_series_without_a_service_have_an_option_of_their_own():
    """The "(none)" option (series from a resource without ``service.name``) picks those
    series only; it used to share its value with "All services"."""
    store = MetricStore(clock=VirtualClock())
    for resource, name in (({"service.name": "shop"}, "of_shop"), ({}, "of_nobody")):
        registry = CollectorRegistry()
        Gauge(name, "A gauge.", registry=registry).set(1)
        store.apply(encode_metrics(resource, registry.collect(), start_ns=0, now_ns=10**9))
    assert store.jobs() == ["", "shop"]

    def shown(service: str) -> set[str]:
        return {f.name for f in store.view(service_filter(service))}

    assert shown("") == {"of_shop", "of_nobody"}
    assert shown("shop") == {"of_shop"}
    assert shown(service_value("")) == {"of_nobody"}
    # A service whose name starts with the marker stays itself.
    assert service_filter(service_value("=odd")) == "=odd"
    assert service_filter(service_value("shop")) == "shop"
    page = metrics_page(
        jobs=store.jobs(), form={"service": "="}, families=store.view(""), stats=None
    )
    values = re.findall(r'<option value="([^"]*)"', page)
    assert len(values) == len(set(values)), values
    assert '<option value="=" selected>(none)</option>' in page
