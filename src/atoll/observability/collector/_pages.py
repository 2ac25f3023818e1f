"""Server-rendered HTML: the trace search and the waterfall of one trace.

Every value from a span reaches the page through :func:`html.escape` (``_e``); the only
script is the package's static ``collector.js``, which reads the DOM and never builds
markup from span data, so attribute values cannot inject script.
"""

from __future__ import annotations

import html
import json
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote, urlencode

from atoll.observability.collector._metrics import FamilyView, SeriesView
from atoll.observability.collector._store import (
    LogRecord,
    ServiceInfo,
    SpanRecord,
    StoreStats,
    Trace,
    TraceSummary,
)

#: A trace larger than this shows its first spans and says so (the JSON API has all).
MAX_RENDERED_SPANS: Final = 3000
#: Likewise for a trace's log records, and for those shown in one span's details.
MAX_RENDERED_LOGS: Final = 2000
#: The Metrics page shows this many series at most (a page of 10,000 is megabytes).
MAX_RENDERED_SERIES: Final = 2000
MAX_SPAN_LOGS: Final = 200

#: Distinct, readable on white and on dark grey; no pure red, which means "error".
_PALETTE: Final = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#d4a017",
    "#ff9da7",
    "#9c755f",
    "#5b8ff9",
    "#8cc152",
    "#a0522d",
    "#6f5bd4",
)
#: Inline, so that the browser asks the collector for nothing it does not serve.
_FAVICON: Final = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E"
    "%3Ccircle cx='8' cy='8' r='7.5' fill='%234e79a7'/%3E"
    "%3Ccircle cx='8' cy='8' r='4' fill='%232bb3a3'/%3E%3C/svg%3E"
)
LOOKBACKS: Final = (
    ("", "All stored"),
    ("5m", "Last 5 minutes"),
    ("15m", "Last 15 minutes"),
    ("1h", "Last hour"),
    ("6h", "Last 6 hours"),
    ("24h", "Last 24 hours"),
    ("7d", "Last 7 days"),
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


class Palette:
    """A colour per service: by position among all known services, so that up to a dozen
    services never share a colour and each keeps its colour from page to page."""

    __slots__ = ("_colors",)

    def __init__(self, services: Iterable[str]) -> None:
        names = sorted(set(services))
        self._colors = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}

    def __call__(self, service: str) -> str:
        found = self._colors.get(service)
        if found is None:
            found = _PALETTE[zlib.crc32(service.encode()) % len(_PALETTE)]
        return found


def format_duration(ns: int) -> str:
    if ns >= 60_000_000_000:
        minutes, rest = divmod(ns / 1e9, 60)
        return f"{int(minutes)} min {rest:.0f} s"
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.3g} s" if ns < 10_000_000_000 else f"{ns / 1e9:.1f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.3g} ms" if ns < 100_000_000 else f"{ns / 1e6:.0f} ms"
    if ns >= 1_000:
        return f"{ns / 1e3:.3g} µs"
    return f"{ns} ns"


def format_time(ns: int) -> str:
    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"


def format_ago(ns: int, now: float) -> str:
    seconds = now - ns / 1e9
    if seconds < 0:
        return "in the future"
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _time_tag(ns: int) -> str:
    return f'<time data-ns="{ns}" datetime="{_e(format_time(ns))}">{_e(format_time(ns))}</time>'


def _service_chip(color: Palette, service: str, extra: str = "") -> str:
    return (
        f'<span class="svc" style="--c:{color(service)}">'
        f'<i class="dot"></i>{_e(service)}{extra}</span>'
    )


def _layout(title: str, body: str, stats: StoreStats | None, *, page: str) -> str:
    footer = ""
    if stats is not None:
        footer = (
            f'<span title="spans stored now">{stats.spans:,} spans stored</span>'
            f'<span title="log records stored now">{stats.logs:,} log records</span>'
            f'<span title="database file size">{stats.file_bytes / 1e6:,.1f} MB</span>'
        )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · atoll traces</title>
<link rel="icon" href="{_FAVICON}">
<link rel="stylesheet" href="/static/collector.css">
<script src="/static/collector.js" defer></script>
</head>
<body class="page-{page}">
<header class="top">
  <a class="brand" href="/"><span class="logo" aria-hidden="true"></span>atoll
    <span>traces</span></a>
  <nav><a href="/">Search</a><a href="/logs">Logs</a><a href="/series">Metrics</a>
    <a href="/api/docs">API</a></nav>
  <div class="store-stats">{footer}</div>
</header>
<main>
{body}
</main>
</body>
</html>
"""


# --- search ----------------------------------------------------------------------


def _option(value: str, label: str, selected: str | None) -> str:
    mark = " selected" if value == (selected or "") else ""
    return f'<option value="{_e(value)}"{mark}>{_e(label)}</option>'


def _search_form(services: Sequence[ServiceInfo], form: dict[str, str]) -> str:
    service = form.get("service", "")
    operation = form.get("operation", "")
    service_options = [_option("", "All services", service)]
    service_options += [_option(s.name, s.name, service) for s in services]
    if service and service not in {s.name for s in services}:
        service_options.append(_option(service, service, service))
    chosen = [s for s in services if s.name == service] if service else list(services)
    names = sorted({op for s in chosen for op in s.operations})
    operation_options = [_option("", "All operations", operation)]
    operation_options += [_option(name, name, operation) for name in names]
    if operation and operation not in names:
        operation_options.append(_option(operation, operation, operation))
    operations_json = _e(json.dumps({s.name: s.operations for s in services}))
    lookback = form.get("lookback", "")
    status = form.get("status", "")
    # A time range given in the URL (start/end, Unix ms or ISO 8601) survives a new search.
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{_e(form[name])}">'
        for name in ("start", "end")
        if form.get(name)
    )
    return f"""
<form class="search" method="get" action="/" id="search">
  <label class="f-service">Service
    <select name="service" id="f-service">{"".join(service_options)}</select></label>
  <label class="f-operation">Operation
    <select name="operation" id="f-operation" data-operations="{operations_json}">{
        "".join(operation_options)
    }</select></label>
  <label class="f-attrs">Attributes
    <input name="attrs" id="f-attrs" value="{_e(form.get("attrs", ""))}"
      placeholder='order.id=42 http.route="/orders"' autocomplete="off" spellcheck="false"></label>
  <label class="f-num">Min duration
    <input name="min_duration_ms" id="f-min" type="number" min="0" step="any"
      value="{_e(form.get("min_duration_ms", ""))}" placeholder="ms"></label>
  <label class="f-num">Max duration
    <input name="max_duration_ms" id="f-max" type="number" min="0" step="any"
      value="{_e(form.get("max_duration_ms", ""))}" placeholder="ms"></label>
  <label class="f-status">Status
    <select name="status" id="f-status">{_option("", "Any", status)}{_option("ok", "OK", status)}{
        _option("error", "Error", status)
    }</select></label>
  <label class="f-lookback">Time
    <select name="lookback" id="f-lookback">{
        "".join(_option(v, label, lookback) for v, label in LOOKBACKS)
    }</select></label>
  <label class="f-num f-limit">Limit
    <input name="limit" id="f-limit" type="number" min="1" max="1000"
      value="{_e(form.get("limit", "20"))}"></label>
  {hidden}<button type="submit" id="f-submit">Find traces</button>
</form>"""


def _scatter(traces: Sequence[TraceSummary], color: Palette) -> str:
    """Duration over start time, one dot per trace; errors in red. Click opens the trace."""
    if len(traces) < 2:
        return ""
    width, height, pad = 1000, 160, 28
    starts = [t.start_ns for t in traces]
    low, high = min(starts), max(starts)
    longest = max(t.duration_ns for t in traces) or 1
    span = (high - low) or 1
    dots = []
    for t in traces:
        x = pad + (t.start_ns - low) / span * (width - 2 * pad)
        y = height - pad - (t.duration_ns / longest) * (height - 2 * pad)
        r = 4 + min(6, t.span_count**0.5)
        cls = "dot err" if t.error_count else "dot"
        dots.append(
            f'<a href="/traces/{t.trace_id}"><circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}"'
            f' r="{r:.1f}" style="--c:{color(t.root_service)}"><title>'
            f"{_e(t.root_service)}: {_e(t.root_name)} · {_e(format_duration(t.duration_ns))}"
            f" · {t.span_count} spans</title></circle></a>"
        )
    return f"""
<figure class="scatter" aria-label="Trace durations over time">
  <svg viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img">
    <line class="axis" x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}"/>
    <line class="axis" x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}"/>
    <text class="tick" x="{pad + 4}" y="{pad - 8}">{_e(format_duration(longest))}</text>
    <text class="tick" x="{pad}" y="{height - 8}">{_e(format_time(low))}</text>
    <text class="tick end" x="{width - pad}" y="{height - 8}">{_e(format_time(high))}</text>
    {"".join(dots)}
  </svg>
</figure>"""


def _result_rows(traces: Sequence[TraceSummary], now: float, color: Palette) -> str:
    longest = max((t.duration_ns for t in traces), default=1) or 1
    rows = []
    for t in traces:
        chips = "".join(
            _service_chip(color, s.name, f' <span class="n">{s.span_count}</span>')
            for s in t.services
        )
        errors = (
            f' <span class="badge err" title="spans with error status">{t.error_count} error'
            f"{'s' if t.error_count != 1 else ''}</span>"
            if t.error_count
            else ""
        )
        missing = (
            ' <span class="badge warn" title="the root span was not received">no root</span>'
            if t.root_missing
            else ""
        )
        width = max(0.5, t.duration_ns / longest * 100)
        rows.append(
            f"""<tr class="trace-row{" has-error" if t.error_count else ""}" data-trace="{
                t.trace_id
            }">
  <td class="t-root"><a class="trace-link" href="/traces/{t.trace_id}">{
                _service_chip(color, t.root_service)
            }<span class="op">{_e(t.root_name)}</span></a>{missing}
    <div class="tid mono">{t.trace_id}</div></td>
  <td class="t-services">{chips}</td>
  <td class="t-spans">{t.span_count}{errors}</td>
  <td class="t-duration"><div class="dur"><span class="dur-bar" style="width:{width:.1f}%"></span>
    <span class="dur-text">{_e(format_duration(t.duration_ns))}</span></div></td>
  <td class="t-start">{_time_tag(t.start_ns)}<div class="ago">{
                _e(format_ago(t.start_ns, now))
            }</div></td>
</tr>"""
        )
    return "".join(rows)


def search_page(
    *,
    services: Sequence[ServiceInfo],
    form: dict[str, str],
    traces: Sequence[TraceSummary] | None,
    error: str | None,
    stats: StoreStats | None,
    now: float,
) -> str:
    color = Palette(s.name for s in services)
    parts = [_search_form(services, form)]
    if error is not None:
        parts.append(f'<p class="notice error" role="alert">{_e(error)}</p>')
    elif traces is not None and not traces:
        hint = (
            "No traces stored yet. Point an OpenTelemetry exporter at"
            " <code>http://&lt;this host&gt;:4318/v1/traces</code> (OTLP/HTTP)."
            if not services
            else "No trace matches. Widen the time range or remove a filter."
        )
        parts.append(f'<p class="notice empty" id="no-results">{hint}</p>')
    elif traces:
        count = len(traces)
        parts.append(
            f'<section class="results"><div class="results-head"><h2>{count} trace'
            f"{'s' if count != 1 else ''}</h2><span>most recent first</span></div>"
            f"{_scatter(traces, color)}"
            '<table class="traces" id="results"><thead><tr><th>Root span</th><th>Services</th>'
            "<th>Spans</th><th>Duration</th><th>Started</th></tr></thead>"
            f"<tbody>{_result_rows(traces, now, color)}</tbody></table></section>"
        )
    return _layout("Search", "".join(parts), stats, page="search")


# --- logs ----------------------------------------------------------------------------

#: The least severities the log search offers, as level names ``build_log_query`` takes.
SEVERITIES: Final = (
    ("", "Any"),
    ("debug", "Debug and up"),
    ("info", "Info and up"),
    ("warn", "Warn and up"),
    ("error", "Error and up"),
)


def _log_rows(logs: Sequence[LogRecord], color: Palette) -> str:
    rows = []
    for record in logs:
        level = record.level
        badge_class = {"error": "err", "fatal": "err", "warn": "warn"}.get(level, "lvl")
        trace = (
            f'<a class="mono trace-link" href="/traces/{_e(record.trace_id)}'
            f'{"#span-" + _e(record.span_id) if record.span_id else ""}">'
            f"{_e(record.trace_id[:16])}…</a>"
            if record.trace_id
            else '<span class="none">none</span>'
        )
        attributes = _log_attributes_html(record.attributes)
        rows.append(
            f'<tr class="log-row l-{_e(level)}">'
            f'<td class="l-time">{_time_tag(record.time_ns)}</td>'
            f'<td><span class="badge {badge_class}">{_e(record.severity_text or level)}</span></td>'
            f"<td>{_service_chip(color, record.service)}</td>"
            f'<td class="l-body">{_log_body_html(record.body)}{attributes}</td>'
            f'<td class="l-trace">{trace}</td></tr>'
        )
    return "".join(rows)


def logs_page(
    *,
    services: Sequence[ServiceInfo],
    form: dict[str, str],
    logs: Sequence[LogRecord] | None,
    error: str | None,
    stats: StoreStats | None,
) -> str:
    """The log search: service, least severity, text, time; newest first, each record
    with a link to its trace (and span)."""
    color = Palette(s.name for s in services)
    service = form.get("service", "")
    severity = form.get("severity", "")
    lookback = form.get("lookback", "")
    service_options = [_option("", "All services", service)]
    service_options += [_option(s.name, s.name, service) for s in services]
    if service and service not in {s.name for s in services}:
        service_options.append(_option(service, service, service))
    parts = [
        f"""
<form class="search" method="get" action="/logs" id="log-search">
  <label class="f-service">Service
    <select name="service" id="l-service">{"".join(service_options)}</select></label>
  <label class="f-status">Severity
    <select name="severity" id="l-severity">{
            "".join(_option(v, label, severity) for v, label in SEVERITIES)
        }</select></label>
  <label class="f-attrs">Text
    <input name="text" id="l-text" value="{_e(form.get("text", ""))}"
      placeholder="a part of the message" autocomplete="off" spellcheck="false"></label>
  <label class="f-lookback">Time
    <select name="lookback" id="l-lookback">{
            "".join(_option(v, label, lookback) for v, label in LOOKBACKS)
        }</select></label>
  <label class="f-num f-limit">Limit
    <input name="limit" id="l-limit" type="number" min="1" max="1000"
      value="{_e(form.get("limit", "100"))}"></label>
  <button type="submit" id="l-submit">Find logs</button>
</form>"""
    ]
    if error is not None:
        parts.append(f'<p class="notice error" role="alert">{_e(error)}</p>')
    elif logs is not None and not logs:
        hint = (
            "No log record matches. Widen the time range or remove a filter."
            if stats is None or stats.logs
            else "No log records stored yet. Point an OpenTelemetry log exporter at"
            " <code>http://&lt;this host&gt;:4318/v1/logs</code> (OTLP/HTTP)."
        )
        parts.append(f'<p class="notice empty" id="no-logs">{hint}</p>')
    elif logs:
        count = len(logs)
        parts.append(
            f'<section class="results"><div class="results-head"><h2>{count} log record'
            f"{'s' if count != 1 else ''}</h2><span>most recent first</span></div>"
            '<table class="traces logs-table" id="log-results"><thead><tr><th>Time</th>'
            "<th>Level</th><th>Service</th><th>Message</th><th>Trace</th></tr></thead>"
            f"<tbody>{_log_rows(logs, color)}</tbody></table></section>"
        )
    return _layout("Logs", "".join(parts), stats, page="logs")


# --- metrics -----------------------------------------------------------------------


#: ``*_seconds`` metrics that hold a Unix time, by the Prometheus naming habits.
_UNIX_TIME_NAME: Final = re.compile(
    r"_(?:timestamp|time|not_after|not_before|next_update|expiry|expires|expiration)_seconds$"
)
_EPOCH_2001: Final = 1e9  # 2001-09-09 as Unix time
_YEAR_9999: Final = 253402300799.0


def _format_seconds(value: float, name: str) -> str:
    if _UNIX_TIME_NAME.search(name) or _EPOCH_2001 <= value <= _YEAR_9999:
        # A moment, not a duration (process_start_time_seconds, a certificate's
        # not_after): over 1e9 s, a "duration" of 31 years is one too.
        if 0 <= value <= _YEAR_9999:
            return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    elif abs(value) < _YEAR_9999:
        sign = "-" if value < 0 else ""
        return sign + format_duration(round(abs(value) * 1e9))
    return f"{value:.4g} s"


def format_number(value: float, name: str = "") -> str:
    """A metric value for reading: durations for ``*_seconds``, sizes for ``*_bytes``,
    whole numbers without decimals, others to four significant digits."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if name.endswith("_seconds"):
        return _format_seconds(value, name)
    if name.endswith("_bytes") and abs(value) >= 1024:
        unit = "B"
        for larger in ("KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024:
                break
            value /= 1024
            unit = larger
        return f"{value:.4g} {unit}"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _series_value(kind: str, name: str, series: SeriesView) -> str:
    if kind == "counter":
        rate = (
            f' <span class="m-rate">{series.rate:.3g}/s</span>' if series.rate is not None else ""
        )
        return f'<span class="m-value">{format_number(series.value or 0.0)}</span>{rate}'
    if kind == "gauge":
        return f'<span class="m-value">{format_number(series.value or 0.0, name)}</span>'
    parts = [f'<span class="m-value">{format_number(series.count)}</span> observed']
    if series.count:
        parts.append(f"mean {format_number(series.sum / series.count, name)}")
    parts += [
        f'<span class="m-q">p{q * 100:g} {format_number(v, name)}</span>'
        for q, v in series.quantiles
    ]
    return " · ".join(parts)


def _family_html(family: FamilyView, color: Palette) -> str:
    rows = []
    for series in family.series:
        labels = " ".join(
            f'<span class="m-label">{_e(k)}=<b>{_e(v)}</b></span>'
            for k, v in sorted(series.labels.items())
        )
        rows.append(
            f'<tr class="series-row"><td>{_service_chip(color, series.job or "(none)")}'
            f'<span class="m-instance mono">{_e(series.instance)}</span></td>'
            f'<td class="m-labels">{labels or "<span class=none>none</span>"}</td>'
            f'<td class="m-values">{_series_value(family.kind, family.name, series)}</td></tr>'
        )
    return (
        f'<section class="metric-family" id="m-{_e(family.name)}" data-kind="{_e(family.kind)}">'
        f'<h3><span class="mono">{_e(family.name)}</span>'
        f'<span class="badge lvl">{_e(family.kind)}</span></h3>'
        f'<p class="m-help">{_e(family.help)}</p>'
        '<table class="traces metrics-table"><thead><tr><th>Service</th><th>Labels</th>'
        f"<th>Value</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def service_value(job: str) -> str:
    """The Metrics page's service option for ``job``: its name, but ``"="`` for the
    series without one, and ``"="`` before a name that starts with it, so that no option
    shares its value with "All services" (``""``) or with another service."""
    return "=" + job if not job or job.startswith("=") else job


def service_filter(value: str) -> str | None:
    """The ``job`` a service option stands for (:func:`service_value` undone); ``None``
    for all services."""
    if not value:
        return None
    return value.removeprefix("=")


def metrics_page(
    *,
    jobs: Sequence[str],
    form: dict[str, str],
    families: Sequence[FamilyView] | None,
    stats: StoreStats | None,
) -> str:
    """The latest value of every metric series received over OTLP (``families`` is
    ``None`` when the collector takes no metrics): service and name filters; counters
    with their rate, histograms with estimated quantiles."""
    color = Palette(jobs)
    service = form.get("service", "")
    options = [_option("", "All services", service)]
    options += [_option(service_value(job), job or "(none)", service) for job in jobs]
    wanted = service_filter(service)
    if wanted is not None and wanted not in jobs:
        options.append(_option(service, wanted or "(none)", service))
    parts = [
        f"""
<form class="search" method="get" action="/series" id="metric-search">
  <label class="f-service">Service
    <select name="service" id="m-service">{"".join(options)}</select></label>
  <label class="f-attrs">Name
    <input name="name" id="m-name" value="{_e(form.get("name", ""))}"
      placeholder="a part of the metric's name" autocomplete="off" spellcheck="false"></label>
  <button type="submit" id="m-submit">Show metrics</button>
</form>"""
    ]
    if families is None:
        parts.append(
            '<p class="notice empty" id="no-metrics">This collector was started without'
            " OTLP metrics (<code>--max-metric-series none</code>).</p>"
        )
    elif not families:
        hint = (
            "No metric matches. Choose another service or a shorter name."
            if jobs
            else "No metrics received yet. atoll services and the gateway push theirs"
            " every 10 s under <code>atoll up</code>; for other programs, point an"
            " OpenTelemetry metric exporter at <code>http://&lt;this host&gt;:4318/v1/metrics"
            "</code> (OTLP/HTTP)."
        )
        parts.append(f'<p class="notice empty" id="no-metrics">{hint}</p>')
    else:
        count = sum(len(f.series) for f in families)
        shown, room = [], MAX_RENDERED_SERIES
        for family in families:
            if room <= 0:
                break
            kept = family.series[:room]
            room -= len(kept)
            shown.append(FamilyView(family.name, family.kind, family.help, kept))
        cut = ""
        if count > MAX_RENDERED_SERIES:
            cut = (
                f'<p class="notice" id="metrics-cut">Showing the first {MAX_RENDERED_SERIES:,}'
                f" of {count:,} series: choose a service or a part of a name to see the rest"
                ' (or all of them in <a href="/metrics">Prometheus format</a>).</p>'
            )
        parts.append(
            f'<section class="results" id="metric-results"><div class="results-head"><h2>'
            f"{len(families)} metric{'s' if len(families) != 1 else ''}, {count:,} series</h2>"
            '<span>latest values; <a href="/metrics">Prometheus format</a></span></div>'
            f"{cut}{''.join(_family_html(f, color) for f in shown)}</section>"
        )
    return _layout("Metrics", "".join(parts), stats, page="metrics")


# --- waterfall -------------------------------------------------------------------


def order_spans(spans: Sequence[SpanRecord]) -> list[tuple[SpanRecord, int, bool]]:
    """Depth-first by parent, siblings by start: (span, depth, has_children).

    Spans whose parent is not stored become roots. Cycles (which a broken client could
    send) cannot loop: a span is placed once, and any left over are added as roots.
    """
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for span in spans:
        parent = span.parent_span_id
        if parent is None or parent not in by_id or parent == span.span_id:
            roots.append(span)
        else:
            children.setdefault(parent, []).append(span)
    order: list[tuple[SpanRecord, int, bool]] = []
    placed: set[str] = set()

    def walk(starts: Iterable[SpanRecord]) -> None:
        stack = [(s, 0) for s in sorted(starts, key=_start_key, reverse=True)]
        while stack:
            span, depth = stack.pop()
            if span.span_id in placed:
                continue
            placed.add(span.span_id)
            kids = sorted(children.get(span.span_id, ()), key=_start_key, reverse=True)
            order.append((span, depth, bool(kids)))
            stack.extend((kid, depth + 1) for kid in kids)

    walk(roots)
    left = [s for s in spans if s.span_id not in placed]
    while left:
        walk([left[0]])
        left = [s for s in left if s.span_id not in placed]
    return order


def _start_key(span: SpanRecord) -> tuple[int, str]:
    return (span.start_ns, span.span_id)


def _value_html(value: Any) -> str:
    if isinstance(value, bool):
        return f'<span class="v-bool">{"true" if value else "false"}</span>'
    if isinstance(value, int | float):
        return f'<span class="v-num">{_e(value)}</span>'
    if isinstance(value, str):
        if "\n" in value or len(value) > 160:
            return f'<pre class="v-long">{_e(value)}</pre>'
        return f'<span class="v-str">{_e(value)}</span>'
    if value is None:
        return '<span class="v-null">null</span>'
    return f'<code class="v-json">{_e(json.dumps(value, ensure_ascii=False))}</code>'


def _attribute_table(attributes: dict[str, Any], cls: str = "attrs") -> str:
    if not attributes:
        return '<p class="none">none</p>'
    rows = "".join(
        f'<tr><th scope="row">{_e(key)}</th><td>{_value_html(attributes[key])}</td></tr>'
        for key in sorted(attributes)
    )
    return f'<table class="{cls}">{rows}</table>'


def _events_html(span: SpanRecord) -> str:
    items = []
    for event in span.events:
        offset = int(event.get("time_unix_nano") or 0) - span.start_ns
        attributes = dict(event.get("attributes") or {})
        name = str(event.get("name", ""))
        is_exception = name == "exception"
        summary = ""
        if is_exception:
            kind = attributes.get("exception.type", "")
            message = attributes.get("exception.message", "")
            summary = f' <span class="exc">{_e(kind)}{": " if message else ""}{_e(message)}</span>'
            trace_text = attributes.pop("exception.stacktrace", None)
        else:
            trace_text = None
        stack = (
            '<details class="stack"><summary>Stack trace</summary>'
            f"<pre>{_e(trace_text)}</pre></details>"
            if trace_text
            else ""
        )
        items.append(
            f'<li class="event{" exception" if is_exception else ""}">'
            f'<span class="ev-time mono">+{_e(format_duration(max(0, offset)))}</span>'
            f'<span class="ev-name">{_e(name)}</span>{summary}'
            f"{_attribute_table(attributes, 'attrs small') if attributes else ''}{stack}</li>"
        )
    return f'<ol class="events">{"".join(items)}</ol>'


def _log_body_html(body: Any) -> str:
    if isinstance(body, str):
        if "\n" in body or len(body) > 240:
            return f'<pre class="log-body">{_e(body)}</pre>'
        return f'<span class="log-body">{_e(body)}</span>'
    return _value_html(body)


def _log_attributes_html(attributes: dict[str, Any]) -> str:
    """A record's attributes, folded: its own first (``order_id``...), then the code
    location, which every record has."""
    if not attributes:
        return ""
    own = sorted(k for k in attributes if not k.startswith("code."))
    names = ", ".join(own[:4]) + (f" and {len(own) - 4} more" if len(own) > 4 else "")
    label = f"{len(attributes)} attributes" + (f": {names}" if names else "")
    return (
        f'<details class="log-attrs"><summary>{_e(label)}</summary>'
        f"{_attribute_table(attributes, 'attrs small')}</details>"
    )


def _logs_html(logs: Sequence[LogRecord], origin: int, color: Palette | None = None) -> str:
    """Log records as a list, times relative to ``origin``; with ``color``, each names
    its service and links to its span (the trace's list), else not (a span's own)."""
    items = []
    for record in logs:
        level = record.level
        badge_class = {"error": "err", "fatal": "err", "warn": "warn"}.get(level, "lvl")
        label = record.severity_text or level
        where = ""
        if color is not None:
            where = _service_chip(color, record.service)
            if record.span_id:
                where += (
                    f' <a class="mono span-ref" href="#span-{_e(record.span_id)}"'
                    f' data-link-span="{_e(record.span_id)}">{_e(record.span_id)}</a>'
                )
        attributes = _log_attributes_html(record.attributes)
        items.append(
            f'<li class="log l-{_e(level)}">'
            f'<span class="ev-time mono">+{_e(format_duration(max(0, record.time_ns - origin)))}'
            f'</span><span class="badge {badge_class}">{_e(label)}</span> {where}'
            f" {_log_body_html(record.body)}{attributes}</li>"
        )
    return f'<ol class="logs">{"".join(items)}</ol>'


def _links_html(span: SpanRecord, trace_id: str) -> str:
    items = []
    for link in span.links:
        tid = str(link.get("trace_id", ""))
        sid = str(link.get("span_id", ""))
        here = tid == trace_id
        where = "in this trace" if here else "another trace"
        href = f"#span-{quote(sid)}" if here else f"/traces/{quote(tid)}#span-{quote(sid)}"
        attributes = dict(link.get("attributes") or {})
        items.append(
            f'<li class="link"><a class="mono" href="{_e(href)}" data-link-span="{_e(sid)}">'
            f'{_e(tid[:8])}…/{_e(sid)}</a> <span class="where">{where}</span>'
            f"{_attribute_table(attributes, 'attrs small') if attributes else ''}</li>"
        )
    return f'<ul class="links">{"".join(items)}</ul>'


def _detail(span: SpanRecord, trace: Trace, origin: int, logs: Sequence[LogRecord]) -> str:
    resource = trace.resources.get(span.resource_id)
    parent = (
        f'<a class="mono" href="#span-{_e(span.parent_span_id)}">{_e(span.parent_span_id)}</a>'
        if span.parent_span_id
        else "none (root)"
    )
    status = _e(span.status.upper())
    if span.status_message:
        status += f' <span class="status-msg">{_e(span.status_message)}</span>'
    facts = [
        ("Span ID", f'<span class="mono">{_e(span.span_id)}</span>'),
        ("Parent", parent),
        ("Kind", _e(span.kind)),
        ("Status", f'<span class="status s-{_e(span.status)}">{status}</span>'),
        ("Start", f"+{_e(format_duration(span.start_ns - origin))} · {_time_tag(span.start_ns)}"),
        ("Duration", _e(format_duration(span.duration_ns))),
    ]
    if span.scope_name:
        facts.append(("Scope", _e(f"{span.scope_name} {span.scope_version}".strip())))
    if span.trace_state:
        facts.append(("Trace state", f'<span class="mono">{_e(span.trace_state)}</span>'))
    if span.flags & 0x100:
        facts.append(("Parent is remote", "yes" if span.flags & 0x200 else "no"))
    if span.dropped:
        dropped = ", ".join(f"{v} {k}" for k, v in span.dropped.items() if v)
        facts.append(("Dropped", _e(dropped)))
    facts_html = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    sections = [
        f'<dl class="facts">{facts_html}</dl>',
        f"<h4>Attributes</h4>{_attribute_table(span.attributes)}",
    ]
    if span.events:
        sections.append(
            f'<h4>Events <span class="n">{len(span.events)}</span></h4>{_events_html(span)}'
        )
    if span.links:
        sections.append(
            f'<h4>Links <span class="n">{len(span.links)}</span></h4>'
            f"{_links_html(span, trace.trace_id)}"
        )
    if logs:
        more = (
            f'<p class="notice">The first {MAX_SPAN_LOGS}; the trace\'s list below has all.</p>'
            if len(logs) > MAX_SPAN_LOGS
            else ""
        )
        sections.append(
            f'<h4>Logs <span class="n">{len(logs)}</span></h4>{more}'
            f"{_logs_html(logs[:MAX_SPAN_LOGS], span.start_ns)}"
        )
    if resource is not None:
        sections.append(
            f'<details class="resource"><summary>Resource · {_e(resource.service)}</summary>'
            f"{_attribute_table(resource.attributes, 'attrs small')}</details>"
        )
    return "".join(sections)


def _tick_step(total: int) -> int:
    """A round step (1, 2 or 5 times a power of ten) that cuts ``total`` in about five."""
    step = 1
    while max(total, 1) / step > 5:
        for factor in (2, 5 / 2, 2):
            step = round(step * factor)
            if total / step <= 5:
                break
    return step


def _ticks(total: int) -> str:
    """Labels at round steps, about five of them, and the total at the end."""
    total = max(total, 1)
    step = _tick_step(total)
    marks = [
        f'<span class="tick" style="left:{value / total * 100:.3f}%">'
        f"{_e(format_duration(value))}</span>"
        for value in range(0, total + 1, step)
        if value / total <= 0.92 or value == 0
    ]
    marks.append(f'<span class="tick end" style="left:100%">{_e(format_duration(total))}</span>')
    return "".join(marks)


def _span_badges(span: SpanRecord, logs: Sequence[LogRecord]) -> str:
    """The marks after a span's name: error, links, its log records (coloured by the
    worst), and its kind when it crosses a process."""
    badges = ""
    if span.status == "error":
        badges += '<span class="badge err" title="error status">error</span>'
    if span.links:
        badges += f'<span class="badge link" title="links">⇢ {len(span.links)}</span>'
    if logs:
        worst = max(record.severity for record in logs)
        level = "err" if worst >= 17 else "warn" if worst >= 13 else "lvl"
        badges += (
            f'<span class="badge {level} logs-badge" title="log records">logs {len(logs)}</span>'
        )
    if span.kind in ("producer", "consumer", "client", "server"):
        badges += f'<span class="kind">{_e(span.kind)}</span>'
    return badges


def trace_page(
    trace: Trace, *, services: Iterable[str], stats: StoreStats | None, now: float
) -> str:
    color = Palette([*services, *(s.name for s in trace.summary.services)])
    summary = trace.summary
    origin = summary.start_ns
    total = max(summary.duration_ns, 1)
    ordered = order_spans(trace.spans)
    shown = ordered[:MAX_RENDERED_SPANS]
    logs_by_span: dict[str, list[LogRecord]] = {}
    for record in trace.logs:
        if record.span_id is not None:
            logs_by_span.setdefault(record.span_id, []).append(record)
    rows = []
    for span, depth, has_children in shown:
        left = (span.start_ns - origin) / total * 100
        width = span.duration_ns / total * 100
        span_color = color(span.service)
        error = span.status == "error"
        label_side = " label-left" if left + width > 78 else ""
        marks = "".join(
            f'<i class="ev{" ev-exc" if e.get("name") == "exception" else ""}" style="left:'
            f'{(int(e.get("time_unix_nano") or 0) - origin) / total * 100:.3f}%" title="'
            f'{_e(e.get("name", ""))}"></i>'
            for e in span.events
        )
        twisty = (
            '<button class="twisty" type="button" aria-label="Collapse children"'
            ' title="Collapse children"></button>'
            if has_children
            else '<span class="twisty-pad"></span>'
        )
        badges = _span_badges(span, logs_by_span.get(span.span_id, ()))
        search_text = _e(
            f"{span.service} {span.name} {json.dumps(span.attributes, ensure_ascii=False)}".lower()
        )
        row_class = "span-row is-error" if error else "span-row"
        duration = _e(format_duration(span.duration_ns))
        rows.append(
            f'<div class="{row_class}" id="span-{span.span_id}" data-span="{span.span_id}"'
            f' data-depth="{depth}" data-search="{search_text}" tabindex="0" role="treeitem"'
            f' aria-level="{depth + 1}" aria-expanded="false"'
            f' style="--depth:{depth};--c:{span_color}">\n'
            f'  <div class="wf-name">{twisty}<span class="svc-name">{_e(span.service)}</span>'
            f'<span class="op">{_e(span.name)}</span>{badges}</div>\n'
            f'  <div class="wf-time"><div class="bar{label_side}"'
            f' style="left:{left:.3f}%;width:{width:.3f}%">'
            f'<span class="bar-label">{duration}</span></div>{marks}</div>\n'
            f"</div>\n"
            f'<div class="span-detail" id="detail-{span.span_id}" style="--depth:{depth}"'
            f" hidden>{_detail(span, trace, origin, logs_by_span.get(span.span_id, ()))}</div>\n"
        )
    cut = ""
    if len(ordered) > len(shown):
        cut = (
            f'<p class="notice">Showing the first {len(shown)} of {len(ordered)} spans;'
            f' <a href="/api/traces/{trace.trace_id}">the JSON</a> has them all.</p>'
        )
    chips = "".join(
        _service_chip(color, s.name, f' <span class="n">{s.span_count}</span>')
        for s in summary.services
    )
    # Grid lines in the timeline fall on the ticks.
    grid = _tick_step(max(summary.duration_ns, 1)) / max(summary.duration_ns, 1) * 100
    plural = "s" if summary.error_count != 1 else ""
    errors = (
        f'<span class="badge err">{summary.error_count} error{plural}</span>'
        if summary.error_count
        else '<span class="badge ok">no errors</span>'
    )
    ago = _e(format_ago(summary.start_ns, now))
    started = f'{_time_tag(summary.start_ns)} <span class="ago">{ago}</span>'
    root = (
        f"{_service_chip(color, summary.root_service)}"
        f' <span class="op">{_e(summary.root_name)}</span>'
    )
    if not trace.spans:
        missing = (
            '<p class="notice warn" id="no-spans">No span of this trace is stored (sampled'
            " out, sent elsewhere or not received yet): only its log records.</p>"
        )
    elif summary.root_missing:
        missing = (
            '<p class="notice warn">The root span of this trace was not received (yet);'
            " spans whose parent is missing are shown at the top level.</p>"
        )
    else:
        missing = ""
    logs_cut = (
        f'<p class="notice">Showing the first {MAX_RENDERED_LOGS} of {len(trace.logs)} log'
        f' records; <a href="/api/logs?trace_id={trace.trace_id}&amp;limit=1000">the JSON</a>'
        " has more.</p>"
        if len(trace.logs) > MAX_RENDERED_LOGS
        else ""
    )
    trace_logs = (
        '<section class="trace-logs" id="logs">'
        f'<h2>Logs <span class="n">{len(trace.logs)}</span></h2>{logs_cut}'
        f"{_logs_html(trace.logs[:MAX_RENDERED_LOGS], origin, color)}</section>"
        if trace.logs
        else ""
    )
    body = f"""
<section class="trace-head">
  <div class="crumbs"><a href="/" id="back">← Search</a></div>
  <h1>{root}</h1>
  <dl class="facts trace-facts">
    <div><dt>Trace ID</dt><dd class="mono" id="trace-id">{trace.trace_id}</dd></div>
    <div><dt>Started</dt><dd>{started}</dd></div>
    <div><dt>Duration</dt><dd>{_e(format_duration(summary.duration_ns))}</dd></div>
    <div><dt>Spans</dt><dd id="span-count">{summary.span_count}</dd></div>
    <div><dt>Logs</dt><dd id="log-count">{len(trace.logs)}</dd></div>
    <div><dt>Status</dt><dd>{errors}</dd></div>
    <div class="wide"><dt>Services</dt><dd>{chips}</dd></div>
  </dl>
  {missing}
  <div class="tools">
    <input type="search" id="span-filter" autocomplete="off"
      placeholder="Highlight spans: service, operation or attribute">
    <button type="button" data-action="expand-details">Open all details</button>
    <button type="button" data-action="collapse-details">Close all details</button>
    <a class="button" href="/api/traces/{trace.trace_id}">JSON</a>
  </div>
</section>
{cut}
<section class="waterfall" role="tree" aria-label="Spans of trace {trace.trace_id}"
  style="--grid:{grid:.4f}%">
  <div class="wf-head"><div class="wf-name">Service · operation</div>
    <div class="wf-time">{_ticks(summary.duration_ns)}</div></div>
  <div class="wf-rows" id="spans">
{"".join(rows)}
  </div>
</section>
{trace_logs}"""
    return _layout(f"{summary.root_service}: {summary.root_name}", body, stats, page="trace")


def not_found_page(trace_id: str, *, stats: StoreStats | None) -> str:
    body = (
        f'<section class="trace-head"><div class="crumbs"><a href="/">← Search</a></div>'
        f'<p class="notice error" id="not-found">No span of trace <span class="mono">'
        f"{_e(trace_id)}</span> is stored. It may not have arrived yet, or retention removed"
        " it.</p></section>"
    )
    return _layout("Trace not found", body, stats, page="trace")


def search_link(**params: str) -> str:
    return "/?" + urlencode({k: v for k, v in params.items() if v})
