"""OTLP metrics in, Prometheus out: what the OpenTelemetry Collector's ``prometheus``
exporter does, for applications whose SDK exports metrics over OTLP.

``POST /v1/metrics`` takes an ``ExportMetricsServiceRequest`` (protobuf or JSON), and
``GET /metrics`` answers the latest value of every series in Prometheus' text format,
converted as OpenTelemetry's "Prometheus and OpenMetrics compatibility" specification
says:

* Names: characters Prometheus does not take become ``_``; the unit is appended
  (``http.server.duration`` in ``s`` is ``http_server_duration_seconds``), and a
  monotonic sum is a counter (``_total``). Other sums and gauges are gauges, explicit
  bucket histograms are histograms, summaries are summaries.
* Labels: the point's attributes (names made valid the same way; values of names that
  become equal are joined with ``;``), ``otel_scope_name`` and ``otel_scope_version``,
  and ``job`` (``service.namespace/service.name``) and ``instance``
  (``service.instance.id``). The other resource attributes are the labels of one
  ``target_info`` gauge per resource.
* Temporality: cumulative points replace the series' value; delta points are added to
  it (histograms bucket by bucket while the bounds stay the same).

Points are refused, counted in the response's ``partial_success``, when they cannot be
shown: exponential histograms, a name already used by a metric of another type, a new
series past ``max_series``. Series not updated for ``expiry`` seconds are dropped (the
Prometheus exporter's ``metric_expiration``, 5 minutes by default). Nothing is kept on
disk: these are the latest values, for Prometheus to scrape and keep.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from atoll.determinism import Clock
from atoll.observability.collector._decode import any_value
from atoll.observability.collector._errors import MalformedRequestError

DEFAULT_MAX_SERIES: Final = 10_000
DEFAULT_EXPIRY: Final = 300.0
_DELTA: Final = 1  # AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
_NO_RECORDED_VALUE: Final = 1  # DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK

#: UCUM units as the specification writes them in Prometheus names.
_UNITS: Final = {
    "d": "days",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "TiBy": "tibibytes",
    "KBy": "kilobytes",
    "MBy": "megabytes",
    "GBy": "gigabytes",
    "TBy": "terabytes",
    "m": "meters",
    "V": "volts",
    "A": "amperes",
    "J": "joules",
    "W": "watts",
    "g": "grams",
    "Cel": "celsius",
    "Hz": "hertz",
    "%": "percent",
}
_PER_UNITS: Final = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}
_INVALID_NAME: Final = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL: Final = re.compile(r"[^a-zA-Z0-9_]+")


def prometheus_name(name: str, unit: str, kind: str) -> str:
    """An OpenTelemetry metric's name as Prometheus shows it, without ``_total``."""
    base = _INVALID_NAME.sub("_", name).strip("_") or "metric"
    if base[0].isdigit():
        base = "_" + base
    if kind == "counter" and base.endswith("_total"):
        base = base[: -len("_total")]
    suffix = _unit_suffix(unit, kind)
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base


def _unit_suffix(unit: str, kind: str) -> str:
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()  # annotations: {request}
    top, slash, per = unit.partition("/")
    top = "" if top == "1" else top
    if not slash and not top:
        return "ratio" if unit == "1" and kind == "gauge" else ""
    words = _UNITS.get(top, top)
    if per:
        per_words = f"per_{_PER_UNITS.get(per, _UNITS.get(per, per))}"
        words = f"{words}_{per_words}" if words else per_words
    return _INVALID_LABEL.sub("_", words).strip("_")


def label_name(key: str) -> str:
    """An attribute key as a valid Prometheus label name."""
    name = _INVALID_LABEL.sub("_", key)
    if not name or name[0].isdigit():
        name = "key_" + name
    elif name.startswith("__"):
        name = "key" + name
    return name


def _label_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()  # true, 3, 1.5, ["a", "b"] as JSON


def _labels(attributes: Sequence[Any]) -> dict[str, str]:
    """Point or resource attributes as labels; keys that become the same name have
    their values joined with ``;`` in the order of the original keys."""
    found: dict[str, list[tuple[str, str]]] = {}
    for kv in attributes:
        found.setdefault(label_name(kv.key), []).append((kv.key, _label_value(any_value(kv.value))))
    return {name: ";".join(v for _, v in sorted(values)) for name, values in found.items()}


@dataclass(slots=True)
class _Series:
    labels: dict[str, str]
    updated: float
    time_ns: int = 0  # of the last cumulative point taken
    value: float = 0.0
    bounds: tuple[float, ...] = ()
    counts: list[int] = field(default_factory=list)  # per bucket, the last one +Inf
    sum: float = 0.0
    count: int = 0
    quantiles: tuple[tuple[float, float], ...] = ()
    #: A counter's increase per second between its last two points (``None``: not known).
    rate: float | None = None


@dataclass(slots=True)
class _Family:
    name: str
    kind: str  # "counter", "gauge", "histogram", "summary"
    help: str
    series: dict[tuple[tuple[str, str], ...], _Series] = field(default_factory=dict)


@dataclass(slots=True)
class MetricsOutcome:
    """What one export did: data points taken and refused, with why."""

    accepted: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected += count
        self.reasons[reason] = self.reasons.get(reason, 0) + count

    def error_message(self) -> str:
        return "; ".join(f"{count} {reason}" for reason, count in self.reasons.items())


def parse_metrics(body: bytes, encoding: str) -> ExportMetricsServiceRequest:
    """An export request's body, or :class:`MalformedRequestError` saying why not."""
    request = ExportMetricsServiceRequest()
    try:
        if encoding == "protobuf":
            request.ParseFromString(body)
        else:
            json_format.Parse(body, request, ignore_unknown_fields=True)
    except (DecodeError, json_format.ParseError, RecursionError, ValueError) as exc:
        what = "protobuf" if encoding == "protobuf" else "OTLP/JSON"
        raise MalformedRequestError(
            f"the body is not a {what} ExportMetricsServiceRequest: {exc}"
        ) from exc
    return request


class MetricStore(Collector):
    """The latest value of every series received over OTLP, for ``GET /metrics``.

    Thread-safe: exports are applied on the receiver's decoding thread, a metric at a
    time under the lock, while a scrape copies the values under it.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        max_series: int = DEFAULT_MAX_SERIES,
        expiry: float = DEFAULT_EXPIRY,
    ) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, not {max_series}")
        if not expiry > 0:
            raise ValueError(f"expiry must be positive, not {expiry}")
        self.clock = clock
        self.max_series = max_series
        self.expiry = expiry
        self._families: dict[str, _Family] = {}
        #: Every name a family's samples use, with the family: two families must not
        #: share one (a sum ``x`` and a gauge ``x_total`` would both write ``x_total``).
        self._owners: dict[str, str] = dict.fromkeys(_RESERVED, "")
        #: target_info labels by (job, instance).
        self._targets: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
        self._count = 0
        self._lock = threading.Lock()

    @property
    def series(self) -> int:
        """Series held now."""
        return self._count

    def apply(self, request: ExportMetricsServiceRequest) -> MetricsOutcome:
        """Take the points of ``request``; refused points are counted, never raised."""
        outcome = MetricsOutcome()
        now = self.clock.time()
        with self._lock:
            self._expire(now)
        for resource_metrics in request.resource_metrics:
            resource = _labels(resource_metrics.resource.attributes)
            target = _target(resource)
            info = {k: v for k, v in resource.items() if k not in _RESOURCE_LABELS}
            info.pop("job", None)
            info.pop("instance", None)
            if info:
                with self._lock:
                    self._targets[target] = (info, now)
            for scope_metrics in resource_metrics.scope_metrics:
                scope = scope_metrics.scope
                own = {"job": target[0], "instance": target[1]}
                if scope.name:
                    own["otel_scope_name"] = scope.name
                if scope.version:
                    own["otel_scope_version"] = scope.version
                for metric in scope_metrics.metrics:
                    with self._lock:
                        self._metric(metric, own, now, outcome)
        return outcome

    def _metric(
        self, metric: Any, own: dict[str, str], now: float, outcome: MetricsOutcome
    ) -> None:
        data = metric.WhichOneof("data")
        if data is None:
            return
        body = getattr(metric, data)
        points = body.data_points
        if data == "exponential_histogram":
            outcome.reject("exponential histogram points (not converted)", len(points))
            return
        if not metric.name:
            outcome.reject("points of a metric with no name", len(points))
            return
        kind, delta = _kind(data, body)
        name = prometheus_name(metric.name, metric.unit, kind)
        family = self._families.get(name)
        if family is None:
            clash = next(
                (n for n in _sample_names(name, kind) if self._owners.get(n, name) != name), None
            )
            if clash is not None:
                owner = self._owners[clash] or "atoll"
                outcome.reject(f"points of {name} (its {clash} is {owner}'s already)", len(points))
                return
            family = self._families[name] = _Family(name, kind, metric.description)
            for sample in _sample_names(name, kind):
                self._owners[sample] = name
        elif family.kind != kind:
            outcome.reject(f"points of {name} as a {kind} (it is a {family.kind})", len(points))
            return
        for point in points:
            self._point(family, point, own, now, outcome, delta=delta)

    def _point(
        self,
        family: _Family,
        point: Any,
        own: dict[str, str],
        now: float,
        outcome: MetricsOutcome,
        *,
        delta: bool,
    ) -> None:
        kind = family.kind
        # The collector's own labels last: an attribute named job cannot stand for them,
        # and keeps its value as exported_job (as Prometheus does without honor_labels):
        # the gateway's per-instance series are told apart by their own "instance".
        labels = _with_own(_labels(point.attributes), own)
        if kind == "histogram":
            labels.pop("le", None)
        elif kind == "summary":
            labels.pop("quantile", None)
        key = tuple(sorted(labels.items()))
        if point.flags & _NO_RECORDED_VALUE:  # the series ended (a staleness marker)
            if family.series.pop(key, None) is not None:
                self._count -= 1
            return
        problem = _invalid(kind, point)
        if problem is not None:
            outcome.reject(problem)
            return
        series = family.series.get(key)
        add = delta
        created = series is None
        if series is None:
            if self._count >= self.max_series:
                outcome.reject(f"points of new series past the limit of {self.max_series}")
                return
            series = family.series[key] = _Series(labels, now)
            self._count += 1
            add = False
        elif not delta and point.time_unix_nano < series.time_ns:
            outcome.accepted += 1  # an older cumulative value (a retry): kept the newer
            return
        series.updated = now
        _update(series, kind, point, add=add, delta=delta, new=created)
        outcome.accepted += 1

    def _expire(self, now: float) -> None:
        cutoff = now - self.expiry
        for name, family in list(self._families.items()):
            stale = [key for key, series in family.series.items() if series.updated < cutoff]
            for key in stale:
                del family.series[key]
            self._count -= len(stale)
            if not family.series:
                del self._families[name]
                for sample in _sample_names(name, family.kind):
                    self._owners.pop(sample, None)
        for target, (_, updated) in list(self._targets.items()):
            if updated < cutoff:
                del self._targets[target]

    def jobs(self) -> list[str]:
        """The services (``job``) that have series now."""
        with self._lock:
            self._expire(self.clock.time())
            found = {
                series.labels.get("job", "")
                for family in self._families.values()
                for series in family.series.values()
            }
        return sorted(found)

    def view(self, job: str | None = None, text: str = "") -> list[FamilyView]:
        """The families and series for the Metrics page: of ``job`` (any when ``None``;
        ``""`` is the series without one), and whose name holds ``text`` (any case); by
        name, each family's series by label."""
        needle = text.strip().lower()
        with self._lock:
            self._expire(self.clock.time())
            found = [
                (f.name, f.kind, f.help, [_copy(s) for s in f.series.values()])
                for f in self._families.values()
                if needle in f.name.lower()
            ]
        views = []
        for name, kind, text_help, series in sorted(found, key=lambda family: family[0]):
            shown = [
                _view(name, kind, s)
                for s in series
                if job is None or s.labels.get("job", "") == job
            ]
            if shown:
                shown.sort(key=lambda v: (v.job, v.instance, sorted(v.labels.items())))
                views.append(FamilyView(name, kind, text_help, tuple(shown)))
        return views

    def collect(self) -> Iterator[Metric]:
        """The series as Prometheus metric families (prometheus_client's ``Collector``)."""
        with self._lock:
            self._expire(self.clock.time())
            # Copied under the lock: apply goes on changing the series meanwhile.
            families = [
                (f.name, f.kind, f.help, [_copy(series) for series in f.series.values()])
                for f in self._families.values()
            ]
            targets = [(t, dict(info)) for t, (info, _) in self._targets.items()]
        for name, kind, text, series in sorted(families, key=lambda family: family[0]):
            metric = Metric(name, text, kind)
            for s in series:
                _samples(metric, name, kind, s)
            yield metric
        if targets:
            info = Metric("target", "Target metadata (resource attributes)", "info")
            for (job, instance), labels in sorted(targets, key=lambda t: t[0]):
                info.add_sample("target_info", {**labels, "job": job, "instance": instance}, 1.0)
            yield info


#: Names only the collector writes (``target_info``, the resources' labels).
_RESERVED: Final = ("target", "target_info")


def _kind(data: str, body: Any) -> tuple[str, bool]:
    """The Prometheus type of an OTLP metric's data, and whether its points are deltas."""
    if data == "gauge":
        return "gauge", False
    if data == "sum":
        return ("counter" if body.is_monotonic else "gauge"), body.aggregation_temporality == _DELTA
    if data == "histogram":
        return "histogram", body.aggregation_temporality == _DELTA
    return "summary", False


def _take(series: _Series, kind: str, point: Any, *, add: bool) -> None:
    """A point's value into its series: added to it (a delta) or instead of it."""
    if kind in ("gauge", "counter"):
        value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
        series.value = series.value + value if add else float(value)
    elif kind == "histogram":
        _histogram(series, point, add=add)
    else:
        series.sum, series.count = point.sum, point.count
        series.quantiles = tuple((q.quantile, q.value) for q in point.quantile_values)


def _sample_names(name: str, kind: str) -> tuple[str, ...]:
    """The names a family's samples (and its TYPE line) use."""
    if kind == "counter":
        return (name, name + "_total")
    if kind == "histogram":
        return (name, name + "_bucket", name + "_sum", name + "_count")
    if kind == "summary":
        return (name, name + "_sum", name + "_count")
    return (name,)


def _invalid(kind: str, point: Any) -> str | None:
    """Why a point cannot be shown, or ``None``."""
    if kind in ("gauge", "counter"):
        return None if point.WhichOneof("value") is not None else "points with no value"
    if kind != "histogram":
        return None
    bounds = point.explicit_bounds
    counts = point.bucket_counts
    if not counts and not bounds:
        return None  # the totals only
    if (
        len(counts) != len(bounds) + 1
        or not all(math.isfinite(b) for b in bounds)
        or any(a >= b for a, b in itertools.pairwise(bounds))
        or sum(counts) != point.count
    ):
        return "histogram points whose buckets do not add up (bounds finite and rising)"
    return None


def _with_own(labels: dict[str, str], own: dict[str, str]) -> dict[str, str]:
    """A point's labels with the collector's (``job``, ``instance``, the scope's) last;
    a point's own label of one of those names is kept as ``exported_<name>``."""
    for name in own:
        if name in labels:
            labels["exported_" + name] = labels.pop(name)
    labels.update(own)
    return labels


def _update(series: _Series, kind: str, point: Any, *, add: bool, delta: bool, new: bool) -> None:
    """A point into its series (and a counter's rate)."""
    before, before_ns = series.value, series.time_ns
    if not delta:
        series.time_ns = point.time_unix_nano
    _take(series, kind, point, add=add)
    if kind == "counter":
        rate = _rate(point, series.value, before, before_ns, delta=delta, new=new)
        if rate is not None or new:
            series.rate = rate  # a repeated point (a retry) keeps the rate it had


def _rate(
    point: Any, value: float, before: float, before_ns: int, *, delta: bool, new: bool
) -> float | None:
    """A counter's increase per second: a delta point's over its own interval, a
    cumulative one's since the point before (``None`` for the first, or after a reset)."""
    if delta:
        span = point.time_unix_nano - point.start_time_unix_nano
        increase = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
        return float(increase) / (span / 1e9) if span > 0 else None
    span = int(point.time_unix_nano) - before_ns
    if new or span <= 0:
        return None
    # Below the value before: the counter restarted from 0, as Prometheus' rate() reads it.
    increase = value - before if value >= before else value
    return increase / (span / 1e9)


@dataclass(frozen=True, slots=True)
class SeriesView:
    """One series as the Metrics page shows it."""

    job: str
    instance: str
    #: Its own labels (not job, instance or the scope's).
    labels: dict[str, str]
    updated: float
    value: float | None = None
    rate: float | None = None
    count: int = 0
    sum: float = 0.0
    #: (quantile, value): a summary's own, a histogram's estimated from its buckets.
    quantiles: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class FamilyView:
    name: str
    kind: str
    help: str
    series: tuple[SeriesView, ...]


#: Labels the page shows apart from a series' own.
_OWN_LABELS: Final = frozenset({"job", "instance", "otel_scope_name", "otel_scope_version"})
#: The quantiles the page estimates for a histogram.
_PAGE_QUANTILES: Final = (0.5, 0.9, 0.99)


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram, interpolated within its bucket as Prometheus'
    ``histogram_quantile`` does (the highest finite bound when it falls in ``+Inf``)."""
    total = sum(counts)
    if not total or not bounds:
        return None
    rank = q * total
    seen = 0
    lower = 0.0 if bounds[0] > 0 else bounds[0]
    for index, count in enumerate(counts):
        if seen + count >= rank and count:
            if index >= len(bounds):
                return bounds[-1]
            upper = bounds[index]
            low = lower if index == 0 else bounds[index - 1]
            return low + (upper - low) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _view(name: str, kind: str, series: _Series) -> SeriesView:
    job, instance = series.labels.get("job", ""), series.labels.get("instance", "")
    # atoll's own metrics name their service in a label too: the job says it already.
    labels = {
        k: v
        for k, v in series.labels.items()
        if k not in _OWN_LABELS and not (k == "service" and v == job)
    }
    if kind in ("gauge", "counter"):
        return SeriesView(job, instance, labels, series.updated, series.value, series.rate)
    quantiles = series.quantiles
    if kind == "histogram":
        estimated = [
            (q, histogram_quantile(q, series.bounds, series.counts)) for q in _PAGE_QUANTILES
        ]
        quantiles = tuple((q, v) for q, v in estimated if v is not None)
    del name
    return SeriesView(
        job,
        instance,
        labels,
        series.updated,
        count=series.count,
        sum=series.sum,
        quantiles=quantiles,
    )


def _copy(series: _Series) -> _Series:
    return _Series(
        series.labels,
        series.updated,
        series.time_ns,
        series.value,
        series.bounds,
        list(series.counts),
        series.sum,
        series.count,
        series.quantiles,
        series.rate,
    )


_RESOURCE_LABELS: Final = frozenset({"service_name", "service_namespace", "service_instance_id"})


def _target(resource: dict[str, str]) -> tuple[str, str]:
    """``(job, instance)`` from a resource's labels."""
    name = resource.get("service_name", "")
    namespace = resource.get("service_namespace")
    job = f"{namespace}/{name}" if namespace and name else name
    return job, resource.get("service_instance_id", "")


def _histogram(series: _Series, point: Any, *, add: bool) -> None:
    bounds = tuple(point.explicit_bounds)
    counts = list(point.bucket_counts) or [point.count]
    if len(counts) != len(bounds) + 1:  # malformed: keep the totals only
        bounds, counts = (), [point.count]
    if add and bounds == series.bounds and len(counts) == len(series.counts):
        series.counts = [a + b for a, b in zip(series.counts, counts, strict=True)]
        series.sum += point.sum
        series.count += point.count
    else:
        series.bounds, series.counts = bounds, counts
        series.sum, series.count = point.sum, point.count


def _float_text(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _samples(metric: Metric, name: str, kind: str, series: _Series) -> None:
    labels = series.labels
    if kind == "gauge":
        metric.add_sample(name, labels, series.value)
    elif kind == "counter":
        metric.add_sample(name + "_total", labels, series.value)
    elif kind == "histogram":
        total = 0
        for bound, count in zip((*series.bounds, math.inf), series.counts, strict=True):
            total += count
            metric.add_sample(name + "_bucket", {**labels, "le": _float_text(bound)}, total)
        metric.add_sample(name + "_sum", labels, series.sum)
        metric.add_sample(name + "_count", labels, series.count)
    else:
        for quantile, value in series.quantiles:
            metric.add_sample(name, {**labels, "quantile": _float_text(quantile)}, value)
        metric.add_sample(name + "_sum", labels, series.sum)
        metric.add_sample(name + "_count", labels, series.count)
