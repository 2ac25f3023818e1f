"""Upstreams: instances, keep-alive connection pools, load balancing, health.

One :class:`UpstreamConnection` (an :class:`asyncio.Protocol` parsing responses with
``httptools``) per connection to an instance; idle ones wait in a LIFO pool per
instance (the most recently used connection is the least likely to have been closed by
the server). A request is written as one pre-joined buffer; the response head resolves
a future, and its body either arrives whole before the handler even wakes (small
responses: one write downstream) or streams through :class:`ResponseBody` with flow
control (reading from the instance pauses while the client is slow).

Health: an instance is *ejected* for ``ejection`` seconds after ``failures``
consecutive failures (passive), and marked down by the active probe after
``unhealthy_threshold`` failed probes (up again after ``healthy_threshold`` good ones).
When every instance is out, requests go to all of them rather than to none (Envoy's
"panic" routing): the breaker, not the health checker, then decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httptools

from atoll.determinism import Clock
from atoll.resilience._timer import race

log = logging.getLogger("atoll.gateway")

#: Bytes buffered from an upstream response before reading from the instance pauses.
RESPONSE_HIGH_WATER = 256 * 1024


#: ``Connection`` values that name no other header field: the common ones, checked first.
_PLAIN_CONNECTION = frozenset(
    {b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"}
)
#: Connection options that are not header names (RFC 9112 9.3 and 9.6, RFC 9110 7.8).
_CONNECTION_KEYWORDS = frozenset({b"close", b"keep-alive", b"upgrade", b""})


def connection_options(value: bytes) -> frozenset[bytes] | None:
    """The header names a ``Connection`` field lists as hop-by-hop, if any.

    A proxy must remove those fields before forwarding the message (RFC 9110 7.6.1):
    ``Connection: close, X-Internal`` marks ``X-Internal`` as meant for this hop only.
    """
    if value in _PLAIN_CONNECTION:
        return None
    options = frozenset(t.strip().lower() for t in value.split(b",")) - _CONNECTION_KEYWORDS
    return options or None


class UpstreamError(Exception):
    """A request to an upstream instance failed; ``instance`` is ``host:port``."""

    #: True if the request provably never reached the instance (safe to retry any method).
    nothing_sent = False

    def __init__(self, instance: str, problem: str) -> None:
        super().__init__(f"{instance}: {problem}")
        self.instance = instance
        self.problem = problem


class ConnectFailedError(UpstreamError):
    """The connection could not be opened: nothing was sent."""

    nothing_sent = True


class UpstreamClosedError(UpstreamError):
    """The instance closed the connection or sent garbage before the response was complete."""


class ReadTimeoutError(UpstreamClosedError):
    """The instance sent nothing more of a response body for ``pool.read_timeout`` seconds."""


class NoInstanceError(UpstreamError):
    """The upstream has no instance at all (nothing was sent)."""

    nothing_sent = True


class ResponseBody:
    """An upstream response body as it arrives (same shape as the request ``Body``)."""

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "complete")

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > RESPONSE_HIGH_WATER:
            self._conn._pause()
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self.complete:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def buffered(self) -> bytes | None:
        """The whole body if it has all arrived, else ``None``."""
        if not self.complete:
            return None
        chunks = self._chunks
        if not chunks:
            return b""
        if len(chunks) == 1:
            return chunks[0]
        data = b"".join(chunks)
        chunks.clear()
        chunks.append(data)
        return data

    async def chunk(self) -> bytes | None:
        """The next chunk, or ``None`` at the end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._size -= len(chunk)
                if self._size <= RESPONSE_HIGH_WATER:
                    self._conn._resume()
                return chunk
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            instance = self._conn.instance
            seconds = instance.pool.read_timeout
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with race(instance.clock, seconds) as timer:
                    await self._waiter
            except TimeoutError:
                if not timer.expired():
                    raise
                self._conn.abort()  # the rest of this body would be read as the next answer
                error = ReadTimeoutError(
                    instance.address, f"no more of the response body for {seconds:g} s"
                )
                self._fail(error)
                raise error from None
            finally:
                self._waiter = None

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (:class:`UpstreamClosedError` past ``limit`` bytes, and
        :class:`ReadTimeoutError` when it stalls for ``pool.read_timeout``)."""
        parts = []
        size = 0
        while (chunk := await self.chunk()) is not None:
            size += len(chunk)
            if limit is not None and size > limit:
                self._conn.abort()
                raise UpstreamClosedError(self._conn.instance.address, f"body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class Response:
    """An upstream response head; its body is :attr:`body`."""

    __slots__ = (
        "body",
        "chunked",
        "conn",
        "content_length",
        "headers",
        "hop_by_hop",
        "keep_alive",
        "status",
        "upgrade",
    )

    def __init__(
        self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.conn = conn
        self.status = status
        self.headers = headers
        self.body = ResponseBody(conn)
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade = False
        #: Header names the instance's ``Connection`` field lists (not for the client).
        self.hop_by_hop: frozenset[bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), if any."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def discard(self) -> None:
        """Give the response up (a retry replaced it, its reader went): its connection is
        not reused unread. Once the body is complete the connection may carry another
        request already (it went back to the pool), so it is left alone."""
        if not self.body.complete:
            self.conn.abort()

    def discard_on(self, _: object) -> None:
        """:meth:`discard`, as a done-callback (of a client's ``when_lost`` future)."""
        self.discard()


#: The most bytes of header fields an upstream response may have (names, values and
#: their separators); past it the request fails with a 502.
MAX_RESPONSE_HEAD: Final = 64 * 1024


def _read_framing(response: Response) -> None:
    """Content-Length, chunking and the Connection options of ``response``'s fields."""
    for name, value in response.headers:
        if name == b"content-length" and value.isdigit():
            response.content_length = int(value)
        elif name == b"transfer-encoding":
            response.chunked = True
        elif name == b"connection" and value not in _PLAIN_CONNECTION:
            options = connection_options(value)
            if options is not None:
                previous = response.hop_by_hop
                response.hop_by_hop = options if previous is None else previous | options


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an instance."""

    __slots__ = (
        "_counted",
        "_head_only",
        "_head_size",
        "_headers",
        "_loop",
        "_paused",
        "_upgrade",
        "_waiter",
        "_writable",
        "closed",
        "idle_since",
        "instance",
        "leftover",
        "parser",
        "pooled",
        "response",
        "reused",
        "sending_body",
        "transport",
    )

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._waiter: asyncio.Future[Response] | None = None
        self.response: Response | None = None
        self._head_only = False
        self._upgrade = False  # the request in flight asked for a protocol upgrade
        self._counted = False
        self._writable: asyncio.Future[None] | None = None
        self._paused = False
        self.closed = False
        #: In its instance's idle pool now (a flag, not a search of the pool).
        self.pooled = False
        self.reused = False
        #: A streamed request body is still being written: not to be pooled meanwhile,
        #: even if the instance has answered already.
        self.sending_body = False
        self.idle_since = 0.0
        self.leftover = b""
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - any cause ends it
        self.closed = True
        self.instance.pool_discard(self)
        self._uncount()
        response = self.response
        if response is not None and not response.body.complete:
            if response.content_length is None and not response.chunked and not response.upgrade:
                response.body._end()  # a body delimited by the end of the connection
                self._done()
            else:
                response.body._fail(
                    UpstreamClosedError(self.instance.address, "connection closed mid-body")
                )
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                UpstreamClosedError(self.instance.address, "connection closed before a response")
            )
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)
        self._writable = None

    @property
    def writable(self) -> asyncio.Future[None] | None:
        """A future to await while the instance reads slower than we write, else ``None``."""
        writable = self._writable
        return writable if writable is not None and not writable.done() else None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
            if self._waiter is not None:
                # The head is still coming, so all of this was head (or interim answers):
                # counted per read, not per field (nginx's "upstream sent too big header").
                self._head_size += len(data)
                if self._head_size > MAX_RESPONSE_HEAD:
                    self._fail(
                        UpstreamClosedError(
                            self.instance.address,
                            f"a response head over {MAX_RESPONSE_HEAD} bytes",
                        )
                    )
        except httptools.HttpParserUpgrade as exc:
            # A 101: the caller takes the transport over, with any bytes after the head.
            offset = int(exc.args[0]) if exc.args else len(data)
            self.leftover = data[offset:]
            self.transport.pause_reading()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosedError(self.instance.address, f"malformed response: {exc}"))

    def _fail(self, error: UpstreamError) -> None:
        """The response cannot be read: its waiter and body fail; the connection ends."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.response is not None:
            self.response.body._fail(error)
        self.abort()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim response (100 Continue): the real one follows
        if not 100 <= status <= 599 or (status == 101 and not self._upgrade):
            # RFC 9110 15: three digits, 1xx to 5xx; a 101 only answers an upgrade. Relayed,
            # a 600 or an unasked-for 101 would leave the client (and this connection's
            # framing) lost: nginx's "upstream sent invalid status", a 502.
            self._fail(
                UpstreamClosedError(
                    self.instance.address,
                    f"an invalid status {status}"
                    + (" to a request that asked for no upgrade" if status == 101 else ""),
                )
            )
            return
        if self._waiter is None:
            # A response nobody asked for (a 408 on an idle connection, an answer written
            # twice): what follows on this connection cannot be matched to requests.
            log.info(
                "upstream %s answered a request it was not sent; closing", self.instance.address
            )
            self.abort()
            return
        response = Response(self, status, self._headers)
        response.keep_alive = parser.should_keep_alive()
        _read_framing(response)
        response.upgrade = status == 101
        self.response = response
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self._head_only or status in (204, 304):
            # No body follows; the parser cannot know a HEAD's, so end it here.
            response.body._end()
            if self._head_only:
                self.abort_later()
            else:
                self._done()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response.body._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and not response.body.complete:
            response.body._end()
            self._done()

    # use

    def send(
        self, data: bytes, *, head_only: bool = False, upgrade: bool = False
    ) -> asyncio.Future[Response]:
        """Write a request; the future resolves with the response head. ``upgrade``: the
        request asks for a protocol upgrade, so a 101 may answer it."""
        loop = self._loop or asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._head_size = 0
        self._head_only = head_only
        self._upgrade = upgrade
        self.response = None
        if not self._counted:
            self._counted = True
            self.instance.outstanding += 1
        self.transport.write(data)
        return waiter

    def write(self, data: bytes) -> None:
        """Write more of the request body."""
        if not self.closed:
            self.transport.write(data)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.instance.outstanding -= 1

    def _done(self) -> None:
        response = self.response
        self._uncount()
        if (
            response is not None
            and response.keep_alive
            and not self.closed
            and not self.sending_body
        ):
            self.instance.pool_release(self)
        else:
            self.abort()

    def _pause(self) -> None:
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection."""
        self._uncount()
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def abort_later(self) -> None:
        """Drop the connection once this callback returns (HEAD responses)."""
        asyncio.get_running_loop().call_soon(self._close_head)

    def _close_head(self) -> None:
        self.abort()

    def detach(self) -> asyncio.Transport:
        """Hand the transport over (after a 101): it leaves the pool for good."""
        self._uncount()
        self.closed = True
        return self.transport


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Keep-alive pool of each instance."""

    max_idle: int = 128
    #: Seconds an idle connection is kept: under the instance's own keep-alive timeout
    #: (uvicorn's is 5 s), so the instance never closes one we are about to use.
    idle_timeout: float = 4.0
    connect_timeout: float = 2.0
    #: Seconds to wait for more of a response body before giving the response up (nginx's
    #: ``proxy_read_timeout``): the pipeline's timeouts end with the head.
    read_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class PassiveHealth:
    """Eject an instance after ``failures`` consecutive failures, for ``ejection`` seconds."""

    failures: int = 5
    ejection: float = 30.0


class Instance:
    """One address of an upstream, with its pool, load and health."""

    __slots__ = (
        "_idle",
        "address",
        "clock",
        "consecutive_failures",
        "current_weight",
        "ejected_until",
        "ejections_total",
        "failures_total",
        "host",
        "host_header",
        "outstanding",
        "passive",
        "pool",
        "port",
        "probe_failures",
        "probe_successes",
        "probed_healthy",
        "requests_total",
        "server_name",
        "tls",
        "weight",
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        pool: PoolSettings,
        passive: PassiveHealth,
        clock: Clock,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        weight: int = 1,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.host_header = self.address.encode()
        #: HTTPS to this instance (``None``: plain HTTP), and the name its certificate
        #: must carry (sent as SNI).
        self.tls = tls
        self.server_name = server_name or host
        #: Its share of the upstream's traffic (0: only when no other is available).
        self.weight = weight
        self.current_weight = 0  # smooth weighted round robin's running score
        self.pool = pool
        self.passive = passive
        self.clock = clock
        self._idle: list[UpstreamConnection] = []
        self.outstanding = 0
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.probed_healthy = True
        self.probe_failures = 0
        self.probe_successes = 0
        self.requests_total = 0
        self.failures_total = 0
        self.ejections_total = 0

    @property
    def available(self) -> bool:
        """Neither ejected nor marked down by the active probe."""
        return self.probed_healthy and (
            not self.ejected_until or self.clock.monotonic() >= self.ejected_until
        )

    def health(self) -> str:
        """``healthy``, ``ejected`` or ``down`` (for the admin endpoint)."""
        if not self.probed_healthy:
            return "down"
        if self.ejected_until and self.clock.monotonic() < self.ejected_until:
            return "ejected"
        return "healthy"

    async def connect(self) -> UpstreamConnection:
        """An idle pooled connection, or a new one."""
        return self.take_idle() or await self.connect_fresh()

    def take_idle(self) -> UpstreamConnection | None:
        """An idle pooled connection still fit for use, if there is one."""
        idle = self._idle
        now = 0.0
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if conn.closed or conn.transport.is_closing():
                continue
            if not now:
                now = self.clock.monotonic()
            if now - conn.idle_since > self.pool.idle_timeout:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    async def connect_fresh(self) -> UpstreamConnection:
        """A new connection, not from the pool."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.pool.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, **self.tls_options
                )
        except TimeoutError:
            raise ConnectFailedError(self.address, "connect timed out") from None
        except ssl.SSLError as exc:  # the handshake: a certificate not trusted, say
            raise ConnectFailedError(
                self.address, f"TLS handshake failed: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise ConnectFailedError(
                self.address, f"cannot connect: {exc.strerror or exc}"
            ) from None
        assert isinstance(protocol, UpstreamConnection)
        sock = protocol.transport.get_extra_info("socket")
        if sock is not None:
            import socket  # noqa: PLC0415 - once per new connection

            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return protocol

    @property
    def tls_options(self) -> dict[str, Any]:
        """``create_connection``'s keyword arguments for this instance's TLS (if any)."""
        if self.tls is None:
            return {}
        return {"ssl": self.tls, "server_hostname": self.server_name}

    def pool_release(self, conn: UpstreamConnection) -> None:
        if conn.closed or conn.pooled:
            return  # never pooled twice: two requests would share one connection
        if len(self._idle) >= self.pool.max_idle:
            conn.abort()
            return
        conn.idle_since = self.clock.monotonic()
        conn.response = None
        conn.pooled = True
        self._idle.append(conn)

    def pool_discard(self, conn: UpstreamConnection) -> None:
        if conn.pooled:
            conn.pooled = False
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)

    def close_idle(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.pooled = False
            conn.abort()

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool."""
        return len(self._idle)

    def succeeded(self) -> None:
        """A request got a non-5xx answer."""
        self.consecutive_failures = 0

    def failed(self) -> None:
        """A request failed (no answer, or a 5xx): maybe eject the instance."""
        self.failures_total += 1
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.passive.failures:
            self.consecutive_failures = 0
            self.ejected_until = self.clock.monotonic() + self.passive.ejection
            self.ejections_total += 1
            log.warning(
                "upstream instance %s ejected for %.1f s after %d consecutive failures",
                self.address,
                self.passive.ejection,
                self.passive.failures,
            )


class Balancer:
    """Picks an instance: ``round_robin`` or ``least_outstanding``, by weight if the
    instances have different ones.

    Weighted round robin is nginx's smooth one: each pick adds every candidate's weight
    to its score, takes the highest and takes the total off it, so with weights 5, 1, 1
    the picks interleave (a a b a c a a) instead of coming in bursts. Weighted least
    outstanding takes the lowest ``(outstanding + 1) / weight``. Instances of weight 0
    are picked only when no other is available.
    """

    __slots__ = ("_next", "instances", "kind", "weighted")

    def __init__(self, instances: list[Instance], kind: str) -> None:
        self.instances = instances
        self.kind = kind
        self._next = 0
        self.weighted = len({i.weight for i in instances}) > 1

    def pick(self, avoid: Instance | None = None) -> Instance:
        """An available instance (not ``avoid`` if there is another); all if none is."""
        instances = self.instances
        if len(instances) == 1:
            return instances[0]
        candidates = [i for i in instances if i.available and i is not avoid]
        if not candidates:
            candidates = [i for i in instances if i is not avoid] or instances
        if self.weighted:
            return self._pick_weighted(candidates)
        self._next += 1
        start = self._next % len(candidates)
        if self.kind == "least_outstanding":
            best = candidates[start]
            for offset in range(1, len(candidates)):
                candidate = candidates[(start + offset) % len(candidates)]
                if candidate.outstanding < best.outstanding:
                    best = candidate
            return best
        return candidates[start]

    def _pick_weighted(self, candidates: list[Instance]) -> Instance:
        weighted = [i for i in candidates if i.weight] or candidates
        if len(weighted) == 1:
            return weighted[0]
        if self.kind == "least_outstanding":
            return min(weighted, key=lambda i: (i.outstanding + 1) / (i.weight or 1))
        total = 0
        best = weighted[0]
        for instance in weighted:
            instance.current_weight += instance.weight or 1
            total += instance.weight or 1
            if instance.current_weight > best.current_weight:
                best = instance
        best.current_weight -= total
        return best


@dataclass(frozen=True, slots=True)
class ActiveHealth:
    """An HTTP probe of every instance every ``interval`` seconds."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2


async def probe(instance: Instance, settings: ActiveHealth) -> bool:
    """One probe: ``GET path`` answered 2xx within ``timeout``."""
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(settings.timeout):
            probe_conn = UpstreamConnection(instance)
            _, _ = await loop.create_connection(
                lambda: probe_conn, instance.host, instance.port, **instance.tls_options
            )
            transport = probe_conn.transport
            head = (
                f"GET {settings.path} HTTP/1.1\r\nhost: {instance.address}\r\n"
                "user-agent: atoll-gateway-probe\r\nconnection: close\r\n\r\n"
            ).encode()
            response = await probe_conn.send(head)
            await response.body.read(limit=1 << 20)
            return 200 <= response.status < 300
    except (TimeoutError, OSError, UpstreamError):
        return False
    finally:
        if transport is not None:
            transport.abort()


async def run_health_checks(
    instances: list[Instance], settings: ActiveHealth, clock: Clock, on_change: Callable[[], None]
) -> None:
    """Probe ``instances`` forever (a task cancelled when the upstream goes away)."""
    while True:
        results = await asyncio.gather(*(probe(i, settings) for i in instances))
        changed = False
        for instance, ok in zip(instances, results, strict=True):
            if ok:
                instance.probe_failures = 0
                instance.probe_successes += 1
                if (
                    not instance.probed_healthy
                    and instance.probe_successes >= settings.healthy_threshold
                ):
                    instance.probed_healthy = True
                    changed = True
                    log.info("upstream instance %s is up again", instance.address)
            else:
                instance.probe_successes = 0
                instance.probe_failures += 1
                if (
                    instance.probed_healthy
                    and instance.probe_failures >= settings.unhealthy_threshold
                ):
                    instance.probed_healthy = False
                    changed = True
                    log.warning(
                        "upstream instance %s is down (%d failed probes of %s)",
                        instance.address,
                        instance.probe_failures,
                        settings.path,
                    )
        if changed:
            on_change()
        await clock.sleep(settings.interval)
