"""What every service's HTTP API has: health endpoints and problem+json errors."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from atoll.persistence import TransientDatabaseError
from atoll.resilience import PropagationMiddleware, snapshot_to_json

if TYPE_CHECKING:
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
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return problem(500, "internal error", instance=request.url.path)


#: Paths that are not traced: probes and scrapes would drown the traces that matter.
UNTRACED_PATHS = "healthz,readyz,metrics"


def instrument_client(client: httpx.AsyncClient, tracing: Tracing) -> None:
    """Trace calls made with ``client`` (a client span per request, W3C context out)."""
    if tracing.provider is None or getattr(client, "_atoll_traced", False):
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor  # noqa: PLC0415

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=tracing.provider)
    client._atoll_traced = True  # type: ignore[attr-defined]


def instrument_http(service: Service, tracing: Tracing) -> None:
    """Trace the service's HTTP server (W3C context in, server span per request)."""
    if tracing.provider is None or getattr(service.http, "_atoll_traced", False):
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415

    FastAPIInstrumentor.instrument_app(
        service.http,
        tracer_provider=tracing.provider,
        excluded_urls=UNTRACED_PATHS,
        exclude_spans=["receive", "send"],
    )
    service.http._atoll_traced = True  # type: ignore[attr-defined]
