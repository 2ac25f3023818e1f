"""The lean span's span contexts are the ones OpenTelemetry's constructor makes."""

from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.trace import DEFAULT_TRACE_STATE, SpanContext, TraceFlags, TraceState

from atoll.observability._lean import make_span_context, parse_traceparent

ids = st.integers(min_value=0, max_value=2**130)
flags = st.integers(min_value=0, max_value=255).map(TraceFlags)
states = st.one_of(st.none(), st.just(TraceState([("vendor", "value")])))


@given(trace_id=ids, span_id=st.integers(0, 2**66), remote=st.booleans(), flag=flags, state=states)
def test_made_directly_equals_made_by_the_constructor(trace_id, span_id, remote, flag, state):
    fast = make_span_context(trace_id, span_id, remote=remote, flags=flag, state=state)
    slow = SpanContext(trace_id, span_id, is_remote=remote, trace_flags=flag, trace_state=state)
    assert type(fast) is SpanContext
    assert fast == slow
    assert (fast.is_valid, fast.is_remote, fast.trace_flags.sampled) == (
        slow.is_valid,
        slow.is_remote,
        slow.trace_flags.sampled,
    )
    assert fast.trace_state is (DEFAULT_TRACE_STATE if state is None else state)


@given(
    trace_id=st.integers(1, 2**128 - 1), span_id=st.integers(1, 2**64 - 1), flag=st.integers(0, 255)
)
def test_a_parsed_traceparent_equals_the_constructors_context(trace_id, span_id, flag):
    header = f"00-{trace_id:032x}-{span_id:016x}-{flag:02x}"
    parsed = parse_traceparent({"traceparent": header, "tracestate": "a=1,b=2"})
    expected = SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=TraceFlags(flag),
        trace_state=TraceState.from_header(["a=1,b=2"]),
    )
    assert parsed == expected
    assert isinstance(parsed.trace_flags, TraceFlags)
    assert parsed.trace_flags.sampled == bool(flag & 1)
