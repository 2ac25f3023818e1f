"""Decoding never fails on input except with MalformedRequestError, and keeps values."""

from __future__ import annotations

import base64
import copy
import json
import math

from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp import make_request, make_span, span_id, trace_id

from atoll.observability.collector import MalformedRequestError, _json
from atoll.observability.collector._decode import (
    DecodedBatch,
    Interner,
    OTLPDecoder,
    hex_ids_to_base64,
)

decoder = OTLPDecoder(Interner(), Interner())


def decode_or_reject(fn, body: bytes) -> DecodedBatch | None:
    try:
        return fn(body)
    except MalformedRequestError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_are_rejected_as_protobuf(body):
    decode_or_reject(decoder.decode_protobuf, body)


_valid = make_request(
    "svc",
    [make_span(trace_id(1), span_id(2), attributes={"a": [1, {"b": b"\x00"}], "f": 1.5})],
).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_valid) - 1), st.integers(0, 255))
def test_mutated_protobuf_decodes_or_is_rejected(position, byte):
    body = bytearray(_valid)
    body[position] = byte
    batch = decode_or_reject(decoder.decode_protobuf, bytes(body))
    if batch is not None:
        for row in batch.spans:
            assert len(row[0]) == 16
            assert len(row[1]) == 8


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)
keys = st.sampled_from(
    [
        "resourceSpans",
        "scopeSpans",
        "spans",
        "traceId",
        "spanId",
        "parentSpanId",
        "name",
        "kind",
        "startTimeUnixNano",
        "attributes",
        "key",
        "value",
        "stringValue",
        "links",
        "x",
    ]
)
otlp_like = st.recursive(
    json_values,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(otlp_like)
def test_any_json_decodes_or_is_rejected(document):
    decode_or_reject(decoder.decode_json, json.dumps(document).encode())


def test_hex_and_base64_ids():
    document = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "0102030405060708090a0b0c0d0e0f10",
                                "spanId": "AQIDBAUGBwg=",
                                "parentSpanId": "!!",
                                "links": [{"trace_id": "ff" * 16, "span_id": "-_-_-_-_-_8"}],
                            },
                        ]
                    }
                ]
            }
        ]
    }
    hex_ids_to_base64(document)
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "AQIDBAUGBwgJCgsMDQ4PEA=="
    assert span["spanId"] == "AQIDBAUGBwg="  # base64 stays base64
    assert span["parentSpanId"] == "AA=="  # neither: one byte, so the span is rejected
    assert span["links"][0]["trace_id"] == "/////////////////////w=="
    assert span["links"][0]["span_id"] == "+/+/+/+/+/8="  # URL-safe base64


def test_values_are_kept_with_their_types():
    attributes = {
        "s": "text",
        "i": -(2**63),
        "b": False,
        "d": 0.25,
        "nan": math.nan,
        "bytes": b"\x00\xff",
        "list": [1, "two", [3.0]],
        "map": {"k": {"deep": True}},
    }
    batch = decoder.convert(
        make_request("svc", [make_span(trace_id(), span_id(), attributes=attributes)])
    )
    stored = json.loads(batch.spans[0][11])
    assert stored == {
        "s": "text",
        "i": -(2**63),
        "b": False,
        "d": 0.25,
        "nan": "nan",
        "bytes": "AP8=",
        "list": [1, "two", [3.0]],
        "map": {"k": {"deep": True}},
    }


def test_resource_without_service_name_and_zero_parent():
    batch = decoder.convert(
        make_request(None, [make_span(trace_id(), span_id(), parent=b"\x00" * 8)])
    )
    assert next(iter(batch.resources.values())).service == "unknown_service"
    assert batch.spans[0][2] is None  # an all-zero parent means no parent


# --- the OTLP/JSON fast path agrees with protobuf's parser --------------------------


def reference(document):
    """The slow path: ids rewritten, protobuf's parser, then the protobuf conversion."""
    document = copy.deepcopy(document)
    hex_ids_to_base64(document)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except Exception:
        return None
    return decoder.convert(request)


def same(fast, slow):
    assert fast.spans == slow.spans
    assert (fast.rejected, fast.reasons) == (slow.rejected, slow.reasons)
    assert fast.operations == slow.operations
    assert {k: (r.service, r.attributes) for k, r in fast.resources.items()} == {
        k: (r.service, r.attributes) for k, r in slow.resources.items()
    }


ids16 = st.one_of(
    st.binary(min_size=16, max_size=16), st.sampled_from([b"", b"\x00" * 16, b"\x01" * 3])
)
ids8 = st.one_of(
    st.binary(min_size=8, max_size=8), st.sampled_from([b"", b"\x00" * 8, b"\x01" * 3])
)
scalars = st.one_of(
    st.text(max_size=8),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=6),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
attribute_maps = st.dictionaries(st.text(max_size=6), values, max_size=4)
times = st.integers(0, 2**64 - 1)


@st.composite
def requests(draw):
    spans = []
    for _ in range(draw(st.integers(0, 4))):
        span = make_span(
            draw(ids16),
            draw(ids8),
            parent=draw(ids8),
            name=draw(st.text(max_size=10)),
            start_ns=0,
            duration_ns=0,
            status=draw(st.integers(0, 2)),
            message=draw(st.text(max_size=5)),
            kind=draw(st.integers(0, 5)),
            attributes=draw(attribute_maps),
            events=[(draw(st.text(max_size=5)), draw(times), draw(attribute_maps))],
            links=[(draw(ids16), draw(ids8), draw(attribute_maps))] if draw(st.booleans()) else [],
        )
        span.start_time_unix_nano = draw(times)
        span.end_time_unix_nano = draw(times)
        span.flags = draw(st.integers(0, 2**32 - 1))
        span.trace_state = draw(st.text(max_size=5))
        span.dropped_attributes_count = draw(st.integers(0, 3))
        spans.append(span)
    return make_request(
        draw(st.one_of(st.none(), st.text(max_size=6))), spans, draw(attribute_maps)
    )


def to_hex_ids(document):
    """The OTLP JSON mapping's ids: hex instead of json_format's base64."""
    for resource_spans in document.get("resourceSpans", document.get("resource_spans", [])):
        for scope_spans in resource_spans.get("scopeSpans", resource_spans.get("scope_spans", [])):
            for span in scope_spans.get("spans", []):
                for holder in [span, *span.get("links", [])]:
                    for key in (
                        "traceId",
                        "spanId",
                        "parentSpanId",
                        "trace_id",
                        "span_id",
                        "parent_span_id",
                    ):
                        if key in holder:
                            holder[key] = base64.b64decode(holder[key]).hex()


@settings(max_examples=120, deadline=None)
@given(requests(), st.booleans(), st.booleans(), st.booleans())
def test_json_fast_path_matches_protobufs_parser(request, snake, int_enums, hex_ids):
    document = json_format.MessageToDict(
        request, preserving_proto_field_name=snake, use_integers_for_enums=int_enums
    )
    if hex_ids:
        to_hex_ids(document)
    document = json.loads(json.dumps(document))
    slow = reference(document)
    assert slow is not None
    try:
        fast = decoder.convert_json(copy.deepcopy(document))
    except _json.Fallback:
        # Only forms protobuf writes but SDKs do not (NaN as a string) may fall back.
        assert "NaN" in json.dumps(document) or "Infinity" in json.dumps(document)
        return
    same(fast, slow)


@settings(max_examples=300, deadline=None)
@given(otlp_like)
def test_json_fast_path_accepts_only_what_protobuf_accepts(document):
    if not isinstance(document, dict):
        return
    try:
        fast = decoder.convert_json(copy.deepcopy(document))
    except _json.Fallback:
        return
    slow = reference(document)
    assert slow is not None, document
    same(fast, slow)


def test_span_attributes_and_terms_are_the_general_ones():
    # The inline path (scalars) and the general one give the same values
    # and index terms, a key given twice included (the last one wins).
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue  # noqa: PLC0415

    from atoll.observability.collector._decode import (  # noqa: PLC0415
        _span_attributes,
        add_terms,
        attributes_dict,
    )

    def pair(key: str, **value: object) -> KeyValue:
        kv = KeyValue(key=key)
        for field_name, field_value in value.items():
            setattr(kv.value, field_name, field_value)
        return kv

    cases = [
        [pair("a", string_value="x"), pair("n", int_value=3)],
        [pair("a", string_value="x"), pair("a", int_value=3)],
        [pair("a", string_value="x"), pair("b", bool_value=True), pair("d", double_value=0.5)],
        [pair("a", string_value="x"), pair("e")],
        [pair("b", bool_value=False), pair("d", double_value=float("inf")), pair("n", int_value=0)],
        [pair("d", double_value=float("nan")), pair("e", double_value=-2.5)],
        [pair("b", bool_value=True), pair("b", string_value="true"), pair("c", bool_value=True)],
        [pair("a", string_value="x"), listed := pair("l")],
    ]
    listed.value.array_value.values.add(int_value=1)
    for attributes in cases:
        terms: set[tuple[str, str | int | float]] = set()
        expected_terms: set[tuple[str, str | int | float]] = set()
        expected = attributes_dict(attributes)
        add_terms(expected_terms, expected)
        assert _span_attributes(attributes, terms) == expected
        assert terms == expected_terms
        assert _span_attributes(attributes, None) == expected


# --- attributes read from their bytes agree with upb's parse ------------------------

scalars = (
    st.text(max_size=140)  # lengths of one and two bytes
    | st.integers(-(2**63), 2**63 - 1)
    | st.booleans()
    | st.floats()
    | st.binary(max_size=4)
)
attribute_maps = st.dictionaries(
    st.text(max_size=8),
    scalars | st.lists(scalars, max_size=2) | st.dictionaries(st.text(max_size=3), scalars),
    max_size=6,
)


def same_batches(raw: DecodedBatch, parsed: DecodedBatch) -> None:
    assert raw.spans == parsed.spans
    assert raw.terms == parsed.terms
    assert raw.rejected == parsed.rejected


@settings(max_examples=300, deadline=None)
@given(st.lists(attribute_maps, min_size=1, max_size=3))
def test_raw_attributes_decode_as_upb_parses_them(spans):
    request = make_request(
        "svc",
        [make_span(trace_id(i + 1), span_id(i + 1), attributes=a) for i, a in enumerate(spans)],
    )
    body = request.SerializeToString()
    # Twice: the second time every scalar comes from the decoder's cache.
    for _ in range(2):
        same_batches(decoder.decode_protobuf(body), decoder.convert(request))


_scalar_body = make_request(
    "svc",
    [
        make_span(
            trace_id(1),
            span_id(2),
            attributes={"s": "text", "i": -5, "n": 300, "b": True, "d": 0.5, "u": "é"},
        )
    ],
).SerializeToString()


def test_every_one_byte_mutation_decodes_as_upb_parses_it():
    # Exhaustive (every position, every byte value): a change anywhere, attributes or
    # not, gives what upb's full parse gives: the same rows, or a 400 for both. Among
    # them, a span rejected for its ids whose attributes no longer parse (position 114,
    # byte 21, found by an earlier random version of this test).
    for position in range(len(_scalar_body)):
        for byte in range(256):
            body = bytearray(_scalar_body)
            body[position] = byte
            try:
                parsed = decoder.convert(ExportTraceServiceRequest.FromString(bytes(body)))
            except Exception:
                parsed = None
            raw = decode_or_reject(decoder.decode_protobuf, bytes(body))
            if parsed is None:
                assert raw is None, (position, byte)
            else:
                assert raw is not None, (position, byte)
                same_batches(raw, parsed)


def test_scalar_key_value_reads_the_usual_encodings():
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue  # noqa: PLC0415

    from atoll.observability.collector._decode import _scalar_key_value  # noqa: PLC0415
    from atoll.observability.collector._terms import term_hash  # noqa: PLC0415

    def raw(**value: object) -> bytes:
        return KeyValue(key="k", value=AnyValue(**value)).SerializeToString()

    assert _scalar_key_value(raw(string_value="x")) == ("k", "x", term_hash("k", "x"))
    assert _scalar_key_value(raw(string_value="")) == ("k", "", term_hash("k", ""))
    low = -(2**63)
    assert _scalar_key_value(raw(int_value=low)) == ("k", low, term_hash("k", low))
    assert _scalar_key_value(raw(bool_value=False)) == ("k", False, term_hash("k", "false"))
    assert _scalar_key_value(raw(double_value=float("inf"))) == ("k", "inf", term_hash("k", "inf"))
    # What it leaves to upb: long strings, bytes, arrays, no value, invalid UTF-8.
    assert _scalar_key_value(raw(string_value="x" * 200)) is None
    assert _scalar_key_value(raw(bytes_value=b"x")) is None
    assert _scalar_key_value(KeyValue(key="k").SerializeToString()) is None
    assert _scalar_key_value(b"\x0a\x01\xff\x12\x02\x0a\x00") is None
    assert _scalar_key_value(b"") is None
