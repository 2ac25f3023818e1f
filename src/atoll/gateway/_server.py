"""A lean HTTP/1.1 server: ``httptools`` parsing inside an :class:`asyncio.Protocol`.

Why not uvicorn + ASGI: a gateway's per-request work is small (match a route, forward
bytes), so the fixed cost of the server dominates. ASGI's message dicts, the
``receive``/``send`` coroutines and uvicorn's per-request objects cost more than the
proxying itself; parsing with ``httptools`` directly and writing pre-joined bytes to
the transport is what lets one process keep up with nginx at all (``docs/gateway.md``,
"Why a hand-written server", has the measurements).

One :class:`Connection` per client connection. Requests on it are handled one at a time
in order (pipelined requests queue up, and reading pauses while more than one waits).
Request bodies stream: a handler starts as soon as the head is parsed and reads the
body from :class:`Body` while it arrives, with reading paused while too much is
buffered. Responses stream the other way through :meth:`Connection.write`, whose
``writable`` future lets producers wait while the client is slow.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import httptools

from atoll.determinism import Clock, SystemClock
from atoll.resilience._timer import race

log = logging.getLogger("atoll.gateway")

#: Bytes buffered from a request body before reading from the client pauses.
BODY_HIGH_WATER = 256 * 1024
#: The client connection preface (RFC 9113 3.4) that starts h2c with prior knowledge.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` for ``status`` (cached)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        from http import HTTPStatus  # noqa: PLC0415 - only on first use of a status

        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Status"
        line = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
        _STATUS_LINES[status] = line
    return line


class RequestError(Exception):
    """A request the server refuses before any handler runs: status and reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Body:
    """A request body as it arrives: iterate for chunks, or :meth:`read` it whole."""

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "complete", "received")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        #: True once the whole body has been received.
        self.complete = False
        #: Bytes received so far.
        self.received = 0

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        self.received += len(chunk)
        if self._size > BODY_HIGH_WATER:
            self._conn._pause_reading()
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def buffered(self) -> bytes | None:
        """The whole body if it has already arrived (the common case), else ``None``."""
        if not self.complete:
            return None
        if not self._chunks:
            return b""
        if len(self._chunks) == 1:
            return self._chunks[0]
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._chunks.append(data)
        return data

    async def chunk(self) -> bytes | None:
        """The next chunk, or ``None`` at the end of the body."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._size -= len(chunk)
                if self._size <= BODY_HIGH_WATER:
                    self._conn._resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            state = self._conn.state
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with race(state.clock, state.body_timeout) as timer:
                    await self._waiter
            except TimeoutError:
                if not timer.expired():
                    raise
                # A client that stops sending mid-body (nginx's client_body_timeout).
                error = RequestError(
                    408, f"the request body stalled: nothing for {state.body_timeout:g} s"
                )
                self._fail(error)
                raise error from None
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        """The whole body."""
        if self.complete and not self._chunks:
            return b""
        parts = []
        while (chunk := await self.chunk()) is not None:
            parts.append(chunk)
        data = b"".join(parts)
        self._chunks.append(data)  # read() again gives the same bytes
        self._size += len(data)
        return data


class _EmptyBody(Body):
    """The body of every request that has none: complete from the start, shared."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.complete = True

    def _feed(self, chunk: bytes) -> None:
        del chunk
        raise RequestError(400, "a body where none was announced")

    def _end(self) -> None:
        pass

    def _fail(self, exc: BaseException) -> None:
        pass


EMPTY_BODY = _EmptyBody()


class Request:
    """One parsed request head, and its :class:`Body`.

    ``headers`` is a list of ``(lower-case name, value)`` byte pairs in arrival order.
    """

    __slots__ = (
        "body",
        "chunked",
        "client",
        "conn",
        "content_length",
        "headers",
        "keep_alive",
        "leftover",
        "method",
        "path",
        "query",
        "raw_path",
        "upgrade",
        "version",
    )

    def __init__(  # noqa: PLR0917 - built only by the connection, per request
        self,
        conn: Connection,
        method: bytes,
        raw_path: bytes,
        headers: list[tuple[bytes, bytes]],
        version: str,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.raw_path = raw_path
        path, _, query = raw_path.partition(b"?")
        self.path = path
        self.query = query
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.client = conn.peer
        self.body: Body = EMPTY_BODY
        self.upgrade = False
        self.leftover = b""
        self.content_length: int | None = None
        self.chunked = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), if present."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


Handler = Callable[[Request], Awaitable[None]]


class ServerState:
    """What the connections of one listening server share: the handler and limits."""

    __slots__ = (
        "body_timeout",
        "client_certs",
        "clock",
        "closing",
        "connections",
        "handler",
        "http2",
        "http2_connections",
        "http2_max_streams",
        "http2_terminated",
        "idle_timeout",
        "max_header_bytes",
        "max_url_bytes",
        "on_bad_request",
        "on_handshake",
    )

    def __init__(
        self,
        handler: Handler,
        on_bad_request: Callable[[Connection, RequestError], None],
        *,
        max_header_bytes: int = 16384,
        max_url_bytes: int = 8192,
        idle_timeout: float = 75.0,
        body_timeout: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        self.handler = handler
        #: Seconds a request body may bring nothing new before it is refused (408).
        self.body_timeout = body_timeout
        self.clock: Clock = clock or SystemClock()
        self.on_bad_request = on_bad_request
        self.max_header_bytes = max_header_bytes
        self.max_url_bytes = max_url_bytes
        self.idle_timeout = idle_timeout
        self.connections: set[Connection] = set()
        self.closing = False
        #: Clients may present certificates (mutual TLS): each connection reads its own.
        self.client_certs = False
        #: Told of every new TLS connection's handshake (the listener's session checks).
        self.on_handshake: Callable[[ssl.SSLObject], None] | None = None
        #: Serve HTTP/2 to clients that ask for it (ALPN ``h2``, or the h2c preface on a
        #: plain listener): see ``atoll.gateway._h2``.
        self.http2 = False
        #: The streams one HTTP/2 connection may have open at once.
        self.http2_max_streams = 100
        #: HTTP/2 connections served, and those ended by the gateway's GOAWAY for an
        #: error, by its code's name (``protocol_error``, ``enhance_your_calm``...).
        self.http2_connections = 0
        self.http2_terminated: dict[str, int] = {}

    def trust_changed(self) -> None:
        """The trusted CAs or revocation lists changed: connections with a client
        certificate end once their request in progress is answered (a WebSocket one at
        once), so their next requests come with a handshake checked against the new."""
        for conn in list(self.connections):
            if conn.client_cert is not None:
                conn.retire()

    def retire_anonymous(self) -> None:
        """Client certificates became required: connections made without one end once
        their request in progress is answered (they would be served on otherwise)."""
        for conn in list(self.connections):
            if conn.client_cert is None:
                conn.retire()

    async def sweep_idle(self) -> None:
        """Close keep-alive connections idle for ``idle_timeout`` (one timer for all of them,
        rather than one per request)."""
        loop = asyncio.get_running_loop()
        step = max(0.05, self.idle_timeout / 4)
        while True:
            await asyncio.sleep(step)  # determinism: allowed - a loop-time sweep of sockets
            before = loop.time() - self.idle_timeout
            for conn in list(self.connections):
                conn.close_if_idle_since(before)


#: How long a connection answered before its request body was read keeps reading (and
#: dropping) the rest, so that the client reads the answer before the close.
LINGER_SECONDS: Final = 5.0


class Connection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "_current",
        "_gone",
        "_header_bytes",
        "_headers",
        "_last",
        "_loop",
        "_lost_waiter",
        "_parser",
        "_pending",
        "_preface",
        "_reading_paused",
        "_refused",
        "_url",
        "_writable",
        "client_cert",
        "client_der",
        "client_identity",
        "closed",
        "forwarded_cert",
        "h2",
        "last_active",
        "peer",
        "peer_transport",
        "responding",
        "retired",
        "state",
        "transport",
        "upgraded",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._current: Request | None = None  # the request being parsed
        self._last: Request | None = None  # the request parsed last
        self._pending: deque[Request] = deque()  # parsed, waiting for their turn
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False
        #: A malformed request parsed behind others: refused once they are answered.
        self._refused: RequestError | None = None
        self.last_active = 0.0
        #: The request whose response is being written, if any.
        self.responding: Request | None = None
        self.closed = False
        self._gone = False  # the transport is lost (closed means: no request more)
        self._lost_waiter: asyncio.Future[None] | None = None
        self.upgraded: Callable[[bytes], None] | None = None
        self.peer_transport: asyncio.Transport | None = None
        self.peer = ""
        #: The client's verified certificate over mutual TLS: ``getpeercert()``'s dict,
        #: and the SHA-256 of its DER as hex.
        self.client_cert: tuple[dict[str, object], str] | None = None
        #: That certificate's DER.
        self.client_der = b""
        #: Its ``X-Forwarded-Client-Cert`` value, with the fields it was made for (reloads).
        self.forwarded_cert: tuple[tuple[str, ...], bytes] | None = None
        #: The identity made from it, with the authenticator it was made by (reloads).
        self.client_identity: tuple[object, object] | None = None
        #: Close once the request in progress is answered (see ServerState.trust_changed).
        self.retired = False
        #: The HTTP/2 session, when the client speaks HTTP/2 (its streams are the requests).
        self.h2: Any = None
        self._preface = b""  # the first bytes on a plain listener, until h2c is ruled out

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        h2 = False
        if self.state.client_certs:
            ssl_object = transport.get_extra_info("ssl_object")
            h2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
            on_handshake = self.state.on_handshake
            if on_handshake is not None and ssl_object is not None:
                on_handshake(ssl_object)
            peercert = transport.get_extra_info("peercert")
            if peercert:
                der = ssl_object.getpeercert(binary_form=True)
                self.client_cert = (peercert, hashlib.sha256(der).hexdigest())
                self.client_der = der
        self.state.connections.add(self)
        self.last_active = self._loop.time()
        if h2:
            self._start_h2(b"")
        elif self.state.http2 and not self.state.client_certs:
            # A plain listener: the first bytes tell h2c (prior knowledge) from HTTP/1.1.
            self.upgraded = self._sniff_preface

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - any cause ends it
        self.closed = True
        self._gone = True
        waiter = self._lost_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.state.connections.discard(self)
        error = ConnectionResetError("the client closed the connection")
        for request in (self._current, self.responding, *self._pending):
            if request is not None and not request.body.complete:
                request.body._fail(error)
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_exception(error)
            writable.exception()  # marked as seen: no producer may be waiting on it
        if self.upgraded is not None:
            self.upgraded(b"")

    def when_lost(self) -> asyncio.Future[None]:
        """A future done once the client's connection is gone: for work done on its
        behalf (an aggregate's calls) to stop when nobody will read the answer."""
        waiter = self._lost_waiter
        if waiter is None:
            waiter = self._lost_waiter = self._loop.create_future()
            if self._gone:
                waiter.set_result(None)
        return waiter

    def data_received(self, data: bytes) -> None:
        if self.upgraded is not None:
            self.upgraded(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            request = self._last
            offset = int(exc.args[0]) if exc.args else len(data)
            upgrade = request.header(b"upgrade") if request is not None else None
            if upgrade is not None and upgrade.strip().lower() == b"h2c":
                # What `curl --http2` sends on http:// (RFC 7540 3.2; dropped by RFC 9113):
                # a server may ignore it. Answered as HTTP/1.1; the parser stopped at the
                # upgrade, so a new one reads what follows (the request was complete).
                self._parser = httptools.HttpRequestParser(self)
                if offset < len(data):
                    self.data_received(data[offset:])
                return
            if request is not None:
                request.upgrade = True
                # Bytes after the head already belong to the upgraded protocol.
                request.leftover = data[offset:]
            self._pause_reading()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestError):
                self._refuse(cause)
            else:
                self._refuse(RequestError(400, _malformed(exc)))

    def eof_received(self) -> bool | None:
        return None

    def _sniff_preface(self, data: bytes) -> None:
        if not data:
            return  # the connection ended before it said anything
        seen = self._preface + data
        if len(seen) < len(PREFACE) and PREFACE.startswith(seen):
            self._preface = seen
            return
        self._preface = b""
        if seen.startswith(PREFACE):
            self._start_h2(seen)
        else:
            self.upgraded = None
            self.data_received(seen)

    def _start_h2(self, data: bytes) -> None:
        from atoll.gateway._h2 import H2Session  # noqa: PLC0415 - h2 only loads when used

        session = H2Session(self)
        self.h2 = session
        self.upgraded = session.data_received
        if data:
            session.data_received(data)

    def pause_writing(self) -> None:
        if self.peer_transport is not None:  # spliced (WebSocket): slow the other side
            self.peer_transport.pause_reading()
            return
        if self.h2 is not None:
            self.h2.pause_reading()  # no more frames to answer (PINGs) until it drains
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self.peer_transport is not None:
            self.peer_transport.resume_reading()
            return
        if self.h2 is not None:
            self.h2.resume_reading()
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)
        self._writable = None

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.state.max_url_bytes:
            raise RequestError(414, "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.state.max_header_bytes:
            raise RequestError(431, "the request's header fields are too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        request = Request(
            self,
            parser.get_method(),
            self._url,
            self._headers,
            parser.get_http_version(),
            parser.should_keep_alive(),
        )
        for name, value in self._headers:
            if name == b"content-length":
                if request.content_length is not None or not value.isdigit():
                    raise RequestError(400, "a bad or repeated Content-Length")
                request.content_length = int(value)
            elif name == b"transfer-encoding":
                request.chunked = True
        # Trailers of a chunked body come through on_header too: into a list of their
        # own, never the request's fields (an X-Forwarded-For there would pick the client).
        self._headers = []
        if request.chunked and request.content_length is not None:
            raise RequestError(400, "both Content-Length and Transfer-Encoding")
        if request.chunked or request.content_length:
            request.body = Body(self)
        self._current = request
        self._last = request
        if self.responding is None:
            self._start(request)
        else:
            self._pending.append(request)
            if len(self._pending) > 1:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.body._feed(body)

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.body._end()
            self._current = None

    # -- requests -----------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self.responding = request
        self._loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self.state.handler(request)
        except Exception:
            log.exception("gateway handler failed")
            self.close()

    def finish(self, request: Request) -> None:
        """The response to ``request`` has been written: go on to the next one."""
        if self.responding is not request:
            return
        self.responding = None
        if self.closed:
            return
        if not request.body.complete:
            # A body not read to its end leaves the stream in an unknown place: closed,
            # once the client has had the answer (see _linger).
            self._linger()
            return
        if not request.keep_alive or self.state.closing or self.retired:
            self.close()
            return
        if self._pending:
            self._start(self._pending.popleft())
            if len(self._pending) <= 1 and self._refused is None:
                self._resume_reading()
        elif self._refused is not None:
            self.state.on_bad_request(self, self._refused)
        else:
            self.last_active = self._loop.time()

    def _refuse(self, exc: RequestError) -> None:
        self._pause_reading()
        current = self._current
        if current is not None and current is self.responding and not current.body.complete:
            # A bad body of the request being handled: its handler answers (or closes).
            current.body._fail(exc)
        elif self.responding is None:
            self.state.on_bad_request(self, exc)
        elif current is not None and not current.body.complete:
            # A bad body of a request still waiting its turn: its handler meets the error
            # when it reads the body, and answers it in order; reading stays paused (the
            # stream is out of step from here) and the connection ends after that answer.
            current.body._fail(exc)
            self._refused = exc
        else:
            # Malformed bytes pipelined behind requests that parsed: those are answered
            # first, in order, then this refusal (RFC 9112 9.3.2), and the connection ends.
            self._refused = exc

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write to the client (no-op once closed)."""
        if not self.closed:
            self.transport.write(data)

    @property
    def writable(self) -> asyncio.Future[None] | None:
        """A future to await while the client reads slower than we write, else ``None``."""
        writable = self._writable
        return writable if writable is not None and not writable.done() else None

    def close(self) -> None:
        """Close the connection (buffered data is still sent)."""
        if not self.closed:
            self.closed = True
            self.transport.close()

    def _linger(self) -> None:
        """Close after an answer given before the request body was read (a 413, a 401 to
        an upload), as nginx's lingering_close does: the answer, then our FIN, then the
        rest of the body read and dropped until the client closes, or LINGER_SECONDS. A
        close with unread bytes makes the kernel send a reset, and a client still sending
        may lose the answer with it."""
        transport = self.transport
        if self.closed:
            return
        if (
            transport.is_closing()
            or transport.get_extra_info("sslcontext") is not None
            or not transport.can_write_eof()
        ):
            self.close()  # gone already, or TLS, which has no half-close of its own
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError):  # the client went meanwhile
            self.close()
            return
        self.upgraded = self._drop
        self._resume_reading()
        self.closed = True  # no request more
        self._loop.call_later(LINGER_SECONDS, transport.close)

    def _drop(self, data: bytes) -> None:
        del data  # the rest of a body nobody reads

    def abort(self) -> None:
        """Drop the connection at once."""
        self.closed = True
        self.transport.abort()

    # -- flow control -------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def resume_reading(self) -> None:
        """Resume reading (after an upgrade was decided)."""
        self._resume_reading()

    def close_if_idle_since(self, before: float) -> None:
        """Close if no request is in progress and none finished since ``before`` (loop time)."""
        if self.h2 is not None:
            self.h2.close_if_idle_since(before)
        elif self.responding is None and self._current is None and self.last_active < before:
            self.close()

    def request_line(self) -> tuple[str | None, str | None]:
        """Method and path of the request being parsed, as far as they were read.

        For logging a request refused before it became a :class:`Request`.
        """
        if not self._url:
            # The parser reports a method even when it could not read one.
            return None, None
        method = self._parser.get_method().decode("latin-1")
        return method, self._url.partition(b"?")[0][:500].decode("latin-1")

    def retire(self) -> None:
        """Close once the request in progress is answered; an upgraded one at once."""
        self.retired = True
        if self.h2 is not None:
            self.h2.go_away()
        elif self.upgraded is not None:
            self.abort()
        else:
            self.close_if_idle()

    def close_if_idle(self) -> None:
        """Close now if between requests (for shutdown); HTTP/2: GOAWAY, and close once
        the open streams are answered."""
        if self.h2 is not None:
            self.h2.go_away()
        elif self.responding is None and self._current is None and not self._pending:
            self.close()


def _malformed(exc: Exception) -> str:
    """What a 400 for bytes ``httptools`` could not parse says."""
    reason = _reason(exc)
    if "PRI" in reason:
        # llhttp's "Pause on PRI/Upgrade": the h2c preface, on a listener without HTTP/2.
        return "an HTTP/2 connection preface; this listener speaks HTTP/1.1 only"
    return f"malformed HTTP request: {reason}"


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 100 else text[:100]


def problem_bytes(
    status: int,
    detail: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
    head_only: bool = False,
    **fields: Any,
) -> bytes:
    """A complete ``application/problem+json`` response (RFC 9457).

    ``head_only`` (the answer to a HEAD): the same head, without the body. Its
    Content-Length still names the body a GET would get, as RFC 9110 allows.
    """
    import json  # noqa: PLC0415 - error path only
    from http import HTTPStatus  # noqa: PLC0415 - error path only

    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail, **fields}
    ).encode()
    head = [
        status_line(status),
        b"content-type: application/problem+json\r\n",
        b"content-length: ",
        str(len(body)).encode(),
        b"\r\n",
    ]
    for name, value in extra_headers or ():
        head += [name, b": ", value, b"\r\n"]
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return b"".join(head)
