"""The fast encoder writes exactly what the OpenTelemetry SDK's encoder writes."""

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from atoll.observability import _otlp
from atoll.observability._otlp import encode_request

keys = st.text(min_size=0, max_size=12)
scalars = st.one_of(
    st.text(max_size=80),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
values = st.one_of(
    scalars,
    st.lists(st.text(max_size=5), max_size=3).map(tuple),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3).map(tuple),
    st.binary(max_size=8),
)
attributes = st.dictionaries(keys, values, max_size=6)
ids128 = st.integers(min_value=1, max_value=2**128 - 1)
ids64 = st.integers(min_value=1, max_value=2**64 - 1)
contexts = st.builds(
    SpanContext,
    trace_id=ids128,
    span_id=ids64,
    is_remote=st.booleans(),
    trace_flags=st.sampled_from([TraceFlags(0), TraceFlags(1)]),
    trace_state=st.one_of(st.none(), st.just(TraceState([("vendor", "value"), ("b", "1")]))),
)
statuses = st.one_of(
    st.just(Status(StatusCode.UNSET)),
    st.just(Status(StatusCode.OK)),
    st.builds(lambda d: Status(StatusCode.ERROR, d), st.one_of(st.none(), st.text(max_size=20))),
)
resources = st.sampled_from(
    [
        Resource.create({"service.name": "orders"}),
        Resource.create({"service.name": "inventory", "deployment.environment": "test"}),
        Resource({"service.name": "payments"}, schema_url="https://opentelemetry.io/schemas/1"),
    ]
)
scopes = st.sampled_from(
    [
        InstrumentationScope("atoll", "0.1.0"),
        InstrumentationScope("other", None, None, {"k": 1}),
        InstrumentationScope("versioned", "2", "https://opentelemetry.io/schemas/1.2"),
    ]
)


@st.composite
def spans(draw):
    return ReadableSpan(
        name=draw(st.text(max_size=30)),
        context=draw(contexts),
        parent=draw(st.one_of(st.none(), contexts)),
        resource=draw(resources),
        attributes=draw(attributes),
        events=draw(
            st.lists(
                st.builds(
                    Event,
                    name=st.text(max_size=10),
                    attributes=attributes,
                    timestamp=st.integers(0, 2**63),
                ),
                max_size=2,
            )
        ),
        links=draw(st.lists(st.builds(Link, context=contexts, attributes=attributes), max_size=2)),
        kind=draw(st.sampled_from(list(SpanKind))),
        status=draw(statuses),
        start_time=draw(st.integers(0, 2**63)),
        end_time=draw(st.integers(0, 2**63)),
        instrumentation_scope=draw(scopes),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(spans(), min_size=1, max_size=5))
def test_the_fast_encoding_is_the_sdk_encoding(batch):
    ours = ExportTraceServiceRequest.FromString(encode_request(batch))
    assert ours == encode_spans(batch)


class _Everything(set):
    def __contains__(self, item: object) -> bool:
        return True


@settings(max_examples=200, deadline=None)
@given(st.lists(spans(), min_size=1, max_size=5))
def test_the_uncached_path_is_the_sdk_encoding_too(batch):
    # Keys whose values never repeat (ids) skip the cache: every key does here.
    real = _otlp._uncached_keys
    _otlp._uncached_keys = _Everything()
    try:
        ours = ExportTraceServiceRequest.FromString(encode_request(batch))
    finally:
        _otlp._uncached_keys = real
    assert ours == encode_spans(batch)


def test_the_checker_notices_a_difference():
    span = ReadableSpan(name="x", context=SpanContext(1, 2, False), attributes={"a": 1})
    other = ReadableSpan(name="x", context=SpanContext(1, 2, False), attributes={"a": 2})
    assert ExportTraceServiceRequest.FromString(encode_request([span])) != encode_spans([other])
