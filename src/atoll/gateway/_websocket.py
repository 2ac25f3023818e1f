"""WebSocket (and any HTTP/1.1 ``Upgrade``) pass-through.

The upgrade request goes to an instance on a connection of its own, after the route's
authentication and rate limit. If the instance answers ``101`` the gateway relays that
answer and from then on copies bytes both ways without looking at them (frames,
pings and closes are the two ends' business), pausing either side's reading while the
other side's send buffer is full. Any other answer is relayed as a normal response.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from atoll.gateway._config import RouteConfig
from atoll.gateway._server import Connection, Request, status_line
from atoll.gateway._upstream import UpstreamError

if TYPE_CHECKING:
    from atoll.gateway._gateway import Gateway, Generation

_HANDSHAKE_TIMEOUT = 10.0


class _Splice(asyncio.Protocol):
    """The instance's side of a spliced connection: its bytes go to the client."""

    def __init__(self, client: Connection, done: asyncio.Future[None]) -> None:
        self.client = client
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def eof_received(self) -> bool | None:
        if self.client.transport.can_write_eof():
            self.client.transport.write_eof()
            return True  # keep our side open until the client closes too
        # TLS cannot half-close: what the instance sent is flushed, then both sides close
        # (else the client would wait for an end that never comes).
        self.client.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - any cause ends it
        self.client.close()
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


def _trace_lines(span: Any) -> list[bytes]:
    """The header lines naming ``span`` as the upstream's parent (none without tracing)."""
    if span is None:
        return []
    return [b"%b: %b\r\n" % (k.encode(), v.encode()) for k, v in span.headers().items()]


async def pass_through(  # noqa: PLR0917 - the request's parts, passed flat
    gateway: Gateway,
    gen: Generation,
    request: Request,
    route: RouteConfig,
    params: dict[str, bytes],
    forwarded: list[tuple[bytes, bytes]],
    rid: bytes,
    span: Any = None,
) -> int:
    """Relay an upgrade request; returns the status the instance answered.

    ``span`` (the request's server span, with tracing on) is the upstream's parent: its
    ``traceparent`` goes with the handshake, as with any proxied request.
    """
    conn = request.conn
    if not route.websocket or route.upstream is None:
        gateway._send_problem(
            request, route, 400, "this route does not accept protocol upgrades", rid, close=True
        )
        return 400
    upgrade = request.header(b"upgrade") or b"websocket"
    upstream = gen.upstreams[route.upstream]
    instance = upstream.balancer.pick()
    target = gateway._target(route, request, params)
    head = [b"%b %b HTTP/1.1\r\nhost: %b\r\n" % (request.method, target, instance.host_header)]
    head += [b"%b: %b\r\n" % pair for pair in forwarded]
    head += _trace_lines(span)
    head.append(b"connection: upgrade\r\nupgrade: %b\r\n\r\n" % upgrade)
    try:
        up = await instance.connect_fresh()
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
                response = await up.send(b"".join(head), upgrade=True)
        except BaseException:
            up.abort()
            raise
    except (UpstreamError, TimeoutError) as exc:
        instance.failed()
        gateway._send_problem(
            request, route, 502, f"upstream {upstream.name}: {exc}", rid, close=True
        )
        return 502
    if response.status != 101:
        request.keep_alive = False
        await gateway._relay(request, route, gen, response, rid)
        up.abort()
        return response.status
    instance.succeeded()
    reply = [status_line(101)]
    for name, value in response.headers:
        reply += [name, b": ", value, b"\r\n"]
    reply += [gen.request_id_header, b": ", rid, b"\r\n\r\n"]
    conn.write(b"".join(reply))
    upstream_transport = up.detach()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    upstream_transport.set_protocol(_Splice(conn, done))
    conn.peer_transport = upstream_transport

    def from_client(data: bytes) -> None:
        if data:
            upstream_transport.write(data)
        else:  # the client is gone
            upstream_transport.close()

    conn.upgraded = from_client
    if up.leftover:
        conn.write(up.leftover)
    if request.leftover:
        upstream_transport.write(request.leftover)
    upstream_transport.resume_reading()
    conn.resume_reading()
    request.keep_alive = False
    await done
    return 101
