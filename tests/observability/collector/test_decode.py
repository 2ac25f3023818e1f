"""Decoding never fails on input except with MalformedRequestError, and keeps values."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from otlp import make_request, make_span, span_id, trace_id

from atoll.observability.collector import MalformedRequestError
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
    stored = json.loads(batch.spans[0][13])
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
