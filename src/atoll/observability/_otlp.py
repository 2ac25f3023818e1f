"""OTLP/HTTP span export with a fast protobuf encoder.

The OpenTelemetry SDK's exporter builds one protobuf object per span, attribute and
value before serialising: 38 µs of CPU per atoll ``process`` span on this machine, more
than the rest of tracing a message together. :func:`encode_request` writes the same
``ExportTraceServiceRequest`` bytes directly (protobuf's wire format is simple: tags,
varints, fixed-width numbers and length-prefixed bytes) and caches the encoding of
attribute pairs that repeat from span to span (the system, the destination, the
group): about 3.5 µs per span. A property test checks it against the SDK's encoder.

:class:`FastOTLPSpanExporter` is the SDK's ``OTLPSpanExporter`` (so every standard
``OTEL_EXPORTER_OTLP_*`` variable, TLS setting and retry rule is the SDK's own) with
the encoding step replaced (if anything unexpected turns up it falls back to the SDK's
encoder) and, for a plain ``http://`` endpoint, its ``requests`` session replaced by
:class:`PlainHTTPTransport` under the SDK's own retrying client.
:class:`FastBatchSpanProcessor` goes one step further: spans are encoded
(:func:`encode_span`) on the thread that ends them, lean spans in runs of up to
:data:`ENCODE_RUN`, and its export thread only joins the bytes and posts them.
"""

from __future__ import annotations

import http.client
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import DEFAULT_TRACE_STATE, SpanContext

from atoll.observability._lean import UNSET_STATUS as _UNSET

log = logging.getLogger("atoll.tracing")

_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack
_pack_d = struct.Struct("<d").pack
_MASK64 = (1 << 64) - 1
_VARINT_1 = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _VARINT_1[n] if n >= 0 else _varint(n & _MASK64)
    if n < 0x4000:  # two bytes: a span's length, most lengths in a request
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:  # noqa: PLR0911 - one return per protobuf value kind
    # The oneof is always written, even for default values (presence).
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _ld(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value & _MASK64)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _ld(b"\x3a", value)
    if isinstance(value, Sequence):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _ld(b"\x32", b"".join(_ld(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"cannot encode attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    body = _ld(b"\x0a", key.encode()) if key else b""
    return body + _ld(b"\x12", _any_value(value))


_kv_cache: dict[tuple[bytes, str, Any, type], bytes] = {}
#: Keys whose values rarely repeat (ids): caching them would only churn the cache.
_uncached_keys: set[str] = set()
_cached_per_key: dict[str, int] = {}
#: String-valued pairs by tag, key and value: two plain dict lookups per hit, no tuple to
#: build and hash (most attributes are strings that repeat: the system, the destination).
_str_cache: dict[bytes, dict[str, dict[str, bytes]]] = {}
_MAX_CACHED = 8192
_cached_total = 0


_key_prefixes: dict[str, bytes] = {}


def _str_pair(tag: bytes, key: str, value: str) -> bytes:
    """``_ld(tag, _key_value(key, value))`` for a string value, the common uncached case."""
    prefix = _key_prefixes.get(key)
    if prefix is None:
        prefix = _ld(b"\x0a", key.encode()) if key else b""
        if len(_key_prefixes) < 1024:
            _key_prefixes[key] = prefix
    data = value.encode()
    size = len(data)
    if size < 126:  # both lengths fit in one varint byte
        body = prefix + b"\x12" + _VARINT_1[size + 2] + b"\x0a" + _VARINT_1[size] + data
    else:
        body = prefix + _ld(b"\x12", _ld(b"\x0a", data))
    return _ld(tag, body)


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    parts: list[bytes] = []
    append = parts.append
    uncached = _uncached_keys
    strings = _str_cache.get(tag)
    if strings is None:
        strings = _str_cache[tag] = {}
    for key, value in attributes.items():
        if key in uncached:
            if value.__class__ is str:
                append(_str_pair(tag, key, value))
            else:
                append(_ld(tag, _key_value(key, value)))
            continue
        if value.__class__ is str:
            by_value = strings.get(key)
            if by_value is not None:
                encoded = by_value.get(value)
                if encoded is not None:
                    append(encoded)
                    continue
        append(_cached_pair(tag, key, value, strings))
    return b"".join(parts)


def _cached_pair(tag: bytes, key: str, value: Any, strings: dict[str, dict[str, bytes]]) -> bytes:
    """One pair missing from the caches: encoded, and kept unless ``key`` looks like an id."""
    global _cached_total  # noqa: PLW0603 - the caches' shared bound
    if value.__class__ is str:
        encoded = _str_pair(tag, key, value)
        cache_key = None
    else:
        cache_key = (tag, key, value, value.__class__)
        try:
            return _kv_cache[cache_key]
        except KeyError:
            encoded = _ld(tag, _key_value(key, value))
        except TypeError:  # unhashable (a list value)
            return _ld(tag, _key_value(key, value))
    seen = _cached_per_key.get(key, 0) + 1
    _cached_per_key[key] = seen
    if seen > 64:
        _uncached_keys.add(key)  # an id, not a label: stop caching it
    elif _cached_total < _MAX_CACHED:
        _cached_total += 1
        if cache_key is None:
            strings.setdefault(key, {})[value] = encoded
        else:
            _kv_cache[cache_key] = encoded
    return encoded


def _dropped(container: Any) -> int:
    return int(getattr(container, "dropped", 0))


def _flags(parent: SpanContext | None) -> bytes:
    if parent is not None and parent.is_remote:
        return _REMOTE_FLAGS
    return _LOCAL_FLAGS


_LOCAL_FLAGS = b"\x85\x01" + _pack_i(_FLAGS_HAS_IS_REMOTE)
_REMOTE_FLAGS = b"\x85\x01" + _pack_i(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
_KIND = [b"\x30" + _varint(k + 1) for k in range(5)]
_EMPTY_STATUS = b"\x7a\x00"
#: A span name's field, by name (names repeat: ``process <type>``).
_names: dict[str, bytes] = {}
_pack_times = struct.Struct("<BQBQ").pack


def _events(events: Sequence[Any]) -> bytes:
    out = b""
    for event in events:
        body = b"\x09" + _pack_q(event.timestamp) if event.timestamp else b""
        if event.name:
            body += _ld(b"\x12", event.name.encode())
        body += _attributes(b"\x1a", event.attributes)
        body += _count(b"\x20", event.dropped_attributes)
        out += _ld(b"\x5a", body)
    return out + _count(b"\x60", _dropped(events))


def _links(links: Sequence[Any]) -> bytes:
    out = b""
    for link in links:
        remote = _FLAGS_IS_REMOTE if link.context.is_remote else 0
        body = (
            b"\x0a\x10"
            + link.context.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + link.context.span_id.to_bytes(8, "big")
            + _attributes(b"\x22", link.attributes)
            + _count(b"\x28", link.dropped_attributes)
            + b"\x35"
            + _pack_i(_FLAGS_HAS_IS_REMOTE | remote)
        )
        out += _ld(b"\x6a", body)
    return out + _count(b"\x70", _dropped(links))


def _status(status: Any) -> bytes:
    code = status.status_code.value
    if not code and not status.description:
        return _EMPTY_STATUS
    body = _ld(b"\x12", status.description.encode()) if status.description else b""
    if code:
        body += b"\x18" + _varint(code)
    return _ld(b"\x7a", body)


def _span(span: ReadableSpan) -> bytes:
    # Reads ReadableSpan's slots, not its properties: those copy attributes, events and
    # links on every access. An SDK without these slots makes the exporter fall back.
    context = span._context
    assert context is not None
    return encode_span(
        context,
        span._parent,
        span._name,
        span._kind.value,
        span._start_time,
        span._end_time,
        span._attributes,
        span._events,
        span._links,
        span._status,
    )


def encode_span(  # noqa: C901, PLR0912, PLR0917 - a Span's fields in order, one flat hot path
    context: SpanContext,
    parent: SpanContext | None,
    name: str,
    kind: int,
    start: int | None,
    end: int | None,
    attributes: Mapping[str, Any] | None,
    events: Sequence[Any],
    links: Sequence[Any],
    status: Any,
) -> bytes:
    """One ``Span`` message: what :func:`encode_request` writes for a span, from its fields.

    ``kind`` is the value of the span's ``SpanKind``; ``events`` are SDK ``Event`` objects
    and ``links`` SDK ``Link`` objects.
    """
    parts = [
        b"\x0a\x10",
        context.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        context.span_id.to_bytes(8, "big"),
    ]
    append = parts.append
    state = context.trace_state
    # The shared empty state (most spans') is skipped without TraceState's Python __len__.
    if state is not DEFAULT_TRACE_STATE and state:
        append(_ld(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items()).encode()))
    if parent is not None:
        append(b"\x22\x08")
        append(parent.span_id.to_bytes(8, "big"))
    if name:
        encoded_name = _names.get(name)
        if encoded_name is None:
            encoded_name = _ld(b"\x2a", name.encode())
            if len(_names) < 1024:
                _names[name] = encoded_name
        append(encoded_name)
    append(_KIND[kind])
    if start and end:
        append(_pack_times(0x39, start, 0x41, end))
    elif start:
        append(b"\x39" + _pack_q(start))
    elif end:
        append(b"\x41" + _pack_q(end))
    if attributes:
        append(_attributes(b"\x4a", attributes))
        if attributes.__class__ is not dict:  # a plain dict drops nothing
            dropped = _dropped(attributes)
            if dropped:
                append(b"\x50" + _varint(dropped))
    if events:
        append(_events(events))
    if links:
        append(_links(links))
    if status is _UNSET:
        append(_EMPTY_STATUS)
    else:
        append(_status(status))
    append(_REMOTE_FLAGS if parent is not None and parent.is_remote else _LOCAL_FLAGS)
    return b"".join(parts)


def _count(tag: bytes, n: int) -> bytes:
    return tag + _varint(n) if n else b""


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    body = _ld(b"\x0a", scope.name.encode()) if scope.name else b""
    if scope.version:
        body += _ld(b"\x12", scope.version.encode())
    return body + _attributes(b"\x1a", scope.attributes)


#: A span ready for a request: its resource, its instrumentation scope, its encoding.
EncodedSpan = tuple[Resource, "InstrumentationScope | None", bytes]


class EndedSpan(Protocol):
    """A span that ended and encodes itself on demand (a lean span)."""

    def encoded(self) -> bytes:
        """The span as one OTLP ``Span`` message (:func:`encode_span`)."""
        ...


#: Ended spans encoded at a time: enough to keep the encoder's code and caches warm over
#: a run of them; few enough that a span waits for at most this many others.
ENCODE_RUN = 64


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` the SDK's encoder would make."""
    return encode_encoded(
        [(span._resource, span._instrumentation_scope or None, _span(span)) for span in spans]
    )


def encode_encoded(spans: Sequence[EncodedSpan]) -> bytes:
    """The ``ExportTraceServiceRequest`` of spans encoded already, grouped as the SDK does."""
    return (_single_group(spans) if spans else None) or _grouped(spans)


def _grouped(spans: Sequence[EncodedSpan]) -> bytes:
    # Grouped by identity: a Resource's hash serialises it to JSON every time.
    grouped: dict[int, tuple[Resource, dict[int, tuple[Any, list[bytes]]]]] = {}
    for resource, scope, encoded in spans:
        by_scope = grouped.get(id(resource))
        if by_scope is None:
            by_scope = grouped[id(resource)] = (resource, {})
        entry = by_scope[1].get(id(scope))
        if entry is None:
            entry = by_scope[1][id(scope)] = (scope, [])
        entry[1].append(encoded)
    request = []
    for resource, by_id in grouped.values():
        scopes = dict(by_id.values())
        body = _ld(b"\x0a", _attributes(b"\x0a", resource.attributes))
        for scope, encoded_spans in scopes.items():
            parts = [_ld(b"\x0a", _scope(scope))]
            for span in encoded_spans:  # one copy of each span, in the join
                parts += (b"\x12", _varint(len(span)), span)
            scope_body = b"".join(parts)
            if scope is not None and scope.schema_url:
                scope_body += _ld(b"\x1a", scope.schema_url.encode())
            body += _ld(b"\x12", scope_body)
        if resource.schema_url:
            body += _ld(b"\x1a", resource.schema_url.encode())
        request.append(_ld(b"\x0a", body))
    return b"".join(request)


def _single_group(spans: Sequence[EncodedSpan]) -> bytes | None:
    """The request for spans of one resource and one scope (a service's own batch), the
    spans copied once into the result; ``None`` for a batch of several."""
    resource, scope, _ = spans[0]
    framed: list[bytes] = []
    for span_resource, span_scope, span in spans:
        if span_resource is not resource or span_scope is not scope:
            return None
        framed += (b"\x12", _varint(len(span)), span)
    scope_head = _ld(b"\x0a", _scope(scope))
    scope_tail = _ld(b"\x1a", scope.schema_url.encode()) if scope and scope.schema_url else b""
    scope_size = len(scope_head) + sum(map(len, framed)) + len(scope_tail)
    resource_head = _ld(b"\x0a", _attributes(b"\x0a", resource.attributes))
    resource_tail = _ld(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""
    scope_length = _varint(scope_size)
    resource_size = len(resource_head) + 1 + len(scope_length) + scope_size + len(resource_tail)
    return b"".join(
        [
            b"\x0a",
            _varint(resource_size),
            resource_head,
            b"\x12",
            scope_length,
            scope_head,
            *framed,
            scope_tail,
            resource_tail,
        ]
    )


@dataclass(frozen=True, slots=True)
class PlainHTTPResult(BaseHTTPResult):
    """What :class:`PlainHTTPTransport` got back: status, reason, body and headers."""

    body: bytes = b""
    #: ``http.client``'s message: case-insensitive, as the SDK's retry rules want.
    response_headers: Any = None

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        return {} if self.response_headers is None else self.response_headers


class PlainHTTPTransport(BaseHTTPTransport):
    """The SDK exporter's HTTP transport, on ``http.client`` (``http://`` endpoints only).

    The SDK's ``requests`` session spends about 1.2 ms of CPU on a 512-span POST (adapters,
    hooks, cookie jars, a ``.netrc`` lookup per request), ``http.client`` 0.3 ms
    (``benchmarks/tracing_parts.py``), on the export thread of every traced service. The
    SDK's ``_OTLPHTTPClient`` still does all the rest: retries and their backoff,
    ``Retry-After``, the deadline, compression and headers. One kept-alive connection;
    any error closes it, and is a connection error (as ``requests`` classes them), which
    the SDK retries at once for a stale kept-alive connection, then with backoff.
    """

    def __init__(self) -> None:
        self._connection: http.client.HTTPConnection | None = None
        self._netloc = ""

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        try:
            parts = urlsplit(url)
            connection = self._connection
            if connection is None or parts.netloc != self._netloc:
                self.close()
                connection = http.client.HTTPConnection(
                    parts.hostname or "localhost", parts.port, timeout=timeout
                )
                self._connection, self._netloc = connection, parts.netloc
            else:
                connection.timeout = timeout
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            body = response.read()
        except Exception as error:
            self.close()
            return PlainHTTPResult(error=error)
        if response.will_close:
            self.close()
        return PlainHTTPResult(
            status_code=response.status,
            reason=response.reason,
            body=body,
            response_headers=response.msg,
        )

    def is_connection_error(self, exception: Exception | None) -> bool:
        # requests' connection errors and timeouts: refused, reset, closed, timed out,
        # a name that does not resolve, a malformed status line.
        return isinstance(exception, (OSError, http.client.HTTPException))

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _plain_http_suits(endpoint: str) -> bool:
    """Whether ``requests`` would post to ``endpoint`` as plain ``http.client`` does: an
    ``http://`` URL, no proxy for it and no ``.netrc`` credentials (read from the
    environment as ``requests`` reads them)."""
    if urlsplit(endpoint).scheme != "http":
        return False
    if os.environ.get(_CREDENTIAL_PROVIDER) or os.environ.get(_TRACES_CREDENTIAL_PROVIDER):
        return False
    from requests.utils import get_environ_proxies, get_netrc_auth  # noqa: PLC0415

    return not get_environ_proxies(endpoint) and get_netrc_auth(endpoint) is None


_CREDENTIAL_PROVIDER = "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER"
_TRACES_CREDENTIAL_PROVIDER = "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER"


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter with :func:`encode_request` as its encoder.

    Built as the SDK's (endpoint, headers, timeout, compression, TLS and their
    ``OTEL_EXPORTER_OTLP_*`` variables; its retry rules); for an ``http://`` endpoint
    that ``requests`` would reach directly (no proxy, no ``.netrc`` entry, no
    credential-provider session) it posts through :class:`PlainHTTPTransport`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(args) > 7 or kwargs.get("session") is not None or "_transport" in kwargs:
            return  # the caller chose how to post
        client = getattr(self, "_client", None)
        transport = getattr(client, "_transport", None)
        if transport is None or not _plain_http_suits(getattr(self, "_endpoint", "")):
            return
        client._transport = PlainHTTPTransport()  # type: ignore[union-attr]
        transport.close()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if getattr(self, "_shutdown", False) or client is None:
            return super().export(spans)
        try:
            data = encode_request(spans)
        except Exception as exc:  # an attribute type the fast path does not know
            log.debug("fast span encoding failed (%s); using the SDK's encoder", exc)
            return super().export(spans)
        result = client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    def export_encoded(self, data: bytes) -> SpanExportResult:
        """Send a request :func:`encode_encoded` made (retried as the SDK retries)."""
        client = getattr(self, "_client", None)
        if getattr(self, "_shutdown", False) or client is None:
            return SpanExportResult.FAILURE
        result = client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment (``OTEL_BSP_*``), else ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, raw, default)
        return default
    return value if value > 0 else default


class FastBatchSpanProcessor(SpanProcessor):
    """The SDK's ``BatchSpanProcessor`` contract, with spans encoded when they end.

    As the SDK's processor: ended spans wait in a queue of at most ``max_queue_size``
    (more are dropped and counted in :attr:`dropped`, never block the caller); one
    thread exports up to ``max_export_batch_size`` at a time as soon as that many wait,
    and whatever waits every ``schedule_delay_millis``; :meth:`force_flush` exports
    everything queued; :meth:`shutdown` exports the rest and stops. The standard
    ``OTEL_BSP_*`` variables set the defaults (``OTEL_BSP_EXPORT_TIMEOUT`` bounds one
    export, retries included, together with the exporter's own timeout).

    The difference: spans are encoded to OTLP protobuf by the thread that ends them (a
    lean span straight from its slots, see :meth:`add_ended`), so no ``ReadableSpan`` is
    built and the export thread only joins bytes and posts them. Encoding whole batches on
    the export thread held the GIL for milliseconds at a time, stalling the service's
    event loop meanwhile. Lean spans are encoded in runs of up to :data:`ENCODE_RUN`
    (the ended ones count against ``max_queue_size``); the export thread encodes a run
    that is not full when it wakes, and :meth:`force_flush` encodes everything first.
    """

    def __init__(
        self,
        exporter: FastOTLPSpanExporter,
        *,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        schedule_delay_millis: int | None = None,
        export_timeout_millis: int | None = None,
    ) -> None:
        self.exporter = exporter
        self.max_queue_size = max_queue_size or env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch = max_export_batch_size or env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.max_export_batch_size = min(batch, self.max_queue_size)
        delay = schedule_delay_millis or env_int("OTEL_BSP_SCHEDULE_DELAY", 5000)
        self.schedule_delay = delay / 1000
        timeout = export_timeout_millis or env_int("OTEL_BSP_EXPORT_TIMEOUT", 30000)
        #: Seconds one export may take, retries included: the exporter's own timeout
        #: (``OTEL_EXPORTER_OTLP_TIMEOUT``) or this, whichever is shorter.
        self.export_timeout = timeout / 1000
        client = getattr(exporter, "_client", None)
        if client is not None and isinstance(getattr(client, "_timeout", None), int | float):
            # The SDK client bounds its retries by its own timeout.
            client._timeout = min(client._timeout, self.export_timeout)
        #: Spans dropped because the queue was full (or could not be encoded).
        self.dropped = 0
        #: Spans lost because their export failed (after the exporter's retries).
        self.failed = 0
        self._queue: deque[EncodedSpan] = deque()
        self._ended: deque[tuple[Resource, InstrumentationScope | None, EndedSpan]] = deque()
        self._encode_run = min(ENCODE_RUN, self.max_export_batch_size)
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._shutdown = False
        self._thread = threading.Thread(target=self._work, name="atoll-otlp-export", daemon=True)
        self._thread.start()

    def add_ended(
        self, resource: Resource, scope: InstrumentationScope | None, span: EndedSpan
    ) -> None:
        """Take a lean span that ended, to be encoded with the next run; never blocks.

        One at a time as each span ends, encoding cost the messaging pipeline's consumer
        about 9 µs a message more than in runs (``docs/benchmarks.md``, tracing): between
        two spans the rest of the message's work pushes the encoder out of the caches.
        """
        ended = self._ended
        if self._shutdown or len(self._queue) + len(ended) >= self.max_queue_size:
            self.dropped += 1
            return
        ended.append((resource, scope, span))
        if len(ended) >= self._encode_run:
            self._encode_ended()

    def _encode_ended(self) -> None:
        # popleft, not a swap of lists: the export thread and the thread ending spans may
        # both be here, and neither may lose a span the other appends meanwhile.
        ended = self._ended
        enqueue = self._enqueue  # spans taken before a shutdown are still exported
        while ended:
            try:
                resource, scope, span = ended.popleft()
            except IndexError:
                return
            try:
                encoded = span.encoded()
            except Exception as exc:  # an attribute value no OTLP type holds
                log.warning("a span was dropped: it cannot be encoded (%s)", exc)
                self.dropped += 1
                continue
            enqueue(resource, scope, encoded)

    def emit(self, resource: Resource, scope: InstrumentationScope | None, span: bytes) -> None:
        """Queue one span encoded by :func:`encode_span`; never blocks."""
        if self._shutdown:
            self.dropped += 1
            return
        self._enqueue(resource, scope, span)

    def _enqueue(self, resource: Resource, scope: InstrumentationScope | None, span: bytes) -> None:
        queue = self._queue
        if len(queue) >= self.max_queue_size:
            self.dropped += 1
            return
        queue.append((resource, scope, span))
        if len(queue) >= self.max_export_batch_size and not self._wake.is_set():
            self._wake.set()

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        try:
            encoded = _span(span)
        except Exception as exc:  # an attribute value no OTLP type holds
            log.warning("span %r dropped: it cannot be encoded (%s)", span.name, exc)
            self.dropped += 1
            return
        self.emit(span._resource, span._instrumentation_scope or None, encoded)

    def _work(self) -> None:
        while True:
            self._wake.wait(self.schedule_delay)
            self._wake.clear()
            if self._shutdown:
                return  # shutdown() exports what is left
            self._encode_ended()
            with self._export_lock:
                # One batch at least (the delay passed), more while full batches wait.
                self._export_batch()
                while len(self._queue) >= self.max_export_batch_size and not self._shutdown:
                    self._export_batch()

    def _export_batch(self) -> None:
        queue = self._queue
        count = min(len(queue), self.max_export_batch_size)
        if not count:
            return
        batch = [queue.popleft() for _ in range(count)]
        try:
            result = self.exporter.export_encoded(encode_encoded(batch))
        except Exception:
            self.failed += count
            log.exception("exporting %d spans failed", count)
            return
        if result is not SpanExportResult.SUCCESS:
            self.failed += count
            log.debug("exporting %d spans failed; they are dropped", count)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        # Wall-clock bounds, as the SDK's processor has: exports are real HTTP requests
        # on a thread, outside anything a simulated clock drives.
        now = time.monotonic  # determinism: allowed - see above
        deadline = now() + timeout_millis / 1000
        self._encode_ended()
        with self._export_lock:
            while self._queue:
                if now() > deadline:
                    return False
                self._export_batch()
        return True

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        self._wake.set()
        self._thread.join()
        self.force_flush()
        self.exporter.shutdown()  # type: ignore[no-untyped-call]
