"""Spans for the event store: ``append``, ``read_stream`` and ``read_all`` of every backend.

Every :class:`EventStore` subclass has these three methods wrapped when the class is
defined, so each backend is traced the same way (``db.system.name``,
``db.operation.name``, ``atoll.eventstore.stream``). Spans go to the tracer of the
service whose span is current (several services may share a process), else to the
process's tracer provider; outside a recording span, or without the ``atoll[otel]``
extra, the wrapper costs one check.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from atoll.observability import attributes

T = TypeVar("T")

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from atoll.observability._lean import LeanSpan
    from atoll.observability._tracing import service_tracer

    _tracer: Any = trace.get_tracer("atoll.eventstore")
except ImportError:  # pragma: no cover - without the otel extra
    _tracer = None


def traced(operation: str, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """``fn`` (a store method) inside a CLIENT span named ``eventstore <operation>``."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        if _tracer is None:
            return await fn(self, *args, **kwargs)
        current = trace.get_current_span()
        if not current.is_recording():
            # Only inside a traced request or handler: a store's own background reads
            # (subscriptions, projections) would make a trace per poll.
            return await fn(self, *args, **kwargs)
        span_attributes: dict[str, Any] = {
            attributes.DB_SYSTEM: getattr(self, "dialect", "unknown"),
            attributes.DB_OPERATION: operation,
        }
        if args and isinstance(args[0], str):
            span_attributes[attributes.STREAM] = args[0]
        name = f"eventstore {operation}"
        # The span goes to the service the current span belongs to (a handler's lean
        # span, a request's SDK span), not to the process's global provider, which is
        # unset when several services share the process.
        if isinstance(current, LeanSpan):
            with current.tracer.span(
                name,
                parent=current.get_span_context(),
                kind=SpanKind.CLIENT,
                attributes=span_attributes,
            ):
                return await fn(self, *args, **kwargs)
        tracer = service_tracer(current) or _tracer
        with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=span_attributes):
            return await fn(self, *args, **kwargs)

    wrapper.__atoll_traced__ = True  # type: ignore[attr-defined]
    return wrapper


def trace_methods(cls: type) -> None:
    """Wrap the class's own ``append``, ``read_stream`` and ``read_all`` (once)."""
    for name in ("append", "read_stream", "read_all"):
        method = cls.__dict__.get(name)
        if (
            method is not None
            and not getattr(method, "__isabstractmethod__", False)
            and not getattr(method, "__atoll_traced__", False)
        ):
            setattr(cls, name, traced(name, method))
