"""Carrying a call's deadline and trace context across HTTP hops.

Trace context is held as plain W3C headers (``traceparent``, ``tracestate``,
``baggage``) in a context variable: :class:`PropagationMiddleware` fills it from an
incoming request and :class:`~atoll.resilience.ServiceClient` copies it onto outgoing
requests. When OpenTelemetry arrives, pass the client a ``trace_headers`` callable that
injects the current span's context instead (the documented hook); nothing else changes.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from atoll.determinism import Clock
from atoll.resilience._deadline import DEADLINE_HEADER, Deadline, deadline_scope

#: The W3C trace-context and baggage headers that are propagated, lower-case.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")

_trace: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "atoll_trace_context", default=None
)


def current_trace_headers() -> dict[str, str]:
    """The trace headers of the call being handled (empty if none)."""
    headers = _trace.get()
    return dict(headers) if headers else {}


@contextmanager
def trace_scope(headers: Mapping[str, str]) -> Iterator[None]:
    """Run the block with ``headers`` (only the :data:`TRACE_HEADERS`) as trace context."""
    lowered = {k.lower(): v for k, v in headers.items()}
    picked = {name: lowered[name] for name in TRACE_HEADERS if name in lowered}
    token = _trace.set(picked)
    try:
        yield
    finally:
        _trace.reset(token)


class PropagationMiddleware:
    """ASGI middleware: adopt the caller's deadline and trace context for the request.

    Reads :data:`DEADLINE_HEADER` (remaining milliseconds) and the W3C trace headers.
    A request whose deadline has already passed is answered at once with ``504`` and an
    ``application/problem+json`` body, without running the handler: the caller has
    stopped waiting. A malformed deadline header is ignored.
    """

    def __init__(self, app: ASGIApp, *, clock: Clock | None = None) -> None:
        self.app = app
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = {DEADLINE_HEADER.lower().encode(), *(h.encode() for h in TRACE_HEADERS)}
        found: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.lower()
            if name in wanted:
                found[name.decode()] = raw_value.decode("latin-1")
        deadline = Deadline.from_header(found.pop(DEADLINE_HEADER.lower(), None), clock=self.clock)
        if deadline is not None and deadline.expired:
            await _deadline_passed(scope, send)
            return
        with deadline_scope(deadline), trace_scope(found):
            await self.app(scope, receive, send)


async def _deadline_passed(scope: Scope, send: Send) -> None:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": "Gateway Timeout",
        "status": 504,
        "detail": "the caller's deadline had passed when the request arrived; it was not handled",
        "instance": scope.get("path", ""),
    }
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 504,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
