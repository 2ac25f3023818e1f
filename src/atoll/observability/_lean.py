"""A lean span for atoll's per-message hot path.

A consumer span through the OpenTelemetry SDK (extract the W3C parent,
``start_as_current_span``, inject for what it sends, end into the SDK's batch processor)
costs about 35 µs on the handling thread on this machine (limits, locks, attribute
cleaning, sampler plumbing), and encoding it for export another 36 to 40; a message
costs about 100 µs end to end. A :class:`LeanSpan` is a real ``opentelemetry.trace.Span``
(user code in a handler sees it as the current span, nests its own spans under it, adds
attributes and events) that records into a few slots: about 12 µs for the same work,
encoding included (``benchmarks/tracing_parts.py``). With atoll's
default OTLP export it ends by handing itself to a
:class:`~atoll.observability._otlp.FastBatchSpanProcessor`, which encodes it to OTLP
protobuf from its slots together with the spans that ended around it (no
``ReadableSpan``); with any other processor it hands over an SDK ``ReadableSpan`` as
usual. An ended span ignores the setters, as the SDK's spans do.

Its ids come from the service's :class:`~atoll.determinism.RandomSource` and its times
from its :class:`~atoll.determinism.Clock`, so simulated runs stay reproducible.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    DEFAULT_TRACE_STATE,
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.util.types import Attributes, AttributeValue

from atoll.determinism import Clock, RandomSource

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_BAGGAGE = W3CBaggagePropagator()
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
#: The status of a span nobody set one on (shared, so the encoder knows it at a glance).
UNSET_STATUS = Status(StatusCode.UNSET)
_MAX_TRACE_ID = 2**128 - 1
_MAX_SPAN_ID = 2**64 - 1
#: ``SpanContext`` is a tuple whose ``__new__`` (Python code, keyword arguments) only
#: fills in defaults and works out ``is_valid``: a span context per span made directly,
#: with the same fields in the same order, costs 100 ns instead of 420 (timeit).
#: ``tests/observability/test_lean_context.py`` holds the two ways equal.
_new_tuple = tuple.__new__


def make_span_context(
    trace_id: int, span_id: int, *, remote: bool, flags: TraceFlags, state: TraceState | None
) -> SpanContext:
    """``SpanContext(trace_id, span_id, remote, flags, state)``, without its ``__new__``."""
    valid = 0 < trace_id <= _MAX_TRACE_ID and 0 < span_id <= _MAX_SPAN_ID
    return _new_tuple(
        SpanContext,
        (trace_id, span_id, remote, flags, DEFAULT_TRACE_STATE if state is None else state, valid),
    )


#: W3C Trace Context's traceparent (lower-case hex only), as the SDK's propagator reads it.
_TRACEPARENT: Final = re.compile(
    r"\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*\Z"
)


def parse_traceparent(carrier: Mapping[str, str]) -> SpanContext | None:
    """The remote span context in W3C headers, parsed without the propagator machinery."""
    header = carrier.get("traceparent")
    if not header:
        return None
    found = _TRACEPARENT.match(header)
    if found is None:
        return None
    version, trace_hex, span_hex, flags_hex, more = found.groups()
    # A later version may add fields after the flags (read as version 00's); 00 has none.
    if version == "ff" or (more and version == "00"):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    flags = int(flags_hex, 16)
    if not trace_id or not span_id:
        return None
    state = carrier.get("tracestate")
    return make_span_context(
        trace_id,
        span_id,
        remote=True,
        flags=_SAMPLED if flags == 1 else _NOT_SAMPLED if flags == 0 else TraceFlags(flags),
        state=TraceState.from_header([state]) if state else None,
    )


#: Attribute value types stored as they are (the encoder's fast paths).
_PLAIN: Final = frozenset({str, bool, int, float})


def _cleaned(value: object, limit: int | None) -> AttributeValue | None:
    """An attribute value as the SDK keeps it: primitives and sequences of them as they
    are (strings cut to ``limit``), ``None`` dropped, anything else as its ``str()``
    (a UUID, a Decimal), so that one odd value cannot cost the whole span."""
    if value is None:
        return None
    if isinstance(value, str):
        return value[:limit] if limit is not None else value
    if isinstance(value, bool | int | float | bytes):
        return value
    if isinstance(value, list | tuple):
        items = [_cleaned(item, limit) for item in value]
        return tuple(item for item in items if item is not None)
    text = str(value)
    return text[:limit] if limit is not None else text


class LeanTracer:
    """Makes :class:`LeanSpan`s for one service and ends them into ``processor``."""

    __slots__ = (
        "_parent_based",
        "_roots_always",
        "add_ended",
        "attribute_limit",
        "clock",
        "encode",
        "event_limit",
        "processor",
        "random",
        "resource",
        "sampler",
        "scope",
        "value_limit",
    )

    def __init__(
        self,
        *,
        processor: SpanProcessor,
        resource: Resource,
        sampler: Any,
        clock: Clock,
        random: RandomSource,
    ) -> None:
        self.processor = processor
        self.resource = resource
        self.sampler = sampler
        self.clock = clock
        self.random = random
        self.scope = InstrumentationScope("atoll")
        # The SDK's limits (OTEL_SPAN_EVENT_COUNT_LIMIT, OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT,
        # OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT), read once, for what code adds to a span.
        limits = SpanLimits()
        self.event_limit: int | None = limits.max_events
        self.attribute_limit: int | None = limits.max_span_attributes
        self.value_limit: int | None = limits.max_span_attribute_length
        # A processor that takes ended lean spans (FastBatchSpanProcessor) encodes them
        # from their slots, in runs: no ReadableSpan is built.
        self.add_ended: Any = getattr(processor, "add_ended", None)
        self.encode: Any = None
        if self.add_ended is not None:
            from atoll.observability._otlp import encode_span  # noqa: PLC0415 - otlp extra

            self.encode = encode_span
        # The default sampler (parent-based, roots always on) needs no call per span.
        description = sampler.get_description() if sampler is not None else ""
        self._roots_always = description.startswith("ParentBased{root:AlwaysOnSampler")
        self._parent_based = description.startswith("ParentBased{")

    def span(
        self,
        name: str,
        *,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
    ) -> LeanSpan:
        """A span to use as a context manager; the child of ``parent`` when given."""
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
            state = parent.trace_state
            if self._parent_based:
                sampled = parent.trace_flags.sampled
            else:
                decision = self.sampler.should_sample(
                    set_span_in_context(NonRecordingSpan(parent)), trace_id, name, kind, attributes
                )
                sampled = decision.decision.is_sampled()
        else:
            parent = None
            trace_id = self.random.getrandbits(128) or 1
            if self._roots_always:
                sampled = True
            else:
                decision = self.sampler.should_sample(None, trace_id, name, kind, attributes)
                sampled = decision.decision.is_sampled()
            state = None
        context = make_span_context(
            trace_id,
            self.random.getrandbits(64) or 1,
            remote=False,
            flags=_SAMPLED if sampled else _NOT_SAMPLED,
            state=state,
        )
        return LeanSpan(self, name, context, parent, kind, attributes)


class LeanSpan(Span):
    """A recording span with just what atoll's spans need (see the module docstring)."""

    __slots__ = (
        "_attributes",
        "_context",
        "_end",
        "_events",
        "_kind",
        "_name",
        "_parent",
        "_start",
        "_status",
        "_token",
        "_tracer",
    )

    def __init__(  # noqa: PLR0917 - built only by LeanTracer.span
        self,
        tracer: LeanTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._events: list[Event] = []
        self._status = UNSET_STATUS
        self._start = 0
        self._end: int | None = None
        self._token: object = None

    def __enter__(self) -> Self:
        self._start = int(self._tracer.clock.time() * 1e9)
        self._token = otel_context.attach(set_span_in_context(self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]
        if exc is not None and isinstance(exc, Exception):
            self.record_exception(exc)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.end()

    # -- the Span interface -----------------------------------------------------------

    def headers(self) -> dict[str, str]:
        """This span's context as W3C headers, for what it sends."""
        context = self._context
        headers = {
            "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-"
            f"{int(context.trace_flags):02x}"
        }
        state = context.trace_state
        if state is not DEFAULT_TRACE_STATE and state:  # no Python __len__ for most spans
            headers["tracestate"] = state.to_header()
        return headers

    def propagated(self, incoming: Mapping[str, str]) -> dict[str, str]:
        """The trace headers for what this span's handler sends: ``incoming`` (the
        message's) with this span's ``traceparent`` and ``tracestate`` in place of the
        sender's, and the current baggage if there is some (else the message's)."""
        outgoing = dict(incoming)
        outgoing.pop("tracestate", None)
        outgoing.update(self.headers())
        if baggage.get_all():
            # The runtime makes the message's baggage current for its handler: what is
            # current now is that, as the handler changed it.
            _BAGGAGE.inject(outgoing)
        return outgoing

    @property
    def tracer(self) -> LeanTracer:
        """The tracer that made this span (its service's), for spans made under it."""
        return self._tracer

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end is None and self._context.trace_flags.sampled

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end is not None:
            return
        tracer = self._tracer
        if type(value) not in _PLAIN or tracer.value_limit is not None:
            value = _cleaned(value, tracer.value_limit)
            if value is None:
                return
        attributes = self._attributes
        limit = tracer.attribute_limit
        if limit is not None and key not in attributes and len(attributes) >= limit:
            return  # as the SDK's: past the limit, new keys are dropped
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end is not None:
            return
        stamp = timestamp if timestamp is not None else int(self._tracer.clock.time() * 1e9)
        if attributes:
            limit = self._tracer.value_limit
            attributes = {
                key: cleaned
                for key, value in attributes.items()
                if (cleaned := _cleaned(value, limit)) is not None
            }
        events = self._events
        limit = self._tracer.event_limit
        if limit is not None and len(events) >= limit:
            if not limit:
                return
            del events[0]  # as the SDK's bounded list: the oldest goes
        events.append(Event(name, attributes, stamp))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        del context, attributes  # links are set at start on atoll's spans

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end is not None:
            return
        self._status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        event_attributes: dict[str, AttributeValue] = {
            # As the SDK writes it: module-qualified but for builtins.
            "exception.type": (
                f"{module}.{kind.__qualname__}"
                if module and module != "builtins"
                else kind.__qualname__
            ),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event_attributes.update(attributes)
        self.add_event("exception", event_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time if end_time is not None else int(self._tracer.clock.time() * 1e9)
        if not self._context.trace_flags.sampled:
            return
        tracer = self._tracer
        if tracer.add_ended is not None:
            # Encoded later, in a run of spans (FastBatchSpanProcessor.add_ended): the span
            # no longer changes (the setters ignore an ended span, as the SDK's do).
            tracer.add_ended(tracer.resource, tracer.scope, self)
            return
        tracer.processor.on_end(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.resource,
                attributes=self._attributes,
                events=self._events,
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=self._end,
                instrumentation_scope=tracer.scope,
            )
        )

    def encoded(self) -> bytes:
        """This ended span as one OTLP ``Span`` message (the processor calls this)."""
        return self._tracer.encode(  # type: ignore[no-any-return]
            self._context,
            self._parent,
            self._name,
            self._kind.value,
            self._start,
            self._end,
            self._attributes,
            self._events,
            (),
            self._status,
        )


def links_for(contexts: Sequence[SpanContext]) -> list[Link]:
    """Span links to the given contexts."""
    return [Link(c) for c in contexts]


def current_span_context() -> SpanContext:
    """The current span's context (invalid when there is none)."""
    span = get_current_span()
    return span.get_span_context() if span is not None else INVALID_SPAN_CONTEXT
