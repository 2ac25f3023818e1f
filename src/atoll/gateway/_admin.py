"""The read-only admin endpoints (on the admin port, never on the public one).

* ``GET /healthz``: the process answers; ``GET /readyz``: it serves (503 while stopping)
* ``GET /metrics``: Prometheus text
* ``GET /routes``: the routes of the current configuration
* ``GET /upstreams``: instances with their health, load and pool, and each breaker
* ``GET /breakers`` and ``GET /breakers/{name}``: ``atoll.resilience``'s breaker view
* ``GET /config``: where the configuration came from and how reloads went

Nothing here changes state: forcing a breaker or ejecting an instance would need
authentication that this port does not have.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

from atoll.gateway._server import Request, problem_bytes, status_line
from atoll.resilience import snapshot_to_json

if TYPE_CHECKING:
    from atoll.gateway._gateway import Gateway


def _tls_view(gateway: Gateway) -> dict[str, Any] | None:
    tls = gateway.gen.config.server.tls
    if tls is None:
        return None
    expires = gateway.tls_not_after
    crl = gateway.tls_crl
    return {
        "cert": str(tls.cert),
        "min_version": tls.min_version,
        "client_ca": None if tls.client_ca is None else str(tls.client_ca),
        "client_auth": None if tls.client_ca is None else tls.client_auth,
        "not_after": _iso(expires),
        "client_crl": None if tls.client_crl is None else str(tls.client_crl),
        "crl_issuers": None if crl is None else list(crl.issuers),
        "crl_next_update": None if crl is None else _iso(crl.next_update),
        "forward_client_cert": list(tls.forward_client_cert),
    }


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def _send(request: Request, status: int, body: bytes, content_type: bytes) -> None:
    head = [
        status_line(status),
        b"content-type: ",
        content_type,
        b"\r\ncontent-length: ",
        str(len(body)).encode(),
        b"\r\ncache-control: no-store\r\n",
    ]
    if not request.keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    if request.method != b"HEAD":  # a HEAD's answer ends at its head (RFC 9110)
        head.append(body)
    request.conn.write(b"".join(head))


def _json(request: Request, status: int, payload: Any) -> None:
    _send(request, status, json.dumps(payload, indent=2).encode(), b"application/json")


def routes_view(gateway: Gateway) -> list[dict[str, Any]]:
    """The routes as JSON-ready data."""
    return [
        {
            "name": route.name,
            "path": route.path,
            "prefix": route.prefix,
            "methods": sorted(m.decode() for m in route.methods) if route.methods else None,
            "host": route.host,
            "upstream": route.upstream,
            "aggregate": (
                {
                    p.name: {"upstream": p.upstream, "path": p.path, "mode": p.mode}
                    for p in route.aggregate.parts
                }
                if route.aggregate
                else None
            ),
            "auth": list(route.auth),
            "scopes": list(route.scopes),
            "allow_subjects": list(route.allow_subjects),
            "rate_limit": (
                {
                    "rate": route.rate_limit.rate,
                    "burst": route.rate_limit.burst,
                    "per": route.rate_limit.per,
                    "shared": route.rate_limit.shared,
                }
                if route.rate_limit
                else None
            ),
            "websocket": route.websocket,
        }
        for route in gateway.gen.config.routes
    ]


def upstreams_view(gateway: Gateway) -> list[dict[str, Any]]:
    """Upstreams with instance health and breaker state."""
    out = []
    for name, upstream in sorted(gateway.gen.upstreams.items()):
        breaker = upstream.breaker
        out.append(
            {
                "name": name,
                "source": upstream.config.source,
                "balance": upstream.config.balance,
                "requests": upstream.requests_total,
                "failures": upstream.failures_total,
                "breaker": snapshot_to_json(breaker.snapshot()) if breaker is not None else None,
                "instances": [
                    {
                        "address": i.address,
                        "weight": i.weight,
                        "health": i.health(),
                        "outstanding": i.outstanding,
                        "idle_connections": i.idle_connections,
                        "requests": i.requests_total,
                        "failures": i.failures_total,
                        "ejections": i.ejections_total,
                    }
                    for i in upstream.instances
                ],
            }
        )
    return out


async def handle_admin(gateway: Gateway, request: Request) -> None:  # noqa: C901 - one branch per endpoint
    """Answer one admin request."""
    path = request.path.decode("latin-1")
    head_only = request.method == b"HEAD"
    if request.method not in (b"GET", b"HEAD"):
        request.conn.write(
            problem_bytes(
                405, "the admin endpoints are read-only", extra_headers=[(b"allow", b"GET")]
            )
        )
        return
    if path == "/healthz":
        _json(request, 200, {"status": "alive"})
    elif path == "/readyz":
        ready = not gateway.state.closing
        _json(
            request,
            200 if ready else 503,
            {"status": "ready" if ready else "stopping", "in_flight": gateway.in_flight},
        )
    elif path == "/metrics":
        _send(request, 200, gateway.metrics.render(), CONTENT_TYPE_LATEST.encode())
    elif path == "/routes":
        _json(request, 200, {"routes": routes_view(gateway)})
    elif path == "/upstreams":
        _json(request, 200, {"upstreams": upstreams_view(gateway)})
    elif path == "/breakers":
        _json(
            request,
            200,
            {"breakers": [snapshot_to_json(b.snapshot()) for b in gateway.gen.registry.breakers]},
        )
    elif path.startswith("/breakers/"):
        breaker = gateway.gen.registry.breaker(path.removeprefix("/breakers/"))
        if breaker is None:
            request.conn.write(
                problem_bytes(
                    404, "no circuit breaker by that name", head_only=head_only, instance=path
                )
            )
        else:
            _json(request, 200, snapshot_to_json(breaker.snapshot()))
    elif path == "/config":
        _json(
            request,
            200,
            {
                "file": str(gateway.config_path),
                "files": [str(f) for f in gateway.gen.config.files],
                "reloads": gateway.reloads,
                "refused": gateway.reload_failures,
                "last_error": gateway.last_reload_error,
                "tls": _tls_view(gateway),
            },
        )
    else:
        request.conn.write(
            problem_bytes(404, "no such admin endpoint", head_only=head_only, instance=path)
        )
