"""The collector as one ASGI application, and the functions that serve it.

``POST /v1/traces`` is handled by a plain ASGI function in front of everything else:
it streams the body with its size limit and answers in OTLP's encodings, with no routing
or dependency injection in the way. Everything else (the pages, the JSON API, health) is
a FastAPI application, like every atoll service's HTTP API. ``docs/collector.md`` has
the measurements behind this split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, Self

import msgspec
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from atoll._heap import freeze_startup_heap
from atoll._version import __version__
from atoll.determinism import Clock, SystemClock
from atoll.observability.collector import _pages
from atoll.observability.collector._errors import CollectorError
from atoll.observability.collector._metrics import DEFAULT_EXPIRY, DEFAULT_MAX_SERIES, MetricStore
from atoll.observability.collector._query import (
    QueryError,
    build_log_query,
    build_query,
    split_attributes,
)
from atoll.observability.collector._receiver import (
    DEFAULT_MAX_BODY_BYTES,
    JSON,
    OTLPReceiver,
    Signal,
    status_body,
)
from atoll.observability.collector._store import LogQuery, Retention, SpanStore, TraceQuery
from atoll.persistence import DatabaseError
from atoll.persistence._sqlite import Synchronous
from atoll.service._http import problem

log = logging.getLogger("atoll.collector")

DEFAULT_PORT: Final = 4318
DEFAULT_DB_PATH: Final = ".atoll/traces.db"
#: The nice value :func:`run_collector` gives its process by default: the normal priority
#: (see :func:`lower_priority` for why not lower).
DEFAULT_NICE: Final = 0
#: The least favourable nice value Unix gives (``--nice`` accepts 0 to this).
MAX_NICE: Final = 19
OTLP_TRACES_PATH: Final = "/v1/traces"
OTLP_LOGS_PATH: Final = "/v1/logs"
OTLP_METRICS_PATH: Final = "/v1/metrics"
_OTLP_SIGNALS: Final[dict[str, Signal]] = {
    OTLP_TRACES_PATH: "traces",
    OTLP_LOGS_PATH: "logs",
    OTLP_METRICS_PATH: "metrics",
}
_STATIC: Final = {
    "collector.css": "text/css; charset=utf-8",
    "collector.js": "text/javascript; charset=utf-8",
}
_UNIMPLEMENTED: Final = 12


class _ClientDisconnectedError(Exception):
    """The client went away before it sent the whole body."""


class CollectorApp:
    """The embedded OTLP collector: receiver, span store, retention, pages and API.

    An ASGI application with its own lifespan; usable directly as ``async with app:``
    (tests, or embedding in a process that runs its own server).
    """

    def __init__(
        self,
        store: SpanStore,
        receiver: OTLPReceiver,
        *,
        clock: Clock,
        cors_origins: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.receiver = receiver
        self.clock = clock
        self.cors_origins = frozenset(cors_origins)
        self.api = _build_api(self)
        self._retention_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.open()
        self.receiver.start()
        self._retention_task = asyncio.get_running_loop().create_task(
            self.store.run_retention(), name="atoll-collector-retention"
        )
        log.info("collector store %s open", self.store.path)

    async def stop(self) -> None:
        task, self._retention_task = self._retention_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
        self.receiver.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        signal = _OTLP_SIGNALS.get(scope["path"]) if kind == "http" else None
        if signal is not None and (signal != "metrics" or self.receiver.metrics is not None):
            await self._otlp(scope, receive, send, signal)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.api(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("the collector could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _cors(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """CORS headers for a browser app's exporter (OpenTelemetry JS on a web page), for
        the origins the collector was told to accept; none otherwise."""
        if origin is None or not ({origin, "*"} & self.cors_origins):
            return ()
        allowed = "*" if "*" in self.cors_origins else origin
        return (("access-control-allow-origin", allowed), ("vary", "Origin"))

    async def _otlp(self, scope: Scope, receive: Receive, send: Send, signal: Signal) -> None:
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers[name.decode("latin-1")] = value.decode("latin-1")
        cors = self._cors(headers.get("origin"))
        if scope["method"] == "OPTIONS" and cors:
            preflight = (
                *cors,
                ("access-control-allow-methods", "POST"),
                (
                    "access-control-allow-headers",
                    headers.get("access-control-request-headers", "content-type"),
                ),
                ("access-control-max-age", "600"),
            )
            await _respond(send, 204, "text/plain", b"", preflight)
            return
        if scope["method"] != "POST":
            body = status_body("json", _UNIMPLEMENTED, "send export requests with POST")
            await _respond(send, 405, JSON, body, (("allow", "POST"), *cors))
            return

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientDisconnectedError
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        try:
            response = await self.receiver.export(
                headers.get("content-type"),
                headers.get("content-encoding"),
                headers.get("content-length"),
                chunks(),
                signal,
            )
        except _ClientDisconnectedError:
            return
        await _respond(
            send,
            response.status,
            response.content_type,
            response.body,
            (*response.headers, *cors),
        )


async def _respond(
    send: Send,
    status: int,
    content_type: str,
    body: bytes,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    raw = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode("latin-1")),
    ]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _json_response(value: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json")


def _trace_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise QueryError(f"trace id {text!r} is not 32 hexadecimal digits")
    return raw


def _build_api(app: CollectorApp) -> FastAPI:  # noqa: C901, PLR0915 - one closure per route
    store = app.store
    clock = app.clock
    api = FastAPI(
        title="atoll collector",
        version=__version__,
        summary="Traces received over OTLP/HTTP, stored in SQLite, searchable.",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )

    async def stats_or_none() -> Any:
        try:
            return await store.stats()
        except (CollectorError, DatabaseError):
            return None

    @api.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "service": "collector"}

    @api.get("/readyz", tags=["health"], summary="Readiness: the store is open")
    async def readyz() -> JSONResponse:
        ready = store.is_open
        return JSONResponse(
            {"service": "collector", "status": "ready" if ready else "stopped"},
            status_code=200 if ready else 503,
        )

    @api.get("/api/services", tags=["traces"], summary="Services and their operations")
    async def services() -> Response:
        found = await store.services()
        return _json_response({"services": found})

    @api.get("/api/stats", tags=["traces"], summary="What the store holds")
    async def stats() -> Response:
        return _json_response(await store.stats())

    @api.get(
        "/api/traces",
        tags=["traces"],
        summary="Search traces, most recent first",
        description=(
            "Every span condition (service, operation, durations, status, attributes) must"
            " hold for one span of the trace. `attr` is `key=value` and may be repeated;"
            " it also matches the span's resource attributes. `start`/`end` are Unix"
            " milliseconds or ISO 8601; `lookback` (like `15m`, `1h`, `7d`) sets `start`"
            " relative to now."
        ),
    )
    async def search(
        *,
        service: str | None = None,
        operation: str | None = None,
        min_duration_ms: Annotated[float | None, Query(ge=0)] = None,
        max_duration_ms: Annotated[float | None, Query(ge=0)] = None,
        status: Annotated[str | None, Query(pattern="^(ok|error)?$")] = None,
        start: str | None = None,
        end: str | None = None,
        lookback: str | None = None,
        attr: Annotated[list[str] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    ) -> Response:
        query = build_query(
            now=clock.time(),
            service=service,
            operation=operation,
            min_duration_ms=min_duration_ms,
            max_duration_ms=max_duration_ms,
            status=status,
            start=start,
            end=end,
            lookback=lookback,
            attributes=attr or [],
            limit=limit,
        )
        return _json_response({"traces": await store.search(query)})

    @api.get("/api/traces/{trace_id}", tags=["traces"], summary="Every stored span of a trace")
    async def trace(trace_id: str) -> Response:
        found = await store.get_trace(_trace_id(trace_id))
        if found is None:
            return problem(404, f"no span of trace {trace_id} is stored")
        return _json_response(found)

    @api.get(
        "/api/logs",
        tags=["logs"],
        summary="Search log records, most recent first",
        description=(
            "Every condition given must hold. `severity` is the least severity: a level"
            " (trace, debug, info, warn, error, fatal) or a number from 1 to 24. `text` is"
            " a substring of the body. `trace_id` gives the records of one trace."
            " `start`/`end`/`lookback` as for traces."
        ),
    )
    async def logs(
        *,
        service: str | None = None,
        severity: str | None = None,
        trace_id: str | None = None,
        text: str | None = None,
        start: str | None = None,
        end: str | None = None,
        lookback: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        query = build_log_query(
            now=clock.time(),
            service=service,
            severity=severity,
            trace_id=_trace_id(trace_id) if trace_id else None,
            text=text,
            start=start,
            end=end,
            lookback=lookback,
            limit=limit,
        )
        return _json_response({"logs": await store.search_logs(query)})

    registry = CollectorRegistry(auto_describe=False)
    if app.receiver.metrics is not None:
        registry.register(app.receiver.metrics)

    @api.get(
        "/metrics",
        tags=["metrics"],
        summary="Metrics received over OTLP, in Prometheus' text format, for scraping",
    )
    async def metrics() -> Response:
        if app.receiver.metrics is None:
            return _json_response({"error": "this collector takes no OTLP metrics"}, 404)
        # Off the loop: a scrape waits for the lock an export holds, metric by metric.
        text = await asyncio.to_thread(generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/{signal}", tags=["otlp"], summary="Other OTLP signals are not collected")
    async def other_signal(signal: str) -> Response:
        message = (
            "this collector was made without OTLP metrics (max_metric_series=None)"
            if signal == "metrics"
            else f"this collector takes traces, logs and metrics, not {signal!r}"
        )
        body = status_body("json", _UNIMPLEMENTED, message)
        return Response(body, status_code=404, media_type=JSON)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page(request: Request) -> HTMLResponse:
        params = request.query_params
        form = {k: params.get(k, "") for k in params}
        error = None
        traces = None
        try:
            query = _page_query(form, clock.time())
            traces = await store.search(query)
        except QueryError as exc:
            error = str(exc)
        except (CollectorError, DatabaseError) as exc:
            error = f"The search failed: {exc}"
        page = _pages.search_page(
            services=await store.services(),
            form=form,
            traces=traces,
            error=error,
            stats=await stats_or_none(),
            now=clock.time(),
        )
        return HTMLResponse(page, status_code=400 if error and traces is None else 200)

    @api.get("/logs", response_class=HTMLResponse, include_in_schema=False)
    async def logs_page(request: Request) -> HTMLResponse:
        params = request.query_params
        form = {k: params.get(k, "") for k in params}
        error = None
        found = None
        try:
            found = await store.search_logs(_log_page_query(form, clock.time()))
        except QueryError as exc:
            error = str(exc)
        except (CollectorError, DatabaseError) as exc:
            error = f"The search failed: {exc}"
        page = _pages.logs_page(
            services=await store.services(),
            form=form,
            logs=found,
            error=error,
            stats=await stats_or_none(),
        )
        return HTMLResponse(page, status_code=400 if error and found is None else 200)

    @api.get("/series", response_class=HTMLResponse, include_in_schema=False)
    async def metrics_page(request: Request) -> HTMLResponse:
        params = request.query_params
        form = {k: params.get(k, "") for k in params}
        metric_store = app.receiver.metrics
        jobs: list[str] = []
        families = None
        if metric_store is not None:
            # Off the loop: it waits for the lock an export holds, metric by metric.
            jobs = await asyncio.to_thread(metric_store.jobs)
            families = await asyncio.to_thread(
                metric_store.view,
                _pages.service_filter(form.get("service", "")),
                form.get("name", ""),
            )
        page = _pages.metrics_page(
            jobs=jobs, form=form, families=families, stats=await stats_or_none()
        )
        return HTMLResponse(page)

    @api.get("/traces/{trace_id}", response_class=HTMLResponse, include_in_schema=False)
    async def trace_page(trace_id: str) -> HTMLResponse:
        try:
            raw = _trace_id(trace_id)
        except QueryError:
            return HTMLResponse(
                _pages.not_found_page(trace_id, stats=await stats_or_none()), status_code=404
            )
        found = await store.get_trace(raw)
        if found is None:
            return HTMLResponse(
                _pages.not_found_page(trace_id, stats=await stats_or_none()), status_code=404
            )
        known = [s.name for s in await store.services()]
        page = _pages.trace_page(
            found, services=known, stats=await stats_or_none(), now=clock.time()
        )
        return HTMLResponse(page)

    @api.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        media_type = _STATIC.get(name)
        if media_type is None:
            return problem(404, f"no static file {name!r}")
        content = resources.files("atoll.observability.collector").joinpath("static", name)
        return Response(
            content.read_bytes(),
            media_type=media_type,
            headers={"cache-control": "no-cache"},
        )

    @api.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError) -> JSONResponse:
        return problem(400, str(exc), instance=request.url.path)

    @api.exception_handler(RequestValidationError)
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

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code,
            str(exc.detail or HTTPStatus(exc.status_code).phrase),
            headers=dict(exc.headers or {}),
            instance=request.url.path,
        )

    @api.exception_handler(CollectorError)
    @api.exception_handler(DatabaseError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return problem(503, str(exc), headers={"Retry-After": "1"}, instance=request.url.path)

    return api


def _page_query(form: dict[str, str], now: float) -> TraceQuery:
    def number(name: str) -> float | None:
        text = form.get(name, "").strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise QueryError(f"{name} {text!r} is not a number") from None

    limit_text = form.get("limit", "").strip() or "20"
    try:
        limit = int(limit_text)
    except ValueError:
        raise QueryError(f"limit {limit_text!r} is not a whole number") from None
    return build_query(
        now=now,
        service=form.get("service"),
        operation=form.get("operation"),
        min_duration_ms=number("min_duration_ms"),
        max_duration_ms=number("max_duration_ms"),
        status=form.get("status"),
        start=form.get("start"),
        end=form.get("end"),
        lookback=form.get("lookback"),
        attributes=split_attributes(form.get("attrs", "")),
        limit=limit,
    )


def _log_page_query(form: dict[str, str], now: float) -> LogQuery:
    limit_text = form.get("limit", "").strip() or "100"
    # isdigit() takes "²", which int() refuses.
    if not (limit_text.isascii() and limit_text.isdigit()):
        raise QueryError(f"limit {limit_text!r} is not a whole number")
    return build_log_query(
        now=now,
        service=form.get("service"),
        severity=form.get("severity"),
        text=form.get("text"),
        start=form.get("start"),
        end=form.get("end"),
        lookback=form.get("lookback"),
        limit=int(limit_text),
    )


def create_collector_app(
    db_path: str | Path = DEFAULT_DB_PATH,
    *,
    retention: Retention | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    synchronous: Synchronous = "NORMAL",
    max_pending_spans: int = 100_000,
    index_attributes: bool = True,
    cors_origins: Sequence[str] = (),
    clock: Clock | None = None,
    max_metric_series: int | None = DEFAULT_MAX_SERIES,
    metric_expiry: float = DEFAULT_EXPIRY,
) -> CollectorApp:
    """The collector as an ASGI application (it opens its store on lifespan startup).

    Args:
        db_path: the SQLite file spans are stored in (created with its directory).
        retention: how long and how many spans to keep; see :class:`Retention`.
        max_body_bytes: largest export body accepted, compressed and decompressed (413).
        synchronous: SQLite's ``synchronous`` for the store: ``NORMAL`` survives a crash
            of the process, ``FULL`` also a power loss, at a cost in throughput.
        max_pending_spans: spans queued for writing beyond which exports get 503.
        index_attributes: keep the attribute index that makes ``attr=`` searches fast.
        cors_origins: web origins (``"http://localhost:3000"``, or ``"*"``) whose pages may
            export to ``/v1/traces`` from the browser; none by default, so that a page
            the developer happens to visit cannot write into the collector.
        clock: the determinism seam; retention and "lookback" read time from it.
        max_metric_series: OTLP metric series held for ``GET /metrics`` at most (points
            of more are refused); ``None``: ``/v1/metrics`` is not taken (404).
        metric_expiry: seconds after which a series nobody updates is dropped.
    """
    clock = clock or SystemClock()
    store = SpanStore(
        db_path,
        retention=retention,
        synchronous=synchronous,
        clock=clock,
        max_pending_spans=max_pending_spans,
        index_attributes=index_attributes,
    )
    metrics = (
        None
        if max_metric_series is None
        else MetricStore(clock=clock, max_series=max_metric_series, expiry=metric_expiry)
    )
    receiver = OTLPReceiver(store, max_body_bytes=max_body_bytes, metrics=metrics)
    return CollectorApp(store, receiver, clock=clock, cors_origins=cors_origins)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; raises :class:`CollectorError` if the address is taken.

    Bound here rather than by uvicorn, whose bind failure exits the process: embedding
    the collector (``atoll up``) must get an exception instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CollectorError(f"the collector cannot listen on {host}:{port}: {exc}") from exc
    sock.set_inheritable(True)
    return sock


def _server(app: CollectorApp, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,
        log_level=log_level,
        # Let exports in flight finish and the write queue drain on shutdown.
        timeout_graceful_shutdown=10,
        log_config=None,
    )
    return uvicorn.Server(config)


async def serve_collector(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    db_path: str | Path = DEFAULT_DB_PATH,
    *,
    log_level: str = "info",
    started: asyncio.Event | None = None,
    **options: Any,
) -> None:
    """Serve the collector in the running event loop until cancelled.

    Cancelling shuts it down gracefully: exports in flight are answered and queued spans
    are stored. ``options`` are those of :func:`create_collector_app`; ``started`` is set
    once the server accepts connections.

    Raises:
        CollectorError: the address is taken, or the store cannot be opened.
    """
    app = create_collector_app(db_path, **options)
    sock = listen_socket(host, port)
    server = _server(app, log_level)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not serving.done():
            await app.clock.sleep(0.01)
        if not server.started:
            await serving
            raise CollectorError(f"the collector did not start on {host}:{port}")
        log.info("collector listening on http://%s:%d", host, sock.getsockname()[1])
        if started is not None:
            started.set()
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        raise
    finally:
        sock.close()


def lower_priority(nice: int) -> int:
    """Make this process's nice value at least ``nice`` (never raise its priority).

    The collector runs beside the services it observes, on the same cores. At a lower
    priority it yields the CPU to them under contention and catches up when a core is
    free: a burst of load is traced late instead of slowed. But under load that lasts,
    it falls behind for good, the exporters' queues fill, and spans are dropped
    (counted). On the tracing benchmark, rounds of 60,000 messages at nice 10 dropped
    up to 5,228 spans each, while the same rounds at the normal priority stored every
    span and kept 0.84 of the untraced rate (``docs/benchmarks.md``, tracing). So the
    default is the normal priority (``0``), and a higher nice is for a machine where
    the services' throughput matters more than complete traces.

    Returns the nice value the process has afterwards. Where the platform has no
    ``os.nice`` or refuses, the priority stays as it was (logged).
    """
    if not hasattr(os, "nice"):
        return 0
    current = os.nice(0)
    if nice > current:
        try:
            current = os.nice(nice - current)
        except OSError as exc:
            log.warning("collector: could not lower the CPU priority to nice %d: %s", nice, exc)
    return current


def run_collector(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    db_path: str | Path = DEFAULT_DB_PATH,
    *,
    log_level: str = "info",
    nice: int = DEFAULT_NICE,
    **options: Any,
) -> None:
    """Run the collector in this process until SIGINT or SIGTERM (blocking).

    ``options`` are those of :func:`create_collector_app`. OTLP/HTTP exporters send to
    ``http://HOST:PORT/v1/traces``; the trace search is at ``http://HOST:PORT/``.
    ``nice`` lowers the process's CPU priority first (:func:`lower_priority`; ``0``
    keeps it).

    Raises:
        CollectorError: the address is taken, or the store cannot be opened.
    """
    lower_priority(nice)
    app = create_collector_app(db_path, **options)
    sock = listen_socket(host, port)
    try:
        log.info("collector listening on http://%s:%d", host, sock.getsockname()[1])
        freeze_startup_heap()  # see atoll._heap: no 40 ms full collections while serving
        _server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
