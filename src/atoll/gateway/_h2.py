"""HTTP/2 from clients (RFC 9113), served by the same handler as HTTP/1.1.

A client gets HTTP/2 by ALPN (``h2``) on a TLS listener, or by starting with the
connection preface on a plain one ("prior knowledge", h2c), when ``server.http2`` is on.
Upstreams are still spoken to over HTTP/1.1, as nginx does.

How it joins the HTTP/1.1 path. Each stream becomes a :class:`~atoll.gateway._server.Request`
whose ``conn`` is an :class:`H2Stream`: the same surface a
:class:`~atoll.gateway._server.Connection` gives the gateway (``write``, ``writable``,
``close``, ``abort``, ``finish``, the client certificate). The gateway writes its
response as HTTP/1.1 bytes, as it does for every client; the stream parses them back
with ``httptools`` and sends the head as a HEADERS frame (without the connection-specific
fields HTTP/2 forbids) and the body, de-chunked, as DATA frames under the peer's flow
control. So every feature (routing, auth, limits, streaming, problem+json) behaves the
same over both protocols, at the price of parsing the response head twice: HTTP/2 here is
for multiplexing and for clients that only speak it, not for speed.

Limits and defences, per connection:

* at most ``server.http2_max_streams`` streams at once (SETTINGS_MAX_CONCURRENT_STREAMS);
* request header fields over ``server.max_header_bytes`` get a 431 on their stream, a
  target over ``server.max_url_bytes`` a 414; HPACK's own list limit and h2's cap on
  CONTINUATION frames end the connection before either;
* a request body is flow-controlled: a stream's window is only re-opened as its handler
  reads, so a slow upstream cannot make the gateway buffer more than a window;
* "rapid reset" (CVE-2023-44487) and its server-provoked variant: a connection whose
  streams end in RST_STREAM more often than they are answered, past a threshold, gets a
  GOAWAY with ENHANCE_YOUR_CALM and is closed;
* a protocol error ends the connection with GOAWAY (h2 picks the error code).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import httptools
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings

from atoll.gateway._server import (
    BODY_HIGH_WATER,
    PREFACE,
    Body,
    Request,
    RequestError,
    ServerState,
)

if TYPE_CHECKING:
    from atoll.gateway._server import Connection

log = logging.getLogger("atoll.gateway")

#: The connection's receive window: room for several streams' bodies at once.
_CONNECTION_WINDOW: Final = 4 * BODY_HIGH_WATER
#: Response body bytes queued on a stream (waiting for the client's window) beyond which
#: the producer is asked to wait (``writable``).
_OUT_HIGH_WATER: Final = 64 * 1024
#: Rapid reset: resets of unanswered streams tolerated on one connection, and the share
#: of its streams they may be, before it is closed with ENHANCE_YOUR_CALM.
_MAX_RESETS: Final = 100
#: HTTP/1.1 response fields that HTTP/2 forbids (RFC 9113 8.2.2).
_CONNECTION_FIELDS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: Status codes whose responses have no body.
_NO_BODY: Final = frozenset({204, 304})


class H2Session:
    """HTTP/2 on one client connection (see the module docstring)."""

    __slots__ = (
        "_conn_unacked",
        "_finished",
        "_frame_head",
        "_frame_left",
        "_going_away",
        "_resets",
        "closed",
        "conn",
        "h2",
        "state",
        "streams",
        "transport",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.state: ServerState = conn.state
        self.transport = conn.transport
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.state.http2_max_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: BODY_HIGH_WATER,
                # Room for the fields (which get their own 431) and HPACK's overhead.
                SettingCodes.MAX_HEADER_LIST_SIZE: 2 * self.state.max_header_bytes + 4096,
            },
        )
        h2.initiate_connection()
        h2.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)
        self.h2 = h2
        self.streams: dict[int, H2Stream] = {}
        self._conn_unacked = 0
        #: Frame boundaries, followed here because h2 checks a frame's length only once
        #: all of it has arrived: bytes left of the preface or of the current frame, and
        #: a frame header read in part.
        self._frame_left = len(PREFACE)
        self._frame_head = b""
        self._resets = 0
        self._finished = 0
        self._going_away = False
        self.closed = False
        self.state.http2_connections += 1
        self.flush()

    # -- input ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when the connection is gone."""
        if not data:
            self._lost()
            return
        if self.closed:
            return
        if not self._frames_fit(data):
            log.info("gateway: an HTTP/2 client announced a frame over the maximum size")
            self._terminate(ErrorCodes.FRAME_SIZE_ERROR)
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.info("gateway: an HTTP/2 client broke the protocol: %s", exc)
            self._terminate(exc.error_code)
            return
        for event in events:
            self._event(event)
            if self._ended():
                return
        self.conn.last_active = self.conn._loop.time()
        self.flush()

    def _frames_fit(self, data: bytes) -> bool:
        """Whether every frame header in ``data`` announces at most the frame size the
        gateway takes: refused on its 9-byte header, a frame does not get to make the
        gateway buffer up to 16 MiB before h2 looks at it."""
        limit = self.h2.max_inbound_frame_size
        offset, size = 0, len(data)
        while offset < size:
            if self._frame_left:
                step = min(self._frame_left, size - offset)
                self._frame_left -= step
                offset += step
                continue
            need = 9 - len(self._frame_head)
            self._frame_head += data[offset : offset + need]
            offset += need
            if len(self._frame_head) < 9:
                return True
            length = int.from_bytes(self._frame_head[:3], "big")
            if length > limit:
                return False
            self._frame_left = length
            self._frame_head = b""
        return True

    def _ended(self) -> bool:
        # A method, not the attribute: an event handler may have closed the session.
        return self.closed

    def _event(self, event: object) -> None:
        if isinstance(event, DataReceived):
            self._data(event)
        elif isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.request is not None:
                stream.request.body._end()
        elif isinstance(event, WindowUpdated):
            self._window_opened(event.stream_id)
        elif isinstance(event, StreamReset):
            self._reset_by_client(event.stream_id)
        elif isinstance(event, ConnectionTerminated):
            self._going_away = True
            if not self.streams:
                self.close()
        # Trailers are not forwarded (StreamEnded follows them); settings, pings and
        # priorities h2 answers itself.

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self._going_away or self.state.closing:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        method, path, fields, size = _request_head(event.headers or ())
        stream.method = method
        stream.path = path
        ended = event.stream_ended is not None
        # H2Stream stands in for the Connection a Request is made for.
        request = Request(stream, method, path, fields, "1.1", keep_alive=True)  # type: ignore[arg-type]
        stream.request = request
        if not ended:
            request.body = Body(stream)  # type: ignore[arg-type]
        refusal = _refusal(request, fields, size, self.state)
        if refusal is not None:
            self._refuse(stream, request, refusal)
            return
        if not ended and request.content_length is None:
            request.chunked = True  # forwarded upstream in chunked encoding
        stream.responding = request
        self.conn._loop.create_task(self._run(stream, request))

    async def _run(self, stream: H2Stream, request: Request) -> None:
        try:
            await self.state.handler(request)
        except Exception:
            log.exception("gateway handler failed (HTTP/2)")
            stream.abort()
        finally:
            stream.finish(request)

    def _refuse(self, stream: H2Stream, request: Request, exc: RequestError) -> None:
        stream.responding = request
        self.state.on_bad_request(stream, exc)  # type: ignore[arg-type]  # writes a problem, closes it
        stream.finish(request)

    def _data(self, event: DataReceived) -> None:
        length = event.flow_controlled_length
        self._conn_unacked += length
        if self._conn_unacked >= _CONNECTION_WINDOW // 2:
            self.h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.request is None or stream.body_done:
            return  # a stream already answered (or refused): its body is not wanted
        try:
            stream.request.body._feed(event.data)
        except RequestError as exc:
            stream.request.body._fail(exc)
            return
        stream.unacked += length
        # Re-opened in steps, not per frame; the body's own high-water mark pauses it.
        if not stream.reading_paused and stream.unacked >= BODY_HIGH_WATER // 4:
            stream.open_window()

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.send_queued()
        else:
            for stream in list(self.streams.values()):
                stream.send_queued()

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not stream.answered:
            self.count_reset()
        stream.reset_by_peer()

    def count_reset(self) -> None:
        """A stream ended in RST_STREAM before its answer: too many, and too large a
        share of the connection's streams, is an attack (rapid reset)."""
        self._resets += 1
        if self._resets > _MAX_RESETS and self._resets > self._finished:
            log.warning(
                "gateway: an HTTP/2 client reset %d streams (answered %d); closing it",
                self._resets,
                self._finished,
            )
            self._terminate(ErrorCodes.ENHANCE_YOUR_CALM)

    # -- output -------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def stream_done(self, stream: H2Stream) -> None:
        """Both sides of ``stream`` are over: forget it."""
        if self.streams.pop(stream.stream_id, None) is not None:
            if stream.answered:
                self._finished += 1
            if self._going_away and not self.streams:
                self.close()

    # -- the connection's life ----------------------------------------------------------

    def go_away(self) -> None:
        """No new streams; close once the open ones are answered (graceful GOAWAY)."""
        if self._going_away or self.closed:
            return
        self._going_away = True
        self.h2.close_connection(ErrorCodes.NO_ERROR)
        self.flush()
        if not self.streams:
            self.close()

    def close_if_idle_since(self, before: float) -> None:
        if not self.streams and self.conn.last_active < before:
            self.go_away()

    def close(self) -> None:
        """Close the connection (what is written still goes out)."""
        if not self.closed:
            self.flush()
            self.closed = True
            self.conn.close()

    def _terminate(self, error_code: int) -> None:
        """End the connection at once with GOAWAY ``error_code``."""
        if self.closed:
            return
        try:
            reason = ErrorCodes(error_code).name.lower()
        except ValueError:
            reason = f"0x{error_code:x}"
        terminated = self.state.http2_terminated
        terminated[reason] = terminated.get(reason, 0) + 1
        with contextlib.suppress(H2Error):
            self.h2.close_connection(error_code)
        self.flush()
        self.closed = True
        self._fail_streams(ConnectionResetError("the HTTP/2 connection was closed"))
        self.conn.close()

    def _lost(self) -> None:
        self.closed = True
        self._fail_streams(ConnectionResetError("the client closed the connection"))

    def _fail_streams(self, error: BaseException) -> None:
        for stream in list(self.streams.values()):
            stream.lost(error)
        self.streams.clear()


class H2Stream:
    """One stream, as the :class:`~atoll.gateway._server.Connection` its request sees."""

    __slots__ = (
        "_drain",
        "_end_queued",
        "_fields",
        "_out",
        "_out_size",
        "_parser",
        "_skip",
        "answered",
        "body_done",
        "closed",
        "head_sent",
        "method",
        "path",
        "peer",
        "reading_paused",
        "request",
        "responding",
        "session",
        "state",
        "stream_id",
        "unacked",
    )

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.state = session.state
        self.peer = session.conn.peer
        self.request: Request | None = None
        self.responding: Request | None = None
        self.method = b""
        self.path = b""
        self.closed = False
        #: The response has been handed to h2 whole (END_STREAM sent or queued).
        self.answered = False
        #: The request body is no longer wanted (answered early, or reset).
        self.body_done = False
        self.head_sent = False
        self.reading_paused = False
        self.unacked = 0
        self._parser = httptools.HttpResponseParser(self)
        self._skip = False  # an informational (1xx) response being parsed: not sent
        self._fields: list[tuple[bytes, bytes]] = []
        self._out: deque[bytes] = deque()
        self._out_size = 0
        self._end_queued = False
        self._drain: asyncio.Future[None] | None = None

    # -- what the gateway reads off a connection ----------------------------------------

    @property
    def client_cert(self) -> tuple[dict[str, object], str] | None:
        return self.session.conn.client_cert

    @property
    def client_der(self) -> bytes:
        return self.session.conn.client_der

    @property
    def forwarded_cert(self) -> tuple[tuple[str, ...], bytes] | None:
        return self.session.conn.forwarded_cert

    @forwarded_cert.setter
    def forwarded_cert(self, value: tuple[tuple[str, ...], bytes] | None) -> None:
        self.session.conn.forwarded_cert = value

    @property
    def client_identity(self) -> tuple[object, object] | None:
        return self.session.conn.client_identity

    @client_identity.setter
    def client_identity(self, value: tuple[object, object] | None) -> None:
        self.session.conn.client_identity = value

    def request_line(self) -> tuple[str | None, str | None]:
        method = self.method.decode("latin-1") or None
        path = self.path.partition(b"?")[0][:500].decode("latin-1") or None
        return method, path

    # -- the request body's flow control ------------------------------------------------

    def _pause_reading(self) -> None:
        self.reading_paused = True

    def _resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.open_window()
            self.session.flush()

    def open_window(self) -> None:
        """Let the client send as much again as the handler has taken (or will take)."""
        if self.unacked and not self.body_done and not self.closed:
            try:
                self.session.h2.increment_flow_control_window(self.unacked, self.stream_id)
            except H2Error:
                return  # the stream ended meanwhile
            self.unacked = 0

    # -- the response: HTTP/1.1 bytes in, frames out -------------------------------------

    def write(self, data: bytes) -> None:
        """Take response bytes as the gateway writes them for an HTTP/1.1 client."""
        if self.closed or self.answered:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            log.exception("gateway: a response could not be sent over HTTP/2")
            self.abort()
            return
        self.send_queued()
        self.session.flush()

    def on_message_begin(self) -> None:
        self._skip = False
        self._fields = []

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._skip = True  # 100 Continue and the like: HTTP/2 clients need none
            self._fields = []
            return
        headers = [(b":status", str(status).encode())]
        headers += [(name, value) for name, value in self._fields if name not in _CONNECTION_FIELDS]
        self._fields = []
        head_only = self.method == b"HEAD" or status in _NO_BODY
        try:
            self.session.h2.send_headers(self.stream_id, headers, end_stream=head_only)
        except H2Error:
            self.closed = True
            return
        self.head_sent = True
        if head_only:
            self._answered()
            self._sent_all()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        if self._skip or self.answered:
            return
        self._out.append(body)
        self._out_size += len(body)

    def on_message_complete(self) -> None:
        if self._skip:
            self._skip = False
            return
        if not self.answered:
            self._end_queued = True
            self._answered()

    def _answered(self) -> None:
        self.answered = True
        self.responding = None

    def send_queued(self) -> None:
        """Send queued body bytes as far as the client's windows allow."""
        if self.closed:
            return
        h2 = self.session.h2
        try:
            while self._out:
                window = min(
                    h2.local_flow_control_window(self.stream_id), h2.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = self._out[0]
                if len(chunk) <= window:
                    self._out.popleft()
                else:
                    self._out[0] = chunk[window:]
                    chunk = chunk[:window]
                self._out_size -= len(chunk)
                h2.send_data(self.stream_id, chunk)
            if not self._out and self._end_queued:
                self._end_queued = False
                h2.end_stream(self.stream_id)
                self._sent_all()
        except H2Error:
            self.closed = True
            self._wake(ConnectionResetError("the HTTP/2 stream was closed"))
            return
        if self._out_size <= _OUT_HIGH_WATER:
            self._wake(None)

    def _sent_all(self) -> None:
        if self.request is not None and not self.request.body.complete:
            # Answered before the body came in whole (RFC 9113 8.1): stop it.
            self.body_done = True
            with contextlib.suppress(H2Error):
                self.session.h2.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
        if self.responding is None:
            self.session.stream_done(self)

    @property
    def writable(self) -> asyncio.Future[None] | None:
        """A future to await while the client reads slower than the gateway writes."""
        paused = self.session.conn.writable
        if paused is not None:
            return paused
        if self._out_size > _OUT_HIGH_WATER and not self.closed:
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            return self._drain
        return None

    def _wake(self, error: BaseException | None) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            if error is None:
                drain.set_result(None)
            else:
                drain.set_exception(error)
        self._drain = None

    # -- the end of the stream ----------------------------------------------------------

    def finish(self, request: Request) -> None:
        """The handler is done with ``request``: whatever is unsent is abandoned."""
        del request  # one request per stream
        self.responding = None
        if self.closed:
            self.session.stream_done(self)
            return
        if not self.answered:
            # The handler ended without a whole response (its client went, or it failed
            # after the head): the client must not take a cut response for a whole one.
            self.abort()
            return
        if not self._out and not self._end_queued:
            self.session.stream_done(self)

    def close(self) -> None:
        """End the stream once what was written is sent (``Connection.close`` for one
        request); a response that was not complete is reset instead."""
        if not self.answered:
            self.abort()

    def abort(self) -> None:
        """Reset the stream at once."""
        if self.closed:
            return
        self.closed = True
        self.body_done = True
        self._out.clear()
        self._out_size = 0
        self._wake(ConnectionResetError("the HTTP/2 stream was reset"))
        with contextlib.suppress(H2Error):
            self.session.h2.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        self.session.flush()
        if self.request is not None and not self.request.body.complete:
            self.request.body._fail(ConnectionResetError("the HTTP/2 stream was reset"))
        if not self.answered:
            self.session.count_reset()
        if self.responding is None:
            self.session.stream_done(self)

    def reset_by_peer(self) -> None:
        self.closed = True
        self.body_done = True
        self._out.clear()
        self._out_size = 0
        error = ConnectionResetError("the client reset the HTTP/2 stream")
        self._wake(error)
        if self.request is not None and not self.request.body.complete:
            self.request.body._fail(error)
        if self.responding is None:
            self.session.stream_done(self)

    def lost(self, error: BaseException) -> None:
        """The connection is gone."""
        self.closed = True
        self._wake(error)
        if self.request is not None and not self.request.body.complete:
            self.request.body._fail(error)

    # The gateway's shutdown and idle sweeps act on the connection (H2Session), not here.
    def close_if_idle(self) -> None:
        pass

    def retire(self) -> None:
        self.session.go_away()


def _request_head(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], int]:
    """Method, target, HTTP/1.1 header fields and the fields' size of a request's
    HEADERS: ``:authority`` becomes ``host``, and cookie crumbs one ``cookie`` field again
    (RFC 9113 8.2.3, 8.3.1)."""
    method = path = authority = b""
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        elif name == b"cookie":
            cookies.append(value)
        elif name != b"host" or not authority:
            fields.append((name, value))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    if authority:
        fields = [pair for pair in fields if pair[0] != b"host"]
        fields.append((b"host", authority))
    return method, path, fields, size


def _refusal(
    request: Request, fields: list[tuple[bytes, bytes]], size: int, state: ServerState
) -> RequestError | None:
    """Why a request is answered before any handler runs (as HTTP/1.1's parser would
    refuse it), after reading its Content-Length; ``None`` if it is not."""
    if size > state.max_header_bytes:
        return RequestError(431, "the request's header fields are too large")
    if len(request.raw_path) > state.max_url_bytes:
        return RequestError(414, "the request target is too long")
    if request.method == b"CONNECT":
        return RequestError(501, "CONNECT is not supported")
    for name, value in fields:
        if name == b"content-length":
            if request.content_length is not None or not value.isdigit():
                return RequestError(400, "a bad or repeated Content-Length")
            request.content_length = int(value)
    return None
