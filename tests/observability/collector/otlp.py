"""Build OTLP trace requests by hand, for tests that need exact control of every field."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

T0 = 1_800_000_000_000_000_000  # ns; 2027-01-15
_counter = itertools.count(1)


def trace_id(n: int | None = None) -> bytes:
    return (n if n is not None else next(_counter)).to_bytes(16, "big")


def span_id(n: int | None = None) -> bytes:
    return (n if n is not None else next(_counter)).to_bytes(8, "big")


def any_value(value: Any) -> AnyValue:  # noqa: PLR0911 - one per kind
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Mapping):
        out = AnyValue()
        out.kvlist_value.values.extend(kvs(value))
        return out
    if isinstance(value, Sequence):
        out = AnyValue()
        out.array_value.values.extend(any_value(v) for v in value)
        return out
    raise TypeError(value)


def kvs(attributes: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()]


def make_span(
    tid: bytes,
    sid: bytes,
    *,
    parent: bytes = b"",
    name: str = "op",
    start_ns: int = T0,
    duration_ns: int = 1_000_000,
    status: int = 0,
    message: str = "",
    kind: int = 1,
    attributes: Mapping[str, Any] | None = None,
    events: Iterable[tuple[str, int, Mapping[str, Any]]] = (),
    links: Iterable[tuple[bytes, bytes, Mapping[str, Any]]] = (),
) -> Span:
    span = Span(
        trace_id=tid,
        span_id=sid,
        parent_span_id=parent,
        name=name,
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=start_ns,
        end_time_unix_nano=start_ns + duration_ns,
        status=Status(code=status, message=message),  # type: ignore[arg-type]
    )
    span.attributes.extend(kvs(attributes or {}))
    for event_name, at, event_attributes in events:
        event = span.events.add(name=event_name, time_unix_nano=at)
        event.attributes.extend(kvs(event_attributes))
    for link_trace, link_span, link_attributes in links:
        link = span.links.add(trace_id=link_trace, span_id=link_span)
        link.attributes.extend(kvs(link_attributes))
    return span


def make_request(
    service: str | None, spans: Iterable[Span], resource: Mapping[str, Any] | None = None
) -> ExportTraceServiceRequest:
    attributes = dict(resource or {})
    if service is not None:
        attributes["service.name"] = service
    resource_spans = ResourceSpans()
    resource_spans.resource.attributes.extend(kvs(attributes))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "tests"
    scope_spans.scope.version = "1.0"
    scope_spans.spans.extend(spans)
    request = ExportTraceServiceRequest()
    request.resource_spans.append(resource_spans)
    return request


def simple_trace(service: str, n_children: int = 2, **root: Any) -> tuple[bytes, list[Span]]:
    tid = trace_id()
    root_id = span_id()
    start = root.pop("start_ns", T0)
    spans = [make_span(tid, root_id, start_ns=start, **root)]
    spans += [
        make_span(
            tid, span_id(), parent=root_id, name=f"child {i}", start_ns=start + 1000 * (i + 1)
        )
        for i in range(n_children)
    ]
    return tid, spans
