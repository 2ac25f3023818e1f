"""What every service's HTTP API has: health endpoints and problem+json errors."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from atoll.persistence import TransientDatabaseError

if TYPE_CHECKING:
    from atoll.service._service import Service

log = logging.getLogger("atoll.http")

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int, detail: str, *, title: str | None = None, headers: dict[str, str] | None = None,
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
    """Add ``/healthz``, ``/readyz`` and problem+json error handlers to ``app``."""

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
            422, f"invalid {where}", title="Request validation failed", errors=errors,
            instance=request.url.path,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code, str(exc.detail), headers=dict(exc.headers or {}),
            instance=request.url.path,
        )

    @app.exception_handler(TransientDatabaseError)
    async def busy(request: Request, exc: TransientDatabaseError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return problem(
            503, "the service's database is busy; nothing was changed, try again",
            headers={"Retry-After": "1"}, instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return problem(500, "internal error", instance=request.url.path)
