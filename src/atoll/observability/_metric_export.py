"""A service's metrics over OTLP: the registry its ``/metrics`` serves, pushed to the
collector its traces go to, so traces, logs and metrics of a whole system are in one
place (the embedded collector's pages, or the OTLP backend a team already runs).

The standard variables choose it, as the OpenTelemetry SDK reads them:
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` +
``/v1/metrics``; ``OTEL_METRICS_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` turns it
off; ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds, 60,000 by default) is the time
between two pushes. The POST is the SDK's ``OTLPMetricExporter``'s (its endpoint,
headers, TLS, compression, timeout and retry rules), on a worker thread: the service's
event loop only reads the registry and encodes.

The conversion reads the OpenTelemetry "Prometheus and OpenMetrics compatibility" rules
backwards, so that a collector that applies them forwards (atoll's, or the OpenTelemetry
Collector's Prometheus exporter) shows the names ``/metrics`` shows:

* counter: a monotonic cumulative Sum, named without ``_total`` (its start time the
  ``_created`` sample's when there is one, else when the export started);
* gauge, untyped, info and stateset: a Gauge of each sample (an info metric keeps its
  ``_info`` name);
* histogram: a cumulative Histogram, its bucket counts taken apart from the cumulative
  ``_bucket`` samples (no min and max: Prometheus has none);
* summary: a Summary of its quantiles, sum and count.

Labels become data point attributes. Pushing never raises into the service: a failed
push is counted (:attr:`MetricExport.failed`) and logged once a minute at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from prometheus_client.metrics_core import Metric

from atoll._version import __version__
from atoll.determinism import Clock, SystemClock
from atoll.observability._logs import limit_exporter_logs
from atoll.observability._tracing import otlp_signal_endpoint

log = logging.getLogger("atoll.observability")

#: OTLP's AggregationTemporality.CUMULATIVE: Prometheus counters never reset on purpose.
_CUMULATIVE: Final = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
#: The OpenTelemetry default for OTEL_METRIC_EXPORT_INTERVAL, in milliseconds.
DEFAULT_INTERVAL_MS: Final = 60_000
_LOG_EVERY: Final = 60.0


def otlp_metrics_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The metrics endpoint the standard OpenTelemetry variables name, if any: none when
    ``OTEL_METRICS_EXPORTER`` names exporters but not ``otlp`` (``prometheus``: the
    service's ``/metrics`` is that already; ``none``)."""
    env = os.environ if environ is None else environ
    chosen = {part.strip().lower() for part in env.get("OTEL_METRICS_EXPORTER", "otlp").split(",")}
    if "otlp" not in chosen:
        return None
    return otlp_signal_endpoint("metrics", environ)


def export_interval(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between two pushes: ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds, a
    positive integer) or the standard's 60 s. (Read here, not through ``_otlp``, which
    needs the SDK: a service without the ``otel`` extra imports this module too.)"""
    env = os.environ if environ is None else environ
    raw = env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    try:
        value = int(raw) if raw else DEFAULT_INTERVAL_MS
    except ValueError:
        log.warning("OTEL_METRIC_EXPORT_INTERVAL=%r is not an integer; using 60 s", raw)
        value = DEFAULT_INTERVAL_MS
    return (value if value > 0 else DEFAULT_INTERVAL_MS) / 1000


def service_resource(service: str) -> dict[str, object]:
    """The OTLP resource of one service process, as its traces' is made (the SDK's
    ``Resource.create``: ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` count),
    with an instance id that tells its replicas apart (``host:pid``) unless one is set."""
    attributes: dict[str, object] = {"service.name": service}
    try:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - otel extra
    except ImportError:
        pass
    else:
        attributes = dict(Resource.create({"service.name": service}).attributes)
    attributes.setdefault("service.instance.id", f"{socket.gethostname()}:{os.getpid()}")
    return attributes


def _any_value(target: AnyValue, value: object) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    else:
        target.string_value = str(value)


def _attributes(target: Any, labels: Mapping[str, object]) -> None:
    for key, value in labels.items():
        pair = target.add()
        pair.key = key
        _any_value(pair.value, value)


def _key(labels: Mapping[str, str], drop: str = "") -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != drop))


def encode_metrics(
    resource: Mapping[str, object],
    families: Iterable[Metric],
    *,
    start_ns: int,
    now_ns: int,
) -> ExportMetricsServiceRequest:
    """One export request holding every sample of ``families`` (see the module docstring)."""
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    _attributes(resource_metrics.resource.attributes, resource)
    scope_metrics = resource_metrics.scope_metrics.add()
    scope_metrics.scope.name = "atoll"
    scope_metrics.scope.version = __version__
    for family in families:
        if not family.samples:
            continue
        # Encoded apart, and left out whole if it cannot be (a NaN count, a value past
        # uint64): one odd family of a custom collector must not stop the others.
        scratch = metrics_pb2.ScopeMetrics()
        try:
            _family(scratch, family, start_ns, now_ns)
        except (ValueError, TypeError, OverflowError, KeyError) as exc:
            if family.name not in _REFUSED:
                _REFUSED.add(family.name)
                log.warning("metric %s is not pushed over OTLP: %s", family.name, exc)
            continue
        scope_metrics.metrics.extend(scratch.metrics)
    return request


#: Families left out of a push, each logged once.
_REFUSED: set[str] = set()


def _family(scope_metrics: Any, family: Metric, start_ns: int, now_ns: int) -> None:
    created = {
        _key(s.labels): int(s.value * 1e9)
        for s in family.samples
        if s.name.endswith("_created") and math.isfinite(s.value)
    }
    if family.type == "counter":
        _counter(scope_metrics.metrics.add(), family, created, start_ns, now_ns)
    elif family.type == "histogram":
        _histogram(scope_metrics.metrics.add(), family, created, start_ns, now_ns)
    elif family.type == "summary":
        _summary(scope_metrics.metrics.add(), family, created, start_ns, now_ns)
    elif family.type in ("gauge", "unknown", "untyped", "info", "stateset"):
        _gauges(scope_metrics, family, now_ns)
    # gaugehistogram: no OTLP twin that a Prometheus view reads back; left out.


def _counter(
    metric: Any, family: Metric, created: dict[Any, int], start_ns: int, now_ns: int
) -> None:
    metric.name = family.name
    metric.description = family.documentation
    metric.sum.is_monotonic = True
    metric.sum.aggregation_temporality = _CUMULATIVE
    for sample in family.samples:
        if not sample.name.endswith("_total"):
            continue
        point = metric.sum.data_points.add()
        _attributes(point.attributes, sample.labels)
        point.as_double = float(sample.value)
        point.start_time_unix_nano = created.get(_key(sample.labels), start_ns)
        point.time_unix_nano = now_ns


def _gauges(scope_metrics: Any, family: Metric, now_ns: int) -> None:
    by_name: dict[str, Any] = {}
    for sample in family.samples:
        metric = by_name.get(sample.name)
        if metric is None:
            metric = by_name[sample.name] = scope_metrics.metrics.add()
            metric.name = sample.name
            metric.description = family.documentation
        point = metric.gauge.data_points.add()
        _attributes(point.attributes, sample.labels)
        point.as_double = float(sample.value)
        point.time_unix_nano = now_ns


def _series(family: Metric, label: str) -> dict[Any, dict[str, Any]]:
    """A histogram's or summary's samples by series (their labels but ``label``, the
    bucket's ``le`` or the ``quantile``): its (bound or quantile, value) parts, sum and
    count."""
    series: dict[Any, dict[str, Any]] = {}
    for sample in family.samples:
        suffix = sample.name[len(family.name) :]
        key = _key(sample.labels, drop=label)
        entry = series.setdefault(key, {"labels": dict(key), "parts": [], "sum": 0.0, "count": 0.0})
        if label in sample.labels and suffix in ("_bucket", ""):
            entry["parts"].append((float(sample.labels[label]), float(sample.value)))
        elif suffix == "_sum":
            entry["sum"] = float(sample.value)
        elif suffix == "_count":
            entry["count"] = float(sample.value)
    return series


def _histogram(
    metric: Any, family: Metric, created: dict[Any, int], start_ns: int, now_ns: int
) -> None:
    metric.name = family.name
    metric.description = family.documentation
    metric.histogram.aggregation_temporality = _CUMULATIVE
    for key, entry in _series(family, "le").items():
        point = metric.histogram.data_points.add()
        _attributes(point.attributes, entry["labels"])
        buckets = sorted(entry["parts"])
        bounds = [bound for bound, _ in buckets if math.isfinite(bound)]
        counts = []
        below = 0.0
        for _, cumulative in buckets:
            counts.append(max(0, round(cumulative - below)))
            below = cumulative
        if len(counts) == len(bounds):  # no +Inf bucket: the count closes it
            counts.append(max(0, round(entry["count"] - below)))
        point.explicit_bounds.extend(bounds)
        point.bucket_counts.extend(counts)
        # From the buckets, which a receiver checks it against: OpenMetrics lets a
        # histogram leave out _count (prometheus_client does with negative bounds).
        point.count = sum(counts)
        point.sum = entry["sum"]
        point.start_time_unix_nano = created.get(key, start_ns)
        point.time_unix_nano = now_ns


def _summary(
    metric: Any, family: Metric, created: dict[Any, int], start_ns: int, now_ns: int
) -> None:
    metric.name = family.name
    metric.description = family.documentation
    for key, entry in _series(family, "quantile").items():
        point = metric.summary.data_points.add()
        _attributes(point.attributes, entry["labels"])
        for quantile, value in sorted(entry["parts"]):
            item = point.quantile_values.add()
            item.quantile = quantile
            item.value = value
        point.count = round(entry["count"])
        point.sum = entry["sum"]
        point.start_time_unix_nano = created.get(key, start_ns)
        point.time_unix_nano = now_ns


def _settle(done: asyncio.Future[bool], result: bool | BaseException) -> None:
    if done.done():
        return  # the caller gave up waiting (a stop's timeout)
    if isinstance(result, BaseException):
        done.set_exception(result)
    else:
        done.set_result(result)


class MetricExport:
    """Pushes a registry's metrics every interval (see the module docstring).

    ``collect`` returns the metric families (a ``CollectorRegistry``'s ``collect``);
    ``refresh``, if given, runs first (values read from a database at scrape time).
    """

    def __init__(
        self,
        resource: Mapping[str, object],
        collect: Callable[[], Iterable[Metric]],
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        endpoint: str | None = None,
        exporter: Any = None,
        clock: Clock | None = None,
        interval: float | None = None,
    ) -> None:
        self.resource = dict(resource)
        self.collect = collect
        self.refresh = refresh
        self.clock: Clock = clock or SystemClock()
        self.interval = interval if interval is not None else export_interval()
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415 - otel extra
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter(endpoint=endpoint)
        limit_exporter_logs(clock=self.clock)
        self.exporter = exporter
        self.start_ns = int(self.clock.time() * 1e9)
        #: Pushes that reached the collector, and those that did not (after the
        #: exporter's retries).
        self.pushed = 0
        self.failed = 0
        self._logged_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Push every interval from now on, in the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="atoll-metric-export"
            )

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop pushing, after a last push given ``timeout`` seconds at most: a POST still
        waiting then is left to its daemon thread, which does not hold up the exit."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            async with asyncio.timeout(timeout):
                await self.push()
        except TimeoutError:
            self.failed += 1
            log.warning("the last metrics push did not finish within %.0f s", timeout)
        self.exporter.shutdown()

    def abandon(self) -> None:
        """Stop pushing at once, without a last push (what a crash leaves)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    def _post_off_loop(self, request: ExportMetricsServiceRequest) -> asyncio.Future[bool]:
        """``_post`` on a daemon thread of its own (not the loop's executor, whose
        threads the interpreter waits for at exit: a collector that never answers would
        hold a stopping service up for the exporter's whole timeout)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def post() -> None:
            try:
                result: bool | BaseException = self._post(request)
            except Exception as exc:  # handed to the loop, raised there
                result = exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits now
                loop.call_soon_threadsafe(_settle, done, result)

        threading.Thread(target=post, name="atoll-metric-push", daemon=True).start()
        return done

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(self.interval)
            await self.push()

    async def push(self) -> bool:
        """Push the registry's values now; ``False`` if that failed (counted, logged)."""
        try:
            if self.refresh is not None:
                await self.refresh()
            request = encode_metrics(
                self.resource,
                self.collect(),
                start_ns=self.start_ns,
                now_ns=int(self.clock.time() * 1e9),
            )
            ok = await self._post_off_loop(request)
        except Exception as exc:  # a push must never take the service down
            ok = False
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = "the collector refused it or did not answer"
        if ok:
            self.pushed += 1
            return True
        self.failed += 1
        now = self.clock.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.warning("pushing metrics over OTLP failed (%d so far): %s", self.failed, reason)
        return False

    def _post(self, request: ExportMetricsServiceRequest) -> bool:
        # The SDK exporter's own batch export (its size check, retries and client); its
        # public export() wants the SDK's MetricsData, which a Prometheus registry is not.
        result = self.exporter._export_batch(request)
        return bool(getattr(result, "name", "") == "SUCCESS")
