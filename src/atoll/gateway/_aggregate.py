"""Aggregate routes: several upstream calls made concurrently, one JSON response.

Each part is ``required`` (its failure fails the whole response: its own 4xx status is
passed on, anything else is a 502, or 504 when the deadline ran out), ``optional``
(left out and named in ``"_partial"``) or has a ``fallback`` value (used in its place
and also named in ``"_partial"``, so the client knows which data is not live). Every
call runs under the route's one deadline, propagated to the upstreams in
``X-Atoll-Deadline``; when it passes, calls still running are cancelled, as they are
when the client goes away (its connection closes, or it resets its HTTP/2 stream). A
part's call carries the client's fields but for those about the client's copy of the
aggregate (conditions, ranges, Accept): a part is asked for its current JSON.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from atoll.gateway._config import PartConfig, RouteConfig
from atoll.gateway._proxy import Call
from atoll.gateway._routing import fill_template
from atoll.gateway._server import Request
from atoll.gateway._upstream import UpstreamError
from atoll.resilience import RejectedError, current_deadline

if TYPE_CHECKING:
    from atoll.gateway._gateway import Gateway, Generation

#: The largest part body read (bytes): aggregates are for small JSON documents.
MAX_PART_BODY = 4 * 1024 * 1024
#: Client fields a part's GET does not carry: those of a body, the client's Accept (a
#: part asks for JSON), and conditions and ranges, which are about the client's copy of
#: the aggregate, not the part's (a part's 304 or 206 would fail the whole answer).
_NOT_FOR_PARTS: frozenset[bytes] = frozenset(
    {
        b"content-type",
        b"content-length",
        b"content-encoding",
        b"accept-encoding",
        b"accept",
        b"range",
        b"if-range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
    }
)
_DECODER = msgspec.json.Decoder()


class PartFailedError(Exception):
    def __init__(self, status: int, detail: str, body: Any = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.body = body


async def _fetch(
    gen: Generation,
    part: PartConfig,
    params: dict[str, bytes],
    forwarded: list[tuple[bytes, bytes]],
    span: Any,
) -> Any:
    upstream = gen.upstreams[part.upstream]
    target = fill_template(part.path, params)
    common = b"".join(b"%b: %b\r\n" % pair for pair in forwarded if pair[0] not in _NOT_FOR_PARTS)
    call = Call(
        b"GET %b HTTP/1.1\r\n" % target, common + b"accept: application/json\r\n", None, None
    )
    if span is not None:
        call.parent = span
    try:
        response = await upstream.exchange(call, b"GET", True)
        try:
            body = await response.body.read(limit=MAX_PART_BODY)
        except BaseException:
            # Cut off mid-body (the deadline, the client gone, a body too large): the
            # connection is not left half-read, held open and counted as outstanding.
            response.discard()
            raise
    except TimeoutError as exc:
        raise PartFailedError(
            504, f"{part.name}: upstream {part.upstream} did not answer in time"
        ) from exc
    except (UpstreamError, RejectedError) as exc:
        raise PartFailedError(
            502, f"{part.name}: upstream {part.upstream} failed ({type(exc).__name__})"
        ) from exc
    if not 200 <= response.status < 300:
        # A redirect or a 304 holds no part (FastAPI answers /orders/7 with a 307 to
        # /orders/7/ and an empty body): taken as a success it would be a silent null.
        try:
            detail_body = _DECODER.decode(body) if body else None
        except msgspec.DecodeError:
            detail_body = None
        status = response.status if 400 <= response.status < 500 else 502
        raise PartFailedError(
            status, f"{part.name}: upstream {part.upstream} answered {response.status}", detail_body
        )
    try:
        return _DECODER.decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise PartFailedError(
            502, f"{part.name}: upstream {part.upstream} did not answer JSON"
        ) from exc


def _read_outcomes(done: set[asyncio.Task[Any]]) -> None:
    """Mark every part's outcome read.

    A required part failing answers at once, leaving the others unread, and asyncio logs
    a failed task nobody read as an error when it is collected.
    """
    for task in done:
        if not task.cancelled():
            task.exception()


async def _gather_parts(
    parts: tuple[Any, ...],
    tasks: list[asyncio.Task[Any]],
    deadline: Any,
    lost: asyncio.Future[None],
) -> tuple[set[asyncio.Task[Any]], set[asyncio.Task[Any]]]:
    """Wait for the parts until all are done, the deadline passes, a required part
    fails, or the client is gone (``lost``): then the answer is known (or unwanted), and
    the parts still running are not waited for."""
    required = {task for part, task in zip(parts, tasks, strict=True) if part.mode == "required"}
    done: set[asyncio.Task[Any]] = set()
    pending: set[asyncio.Future[Any]] = set(tasks)
    while pending and not lost.done():
        timeout = deadline.remaining() if deadline is not None else None
        finished, pending = await asyncio.wait(
            pending | {lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        pending.discard(lost)
        finished.discard(lost)
        if not finished:
            break  # the deadline, or the client left
        done |= finished  # type: ignore[arg-type] # the parts' tasks, lost taken out
        if any(t in required and (t.cancelled() or t.exception()) for t in finished):
            break
    return done, pending  # type: ignore[return-value] # likewise


def _required_failure(
    parts: tuple[Any, ...], tasks: list[asyncio.Task[Any]], done: set[asyncio.Task[Any]]
) -> PartFailedError | None:
    """The first required part that failed (it ends the answer), if one did."""
    for part, task in zip(parts, tasks, strict=True):
        if part.mode != "required" or task not in done or task.cancelled():
            continue
        failure = task.exception()
        if isinstance(failure, PartFailedError):
            return failure
        if failure is not None:
            return PartFailedError(502, f"{part.name}: {type(failure).__name__}")
    return None


async def aggregate(  # noqa: C901, PLR0912, PLR0917 - the request's parts, passed flat on the hot path
    gateway: Gateway,
    gen: Generation,
    request: Request,
    route: RouteConfig,
    params: dict[str, bytes],
    forwarded: list[tuple[bytes, bytes]],
    rid: bytes,
    extra: list[tuple[bytes, bytes]],
    span: Any,
) -> int:
    """Answer ``request`` with the parts of ``route``; returns the status sent."""
    assert route.aggregate is not None
    if request.method not in (b"GET", b"HEAD"):
        gateway._send_problem(
            request,
            route,
            405,
            "aggregate routes answer GET only",
            rid,
            headers=[(b"allow", b"GET")],
        )
        return 405
    parts = route.aggregate.parts
    deadline = current_deadline()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_fetch(gen, part, params, forwarded, span)) for part in parts]
    lost = request.conn.when_lost()
    done, pending = await _gather_parts(parts, tasks, deadline, lost)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    _read_outcomes(done)
    if lost.done():
        return 499  # the client went: its parts' calls are cancelled, nobody to answer
    failed = _required_failure(parts, tasks, done)
    if failed is not None:
        # A required part that failed is the answer, whatever the parts cut short say.
        gateway._send_problem(request, route, failed.status, failed.detail, rid, cors=extra)
        return failed.status
    result: dict[str, Any] = {}
    partial: list[str] = []
    for part, task in zip(parts, tasks, strict=True):
        error: PartFailedError | None = None
        if task in done and task.exception() is None:
            result[part.name] = task.result()
            continue
        exc = task.exception() if task in done else None
        if isinstance(exc, PartFailedError):
            error = exc
        elif exc is None:
            error = PartFailedError(504, f"{part.name}: no answer before the deadline")
        else:
            error = PartFailedError(502, f"{part.name}: {type(exc).__name__}")
        if part.mode == "required":
            gateway._send_problem(request, route, error.status, error.detail, rid, cors=extra)
            return error.status
        partial.append(part.name)
        if part.mode == "fallback":
            result[part.name] = part.fallback
    if partial:
        result["_partial"] = partial
    gateway.send_json(request, 200, result, rid, extra, route)
    return 200
