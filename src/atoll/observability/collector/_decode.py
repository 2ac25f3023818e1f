"""OTLP trace and log export requests, protobuf or JSON, to the rows the store writes.

The protobuf path parses with upb (C), span attributes as the raw bytes of each
``KeyValue`` (upb's wrapper objects for them were most of the cost of a span): scalars in
the usual encoding are read by hand and remembered, anything else is parsed by upb, and
both give exactly what upb's full parse gives (``tests/.../test_decode.py`` checks it on
generated and mutated bodies). Then one walk in Python touches each field once and
encodes attributes, events and links to JSON with msgspec. The JSON path rewrites the
OTLP JSON mapping's hex ids to the base64 that protobuf's JSON parser expects and then
takes the protobuf path, so both encodings are validated by the same code.

Log records (``POST /v1/logs``) come in far smaller numbers than spans and take the plain
path: upb's full parse (JSON through protobuf's own parser), then one walk in Python.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
)
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from atoll.observability.collector import _json
from atoll.observability.collector._errors import MalformedRequestError
from atoll.observability.collector._terms import Term, term_hash

try:
    from atoll.observability.collector import _native
except ImportError:  # built without a C compiler (hatch_build.py): Python decodes
    _native = None  # type: ignore[assignment]

#: Whether the C span decoder was built and is used by default.
NATIVE: Final = _native is not None

#: A span as stored: see ``_store._INSERT_COLUMNS`` for the order. The C decoder gives the
#: ids as ``bytearray``, which SQLite binds without an adapter call (equal to the bytes).
#: A span with none of the usual NULLs' values (a status message, a trace state, events,
#: links, dropped counts) is a *short* row, without them: each NULL bound costs an
#: adapter call, five of them more than a tenth of storing the span.
ShortSpanRow = tuple[
    bytes | bytearray,  # trace_id
    bytes | bytearray,  # span_id
    bytes | bytearray | None,  # parent_id
    int,  # resource_id
    int,  # scope_id
    str,  # name
    int,  # kind
    int,  # start_ns
    int,  # duration_ns
    int,  # status code
    int,  # flags
    str | None,  # attributes (JSON object)
]
FullSpanRow = tuple[
    bytes | bytearray,  # trace_id
    bytes | bytearray,  # span_id
    bytes | bytearray | None,  # parent_id
    int,  # resource_id
    int,  # scope_id
    str,  # name
    int,  # kind
    int,  # start_ns
    int,  # duration_ns
    int,  # status code
    int,  # flags
    str | None,  # attributes (JSON object)
    str | None,  # status message
    str | None,  # trace_state
    str | None,  # events (JSON array)
    str | None,  # links (JSON array)
    str | None,  # dropped counts (JSON object)
]
SpanRow = ShortSpanRow | FullSpanRow
#: The length of a short row.
SHORT_ROW: Final = 12

#: A log record as stored: see ``_store._LOG_COLUMNS`` for the order.
LogRow = tuple[
    int,  # time_ns: the record's time, or when it was observed if it has none
    int,  # observed_ns
    int,  # severity number (0 unspecified, 1 to 24)
    str | None,  # severity text
    str | None,  # body (JSON of the AnyValue)
    str | None,  # attributes (JSON object)
    bytes | None,  # trace_id
    bytes | None,  # span_id
    int,  # flags
    int,  # resource_id
    int,  # scope_id
    str | None,  # event_name
    int,  # dropped attributes count
]

MAX_INT64: Final = (1 << 63) - 1
_ZERO_TRACE_ID: Final = bytes(16)
_ZERO_SPAN_ID: Final = bytes(8)
#: Nested array and kvlist values deeper than this are cut (protobuf allows 100 levels).
_MAX_VALUE_DEPTH: Final = 16
UNKNOWN_SERVICE: Final = "unknown_service"

_REASONS: Final = {
    "trace_id": "an invalid trace_id (must be 16 bytes, not all zero)",
    "span_id": "an invalid span_id (must be 8 bytes, not all zero)",
    "parent_span_id": "an invalid parent_span_id (must be empty or 8 bytes)",
    "time": "a timestamp beyond 2^63-1 nanoseconds",
    "log_trace_id": "an invalid trace_id (must be empty or 16 bytes)",
    "log_span_id": "an invalid span_id (must be empty or 8 bytes)",
    "severity": "an invalid severity_number (must be 0 to 24)",
}
_MAX_SEVERITY: Final = 24

_json_encoder: Final = msgspec.json.Encoder()
M = TypeVar("M", bound=Message)


@dataclass(slots=True)
class ResourceRow:
    """A resource (the process that emitted spans), stored once and shared by its spans."""

    id: int
    digest: bytes
    service: str
    attributes: str | None


@dataclass(slots=True)
class ScopeRow:
    """An instrumentation scope (the library that created spans), stored once."""

    id: int
    digest: bytes
    name: str
    version: str
    attributes: str | None


@dataclass(slots=True)
class DecodedBatch:
    """The valid spans (or log records) of one export request, ready to store, and what
    was rejected. A trace export fills ``spans``, a log export ``logs``."""

    spans: list[SpanRow] = field(default_factory=list)
    logs: list[LogRow] = field(default_factory=list)
    resources: dict[int, ResourceRow] = field(default_factory=dict)
    scopes: dict[int, ScopeRow] = field(default_factory=dict)
    operations: set[tuple[str, str]] = field(default_factory=set)
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    #: Every distinct scalar span attribute of the batch, for the attribute index (see
    #: :func:`add_terms`); ``None`` when not collected, and the index reads the rows.
    terms: set[Term] | None = None
    #: What ``rejected`` counts, for the error message.
    noun: str = "span"

    @property
    def size(self) -> int:
        """The rows to store: spans and log records."""
        return len(self.spans) + len(self.logs)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def error_message(self) -> str:
        """What ``partial_success.error_message`` says, or ``""`` if nothing was rejected."""
        if not self.rejected:
            return ""
        parts = [f"{count} with {_REASONS[reason]}" for reason, count in self.reasons.items()]
        noun = self.noun if self.rejected == 1 else f"{self.noun}s"
        return f"{self.rejected} {noun} rejected: " + "; ".join(parts)


def _full_row(  # noqa: PLR0917 - the five usually NULL fields
    row: ShortSpanRow,
    message: str,
    trace_state: str,
    events: str | None,
    links: str | None,
    dropped: str | None,
) -> SpanRow:
    """``row`` as it is, or with the five usually NULL fields if one of them is not."""
    if message or trace_state or events is not None or links is not None or dropped is not None:
        return (*row, message or None, trace_state or None, events, links, dropped)
    return row


class Interner:
    """Stable small integer ids for resources and scopes, by digest of their content.

    Shared by the decoding threads; the store seeds it from the database at open and
    re-inserts (idempotently) every resource a batch refers to, so an id handed out for a
    batch that then failed to commit is still valid for the next one.
    """

    __slots__ = ("_ids", "_lock", "_next")

    def __init__(self) -> None:
        self._ids: dict[bytes, int] = {}
        self._next = 1
        self._lock = threading.Lock()

    def seed(self, known: Iterable[tuple[bytes, int]]) -> None:
        with self._lock:
            for digest, id_ in known:
                self._ids[digest] = id_
                self._next = max(self._next, id_ + 1)

    def intern(self, digest: bytes) -> int:
        found = self._ids.get(digest)
        if found is not None:
            return found
        with self._lock:
            found = self._ids.get(digest)
            if found is None:
                found = self._next
                self._next += 1
                self._ids[digest] = found
            return found


def any_value(value: AnyValue, depth: int = 0) -> Any:  # noqa: PLR0911 - one per kind
    """An OTLP ``AnyValue`` as the JSON value it is stored as (bytes become base64)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        number = value.double_value
        # JSON has no NaN or infinity; keep them readable rather than dropping them.
        return number if math.isfinite(number) else str(number)
    if kind is None:
        return None
    if depth >= _MAX_VALUE_DEPTH:
        return "…"
    if kind == "array_value":
        return [any_value(item, depth + 1) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value, depth + 1) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return None


def attributes_dict(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in attributes}


def _span_attributes(attributes: Sequence[KeyValue], terms: set[Term] | None) -> dict[str, Any]:
    """``attributes_dict(attributes)``, with its terms added to ``terms`` (when collected)
    as :func:`add_terms` adds them. Scalar values (strings, integers, booleans, doubles:
    nearly all of them) are read inline with no call per attribute (a consumer span has
    eight); a span with an array, map, bytes or empty value is done the general way."""
    values: dict[str, Any] = {}
    found: list[tuple[str, str | int | float]] = []
    for kv in attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "string_value":
            key = kv.key
            found.append((key, text := value.string_value))
            values[key] = text
        elif kind == "int_value":
            key = kv.key
            found.append((key, integer := value.int_value))
            values[key] = integer
        elif kind == "bool_value":
            key = kv.key
            flag = value.bool_value
            values[key] = flag
            found.append((key, "true" if flag else "false"))  # as add_terms indexes it
        elif kind == "double_value":
            key = kv.key
            number = value.double_value
            # Non-finite as a string, as any_value stores it: JSON has no NaN.
            stored = number if math.isfinite(number) else str(number)
            values[key] = stored
            found.append((key, stored))
        else:
            values = attributes_dict(attributes)
            if terms is not None:
                add_terms(terms, values)
            return values
    if terms is not None:
        if len(found) == len(values):  # no key twice: exactly add_terms' terms
            terms.update([term_hash(key, value) for key, value in found])
        else:
            add_terms(terms, values)
    return values


def add_terms(terms: set[Term], attributes: dict[str, Any]) -> None:
    """Add the indexable attributes of one span to ``terms``.

    What the attribute index takes, as the search's ``json_each`` check reads the stored
    JSON: strings, integers, finite floats (non-finite ones are stored as strings
    already) and booleans as ``'true'``/``'false'``; arrays, maps and nulls are not
    indexed. Each is added as its term (:func:`~._terms.term_hash`).
    """
    for key, value in attributes.items():
        kind = value.__class__
        # Non-finite floats: the decoders store them as strings; be sure.
        if kind is str or kind is int or kind is bool or (kind is float and math.isfinite(value)):
            terms.add(term_hash(key, value))


def _raw_request_classes() -> tuple[type[Message], type[Message]]:
    """``ExportTraceServiceRequest`` and ``Span`` with ``Span.attributes`` read as raw bytes.

    The wire format is the same (a repeated length-delimited field), so upb parses the
    same bodies; each attribute then comes out as the bytes of its ``KeyValue`` instead
    of a ``KeyValue`` and an ``AnyValue`` wrapper, which upb builds at about 1 µs an
    attribute (most of the decoding cost of a span). See :func:`_scalar_key_value`.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (common_pb2, resource_pb2, trace_pb2, trace_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        if module is trace_pb2:
            span = next(m for m in proto.message_type if m.name == "Span")
            attributes = next(f for f in span.field if f.name == "attributes")
            attributes.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            attributes.ClearField("type_name")
        pool.Add(proto)
    request = pool.FindMessageTypeByName(ExportTraceServiceRequest.DESCRIPTOR.full_name)
    span_type = pool.FindMessageTypeByName(trace_pb2.Span.DESCRIPTOR.full_name)
    return message_factory.GetMessageClass(request), message_factory.GetMessageClass(span_type)


_RawExportTraceServiceRequest, _RawSpan = _raw_request_classes()
_unpack_double: Final = struct.Struct("<d").unpack_from
#: Raw attributes remembered (most repeat from span to span: messaging.system,
#: http.route, db.system...); the cache is emptied when it reaches this size.
_RAW_CACHE_LIMIT: Final = 8192
#: A parsed attribute: its key, the value as stored, and its term.
_Parsed = tuple[str, Any, Term]
# Protobuf wire format: a tag byte is field_number << 3 | wire type.
_KEY_TAG: Final = 0x0A  # KeyValue.key (1), length-delimited
_VALUE_TAG: Final = 0x12  # KeyValue.value (2), length-delimited
_STRING_TAG: Final = 0x0A  # AnyValue.string_value (1), length-delimited
_BOOL_TAG: Final = 0x10  # AnyValue.bool_value (2), varint
_INT_TAG: Final = 0x18  # AnyValue.int_value (3), varint
_DOUBLE_TAG: Final = 0x21  # AnyValue.double_value (4), 64-bit
_CONTINUES: Final = 0x80  # a varint byte with this bit set has more bytes after it
_MAX_VARINT_SHIFT: Final = 70  # a varint is ten bytes at most


def _scalar_key_value(raw: bytes) -> _Parsed | None:  # noqa: C901, PLR0911, PLR0912 - one flat parser
    """One ``KeyValue`` with a scalar value, in the form every encoder writes it (the
    key, then the value, each field once and every length in one byte), parsed by hand;
    ``None`` for anything else (a longer string, an array, an unusual encoding, invalid
    UTF-8), which the caller then parses with upb. What it returns is what
    :func:`any_value` and :func:`add_terms` make of the same attribute.
    """
    try:
        if raw[0] != _KEY_TAG:
            return None
        size = raw[1]
        start = 2 + size
        end = len(raw)
        # The value, with a one-byte length, and nothing after it.
        if size >= _CONTINUES or raw[start] != _VALUE_TAG or raw[start + 1] >= _CONTINUES:
            return None
        if start + 2 + raw[start + 1] != end:
            return None
        key = raw[2:start].decode()
        tag = raw[start + 2]
        at = start + 3
        if tag == _STRING_TAG:
            if raw[at] >= _CONTINUES or at + 1 + raw[at] != end:
                return None
            text = raw[at + 1 :].decode()
            return key, text, term_hash(key, text)
        if tag == _INT_TAG:  # two's complement in a varint
            number = shift = 0
            while True:
                byte = raw[at]
                at += 1
                number |= (byte & 0x7F) << shift
                if byte < _CONTINUES:
                    break
                shift += 7
                if shift >= _MAX_VARINT_SHIFT:
                    return None
            if at != end or number >= 1 << 64:
                return None
            if number >= 1 << 63:
                number -= 1 << 64
            return key, number, term_hash(key, number)
        if tag == _BOOL_TAG:
            if at + 1 != end or raw[at] > 1:
                return None
            flag = raw[at] == 1
            return key, flag, term_hash(key, flag)
        if tag == _DOUBLE_TAG:
            if at + 8 != end:
                return None
            number = _unpack_double(raw, at)[0]
            stored = number if math.isfinite(number) else str(number)
            return key, stored, term_hash(key, stored)
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def _parse_protobuf(kind: Any, data: bytes, what: str = "ExportTraceServiceRequest") -> Any:
    """``kind.FromString(data)``, its failures as :class:`MalformedRequestError` saying
    the body is not a protobuf ``what``."""
    try:
        return kind.FromString(data)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise MalformedRequestError(f"the body is not a protobuf {what}: {exc}") from exc


def _raw_span_attributes(
    raws: Sequence[bytes], terms: set[Term] | None, cache: dict[bytes, _Parsed]
) -> dict[str, Any]:
    """:func:`_span_attributes` for attributes given as the bytes of each ``KeyValue``.

    Scalars in the usual encoding are parsed by :func:`_scalar_key_value` and
    remembered in ``cache``; anything else is parsed by upb, one attribute at a time.

    Raises:
        MalformedRequestError: an attribute is not a valid ``KeyValue``.
    """
    values: dict[str, Any] = {}
    found: list[Term] = []
    general = False
    for raw in raws:
        parsed = cache.get(raw)
        if parsed is None:
            parsed = _scalar_key_value(raw)
            if parsed is not None:
                if len(cache) >= _RAW_CACHE_LIMIT:
                    cache.clear()
                cache[raw] = parsed
        if parsed is not None:
            key, value, term = parsed
            values[key] = value
            found.append(term)
            continue
        kv = _parse_protobuf(KeyValue, raw)
        values[kv.key] = any_value(kv.value)
        general = True
    if terms is not None:
        if not general and len(found) == len(values):  # exactly add_terms' terms
            terms.update(found)
        else:
            add_terms(terms, values)
    return values


def events_json(events: Iterable[Any]) -> str:
    """Span events (``Span.Event`` messages) as the JSON array stored with the span."""
    return _json_text(
        [
            {
                "name": event.name,
                "time_unix_nano": event.time_unix_nano,
                "attributes": attributes_dict(event.attributes),
                "dropped_attributes_count": event.dropped_attributes_count,
            }
            for event in events
        ]
    )


def links_json(links: Iterable[Any]) -> str:
    """Span links (``Span.Link`` messages) as the JSON array stored with the span."""
    return _json_text(
        [
            {
                "trace_id": link.trace_id.hex(),
                "span_id": link.span_id.hex(),
                "trace_state": link.trace_state,
                "attributes": attributes_dict(link.attributes),
                "flags": link.flags,
            }
            for link in links
        ]
    )


def _json_text(value: object) -> str:
    return _json_encoder.encode(value).decode()


def _json_document(body: bytes, what: str) -> dict[str, Any]:
    """A JSON body decoded, which must be an object (the ``what`` request)."""
    try:
        document = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise MalformedRequestError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedRequestError(f"the body must be a JSON object (an {what})")
    return document


def _parse_json(document: dict[str, Any], request: M) -> M:
    """``document`` into ``request`` by protobuf's JSON parser, its failures as
    :class:`MalformedRequestError`."""
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except Exception as exc:  # ParseError, and ValueError/TypeError from deep inside
        name = request.DESCRIPTOR.name
        raise MalformedRequestError(f"the body is not an OTLP/JSON {name}: {exc}") from exc
    return request


def _optional_id(value: bytes, zero: bytes) -> tuple[bool, bytes | None]:
    """(valid, id) of an optional id: empty or all zeros is none, else it must be as long
    as ``zero``."""
    if not value or value == zero:
        return True, None
    return len(value) == len(zero), value


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class OTLPDecoder:
    """Turns export requests into :class:`DecodedBatch` es. Safe to use from several threads."""

    __slots__ = ("_collect_terms", "_native", "_raw_cache", "_resources", "_scopes")

    def __init__(
        self,
        resources: Interner,
        scopes: Interner,
        *,
        collect_terms: bool = True,
        native: bool = True,
    ) -> None:
        self._resources = resources
        self._scopes = scopes
        #: Collect each batch's attribute terms (``DecodedBatch.terms``): only a store
        #: with the attribute index uses them.
        self._collect_terms = collect_terms
        #: Scalar attributes already parsed, by their bytes (see _raw_span_attributes).
        self._raw_cache: dict[bytes, _Parsed] = {}
        #: Decode protobuf spans with the C walk when it was built (``NATIVE``).
        self._native = native and _native is not None

    def decode_protobuf(self, body: bytes) -> DecodedBatch:
        if self._native:
            batch = self._decode_native(body)
            if batch is not None:
                return batch
        request = _parse_protobuf(_RawExportTraceServiceRequest, body)
        return self._convert(request, raw_attributes=True)

    def decode_json(self, body: bytes) -> DecodedBatch:
        document = _json_document(body, "ExportTraceServiceRequest")
        try:
            return self.convert_json(document)
        except _json.Fallback:
            pass  # not the usual shape: protobuf's parser decides
        except RecursionError as exc:
            raise MalformedRequestError(f"the body nests too deeply: {exc}") from exc
        hex_ids_to_base64(document)
        return self.convert(_parse_json(document, ExportTraceServiceRequest()))

    def convert_json(self, document: dict[str, Any]) -> DecodedBatch:  # noqa: C901, PLR0912, PLR0915 - the JSON twin of convert
        """An OTLP/JSON request in its usual forms to rows, as :meth:`convert` makes them.

        Raises:
            _json.Fallback: the document needs protobuf's parser (see ``_json``).
        """
        j = _json
        batch = DecodedBatch(terms=set() if self._collect_terms else None)
        rows = batch.spans
        operations = batch.operations
        terms = batch.terms
        for resource_spans in j.as_list(j.field(document, "resourceSpans", "resource_spans")):
            resource_spans = j.as_dict(resource_spans)  # noqa: PLW2901 - the same item, checked
            resource_id = self._resource(j.resource(resource_spans.get("resource")), batch)
            service = batch.resources[resource_id].service
            for scope_spans in j.as_list(j.field(resource_spans, "scopeSpans", "scope_spans")):
                scope_spans = j.as_dict(scope_spans)  # noqa: PLW2901 - the same item, checked
                scope_id = self._scope(j.scope(scope_spans.get("scope")), batch)
                for span in j.as_list(scope_spans.get("spans")):
                    span = j.as_dict(span)  # noqa: PLW2901 - the same item, checked
                    trace_id = j.as_id(j.field(span, "traceId", "trace_id"), 16)
                    span_id = j.as_id(j.field(span, "spanId", "span_id"), 8)
                    parent: bytes | None = j.as_id(
                        j.field(span, "parentSpanId", "parent_span_id"), 8
                    )
                    start = j.opt_uint64(j.field(span, "startTimeUnixNano", "start_time_unix_nano"))
                    end = j.opt_uint64(j.field(span, "endTimeUnixNano", "end_time_unix_nano"))
                    name = j.opt_str(span.get("name"))
                    kind = j.opt_enum(span.get("kind"), j.SPAN_KINDS)
                    trace_state = j.opt_str(j.field(span, "traceState", "trace_state"))
                    flags = j.opt_uint32(span.get("flags"))
                    dropped_counts = (
                        j.opt_uint32(
                            j.field(span, "droppedAttributesCount", "dropped_attributes_count")
                        ),
                        j.opt_uint32(j.field(span, "droppedEventsCount", "dropped_events_count")),
                        j.opt_uint32(j.field(span, "droppedLinksCount", "dropped_links_count")),
                    )
                    status = span.get("status")
                    code, message = 0, ""
                    if status is not None:
                        status = j.as_dict(status)
                        code = j.opt_enum(status.get("code"), j.STATUS_CODES)
                        message = j.opt_str(status.get("message"))
                    attributes = j.attributes(span.get("attributes"))
                    events = [
                        {
                            "name": j.opt_str(event.get("name")),
                            "time_unix_nano": j.opt_uint64(
                                j.field(event, "timeUnixNano", "time_unix_nano")
                            ),
                            "attributes": j.attributes(event.get("attributes")),
                            "dropped_attributes_count": j.opt_uint32(
                                j.field(event, "droppedAttributesCount", "dropped_attributes_count")
                            ),
                        }
                        for event in map(j.as_dict, j.as_list(span.get("events")))
                    ]
                    links = [
                        {
                            "trace_id": j.as_id(j.field(link, "traceId", "trace_id"), 16).hex(),
                            "span_id": j.as_id(j.field(link, "spanId", "span_id"), 8).hex(),
                            "trace_state": j.opt_str(j.field(link, "traceState", "trace_state")),
                            "attributes": j.attributes(link.get("attributes")),
                            "flags": j.opt_uint32(link.get("flags")),
                        }
                        for link in map(j.as_dict, j.as_list(span.get("links")))
                    ]
                    # From here on, exactly as convert() does it.
                    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
                        batch.reject("trace_id")
                        continue
                    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
                        batch.reject("span_id")
                        continue
                    if parent:
                        if len(parent) != 8:
                            batch.reject("parent_span_id")
                            continue
                        if parent == _ZERO_SPAN_ID:
                            parent = None
                    else:
                        parent = None
                    if start > MAX_INT64 or end > MAX_INT64:
                        batch.reject("time")
                        continue
                    operations.add((service, name))
                    if attributes and terms is not None:
                        add_terms(terms, attributes)
                    dropped = None
                    if any(dropped_counts):
                        dropped = _json_text(
                            dict(
                                zip(("attributes", "events", "links"), dropped_counts, strict=True)
                            )
                        )
                    row: ShortSpanRow = (
                        trace_id,
                        span_id,
                        parent,
                        resource_id,
                        scope_id,
                        name,
                        kind,
                        start,
                        end - start if end > start else 0,
                        code,
                        flags,
                        _json_text(attributes) if attributes else None,
                    )
                    rows.append(
                        _full_row(
                            row,
                            message,
                            trace_state,
                            _json_text(events) if events else None,
                            _json_text(links) if links else None,
                            dropped,
                        )
                    )
        return batch

    def decode_logs_protobuf(self, body: bytes, now_ns: int) -> DecodedBatch:
        """An ``ExportLogsServiceRequest`` body to log rows; ``now_ns`` stands in for the
        observed time of a record that has neither time."""
        request = _parse_protobuf(ExportLogsServiceRequest, body, "ExportLogsServiceRequest")
        return self.convert_logs(request, now_ns)

    def decode_logs_json(self, body: bytes, now_ns: int) -> DecodedBatch:
        """:meth:`decode_logs_protobuf` for an OTLP/JSON body (hex ids, as the spec says)."""
        document = _json_document(body, "ExportLogsServiceRequest")
        hex_log_ids_to_base64(document)
        return self.convert_logs(_parse_json(document, ExportLogsServiceRequest()), now_ns)

    def convert_logs(self, request: ExportLogsServiceRequest, now_ns: int) -> DecodedBatch:
        """The valid log records of a parsed request, as rows to store.

        A record's ``trace_id`` and ``span_id`` are optional (empty, or all zeros, is
        none); one of another length is rejected, as is a time past 2^63-1 ns or a
        severity number outside 0 to 24. A record with no time takes its observed time,
        and one with neither takes ``now_ns``, as the spec asks of a receiver.
        """
        batch = DecodedBatch(noun="log record")
        rows = batch.logs
        for resource_logs in request.resource_logs:
            resource_id = self._resource(resource_logs.resource, batch)
            for scope_logs in resource_logs.scope_logs:
                scope_id = self._scope(scope_logs.scope, batch)
                for record in scope_logs.log_records:
                    valid, trace_id = _optional_id(record.trace_id, _ZERO_TRACE_ID)
                    if not valid:
                        batch.reject("log_trace_id")
                        continue
                    valid, span_id = _optional_id(record.span_id, _ZERO_SPAN_ID)
                    if not valid:
                        batch.reject("log_span_id")
                        continue
                    time_ns = record.time_unix_nano
                    observed = record.observed_time_unix_nano
                    if time_ns > MAX_INT64 or observed > MAX_INT64:
                        batch.reject("time")
                        continue
                    severity = record.severity_number
                    if not 0 <= severity <= _MAX_SEVERITY:
                        batch.reject("severity")
                        continue
                    observed = observed or now_ns
                    attributes = attributes_dict(record.attributes)
                    value = any_value(record.body) if record.HasField("body") else None
                    body = None if value is None else _json_text(value)
                    rows.append(
                        (
                            time_ns or observed,
                            observed,
                            severity,
                            record.severity_text or None,
                            body,
                            _json_text(attributes) if attributes else None,
                            trace_id,
                            span_id,
                            record.flags,
                            resource_id,
                            scope_id,
                            record.event_name or None,
                            record.dropped_attributes_count,
                        )
                    )
        return batch

    def _resource(self, resource: Resource, batch: DecodedBatch) -> int:
        digest = _digest(resource.SerializeToString(deterministic=True))
        id_ = self._resources.intern(digest)
        if id_ not in batch.resources:
            attributes = attributes_dict(resource.attributes)
            service = attributes.get("service.name")
            if not isinstance(service, str) or not service:
                service = UNKNOWN_SERVICE
            batch.resources[id_] = ResourceRow(
                id_, digest, service, _json_text(attributes) if attributes else None
            )
        return id_

    def _scope(self, scope: InstrumentationScope, batch: DecodedBatch) -> int:
        digest = _digest(scope.SerializeToString(deterministic=True))
        id_ = self._scopes.intern(digest)
        if id_ not in batch.scopes:
            attributes = attributes_dict(scope.attributes)
            batch.scopes[id_] = ScopeRow(
                id_,
                digest,
                scope.name,
                scope.version,
                _json_text(attributes) if attributes else None,
            )
        return id_

    def convert(self, request: ExportTraceServiceRequest) -> DecodedBatch:
        """The valid spans of a parsed request, as rows to store."""
        return self._convert(request, raw_attributes=False)

    def _convert(self, request: Any, *, raw_attributes: bool) -> DecodedBatch:
        # raw_attributes: the request is a _RawExportTraceServiceRequest.
        batch = DecodedBatch(terms=set() if self._collect_terms else None)
        convert_span = self._convert_span
        for resource_spans in request.resource_spans:
            resource_id = self._resource(resource_spans.resource, batch)
            service = batch.resources[resource_id].service
            for scope_spans in resource_spans.scope_spans:
                scope_id = self._scope(scope_spans.scope, batch)
                for span in scope_spans.spans:
                    convert_span(span, resource_id, scope_id, service, batch, raw_attributes)
        return batch

    def _convert_span(  # noqa: PLR0917 - the span and where it belongs; positional: a hot loop
        self,
        span: Any,
        resource_id: int,
        scope_id: int,
        service: str,
        batch: DecodedBatch,
        raw_attributes: bool,
    ) -> None:
        """One span's row appended to ``batch``, or the span rejected (counted)."""
        trace_id = span.trace_id
        reason = None
        parent: bytes | None = span.parent_span_id
        if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
            reason = "trace_id"
        elif len(span.span_id) != 8 or span.span_id == _ZERO_SPAN_ID:
            reason = "span_id"
        elif parent and len(parent) != 8:
            reason = "parent_span_id"
        elif span.start_time_unix_nano > MAX_INT64 or span.end_time_unix_nano > MAX_INT64:
            reason = "time"
        if reason is not None:
            if raw_attributes:
                # upb parsed the rest of the span: its attributes must parse too, or the
                # request is malformed (and a 400) as upb's full parse would have it.
                _raw_span_attributes(span.attributes, None, self._raw_cache)
            batch.reject(reason)
            return
        if not parent or parent == _ZERO_SPAN_ID:
            parent = None
        start = span.start_time_unix_nano
        end = span.end_time_unix_nano
        name = span.name
        batch.operations.add((service, name))
        attributes = span.attributes
        attribute_json = None
        if attributes:
            values = (
                _raw_span_attributes(attributes, batch.terms, self._raw_cache)
                if raw_attributes
                else _span_attributes(attributes, batch.terms)
            )
            attribute_json = _json_text(values)
        events = span.events
        links = span.links
        dropped = None
        if span.dropped_attributes_count or span.dropped_events_count or span.dropped_links_count:
            dropped = _json_text(
                {
                    "attributes": span.dropped_attributes_count,
                    "events": span.dropped_events_count,
                    "links": span.dropped_links_count,
                }
            )
        status = span.status
        row: ShortSpanRow = (
            trace_id,
            span.span_id,
            parent,
            resource_id,
            scope_id,
            name,
            span.kind,
            start,
            end - start if end > start else 0,
            status.code,
            span.flags,
            attribute_json,
        )
        batch.spans.append(
            _full_row(
                row,
                status.message,
                span.trace_state,
                events_json(events) if events else None,
                links_json(links) if links else None,
                dropped,
            )
        )

    def _decode_native(self, body: bytes) -> DecodedBatch | None:
        """``body``'s spans decoded by the C walk (``_native.c``), which hands unusual
        spans back to :meth:`_convert_span`; ``None`` if the request's outer structure
        is unusual and it must be decoded in Python."""
        batch = DecodedBatch(terms=set() if self._collect_terms else None)

        # Each part is parsed inside the messages that hold it in the request, as a
        # parse of the whole request would: upb's nesting limit counts from the root.
        def resource(raw: bytes) -> tuple[int, str]:
            request = _parse_protobuf(_RawExportTraceServiceRequest, _nest(raw, 1, 1))
            resource_id = self._resource(request.resource_spans[0].resource, batch)
            return resource_id, batch.resources[resource_id].service

        def scope(raw: bytes) -> int:
            request = _parse_protobuf(_RawExportTraceServiceRequest, _nest(raw, 1, 2, 1))
            return self._scope(request.resource_spans[0].scope_spans[0].scope, batch)

        def slow_span(raw: bytes, resource_id: int, scope_id: int, service: str) -> None:
            request = _parse_protobuf(_RawExportTraceServiceRequest, _nest(raw, 2, 2, 1))
            span = request.resource_spans[0].scope_spans[0].spans[0]
            self._convert_span(span, resource_id, scope_id, service, batch, True)

        assert _native is not None
        if _native.decode_spans(
            body, batch.spans, batch.operations, batch.terms, resource, scope, slow_span
        ):
            return batch
        return None


def _nest(raw: bytes, *fields: int) -> bytes:
    """``raw`` as field ``fields[0]`` of a message that is field ``fields[1]`` of another,
    and so on outwards (protobuf's wire format: a tag, a length, the bytes)."""
    for number in fields:
        size = len(raw)
        length = bytearray()
        while True:
            byte = size & 0x7F
            size >>= 7
            if size:
                length.append(byte | 0x80)
            else:
                length.append(byte)
                break
        raw = bytes([number << 3 | 2]) + bytes(length) + raw
    return raw


# --- OTLP/JSON ids -------------------------------------------------------------------

#: Stands in for an id that is neither hex nor base64: one byte, which no id can be, so
#: the span is rejected as invalid (a partial success) instead of failing the request.
_INVALID_ID: Final = base64.b64encode(b"\x00").decode()


def _id_to_base64(value: object, size: int) -> object:
    """An id from OTLP/JSON (hex, as the spec says) as the base64 protobuf JSON expects.

    Hex of the right length is taken as hex; anything else is tried as base64, which is
    what ``google.protobuf.json_format`` itself writes (the lengths of a 16- or 8-byte id
    in hex and in base64 differ, so the two cannot be confused). Non-strings are left for
    the protobuf parser to reject.
    """
    if not isinstance(value, str) or not value:
        return value
    if len(value) == size * 2:
        try:
            return base64.b64encode(bytes.fromhex(value)).decode()
        except ValueError:
            pass
    # Standard or URL-safe alphabet, padding optional: what protobuf's own parser takes.
    padded = value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return _INVALID_ID
    return base64.b64encode(raw).decode()


def _fix_ids(obj: dict[str, Any], names: tuple[tuple[str, str, int], ...]) -> None:
    for camel, snake, size in names:
        for key in (camel, snake):
            if key in obj:
                obj[key] = _id_to_base64(obj[key], size)


_SPAN_IDS: Final = (
    ("traceId", "trace_id", 16),
    ("spanId", "span_id", 8),
    ("parentSpanId", "parent_span_id", 8),
)
_LINK_IDS: Final = (("traceId", "trace_id", 16), ("spanId", "span_id", 8))


def _items(obj: dict[str, Any], camel: str, snake: str) -> list[Any]:
    found = obj.get(camel, obj.get(snake))
    return found if isinstance(found, list) else []


def hex_ids_to_base64(document: dict[str, Any]) -> None:
    """Rewrite the trace and span ids of an OTLP/JSON request in place for ParseDict.

    Accepts the lowerCamelCase names of the OTLP JSON mapping and the original proto
    field names, as protobuf's JSON mapping does. Shapes that are wrong are left alone for
    the protobuf parser to reject with a message.
    """
    for resource_spans in _items(document, "resourceSpans", "resource_spans"):
        if not isinstance(resource_spans, dict):
            continue
        for scope_spans in _items(resource_spans, "scopeSpans", "scope_spans"):
            if not isinstance(scope_spans, dict):
                continue
            for span in _items(scope_spans, "spans", "spans"):
                if not isinstance(span, dict):
                    continue
                _fix_ids(span, _SPAN_IDS)
                for link in _items(span, "links", "links"):
                    if isinstance(link, dict):
                        _fix_ids(link, _LINK_IDS)


_LOG_IDS: Final = (("traceId", "trace_id", 16), ("spanId", "span_id", 8))


def hex_log_ids_to_base64(document: dict[str, Any]) -> None:
    """:func:`hex_ids_to_base64` for an OTLP/JSON ``ExportLogsServiceRequest``."""
    for resource_logs in _items(document, "resourceLogs", "resource_logs"):
        if not isinstance(resource_logs, dict):
            continue
        for scope_logs in _items(resource_logs, "scopeLogs", "scope_logs"):
            if not isinstance(scope_logs, dict):
                continue
            for record in _items(scope_logs, "logRecords", "log_records"):
                if isinstance(record, dict):
                    _fix_ids(record, _LOG_IDS)
