"""Prometheus metrics of the gateway, kept as plain counters and read at scrape time.

Per route: ``atoll_gateway_requests_total{route, code}`` and the latency histogram
``atoll_gateway_request_duration_seconds{route}``, ``..._rate_limited_total{route}``.
Per upstream: ``atoll_gateway_upstream_requests_total``, ``..._failures_total``, and per
instance ``..._outstanding``, ``..._healthy`` (1/0), ``..._ejections_total``,
``..._idle_connections``. The breakers come from ``atoll.resilience``'s collector
(``atoll_breaker_*``); spans the trace exporter dropped are ``atoll_trace_spans_dropped``
(the services' metric, labelled ``service``). Nothing here costs the request path more
than a few additions.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from atoll.observability._metrics import log_loss_metrics, span_loss_metrics
from atoll.resilience import ResilienceCollector

if TYPE_CHECKING:
    from atoll.gateway._gateway import Gateway

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RouteStats:
    """Counters of one route."""

    __slots__ = ("buckets", "codes", "rate_limited", "seconds")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self.rate_limited = 0

    def record(self, status: int, seconds: float) -> None:
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.seconds += seconds


class GatewayMetrics:
    """The gateway's counters and its Prometheus registry."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.routes: dict[str, RouteStats] = {}
        self.bad_requests = 0
        self.unrouted = 0
        #: Mirror copies by (route, outcome): sent, failed (no answer, or a 5xx), skipped.
        self.mirrored: dict[tuple[str, str], int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats()
        return stats

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        gateway = metrics.gateway
        requests = CounterMetricFamily(
            "atoll_gateway_requests", "Requests by route and status code", labels=["route", "code"]
        )
        limited = CounterMetricFamily(
            "atoll_gateway_rate_limited", "Requests refused with 429", labels=["route"]
        )
        duration = HistogramMetricFamily(
            "atoll_gateway_request_duration_seconds",
            "Time from the request head to the end of the response",
            labels=["route"],
        )
        for name, stats in sorted(metrics.routes.items()):
            for code, count in sorted(stats.codes.items()):
                requests.add_metric([name, str(code)], count)
            limited.add_metric([name], stats.rate_limited)
            cumulative = 0
            buckets = []
            for bound, count in zip((*BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            duration.add_metric([name], buckets, stats.seconds)
        yield requests
        yield limited
        yield duration
        bad = CounterMetricFamily(
            "atoll_gateway_bad_requests", "Requests refused before routing (400, 414, 431)"
        )
        bad.add_metric([], metrics.bad_requests)
        yield bad
        yield from _http2_counters(gateway)
        up_requests = CounterMetricFamily(
            "atoll_gateway_upstream_requests", "Requests sent to an upstream", labels=["upstream"]
        )
        up_failures = CounterMetricFamily(
            "atoll_gateway_upstream_failures",
            "Requests to an upstream that failed or got a 5xx",
            labels=["upstream"],
        )
        outstanding = GaugeMetricFamily(
            "atoll_gateway_upstream_outstanding",
            "Requests in flight per instance",
            labels=["upstream", "instance"],
        )
        healthy = GaugeMetricFamily(
            "atoll_gateway_upstream_healthy",
            "1 if the instance takes traffic (not ejected, not down)",
            labels=["upstream", "instance"],
        )
        ejections = CounterMetricFamily(
            "atoll_gateway_upstream_ejections",
            "Passive-health ejections of the instance",
            labels=["upstream", "instance"],
        )
        idle = GaugeMetricFamily(
            "atoll_gateway_upstream_idle_connections",
            "Idle keep-alive connections to the instance",
            labels=["upstream", "instance"],
        )
        generation = gateway.gen
        for name, upstream in sorted(generation.upstreams.items()):
            up_requests.add_metric([name], upstream.requests_total)
            up_failures.add_metric([name], upstream.failures_total)
            for instance in upstream.instances:
                labels = [name, instance.address]
                outstanding.add_metric(labels, instance.outstanding)
                healthy.add_metric(labels, 1.0 if instance.available else 0.0)
                ejections.add_metric(labels, instance.ejections_total)
                idle.add_metric(labels, instance.idle_connections)
        yield from (up_requests, up_failures, outstanding, healthy, ejections, idle)
        reloads = CounterMetricFamily(
            "atoll_gateway_config_reloads", "Configuration reloads", labels=["outcome"]
        )
        reloads.add_metric(["applied"], gateway.reloads)
        reloads.add_metric(["refused"], gateway.reload_failures)
        yield reloads
        mirrored = CounterMetricFamily(
            "atoll_gateway_mirrored",
            "Copies of requests sent to routes' mirrors, by outcome",
            labels=["route", "outcome"],
        )
        for (route, outcome), count in sorted(self.metrics.mirrored.items()):
            mirrored.add_metric([route, outcome], count)
        yield mirrored
        yield from _tls_gauges(gateway)
        auth = CounterMetricFamily(
            "atoll_gateway_auth_failures", "Refused credentials by reason", labels=["reason"]
        )
        for reason, count in sorted(generation.auth.failures.items()):
            auth.add_metric([reason], count)
        yield auth
        tracing = gateway.tracing
        yield from span_loss_metrics(
            getattr(tracing, "service", "gateway"),
            getattr(tracing, "dropped_spans", 0),
            getattr(tracing, "failed_spans", 0),
        )
        yield from log_loss_metrics(
            getattr(tracing, "service", "gateway"),
            getattr(tracing, "dropped_log_records", 0),
            getattr(tracing, "failed_log_records", 0),
        )
        # Breakers of the current generation, by atoll.resilience's own collector.
        yield from ResilienceCollector(generation.registry).collect()


def _http2_counters(gateway: Gateway) -> Iterator[Metric]:
    """HTTP/2 connections from clients, and those the gateway ended for an error."""
    state = gateway.state
    yield CounterMetricFamily(
        "atoll_gateway_http2_connections",
        "Client connections served over HTTP/2",
        value=state.http2_connections,
    )
    terminated = CounterMetricFamily(
        "atoll_gateway_http2_terminated",
        "HTTP/2 connections the gateway ended for an error, by its GOAWAY code"
        " (enhance_your_calm: rapid reset or a header list over the limit; stalled: the"
        " client never opened its window)",
        labels=["error"],
    )
    for error, count in sorted(state.http2_terminated.items()):
        terminated.add_metric([error], count)
    yield terminated


def _tls_gauges(gateway: Gateway) -> Iterator[Metric]:
    """When the listener's certificate and its clients' revocation lists run out."""
    if gateway.tls_not_after is not None:
        yield GaugeMetricFamily(
            "atoll_gateway_tls_certificate_not_after_seconds",
            "When the listener's TLS certificate expires (Unix time)",
            value=gateway.tls_not_after,
        )
    if gateway.gen.config.server.tls is not None:
        failures = CounterMetricFamily(
            "atoll_gateway_tls_handshake_failures",
            "Failed TLS handshakes on the listener, by OpenSSL's reason",
            labels=["reason"],
        )
        for reason, count in sorted(gateway.tls_failures.items()):
            failures.add_metric([reason], count)
        yield failures
    crl = gateway.tls_crl
    if crl is not None and crl.next_update is not None:
        yield GaugeMetricFamily(
            "atoll_gateway_tls_crl_next_update_seconds",
            "When the earliest client certificate revocation list must be replaced"
            " (its next update, Unix time); past it, OpenSSL refuses that CA's clients",
            value=crl.next_update,
        )
