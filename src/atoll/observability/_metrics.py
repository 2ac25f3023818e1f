"""Prometheus metrics of one service: what it handles, sends, retries, parks and owes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from atoll.service._runtime import ServiceRuntime

#: Handler latency buckets, seconds: sub-millisecond handlers up to slow ones.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _RuntimeCollector(Collector):
    """Reads the runtime's plain counters at scrape time: nothing on the hot path."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self._runtime = runtime

    def describe(self) -> Iterator[Metric]:
        # Nothing to pre-declare; keeps registration from collecting too early.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        rt = self._runtime
        name = rt.service.name
        incoming = CounterMetricFamily(
            "atoll_messages_in",
            "Messages delivered to this service, by type and outcome.",
            labels=["service", "message_type", "outcome"],
        )
        for (message_type, outcome), value in rt.stats.by_type.items():
            incoming.add_metric([name, message_type, outcome], value)
        yield incoming
        out = CounterMetricFamily(
            "atoll_messages_out", "Messages the outbox relay published.", labels=["service"]
        )
        out.add_metric([name], rt.relay.published)
        yield out
        redeliveries = CounterMetricFamily(
            "atoll_redeliveries",
            "Deliveries that were not the first attempt.",
            labels=["service"],
        )
        redeliveries.add_metric([name], rt.stats.redeliveries)
        yield redeliveries
        dead = CounterMetricFamily(
            "atoll_dead_letters",
            "Messages of this service that went to dead letters: undecodable, of no handled"
            " type, past their deadline, rejected by their handler, or failed on their last"
            " attempt.",
            labels=["service"],
        )
        dead.add_metric([name], rt.stats.dead_lettered)
        yield dead
        failures = CounterMetricFamily(
            "atoll_relay_failures", "Failed outbox relay passes.", labels=["service"]
        )
        failures.add_metric([name], rt.relay.failures)
        yield failures
        pending = GaugeMetricFamily(
            "atoll_outbox_pending_messages",
            "Committed messages waiting in the outbox.",
            labels=["service"],
        )
        pending.add_metric([name], rt.metrics.outbox_pending)
        yield pending
        age = GaugeMetricFamily(
            "atoll_outbox_oldest_age_seconds",
            "Age of the oldest message waiting in the outbox (0 when empty).",
            labels=["service"],
        )
        age.add_metric([name], rt.metrics.outbox_oldest_age)
        yield age
        yield from span_loss_metrics(name, rt.tracing.dropped_spans, rt.tracing.failed_spans)
        yield from log_loss_metrics(
            name, rt.tracing.dropped_log_records, rt.tracing.failed_log_records
        )
        ready = GaugeMetricFamily(
            "atoll_ready", "1 while the service takes work.", labels=["service"]
        )
        ready.add_metric([name], 1.0 if rt.ready else 0.0)
        yield ready


class ServiceMetrics:
    """The metrics registry of one service.

    Other parts of atoll (breakers, sagas, projections) register their own collectors or
    metrics in :attr:`registry`; :meth:`add_refresher` runs an async callback before each
    scrape (for values read from a database).
    """

    def __init__(self, runtime: ServiceRuntime, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.handler_seconds = Histogram(
            "atoll_handler_duration_seconds",
            "Time in a message handler, its unit of work included.",
            ["service", "message_type"],
            registry=self.registry,
            buckets=BUCKETS,
        )
        self.outbox_pending = 0
        self.outbox_oldest_age = 0.0
        self._runtime = runtime
        self._timers: dict[str, Any] = {}
        self._refreshers: list[Callable[[], Awaitable[None]]] = [self._refresh_outbox]
        self.registry.register(_RuntimeCollector(runtime))

    def handler_timer(self, message_type: str) -> Any:
        """The handler histogram of ``message_type`` (looked up once per type)."""
        timer = self._timers.get(message_type)
        if timer is None:
            timer = self._timers[message_type] = self.handler_seconds.labels(
                self._runtime.service.name, message_type
            )
        return timer

    def add_refresher(self, refresher: Callable[[], Awaitable[None]]) -> None:
        """Run ``refresher`` before every scrape."""
        self._refreshers.append(refresher)

    async def _refresh_outbox(self) -> None:
        count, oldest, _ = await self._runtime.database.outbox_stats()
        self.outbox_pending = count
        self.outbox_oldest_age = (
            0.0 if oldest is None else max(0.0, self._runtime.clock.time() - oldest)
        )

    async def refresh(self) -> None:
        """Run every refresher (before a scrape or an OTLP push)."""
        for refresher in self._refreshers:
            try:
                await refresher()
            except Exception:  # noqa: S112 - a failing source must not hide the rest
                continue

    async def render(self) -> bytes:
        """The Prometheus text exposition, refreshed now."""
        await self.refresh()
        return generate_latest(self.registry)


def log_loss_metrics(service: str, dropped: int, failed: int) -> Iterator[CounterMetricFamily]:
    """The log records a process lost on their way to the collector (OTLP logs)."""
    return _loss_metrics(service, "atoll_log_records", "Log records", dropped, failed)


def span_loss_metrics(service: str, dropped: int, failed: int) -> Iterator[CounterMetricFamily]:
    """The spans a process lost on their way to the collector (services and the gateway
    report them under the same names, so one panel shows all of them)."""
    return _loss_metrics(service, "atoll_trace_spans", "Spans", dropped, failed)


def _loss_metrics(
    service: str, prefix: str, what: str, dropped: int, failed: int
) -> Iterator[CounterMetricFamily]:
    queue_full = CounterMetricFamily(
        f"{prefix}_dropped",
        f"{what} dropped because the export queue was full.",
        labels=["service"],
    )
    queue_full.add_metric([service], dropped)
    yield queue_full
    export_failed = CounterMetricFamily(
        f"{prefix}_export_failed",
        f"{what} lost because their export failed (refused, or the collector unreachable"
        " within the exporter's retries).",
        labels=["service"],
    )
    export_failed.add_metric([service], failed)
    yield export_failed
