"""The C span decoder (``_native.c``) gives what the Python decoder gives, on any body.

The Python decoder is itself checked against upb's full parse (``test_decode.py``, whose
tests run through the C decoder too, as the default). Here both decoders meet generated
requests of every shape the wire allows, unusual encodings of the same fields, and
mutated bodies: the rows, terms, operations, resources, scopes and rejections must be
equal, or both must refuse the body.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status
from otlp import kvs, make_request, make_span, span_id, trace_id

from atoll.observability.collector import MalformedRequestError
from atoll.observability.collector._decode import NATIVE, DecodedBatch, Interner, OTLPDecoder
from atoll.observability.collector._terms import term_hash

pytestmark = pytest.mark.skipif(
    not NATIVE and bool(os.environ.get("ATOLL_NO_NATIVE")),
    reason="built without the C decoder (ATOLL_NO_NATIVE)",
)


def test_the_c_decoder_is_built() -> None:
    # `make install` builds it (hatch_build.py); without it the collector is several
    # times slower, so a build that silently lost it must fail here.
    assert NATIVE


def decoders(*, terms: bool = True) -> tuple[OTLPDecoder, OTLPDecoder]:
    return (
        OTLPDecoder(Interner(), Interner(), collect_terms=terms, native=True),
        OTLPDecoder(Interner(), Interner(), collect_terms=terms, native=False),
    )


def outcome(decoder: OTLPDecoder, body: bytes) -> DecodedBatch | str:
    try:
        return decoder.decode_protobuf(body)
    except MalformedRequestError:
        return "malformed"


def assert_same(body: bytes, *, terms: bool = True) -> DecodedBatch | str:
    native, python = decoders(terms=terms)
    got, expected = outcome(native, body), outcome(python, body)
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
        return got
    assert got.spans == expected.spans
    assert got.terms == expected.terms
    assert got.operations == expected.operations
    assert got.resources == expected.resources
    assert got.scopes == expected.scopes
    assert (got.rejected, got.reasons) == (expected.rejected, expected.reasons)
    return got


# --- generated requests ------------------------------------------------------------

texts = st.text(max_size=20) | st.sampled_from(["", '"\\', "\x00\x1f\x7f", "é\u2028😀"])
scalars = (
    texts | st.integers(-(2**63), 2**63 - 1) | st.booleans() | st.floats() | st.binary(max_size=4)
)
values = scalars | st.lists(scalars, max_size=2) | st.dictionaries(st.text(max_size=3), scalars)
attribute_lists = st.lists(
    st.tuples(st.sampled_from(["a", "b", "k.x", "", "é"]), values), max_size=5
)
ids16 = st.sampled_from([bytes(16), b"", b"\x01" * 15]) | st.binary(min_size=16, max_size=16)
ids8 = st.sampled_from([bytes(8), b"", b"\x01" * 7]) | st.binary(min_size=8, max_size=8)
times = st.integers(0, 2**63 - 1) | st.sampled_from([0, 2**63, 2**64 - 1])
small = st.integers(0, 3) | st.sampled_from([2**31 - 1, 2**32 - 1])


def key_values(pairs: list[tuple[str, object]]) -> list[KeyValue]:
    # kvs() makes one KeyValue per pair, so a key may come twice.
    return [kv for key, value in pairs for kv in kvs({key: value})]


@st.composite
def spans(draw: st.DrawFn) -> Span:
    span = Span(
        trace_id=draw(ids16),
        span_id=draw(ids8),
        parent_span_id=draw(ids8),
        name=draw(texts),
        kind=draw(st.integers(0, 5)),  # type: ignore[arg-type]
        start_time_unix_nano=draw(times),
        end_time_unix_nano=draw(times),
        trace_state=draw(st.sampled_from(["", "k=v", "a=1,b=2"])),
        flags=draw(st.sampled_from([0, 1, 256, 2**32 - 1])),
        dropped_attributes_count=draw(small),
        dropped_events_count=draw(small),
        dropped_links_count=draw(small),
    )
    span.attributes.extend(key_values(draw(attribute_lists)))
    if draw(st.booleans()):
        span.status.CopyFrom(Status(code=draw(st.integers(0, 2)), message=draw(texts)))  # type: ignore[arg-type]
    for _ in range(draw(st.integers(0, 2))):
        event = span.events.add(
            name=draw(texts),
            time_unix_nano=draw(times),
            dropped_attributes_count=draw(small),
        )
        event.attributes.extend(key_values(draw(attribute_lists)))
    for _ in range(draw(st.integers(0, 2))):
        link = span.links.add(
            trace_id=draw(ids16 | st.binary(max_size=3)),
            span_id=draw(ids8),
            trace_state=draw(st.sampled_from(["", "k=v"])),
            flags=draw(st.sampled_from([0, 1, 2**32 - 1])),
            dropped_attributes_count=draw(small),
        )
        link.attributes.extend(key_values(draw(attribute_lists)))
    return span


@st.composite
def requests(draw: st.DrawFn) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        resource_spans = request.resource_spans.add()
        service = draw(st.sampled_from([None, "svc", "other", ""]))
        if service is not None:
            resource_spans.resource.attributes.extend(kvs({"service.name": service}))
        if draw(st.booleans()):
            resource_spans.schema_url = "https://opentelemetry.io/schemas/1.21.0"
        for _ in range(draw(st.integers(0, 2))):
            scope_spans = resource_spans.scope_spans.add()
            if draw(st.booleans()):
                scope_spans.scope.name = draw(st.sampled_from(["lib", "other"]))
            scope_spans.spans.extend(draw(st.lists(spans(), max_size=3)))
    return request


@settings(max_examples=150, deadline=None)
@given(requests(), st.booleans())
def test_generated_requests_decode_as_in_python(request, terms):
    assert_same(request.SerializeToString(), terms=terms)


@settings(max_examples=150, deadline=None)
@given(requests(), st.data())
def test_mutated_requests_decode_as_in_python(request, data):
    body = bytearray(request.SerializeToString())
    for _ in range(data.draw(st.integers(1, 3))):
        if not body:
            break
        at = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.sampled_from(["set", "cut", "insert"]))
        if action == "set":
            body[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del body[at:]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    assert_same(bytes(body))


# --- the usual spans take the C path; the rest are handed back ---------------------


def consumer_span(i: int) -> Span:
    return make_span(
        trace_id(i + 1),
        span_id(i + 1),
        name="process orders.Place",
        kind=5,
        attributes={
            "messaging.system": "atoll",
            "messaging.message.id": f"m-{i}",
            "messaging.delivery.attempt": 1,
            "atoll.retry": False,
        },
    )


def test_the_usual_spans_are_decoded_in_c(monkeypatch):
    from atoll.observability.collector import _decode  # noqa: PLC0415

    def no_slow_path(*args: object) -> None:
        raise AssertionError("a usual span went the slow way")

    monkeypatch.setattr(_decode.OTLPDecoder, "_convert_span", no_slow_path)
    body = make_request("svc", [consumer_span(i) for i in range(50)]).SerializeToString()
    batch = OTLPDecoder(Interner(), Interner()).decode_protobuf(body)
    assert len(batch.spans) == 50
    assert batch.operations == {("svc", "process orders.Place")}
    assert term_hash("messaging.message.id", "m-7") in (batch.terms or set())
    assert term_hash("messaging.delivery.attempt", 1) in (batch.terms or set())
    assert term_hash("atoll.retry", "false") in (batch.terms or set())


def field(number: int, wire: int, payload: bytes) -> bytes:
    return bytes([number << 3 | wire]) + payload


def length_delimited(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return field(number, 2, bytes([len(payload)]) + payload)


def wrap(span_bytes: bytes) -> bytes:
    """A request holding one span given as bytes, under a resource and scope."""
    resource = ResourceSpans()
    resource.resource.attributes.extend(kvs({"service.name": "svc"}))
    resource.scope_spans.add().scope.name = "lib"
    outer = resource.SerializeToString()
    # Append the span to the (only) ScopeSpans by re-encoding it with the span inside.
    scope = resource.scope_spans[0].SerializeToString() + length_delimited(2, span_bytes)
    inner = resource.resource.SerializeToString()
    resource_spans = length_delimited(1, inner) + length_delimited(2, scope)
    assert outer  # the resource and scope as protobuf writes them, above
    return length_delimited(1, resource_spans)


BASE = make_span(trace_id(1), span_id(2), name="op", attributes={"k": "v"}).SerializeToString()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(length_delimited(5, b"renamed"), id="name given twice: the last wins"),
        pytest.param(field(6, 0, b"\x02"), id="kind given twice"),
        pytest.param(length_delimited(15, field(3, 0, b"\x02")), id="status given twice: merged"),
        pytest.param(length_delimited(15, field(1, 0, b"\x01")), id="status's reserved field"),
        pytest.param(field(17, 0, b"\x01"), id="an unknown field"),
        pytest.param(
            length_delimited(9, length_delimited(2, length_delimited(1, b"x"))), id="no key"
        ),
        pytest.param(
            length_delimited(
                9, length_delimited(2, length_delimited(1, b"x")) + length_delimited(1, b"k2")
            ),
            id="value before key",
        ),
        pytest.param(
            length_delimited(
                9, length_delimited(1, b"b") + length_delimited(2, field(2, 0, b"\x02"))
            ),
            id="a boolean written as 2",
        ),
        pytest.param(
            length_delimited(9, length_delimited(1, b"k") + length_delimited(2, b"")),
            id="a key given twice, the second empty",
        ),
        pytest.param(
            length_delimited(
                9,
                length_delimited(1, b"d")
                + length_delimited(2, field(4, 1, struct.pack("<d", 1e16))),
            ),
            id="a double",
        ),
        pytest.param(field(6, 0, b"\xff\xff\xff\xff\x0f"), id="kind beyond int32"),
        pytest.param(length_delimited(5, b"\xed\xa0\x80"), id="a surrogate in the name"),
        pytest.param(length_delimited(5, b"\xc0\x80"), id="an overlong name"),
        pytest.param(field(1, 2, b"\x05abc"), id="truncated"),
    ],
)
def test_unusual_encodings_decode_as_in_python(extra):
    assert_same(wrap(BASE + extra))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(field(2, 0, b"\x01"), id="an unknown request field"),
        pytest.param(
            length_delimited(1, field(4, 0, b"\x01")), id="an unknown resource_spans field"
        ),
        pytest.param(
            length_delimited(1, length_delimited(3, b"a") + length_delimited(3, b"b")),
            id="schema_url twice",
        ),
        pytest.param(length_delimited(1, length_delimited(3, b"\xff")), id="schema_url not UTF-8"),
        pytest.param(length_delimited(1, length_delimited(1, b"\xff")), id="a malformed resource"),
        pytest.param(
            length_delimited(1, length_delimited(2, length_delimited(1, b"\x0a\x01\xff"))),
            id="a scope name not UTF-8",
        ),
        pytest.param(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", id="a huge length"),
        pytest.param(b"\x0b\x0c", id="a group"),
    ],
)
def test_unusual_requests_decode_as_in_python(body):
    assert_same(body)


def test_every_one_byte_mutation_of_a_rich_body_decodes_as_in_python():
    span = make_span(
        trace_id(3),
        span_id(4),
        parent=span_id(5),
        attributes={"s": "t\n", "i": -1, "b": True},
        events=[("e", 7, {"x": "y"})],
        links=[(trace_id(6), span_id(7), {"l": 1})],
        status=2,
        message="bad",
    )
    body = make_request("svc", [span]).SerializeToString()
    for position in range(len(body)):
        for byte in (0x00, 0x01, 0x02, 0x08, 0x0A, 0x10, 0x12, 0x7F, 0x80, 0xFF):
            mutated = bytearray(body)
            mutated[position] = byte
            assert_same(bytes(mutated))


UNNAMED = make_span(trace_id(1), span_id(2), name="").SerializeToString()
BAD_UTF8 = [
    b"\xed\xa0\x80",  # a surrogate
    b"\xc0\x80",  # overlong
    b"\xe0\x80\x80",  # overlong
    b"\xf0\x80\x80\x80",  # overlong
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\x80",  # a lone continuation
    b"\xc3",  # cut short
    b"\xe2\x82",
    b"\xc3\x28",  # a bad continuation
]
GOOD_UTF8 = [b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\x7f"]


@pytest.mark.parametrize("text", BAD_UTF8 + GOOD_UTF8)
@pytest.mark.parametrize("where", ["name", "trace_state", "key", "value", "status", "event"])
def test_strings_are_utf8_as_upb_checks_them(text, where):
    encoded = {
        "name": length_delimited(5, text),
        "trace_state": length_delimited(3, text),
        "key": length_delimited(
            9, length_delimited(1, text) + length_delimited(2, length_delimited(1, b"v"))
        ),
        "value": length_delimited(
            9, length_delimited(1, b"k") + length_delimited(2, length_delimited(1, text))
        ),
        "status": length_delimited(15, length_delimited(2, text)),
        "event": length_delimited(11, length_delimited(2, text)),
    }[where]
    result = assert_same(wrap(UNNAMED + encoded))
    assert (result == "malformed") == (text in BAD_UTF8)


def test_json_text_is_escaped_as_msgspec_escapes_it():
    text = "".join(chr(c) for c in range(0x30)) + '\x7f"\\/é\u2028😀'
    span = make_span(trace_id(1), span_id(1), name=text, attributes={text: text})
    span.events.add(name=text, time_unix_nano=2**64 - 1)
    span.links.add(trace_id=b"\x00\xff", span_id=b"", trace_state="k=v")
    batch = assert_same(make_request("svc", [span]).SerializeToString())
    assert isinstance(batch, DecodedBatch)
    assert len(batch.spans) == 1


def test_int64_extremes_and_a_negative_kind():
    span = make_span(
        trace_id(1), span_id(1), attributes={"min": -(2**63), "max": 2**63 - 1, "zero": 0}
    )
    assert_same(make_request("svc", [span]).SerializeToString())
    raw = AnyValue(int_value=-1).SerializeToString()
    assert raw  # ten bytes of varint: read as int64
    span.kind = -1  # type: ignore[assignment]
    assert_same(make_request("svc", [span]).SerializeToString())


@pytest.mark.parametrize("special", ['"', "\\", "\x00", "\x1f", "\n", "\x7f", "é", "😀"])
def test_a_character_to_escape_is_found_at_any_position(special):
    # The C walk copies eight bytes at a time when none needs escaping.
    spans = [
        make_span(
            trace_id(i + 1),
            span_id(i + 1),
            name=("a" * i + special + "b" * (17 - i)),
            attributes={"k": "x" * i + special + "y" * (17 - i)},
        )
        for i in range(18)
    ]
    batch = assert_same(make_request("svc", spans).SerializeToString())
    assert isinstance(batch, DecodedBatch)
    assert len(batch.spans) == 18


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _ld(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@pytest.mark.parametrize("where", ["event", "link", "resource", "scope", "span"])
def test_nesting_is_limited_from_the_request_as_upb_limits_it(where):
    # Parts handed to upb are parsed inside the messages that hold them: a value nested
    # just under upb's limit counted from a part, over it counted from the request, must
    # be a 400 both ways (found by a review: the C path accepted it).
    for depth in range(40, 52):
        value = _ld(1, b"x")
        for _ in range(depth):
            value = _ld(5, _ld(1, value))  # an array holding the value
        kv = _ld(1, b"k") + _ld(2, value)
        span = _ld(1, trace_id(1)) + _ld(2, span_id(2)) + _ld(5, b"op")
        resource = _ld(1, _ld(1, b"service.name") + _ld(2, _ld(1, b"svc")))
        scope = _ld(1, b"lib")
        if where == "event":
            span += _ld(11, _ld(2, b"e") + _ld(3, kv))
        elif where == "link":
            span += _ld(13, _ld(1, trace_id(3)) + _ld(2, span_id(4)) + _ld(4, kv))
        elif where == "resource":
            resource += _ld(1, kv)
        elif where == "scope":
            scope += _ld(3, kv)
        else:
            span += _ld(9, kv)
        body = _ld(1, _ld(1, resource) + _ld(2, _ld(1, scope) + _ld(2, span)))
        assert_same(body)


def test_a_long_string_costs_memory_in_proportion():
    import tracemalloc  # noqa: PLC0415

    span = make_span(trace_id(1), span_id(1), attributes={"big": "x" * 4_000_000})
    body = make_request("svc", [span]).SerializeToString()
    decoder = OTLPDecoder(Interner(), Interner())
    tracemalloc.start()
    try:
        decoder.decode_protobuf(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The JSON text and its buffer: about twice the string, not six times (a review
    # found every string reserved six bytes a byte).
    assert peak < 3 * len(body)
