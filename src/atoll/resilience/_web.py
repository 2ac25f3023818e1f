"""The read-only ``/atoll/breakers`` endpoint."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from atoll.resilience._breaker import BreakerSnapshot
from atoll.resilience._registry import ResilienceRegistry


def snapshot_to_json(snap: BreakerSnapshot) -> dict[str, Any]:
    """A breaker snapshot as JSON-ready data (times as Unix seconds and ISO 8601)."""
    return {
        "name": snap.name,
        "state": snap.state.value,
        "window": {
            "calls": snap.window_calls,
            "failures": snap.window_failures,
            "slow_calls": snap.window_slow,
            "failure_rate": snap.failure_rate,
            "slow_call_rate": snap.slow_call_rate,
        },
        "retry_at": snap.retry_at,
        "retry_at_iso": (
            None
            if snap.retry_at is None
            else datetime.fromtimestamp(snap.retry_at, tz=UTC).isoformat(timespec="milliseconds")
        ),
        "sharing": snap.sharing,
        "totals": {
            "success": snap.successes_total,
            "failure": snap.failures_total,
            "slow_success": snap.slow_successes_total,
            "slow_failure": snap.slow_failures_total,
            "ignored": snap.ignored_total,
            "rejected": snap.rejected_total,
            "transitions": snap.transitions_total,
        },
    }


def breakers_router(registry: ResilienceRegistry, *, prefix: str = "/atoll") -> APIRouter:
    """A router with ``GET {prefix}/breakers`` and ``GET {prefix}/breakers/{name}``.

    Read-only on purpose: forcing a breaker open or closed is an operator action that
    needs authentication, which this router does not provide.
    """
    router = APIRouter(prefix=prefix, tags=["atoll"])

    @router.get("/breakers", summary="Circuit breakers and their states")
    async def list_breakers() -> dict[str, list[dict[str, Any]]]:
        return {"breakers": [snapshot_to_json(b.snapshot()) for b in registry.breakers]}

    @router.get("/breakers/{name}", summary="One circuit breaker", response_model=None)
    async def one_breaker(name: str) -> dict[str, Any] | JSONResponse:
        breaker = registry.breaker(name)
        if breaker is None:
            return JSONResponse(
                {
                    "type": "about:blank",
                    "title": "Not Found",
                    "status": 404,
                    "detail": f"no circuit breaker called {name!r}",
                },
                status_code=404,
                media_type="application/problem+json",
            )
        return snapshot_to_json(breaker.snapshot())

    return router
