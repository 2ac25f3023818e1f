"""Spans for the event store: ``append``, ``read_stream`` and ``read_all`` of every backend.

Every :class:`EventStore` subclass has these three methods wrapped when the class is
defined, so each backend is traced the same way (``db.system.name``,
``db.operation.name``, ``atoll.eventstore.stream``). Spans go to the process's tracer
provider (``atoll run`` makes the service's the default); without one, or without the
``atoll[otel]`` extra, the wrapper costs one check.
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

    _tracer: Any = trace.get_tracer("atoll.eventstore")
except ImportError:  # pragma: no cover - without the otel extra
    _tracer = None


def traced(operation: str, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """``fn`` (a store method) inside a CLIENT span named ``eventstore <operation>``."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        if _tracer is None or not trace.get_current_span().is_recording():
            # Only inside a traced request or handler: a store's own background reads
            # (subscriptions, projections) would make a trace per poll.
            return await fn(self, *args, **kwargs)
        span_attributes: dict[str, Any] = {
            attributes.DB_SYSTEM: getattr(self, "dialect", "unknown"),
            attributes.DB_OPERATION: operation,
        }
        if args and isinstance(args[0], str):
            span_attributes[attributes.STREAM] = args[0]
        with _tracer.start_as_current_span(
            f"eventstore {operation}", kind=SpanKind.CLIENT, attributes=span_attributes
        ):
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
