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

* at most ``server.http2_max_streams`` requests handled at once (announced as
  SETTINGS_MAX_CONCURRENT_STREAMS): a stream beyond them, or one opened while a reset
  stream's handler still runs, is refused (RST_STREAM REFUSED_STREAM), so resetting
  streams does not multiply the work sent upstream;
* request header fields over ``server.max_header_bytes`` get a 431 on their stream, a
  target over ``server.max_url_bytes`` a 414, a method that is not a token or a target
  with spaces, controls or a fragment a 400 (they would end up in the upstream request
  line); HPACK's list limit and h2's cap on CONTINUATION frames end the connection;
* a frame announced over the maximum frame size ends the connection on its 9-byte
  header (h2 looks only once all of it has come);
* request bodies are flow-controlled by consumption, stream by stream: a stream's
  window (64 KiB) is re-opened only as its handler takes the bytes, the connection's as
  data arrives (as nginx does), so a connection holds at most ``http2_max_streams`` x
  64 KiB of unread bodies and a slow upload does not stall the others; a stream counts
  against the limit until its answer is sent, not only while its handler runs;
* "rapid reset" (CVE-2023-44487): resets of unanswered streams are scored, the score
  halving every 10 s; past 300 (about 20 resets a second, kept up) the connection gets
  GOAWAY ENHANCE_YOUR_CALM and is closed;
* reading stops while the connection's write buffer is full, so a client that floods
  PINGs or SETTINGS and never reads cannot make the gateway queue their answers
  without bound (CVE-2019-9512, 9515);
* a connection whose answers wait for a window the client never opens is closed after
  ``server.idle_timeout``;
* a request whose body does not match its Content-Length (more DATA than it said, or
  less by END_STREAM) is malformed: its stream is reset with PROTOCOL_ERROR before a
  byte past the length reaches the handler, and the connection goes on (RFC 9113
  8.1.1; h2 would end the whole connection, so its own check is off, see
  :class:`_ServerStream`); a Content-Length on a request that ends with its HEADERS
  gets a 400, and so does a header block h2 finds malformed (a value with surrounding
  whitespace, a connection-specific field, a missing pseudo-header);
* a protocol error ends the connection with GOAWAY (h2 picks the error code).

Shutdown, idle sweeps and trust changes refuse new streams, and once the open ones are
answered send a graceful GOAWAY (written here, not by h2, whose state machine would send
nothing more after it) and close; see :meth:`H2Session.go_away` for why the GOAWAY comes
last. A client's own GOAWAY is filtered out before h2 sees it, for the same reason, and
its open streams are answered before the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import httptools
from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream as _H2LibStream
from h2.utilities import HeaderValidationFlags
from hyperframe.frame import GoAwayFrame, SettingsFrame

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

#: A stream's receive window: its unread request body, at most (as nginx's 64 KiB).
#: The connection's window is reopened as data arrives, so the streams' windows are
#: what bound a connection's unread bodies (``http2_max_streams`` x this); a window the
#: connection shared, reopened only as handlers read, would let a few uploads to a slow
#: upstream stall every other upload on the connection.
_STREAM_WINDOW: Final = 64 * 1024
_CONNECTION_WINDOW: Final = 4 * BODY_HIGH_WATER
#: Consumed request body bytes are given back to the client's windows in steps this big.
_WINDOW_STEP: Final = 16 * 1024
#: Response body bytes queued on a stream (waiting for the client's window) beyond which
#: the producer is asked to wait (``writable``).
_OUT_HIGH_WATER: Final = 64 * 1024
#: Rapid reset: the score of resets of unanswered streams that ends a connection, and
#: the seconds in which the score halves.
_RESET_LIMIT: Final = 300.0
_RESET_HALF_LIFE: Final = 10.0
#: What h2 itself enforces as SETTINGS_MAX_CONCURRENT_STREAMS (a connection error past
#: it): a backstop far above what the gateway announces and enforces stream by stream.
_PROVISIONAL_MAX_STREAMS: Final = 1000
_GOAWAY: Final = 0x7  # the frame type, filtered out before h2 sees it (see _filter)
#: HTTP/1.1 response fields that HTTP/2 forbids (RFC 9113 8.2.2).
_CONNECTION_FIELDS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: Status codes whose responses have no body.
_NO_BODY: Final = frozenset({204, 304})
#: A method is a token (RFC 9110 5.6.2); a target has no spaces, controls or fragment
#: (what HTTP/1.1's parser refuses), as it goes into the upstream's request line.
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET: Final = re.compile(rb"(?:/[\x21-\x22\x24-\x7e\x80-\xff]*|\*)\Z")
#: A field name is a token; a value holds no control characters but HTAB (RFC 9110 5.5),
#: as HTTP/1.1's parser has it (h2 checks only CR, LF and NUL).
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _hpack_length(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 5.1), as a string's length."""
    if value < 127:
        return bytes((value,))
    out = bytearray((127,))
    value -= 127
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


class LiteralEncoder:
    """An HPACK encoder for response heads that writes every field as a literal not added
    to the dynamic table, nor Huffman-coded (RFC 7541 6.2.2): valid for any decoder, and
    about ten times cheaper than hpack's own encoder in Python, whose table search,
    Huffman coding and debug logging took a fifth of a stream's CPU. The cost is a few
    bytes more a response head; a gateway's heads repeat little that a table would save
    (request ids, dates and lengths change on every response).
    """

    __slots__ = ("header_table_size",)

    def __init__(self) -> None:
        #: Set by h2 when the client changes SETTINGS_HEADER_TABLE_SIZE; the table is never
        #: used, so any size is kept to.
        self.header_table_size = 4096

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        del huffman  # never: see the class docstring
        parts = []
        for name, value in headers:
            parts += [b"\x00", _hpack_length(len(name)), name, _hpack_length(len(value)), value]
        return b"".join(parts)


class _ServerStream(_H2LibStream):
    """h2's stream, its checks of a request made stream errors instead of the connection's.

    h2 raises a malformed request (a field value with surrounding whitespace, a
    connection-specific field, a missing pseudo-header, a Content-Length its DATA does
    not match, ...) as a connection error, ending every stream of the client. RFC 9113
    8.1.1 makes it a stream error. So a header block h2's validation refuses is kept
    with the reason (``malformed``), and the session answers that request alone with a
    400; the Content-Length is checked by the session, stream by stream
    (:meth:`H2Session._data`), and its value with the other fields (``_field_refusal``).
    """

    #: Why h2 refused the stream's header block, or its trailers; ``None`` if it did not.
    malformed: str | None = None
    malformed_trailers: str | None = None

    def _process_received_headers(
        self,
        headers: Iterable[tuple[bytes, bytes]],
        header_validation_flags: HeaderValidationFlags,
        header_encoding: bool | str | None,
    ) -> list[tuple[bytes, bytes]]:
        received = list(headers)
        try:
            processed: list[tuple[bytes, bytes]] = super()._process_received_headers(
                received, header_validation_flags, header_encoding
            )
        except ProtocolError as exc:
            reason = _without_values(str(exc))
            if header_validation_flags.is_trailer:
                self.malformed_trailers = reason  # the session resets the stream
            else:
                self.malformed = reason  # never routed: the session refuses the request
            return received
        return processed

    def _initialize_content_length(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        del headers

    def _track_content_length(self, length: int, end_stream: bool) -> None:
        del length, end_stream


def _without_values(reason: str) -> str:
    """h2's reason without the field value it quotes (it may be a credential)."""
    if "value" in reason:
        reason = re.split(r"[\s:]*b['\"]", reason, maxsplit=1)[0]
    return reason[:1].lower() + reason[1:].rstrip(".")


class _H2Connection(H2Connection):
    """h2's connection, its peer's streams made :class:`_ServerStream`."""

    def _begin_new_stream(self, stream_id: int, allowed_ids: AllowedStreamIDs) -> _H2LibStream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        # h2 builds the stream by name; it adds no state, so its class can be swapped.
        stream.__class__ = _ServerStream
        return stream


class H2Session:
    """HTTP/2 on one client connection (see the module docstring)."""

    __slots__ = (
        "_active",
        "_flush_due",
        "_frame_head",
        "_frame_left",
        "_goaway_frame",
        "_goaway_seen",
        "_going_away",
        "_read_paused",
        "_reset_at",
        "_reset_score",
        "_stalled_since",
        "closed",
        "conn",
        "h2",
        "loop",
        "state",
        "streams",
        "transport",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.state: ServerState = conn.state
        self.transport = conn.transport
        self.loop = asyncio.get_running_loop()
        h2 = _H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                # The response fields come from the gateway's own HTTP/1.1 output, names
                # lower-cased and connection fields dropped here (see on_headers_complete).
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        h2.encoder = LiteralEncoder()  # type: ignore[assignment]  # h2 calls encode() only
        header_limit = 2 * self.state.max_header_bytes + 4096  # fields get their own 431
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: _PROVISIONAL_MAX_STREAMS,
                SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: header_limit,
            },
        )
        h2.decoder.max_header_list_size = header_limit
        h2.initiate_connection()
        h2.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)
        self.h2 = h2
        self.streams: dict[int, H2Stream] = {}
        #: Handlers running (a reset stream's too, until it returns).
        self._active = 0
        self._flush_due = False
        #: Frame boundaries, followed here (see _filter): bytes left of the preface or of
        #: the current frame, a frame header read in part, and whether the current frame
        #: is a GOAWAY (kept from h2).
        self._frame_left = len(PREFACE)
        self._frame_head = b""
        self._goaway_frame = False
        self._goaway_seen = False
        self._reset_score = 0.0
        self._reset_at = self.loop.time()
        self._going_away = False
        self._read_paused = False
        #: Since when answers have waited for a window the client does not open.
        self._stalled_since: float | None = None
        self.closed = False
        self.state.http2_connections += 1
        self.flush()
        # The limit the client is told, in a SETTINGS frame of its own after h2's: h2
        # would make a stream past it a connection error once acknowledged, where RFC
        # 9113 5.1.2 asks for a stream error. The handler count refuses those streams.
        announce = SettingsFrame(0)
        announce.settings = {SettingCodes.MAX_CONCURRENT_STREAMS: self.state.http2_max_streams}
        self.transport.write(announce.serialize())

    # -- input ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when the connection is gone."""
        if not data:
            self._lost()
            return
        if self.closed:
            return
        kept = self._filter(data)
        if kept is None:
            log.info("gateway: an HTTP/2 client announced a frame over the maximum size")
            self._terminate(ErrorCodes.FRAME_SIZE_ERROR)
            return
        try:
            events = self.h2.receive_data(kept)
        except ProtocolError as exc:
            log.info("gateway: an HTTP/2 client broke the protocol: %s", exc)
            self._terminate(exc.error_code)
            return
        for event in events:
            self._event(event)
            if self._ended():
                return
        if self._goaway_seen:
            # Its streams up to the GOAWAY are answered; it opens no more.
            self._goaway_seen = False
            self._going_away = True
            if not self.streams:
                self.close()
                return
        self.conn.last_active = self.loop.time()
        self.flush()

    def _filter(self, data: bytes) -> bytes | None:
        """``data`` without GOAWAY frames, which are noted here instead; ``None`` if a
        frame header announces more than the maximum frame size.

        h2 checks a frame's length only once all of it has arrived (so a client could make
        the gateway buffer 16 MiB per connection), and after a client's GOAWAY its state
        machine refuses to send anything, even the answers to the streams in progress
        that RFC 9113 6.8 says still get them.
        """
        limit = self.h2.max_inbound_frame_size
        kept: list[bytes] = []
        offset, size = 0, len(data)
        while offset < size:
            if self._frame_left:
                step = min(self._frame_left, size - offset)
                if not self._goaway_frame:
                    kept.append(data[offset : offset + step])
                self._frame_left -= step
                offset += step
                if not self._frame_left and self._goaway_frame:
                    self._goaway_frame = False
                    self._goaway_seen = True
                continue
            need = 9 - len(self._frame_head)
            self._frame_head += data[offset : offset + need]
            offset += need
            if len(self._frame_head) < 9:
                break
            head, self._frame_head = self._frame_head, b""
            length = int.from_bytes(head[:3], "big")
            if length > limit:
                return None
            if head[3] == _GOAWAY and head[5:9] == b"\0\0\0\0":
                self._goaway_frame = bool(length)
                self._goaway_seen = not length
            else:
                kept.append(head)
            self._frame_left = length
        return b"".join(kept)

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
            if stream is not None and stream.request is not None and not stream.body_done:
                request = stream.request
                expected = request.content_length
                trailers = getattr(self.h2.streams.get(event.stream_id), "malformed_trailers", None)
                if trailers is not None:
                    stream.malformed(f"its trailers: {trailers}")
                elif expected is not None and request.body.received != expected:
                    stream.malformed("less body than its Content-Length")
                else:
                    request.body._end()
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            # A larger SETTINGS_INITIAL_WINDOW_SIZE opens every stream's window too.
            self._window_opened(getattr(event, "stream_id", 0))
        elif isinstance(event, StreamReset):
            self._reset_by_client(event.stream_id)
        # Trailers are not forwarded (StreamEnded follows them); pings and priorities
        # h2 answers itself.

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        limit = self.state.http2_max_streams
        # Streams whose answers wait for the client's window count too (they hold memory):
        # a stream leaves the count when it is done, not when its handler returns.
        if self._going_away or self.state.closing or max(self._active, len(self.streams)) >= limit:
            with contextlib.suppress(H2Error):  # the client may have reset it already
                self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            if max(self._active, len(self.streams)) >= limit:
                # Past the limit it was told (or while reset streams' handlers run):
                # scored as a reset, so opening and cancelling in a loop still ends.
                self._count_reset()
            return
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        malformed = getattr(self.h2.streams.get(stream_id), "malformed", None)
        method, path, fields, size = _request_head(event.headers or ())
        stream.method = method
        stream.path = path
        ended = event.stream_ended is not None
        # H2Stream stands in for the Connection a Request is made for.
        request = Request(stream, method, path, fields, "1.1", keep_alive=True)  # type: ignore[arg-type]
        stream.request = request
        if not ended:
            request.body = Body(stream)  # type: ignore[arg-type]
        refusal = (
            RequestError(400, f"a header field breaks HTTP/2's rules: {malformed}")
            if malformed is not None
            else _refusal(request, fields, size, self.state)
        )
        if refusal is not None:
            self._refuse(stream, request, refusal)
            return
        if ended and request.content_length:
            self._refuse(
                stream, request, RequestError(400, "a Content-Length on a request with no body")
            )
            return
        if not ended and request.content_length is None:
            request.chunked = True  # forwarded upstream in chunked encoding
        stream.responding = request
        self._active += 1
        self.loop.create_task(self._run(stream, request))

    async def _run(self, stream: H2Stream, request: Request) -> None:
        try:
            await self.state.handler(request)
        except Exception:
            log.exception("gateway handler failed (HTTP/2)")
            stream.abort()
        finally:
            self._active -= 1
            stream.finish(request)

    def _refuse(self, stream: H2Stream, request: Request, exc: RequestError) -> None:
        stream.responding = request
        self.state.on_bad_request(stream, exc)  # type: ignore[arg-type]  # writes a problem, closes it
        stream.finish(request)

    def _data(self, event: DataReceived) -> None:
        length = event.flow_controlled_length
        data = event.data or b""
        self.give_back(length)  # the connection's window, at once (see _STREAM_WINDOW)
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.request is None or stream.body_done:
            return
        body = stream.request.body
        expected = stream.request.content_length
        if expected is not None and body.received + len(data) > expected:
            stream.malformed("more body than its Content-Length")
            return
        padding = length - len(data)
        if padding:
            stream.give_back(padding)
        body._feed(data)

    def give_back(self, length: int, stream_id: int | None = None) -> None:
        """Re-open the client's window (the connection's, or a stream's) by ``length``."""
        if length <= 0 or self.closed:
            return
        with contextlib.suppress(H2Error):  # a stream that ended meanwhile
            self.h2.increment_flow_control_window(length, stream_id)

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            waiting = [stream] if stream is not None else []
        else:
            waiting = list(self.streams.values())
        before = sum(stream._out_size for stream in waiting)
        for stream in waiting:
            stream.send_queued()
        if not before or sum(stream._out_size for stream in waiting) < before:
            # Only answers that moved end a stall: a window opened by a byte a minute
            # must not keep a connection that never reads open for ever.
            self._stalled_since = None

    def stalled(self) -> None:
        """An answer waits for the client's window."""
        if self._stalled_since is None:
            self._stalled_since = self.loop.time()

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not stream.answered:
            self._count_reset()
        stream.reset_by_peer()

    def _count_reset(self) -> None:
        """A client reset a stream before its answer: many, kept up, is an attack."""
        now = self.loop.time()
        decay = 0.5 ** ((now - self._reset_at) / _RESET_HALF_LIFE)
        self._reset_score = self._reset_score * decay + 1.0
        self._reset_at = now
        if self._reset_score > _RESET_LIMIT:
            log.warning("gateway: an HTTP/2 client resets streams as fast as it opens them")
            self._terminate(ErrorCodes.ENHANCE_YOUR_CALM)

    # -- output -------------------------------------------------------------------------

    def flush(self) -> None:
        self._flush_due = False
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Flush once the loop has run what is ready: the answers of the streams that
        finish in one turn go out in one write (one system call) instead of one each."""
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self.flush)

    def stream_done(self, stream: H2Stream) -> None:
        """Both sides of ``stream`` are over: forget it."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        stream.release()
        self.conn.last_active = self.loop.time()
        if self._going_away and not self.streams:
            self.close()

    def pause_reading(self) -> None:
        """The write buffer is full: read nothing more until it drains."""
        if not self._read_paused and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    # -- the connection's life ----------------------------------------------------------

    def go_away(self) -> None:
        """No new streams; once the open ones are answered, GOAWAY and close.

        RFC 9113 6.8 has a server send GOAWAY first and answer the streams it names
        afterwards, but httpx's HTTP/2 client (httpcore) fails every stream still waiting
        for its answer once a GOAWAY arrives. So the GOAWAY goes out with the last
        answer; meanwhile new streams are refused (REFUSED_STREAM, which a client may
        retry elsewhere), as they would be after a GOAWAY.
        """
        if self._going_away or self.closed:
            return
        self._going_away = True
        if not self.streams:
            self.close()

    def close_if_idle_since(self, before: float) -> None:
        """The idle sweep: close a connection with no streams since ``before``, or one
        whose answers have waited for the client's window since then."""
        if not self.streams and self.conn.last_active < before:
            self.go_away()
        elif self._stalled_since is not None and self._stalled_since < before:
            log.info("gateway: an HTTP/2 client has not opened its window; closing it")
            self._terminate(ErrorCodes.NO_ERROR, reason="stalled")

    def close(self) -> None:
        """Close the connection with a graceful GOAWAY (what is written still goes out)."""
        if not self.closed:
            self.flush()
            # Written here, not by h2: its state machine sends nothing more after one.
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.h2.highest_inbound_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self.transport.write(frame.serialize())
            self.closed = True
            self.conn.close()

    def _terminate(self, error_code: int, reason: str | None = None) -> None:
        """End the connection at once with GOAWAY ``error_code``."""
        if self.closed:
            return
        if reason is None:
            try:
                reason = ErrorCodes(error_code).name.lower()
            except ValueError:
                reason = f"0x{error_code:x}"
        terminated = self.state.http2_terminated
        terminated[reason] = terminated.get(reason, 0) + 1
        if self.h2.state_machine.state is not ConnectionState.CLOSED:  # h2 may have sent one
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

    #: What the access log names (an HTTP/1.1 connection has none: its request's version).
    protocol = "HTTP/2"

    __slots__ = (
        "_drain",
        "_end_queued",
        "_fields",
        "_lost_waiter",
        "_out",
        "_out_size",
        "_parser",
        "_returned",
        "_skip",
        "answered",
        "body_done",
        "closed",
        "method",
        "path",
        "peer",
        "request",
        "responding",
        "session",
        "state",
        "stream_id",
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
        #: Request body bytes given back to the client's windows (see _resume_reading).
        self._returned = 0
        self._parser = httptools.HttpResponseParser(self)
        self._skip = False  # an informational (1xx) response being parsed
        self._fields: list[tuple[bytes, bytes]] = []
        self._out: deque[bytes] = deque()
        self._out_size = 0
        self._end_queued = False
        self._drain: asyncio.Future[None] | None = None
        self._lost_waiter: asyncio.Future[None] | None = None

    # -- what the gateway reads off a connection ----------------------------------------

    def when_lost(self) -> asyncio.Future[None]:
        """:meth:`Connection.when_lost <atoll.gateway._server.Connection.when_lost>`: done
        once the stream is reset or its connection is gone."""
        waiter = self._lost_waiter
        if waiter is None:
            waiter = self._lost_waiter = self.session.loop.create_future()
            if self.closed:
                waiter.set_result(None)
        return waiter

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
        pass  # the client's window is what holds it back: reopened only as bytes are read

    def _resume_reading(self) -> None:
        """The handler took body bytes (Body calls this): give them back to the client's
        windows, the stream's and the connection's, in steps."""
        request = self.request
        if request is None or self.body_done:
            return
        body = request.body
        taken = body.received - body._size
        step = taken - self._returned
        if step >= _WINDOW_STEP or (step > 0 and body.complete):
            self._returned = taken
            if not body.complete:
                self.session.give_back(step, self.stream_id)
                self.session.flush_soon()

    def give_back(self, length: int) -> None:
        """Padding: nobody reads it, so the stream's window reopens at once (the
        connection's already has)."""
        self.session.give_back(length, self.stream_id)

    def release(self) -> None:
        """The stream is over (the connection's window was given back as data came)."""

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
        self.session.flush_soon()

    def on_message_begin(self) -> None:
        self._skip = False
        self._fields = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        fields, self._fields = self._fields, []
        if status < 200:
            self._skip = True
            if status != 101:  # 100 Continue, 103 Early Hints: informational HEADERS
                self._send_head([(b":status", str(status).encode())], end=False)
            return
        headers = [(b":status", str(status).encode())]
        empty = False
        for name, value in fields:
            if name in _CONNECTION_FIELDS:
                continue
            if name == b"content-length" and value == b"0":
                empty = True
            headers.append((name, value))
        head_only = self.method == b"HEAD" or status in _NO_BODY or empty
        if self._send_head(headers, end=head_only) and head_only:
            self._answered()
            self._sent_all()

    def _send_head(self, headers: list[tuple[bytes, bytes]], *, end: bool) -> bool:
        try:
            self.session.h2.send_headers(self.stream_id, headers, end_stream=end)
        except H2Error:
            self._broken()
            return False
        return True

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
                    self.session.stalled()
                    break
                chunk = self._out[0]
                if len(chunk) <= window:
                    self._out.popleft()
                else:
                    self._out[0] = chunk[window:]
                    chunk = chunk[:window]
                self._out_size -= len(chunk)
                last = not self._out and self._end_queued
                h2.send_data(self.stream_id, chunk, end_stream=last)
                if last:
                    self._end_queued = False
                    self._sent_all()
            if not self._out and self._end_queued:
                self._end_queued = False
                h2.end_stream(self.stream_id)  # an empty body of unknown length
                self._sent_all()
        except H2Error:
            self._broken()
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

    def _broken(self) -> None:
        """h2 refused to send on the stream (it ended meanwhile): give up on it."""
        self.lost(ConnectionResetError("the HTTP/2 stream was closed"))
        if self.responding is None:
            self.session.stream_done(self)

    @property
    def writable(self) -> asyncio.Future[None] | None:
        """A future to await while the client reads slower than the gateway writes; one
        that fails once the stream is gone, so a producer stops."""
        if self.closed:
            gone: asyncio.Future[None] = self.session.loop.create_future()
            gone.set_exception(ConnectionResetError("the HTTP/2 stream was closed"))
            return gone
        paused = self.session.conn.writable
        if paused is not None:
            return paused
        if self._out_size > _OUT_HIGH_WATER:
            if self._drain is None or self._drain.done():
                self._drain = self.session.loop.create_future()
            return self._drain
        return None

    def _wake(self, error: BaseException | None) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            if error is None:
                drain.set_result(None)
            else:
                drain.set_exception(error)
                drain.exception()  # marked as seen: a producer may never await it
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

    def malformed(self, reason: str) -> None:
        """The request broke HTTP/2's rules for its stream alone: reset it with
        PROTOCOL_ERROR (RFC 9113 8.1.1); its handler's body read fails."""
        log.info("gateway: an HTTP/2 request was malformed (%s); its stream is reset", reason)
        self.abort(ErrorCodes.PROTOCOL_ERROR)

    def abort(self, error_code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """Reset the stream at once."""
        if self.closed:
            return
        with contextlib.suppress(H2Error):
            self.session.h2.reset_stream(self.stream_id, error_code)
        self.session.flush()
        self.lost(ConnectionResetError("the HTTP/2 stream was reset"))
        if self.responding is None:
            self.session.stream_done(self)

    def reset_by_peer(self) -> None:
        self.lost(ConnectionResetError("the client reset the HTTP/2 stream"))
        if self.responding is None:
            self.session.stream_done(self)

    def lost(self, error: BaseException) -> None:
        """The stream (or the connection) is gone: producers and readers are told."""
        self.closed = True
        waiter = self._lost_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.body_done = True
        self._out.clear()
        self._out_size = 0
        self._wake(error)
        if self.request is not None and not self.request.body.complete:
            self.request.body._fail(error)


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
        else:
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
    return _line_refusal(request) or _field_refusal(request, fields)


def _line_refusal(request: Request) -> RequestError | None:
    """Method and target go into the upstream's request line: refused as HTTP/1.1's
    parser refuses them."""
    if not _METHOD.match(request.method):
        return RequestError(400, "the method is not a token")
    if request.method == b"CONNECT":
        return RequestError(501, "CONNECT is not supported")
    if not _TARGET.match(request.raw_path):
        return RequestError(
            400, "the target must be a path without spaces, control characters or fragment"
        )
    return None


def _field_refusal(request: Request, fields: list[tuple[bytes, bytes]]) -> RequestError | None:
    for name, value in fields:
        if not _NAME.match(name):
            return RequestError(400, "a header field name is not a token")
        if _BAD_VALUE.search(value):
            return RequestError(400, "a header field value holds control characters")
        if name == b"content-length":
            if request.content_length is not None or not value.isdigit():
                return RequestError(400, "a bad or repeated Content-Length")
            request.content_length = int(value)
    return None
