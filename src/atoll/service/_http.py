"""What every service's HTTP API has: health endpoints and problem+json errors."""

from __future__ import annotations

import logging
import os
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from atoll.observability._logs import request_correlation
from atoll.persistence import TransientDatabaseError
from atoll.resilience import PropagationMiddleware, snapshot_to_json

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from atoll.observability import Tracing
    from atoll.service._service import Service

log = logging.getLogger("atoll.http")

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An RFC 9457 problem details response."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_http_defaults(app: FastAPI, service: Service) -> None:
    """Add atoll's endpoints, deadline propagation and problem+json errors to ``app``."""
    _install_endpoints(app, service)
    app.add_middleware(RequestCorrelationMiddleware)
    # Adopts an incoming X-Atoll-Deadline (and W3C headers when tracing is off), and
    # answers 504 at once when the caller's deadline has already passed.
    app.add_middleware(PropagationMiddleware)
    _install_error_handlers(app)


def _install_endpoints(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", tags=["atoll"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "service": service.name}

    @app.get("/readyz", tags=["atoll"], summary="Readiness: the service takes work")
    async def readyz() -> JSONResponse:
        runtime = service._runtime
        if runtime is None:
            return JSONResponse({"service": service.name, "status": "stopped"}, status_code=503)
        details = await runtime.readiness()
        return JSONResponse(details, status_code=200 if runtime.ready else 503)

    @app.get("/atoll/breakers", tags=["atoll"], summary="Circuit breakers of this service")
    async def breakers() -> dict[str, Any]:
        runtime = service._runtime
        if runtime is None:
            return {"breakers": []}
        return {
            "breakers": [snapshot_to_json(b.snapshot()) for b in runtime.client.registry.breakers]
        }

    @app.get("/metrics", tags=["atoll"], summary="Prometheus metrics of this service")
    async def metrics() -> Response:
        runtime = service._runtime
        if runtime is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST, status_code=503)
        return Response(await runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "location": list(error.get("loc", ())),
                "message": error.get("msg", ""),
                "type": error.get("type", ""),
            }
            for error in exc.errors()
        ]
        malformed = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if malformed is not None:
            # Not a field that failed validation: the body is not JSON at all (400, as
            # for any request the server cannot parse), with the parser's reason.
            reason = (malformed.get("ctx") or {}).get("error") or "JSON decode error"
            location = malformed.get("loc", ())
            at = f" at character {location[1]}" if len(location) > 1 else ""
            return problem(
                400,
                f"the request body is not valid JSON: {reason}{at}",
                title="Malformed request body",
                errors=errors,
                instance=request.url.path,
            )
        where = ", ".join(".".join(str(p) for p in e["location"]) for e in errors) or "request"
        return problem(
            422,
            f"invalid {where}",
            title="Request validation failed",
            errors=errors,
            instance=request.url.path,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code,
            str(exc.detail),
            headers=dict(exc.headers or {}),
            instance=request.url.path,
        )

    @app.exception_handler(TransientDatabaseError)
    async def busy(request: Request, exc: TransientDatabaseError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return problem(
            503,
            "the service's database is busy; nothing was changed, try again",
            headers={"Retry-After": "1"},
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this handler outside every middleware, after the request's
        # correlation id was unbound: bind it again for this log line.
        token = request_correlation.set(request_id(request.scope))
        try:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        finally:
            request_correlation.reset(token)
        return problem(500, "internal error", instance=request.url.path)


#: The header the gateway puts its request id in (its ``server.request_id_header``
#: default); a service's HTTP log lines carry it as their ``correlation_id``.
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_NAME = REQUEST_ID_HEADER.lower().encode()
#: What the gateway accepts as a request id: nothing that could forge a log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(scope: Scope) -> str | None:
    """The request's :data:`REQUEST_ID_HEADER`, if it has a sane one."""
    for name, value in scope["headers"]:
        if name == _REQUEST_ID_NAME:
            rid = value.decode("latin-1")
            return rid if _REQUEST_ID.fullmatch(rid) else None
    return None


class RequestCorrelationMiddleware:
    """ASGI middleware: log lines written while a request is served carry its request
    id (:data:`REQUEST_ID_HEADER`) as ``correlation_id``, as a handler's carry its
    message's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id(scope) if scope["type"] == "http" else None
        if rid is None:
            await self.app(scope, receive, send)
            return
        token = request_correlation.set(rid)
        try:
            await self.app(scope, receive, send)
        finally:
            request_correlation.reset(token)


#: Paths that are not traced: probes and scrapes would drown the traces that matter.
#: The instrumentation searches each pattern in the whole URL, host included: anchored,
#: so /reports/metrics or a host named metrics-api is traced.
UNTRACED_PATHS = r"^[a-z]+://[^/]+/(?:healthz|readyz|metrics)/?(?:\?.*)?$"


#: Which semantic conventions the OpenTelemetry instrumentations follow.
SEMCONV_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"


def use_stable_http_semconv() -> None:
    """Have the HTTP instrumentations name attributes as the gateway does (the stable
    ``http.request.method``, ``url.path``, ``server.address``... instead of
    ``http.method``, ``http.url``, ``net.peer.*``), unless the user chose otherwise in
    :data:`SEMCONV_OPT_IN` (``http/dup`` for both, say)."""
    if SEMCONV_OPT_IN in os.environ:
        return
    os.environ[SEMCONV_OPT_IN] = "http"
    try:
        from opentelemetry.instrumentation._semconv import (  # noqa: PLC0415 - otel extra
            _OpenTelemetrySemanticConventionStability as Stability,
        )
    except ImportError:  # pragma: no cover - instrumentations without the opt-in
        return
    # The instrumentations read the variable once per process; if one already did
    # (unset then, so every signal got its default), read it again. Private to them:
    # where it is not there, the variable still serves instrumentations made later.
    lock = getattr(Stability, "_lock", None)
    if getattr(Stability, "_initialized", False) and lock is not None:
        with lock:
            Stability._initialized = False
        Stability._initialize()  # type: ignore[no-untyped-call]  # unannotated upstream


def instrument_client(client: httpx.AsyncClient, tracing: Tracing) -> None:
    """Trace calls made with ``client`` (a client span per request, W3C context out)."""
    if tracing.provider is None or getattr(client, "_atoll_traced", False):
        return
    use_stable_http_semconv()
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor  # noqa: PLC0415

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=tracing.provider)
    client._atoll_traced = True  # type: ignore[attr-defined]


def instrument_http(service: Service, tracing: Tracing) -> None:
    """Trace the service's HTTP server (W3C context in, server span per request)."""
    if tracing.provider is None or getattr(service.http, "_atoll_traced", False):
        return
    use_stable_http_semconv()
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415

    FastAPIInstrumentor.instrument_app(
        service.http,
        tracer_provider=tracing.provider,
        excluded_urls=UNTRACED_PATHS,
        exclude_spans=["receive", "send"],
    )
    service.http._atoll_traced = True  # type: ignore[attr-defined]
