"""parse_traceparent (the message consumer's and the gateway's W3C parser) follows W3C
Trace Context level 1 as the SDK's propagator does."""

import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from atoll.observability._lean import parse_traceparent

T = "4bf92f3577b34da6a3ce929d0e0e4736"
S = "00f067aa0ba902b7"


def test_a_future_version_with_more_fields_is_accepted():
    # W3C: a version above 00 may carry more fields after the flags; parse the first four.
    header = f"01-{T}-{S}-01-what-the-future-will-be-like"
    sdk = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header}))
    assert sdk.get_span_context().is_valid  # the SDK continues the trace
    parsed = parse_traceparent({"traceparent": header})
    assert parsed is not None, "the trace is broken: the handler's span becomes a new root"
    assert parsed.trace_id == int(T, 16)


@pytest.mark.parametrize(
    "header",
    [
        f"00-{T.upper()}-{S}-01",  # uppercase hex: not HEXDIGLC
        f"00-+{T[1:]}-{S}-01",  # int() takes a sign
        f"00-{T[:5]}_{T[6:]}-{S}-01",  # ... and underscores
        f"00- {T[1:]}-{S}-01",  # ... and spaces
        f"zz-{T}-{S}-01",  # version not hex
        f"00-{T}x{S}x01",  # no dashes between the fields
    ],
)
def test_an_invalid_traceparent_is_ignored(header):
    sdk = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header}))
    assert not sdk.get_span_context().is_valid
    assert parse_traceparent({"traceparent": header}) is None
