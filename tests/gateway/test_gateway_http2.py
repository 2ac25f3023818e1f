"""HTTP/2 between clients and the gateway (``server.http2``): ALPN ``h2`` on a TLS
listener, prior knowledge (h2c) on a plain one, and the hostile clients HTTP/2 brings
(malformed frames, oversized header blocks, rapid reset)."""

import asyncio
import contextlib
import json
import os
import socket
import ssl
import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import httpx
import hyperframe.frame
import pytest
import websockets
from gateway_support import admin_url, base_config, raw_request, running_gateway, url, write_config

from atoll.gateway import mint_token
from atoll.testing import wait_until

#: Bound on any single wait for the gateway (each test stays well under it in total).
TIMEOUT = 4.0
SECRET = "a-development-secret-of-32-bytes!!"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ErrorCodes = h2.errors.ErrorCodes


def h2_config(tmp_path, stub, *, tls=False, server=None, routes=None, **extra):
    """A gateway config: one catch-all route to ``stub`` unless ``routes`` is given."""
    settings = {"port": 8080, "access_log": False}
    if tls:
        settings["tls"] = {"cert": "certs/server.pem", "key": "certs/server.key"}
    settings.update(server or {})
    if routes is None:
        routes = [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}]
    return write_config(
        tmp_path / "gw.yaml",
        base_config({"a": {"targets": [stub.address]}}, routes, server=settings, **extra),
    )


def client_context(certs, alpn=None):
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def tls_url(gw, path=""):
    return f"https://127.0.0.1:{gw.port}{path}"


def h2c_client(**kwargs):
    """An httpx client that speaks HTTP/2 with prior knowledge on plain connections."""
    return httpx.AsyncClient(http1=False, http2=True, timeout=TIMEOUT, **kwargs)


def h2_client(certs, **kwargs):
    """An httpx client that offers ``h2`` (and ``http/1.1``) over TLS."""
    return httpx.AsyncClient(http2=True, verify=client_context(certs), timeout=TIMEOUT, **kwargs)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame as bytes, whatever it says (RFC 9113 4.1)."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


class Response:
    def __init__(self):
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.ended = False
        self.reset: h2.errors.ErrorCodes | None = None

    @property
    def status(self) -> int | None:
        value = self.headers.get(b":status")
        return int(value) if value is not None else None


class RawH2:
    """One client connection driven by hand with ``h2``, for what httpx will not send.

    ``receive`` reads once and feeds h2; received data is acknowledged at once so flow
    control never stalls the server. ``closed`` turns true when the server closes.
    """

    def __init__(self, reader, writer, settings=None):
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.events: list[h2.events.Event] = []
        self.closed = False

    @classmethod
    async def open(cls, port, *, ssl_context=None, settings=None, preface=True):
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)
        client = cls(reader, writer, settings)
        if preface:
            client.conn.initiate_connection()
            await client.flush()
        return client

    @property
    def terminated(self) -> h2.events.ConnectionTerminated | None:
        for event in self.events:
            if isinstance(event, h2.events.ConnectionTerminated):
                return event
        return None

    async def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def send_raw(self, data: bytes):
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self):
        try:
            data = await self.reader.read(65536)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return
        if self.terminated is not None:
            return  # after a GOAWAY, only the close is of interest
        events = self.conn.receive_data(data)
        self.events += events
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)  # no drain: a writer task may be draining

    async def until(self, predicate, timeout=TIMEOUT):
        """The first event ``predicate`` accepts, or None once the server closed."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                if self.closed:
                    return None
                await self.receive()

    async def until_closed(self, timeout=TIMEOUT):
        async with asyncio.timeout(timeout):
            while not self.closed:
                await self.receive()

    def request_headers(self, path, method="GET", authority=None, extra=()):
        return [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", (authority or "127.0.0.1").encode()),
            (b":path", path.encode()),
            *extra,
        ]

    async def request(self, path, *, method="GET", headers=(), body=None):
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id, self.request_headers(path, method, extra=headers), end_stream=body is None
        )
        await self.flush()
        if body is not None:
            await self.send_body(stream_id, body)
        return stream_id

    def _stream_done(self, stream_id):
        return any(
            isinstance(event, h2.events.StreamEnded | h2.events.StreamReset)
            and event.stream_id == stream_id
            for event in self.events
        )

    async def send_body(self, stream_id, body: bytes):
        """Send ``body`` as flow control allows; stop early if the server ends the stream
        (an early answer, such as a 413) or the connection."""
        offset = 0
        async with asyncio.timeout(TIMEOUT):
            while offset < len(body):
                if self.closed or self.terminated or self._stream_done(stream_id):
                    return
                window = min(
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                    len(body) - offset,
                )
                if window <= 0:
                    await self.receive()
                    continue
                last = offset + window >= len(body)
                self.conn.send_data(stream_id, body[offset : offset + window], end_stream=last)
                offset += window
                await self.flush()

    async def response(self, stream_id, timeout=TIMEOUT) -> Response:
        """The response on ``stream_id`` as far as it came (ended, reset or cut off)."""
        result = Response()
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[seen:]:
                    if getattr(event, "stream_id", None) != stream_id:
                        continue
                    if isinstance(event, h2.events.ResponseReceived):
                        result.headers = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        result.body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        result.ended = True
                        return result
                    elif isinstance(event, h2.events.StreamReset):
                        result.reset = event.error_code
                        return result
                seen = len(self.events)
                if self.closed or self.terminated is not None:
                    return result
                await self.receive()

    async def close(self):
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_h2(port, **kwargs):
    client = await RawH2.open(port, **kwargs)
    try:
        yield client
    finally:
        await client.close()


# --- TLS and ALPN ---------------------------------------------------------------------


async def test_requests_over_tls_negotiate_h2_and_are_proxied(tmp_path, stub, certs):
    routes = [
        {
            "name": "hosted",
            "match": {"prefix": "/hosted", "host": "*.example.com"},
            "upstream": "a",
        },
        {
            "name": "a",
            "match": {"prefix": "/"},
            "upstream": "a",
            "request_headers": {"set": {"x-added": "yes"}, "remove": ["x-secret"]},
            "response_headers": {"set": {"x-gateway": "atoll"}},
        },
    ]
    config = h2_config(tmp_path, stub, tls=True, routes=routes)  # server.http2: the default
    async with running_gateway(config) as gw, h2_client(certs) as client:
        authority = f"127.0.0.1:{gw.port}"
        r = await client.get(
            tls_url(gw, "/orders/7?x=1"), headers={"x-custom": "hello", "x-secret": "s"}
        )
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        body = r.json()
        assert body["stub"] == "a"
        assert body["path"] == "/orders/7"
        assert body["query"] == "x=1"
        # The response: the upstream's own headers, the route's rules, a request id.
        assert r.headers["x-stub"] == "a"
        assert r.headers["x-gateway"] == "atoll"
        assert r.headers["content-type"] == "application/json"
        request_id = r.headers["x-request-id"]
        assert len(request_id) == 32
        # What the upstream got, over HTTP/1.1: the client's headers, the route's rules,
        # the authority where HTTP/1.1's Host goes (x-forwarded-host), no pseudo-headers.
        seen = stub.hits[-1]["headers"]
        assert seen["x-custom"] == "hello"
        assert seen["x-added"] == "yes"
        assert "x-secret" not in seen
        assert seen["x-forwarded-host"] == authority
        assert seen["host"] == stub.address  # as for HTTP/1.1 (preserve_host is off)
        assert seen["x-forwarded-proto"] == "https"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-request-id"] == request_id
        assert not [name for name in seen if name.startswith(":")]
        for hop in ("connection", "te", "http2-settings", "upgrade", "keep-alive"):
            assert hop not in seen, hop
        # A request id the client sets is kept.
        r = await client.get(tls_url(gw, "/x"), headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert stub.hits[-1]["headers"]["x-request-id"] == "abc-123"
        # Routing by host uses :authority (httpx sends a Host header as :authority).
        r = await client.get(tls_url(gw, "/hosted/1"), headers={"host": "shop.example.com"})
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        assert stub.hits[-1]["headers"]["x-forwarded-host"] == "shop.example.com"
        assert "x-added" not in stub.hits[-1]["headers"]  # the "hosted" route, not "a"
        # Metrics count requests over HTTP/2 like any other.
        async with httpx.AsyncClient() as plain:
            metrics = (await plain.get(admin_url(gw, "/metrics"))).text
        assert 'atoll_gateway_requests_total{code="200",route="a"} 2.0' in metrics
        assert 'atoll_gateway_requests_total{code="200",route="hosted"} 1.0' in metrics


async def test_alpn_offers_h2_unless_http2_is_off(tmp_path, stub, certs):
    for http2, expected in ((True, "h2"), (False, "http/1.1")):
        config = h2_config(tmp_path, stub, tls=True, server={"http2": http2})
        async with running_gateway(config) as gw:
            context = client_context(certs, alpn=["h2", "http/1.1"])
            async with asyncio.timeout(TIMEOUT):
                _, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=context)
            selected = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            assert selected == expected, http2
            # httpx offers both and uses what was selected; HTTP/1.1 clients are unaffected.
            async with h2_client(certs) as client:
                r = await client.get(tls_url(gw, "/x"))
            assert r.status_code == 200
            assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            async with httpx.AsyncClient(verify=client_context(certs)) as http1:
                r = await http1.get(tls_url(gw, "/y"))
            assert r.status_code == 200
            assert r.http_version == "HTTP/1.1"


async def test_the_settings_announce_max_concurrent_streams(tmp_path, stub, certs):
    for server, expected in (({}, 100), ({"http2_max_streams": 7}, 7)):
        config = h2_config(tmp_path, stub, tls=True, server=server)
        async with (
            running_gateway(config) as gw,
            raw_h2(gw.port, ssl_context=client_context(certs, alpn=["h2"])) as client,
        ):
            assert client.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            settings = await client.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
            assert settings is not None, "no SETTINGS from the gateway"
            assert client.conn.remote_settings.max_concurrent_streams == expected
            # No extended CONNECT: WebSockets stay on HTTP/1.1.
            assert client.conn.remote_settings.enable_connect_protocol != 1


# --- h2c (prior knowledge) on a plain listener ---------------------------------------------


async def test_prior_knowledge_h2c_on_a_plain_listener(tmp_path, stub):
    config = h2_config(tmp_path, stub)
    async with running_gateway(config) as gw:
        async with h2c_client() as client:
            r = await client.get(url(gw, "/orders/1"), headers={"x-custom": "v"})
            assert r.http_version == "HTTP/2"
            assert r.status_code == 200
            assert r.json()["path"] == "/orders/1"
            assert stub.hits[-1]["headers"]["x-custom"] == "v"
            assert stub.hits[-1]["headers"]["x-forwarded-proto"] == "http"
            assert stub.hits[-1]["headers"]["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
            assert stub.hits[-1]["headers"]["x-request-id"] == r.headers["x-request-id"]
            r = await client.delete(url(gw, "/orders/2"))
            assert r.status_code == 200
            assert stub.hits[-1]["method"] == "DELETE"
        # HTTP/1.1 on the same listener is unaffected.
        async with httpx.AsyncClient() as http1:
            r = await http1.get(url(gw, "/orders/3"))
            assert r.http_version == "HTTP/1.1"
            assert r.status_code == 200


async def test_without_http2_the_preface_is_refused_on_a_plain_listener(tmp_path, stub):
    config = h2_config(tmp_path, stub, server={"http2": False})
    async with running_gateway(config) as gw:
        loop = asyncio.get_running_loop()
        started = loop.time()
        raw = await raw_request(gw.port, PREFACE + frame(0x4, 0, 0), read_timeout=3)
        assert loop.time() - started < 2.5, "the connection was left open"
        # A 400 (problem+json) and a close, or just a close; never an HTTP/2 SETTINGS frame.
        assert raw == b"" or raw.startswith(b"HTTP/1.1 400 "), raw[:200]
        if raw:
            assert b"application/problem+json" in raw.partition(b"\r\n\r\n")[0]
        with pytest.raises(httpx.HTTPError):
            async with h2c_client() as client:
                await client.get(url(gw, "/x"))
        assert not stub.hits
        async with httpx.AsyncClient() as http1:
            r = await http1.get(url(gw, "/x"))
            assert r.status_code == 200
            assert r.http_version == "HTTP/1.1"


# --- multiplexing, bodies, HEAD --------------------------------------------------------------


async def test_many_requests_in_flight_at_once_on_one_connection(tmp_path, stub):
    config = h2_config(tmp_path, stub)
    count = 25
    async with running_gateway(config) as gw:
        # One connection at most: the requests can only all be at the upstream together
        # if they are multiplexed on it.
        async with h2c_client(limits=httpx.Limits(max_connections=1)) as client:
            stub.release.clear()
            tasks = [
                asyncio.create_task(client.get(url(gw, f"/m/{i}"), headers={"x-n": str(i)}))
                for i in range(count)
            ]
            try:
                await wait_until(lambda: len(stub.hits) == count, timeout=TIMEOUT, what="all hits")
            finally:
                stub.release.set()
            async with asyncio.timeout(TIMEOUT):
                responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * count
        assert {r.http_version for r in responses} == {"HTTP/2"}
        # Each stream got its own answer.
        assert [r.json()["path"] for r in responses] == [f"/m/{i}" for i in range(count)]
        assert [r.json()["headers"]["x-n"] for r in responses] == [str(i) for i in range(count)]
        assert len({r.headers["x-request-id"] for r in responses}) == count


async def test_many_streams_on_one_raw_connection(tmp_path, stub):
    """The same without httpx: every stream opened before any answer comes."""
    config = h2_config(tmp_path, stub)
    async with running_gateway(config) as gw, raw_h2(gw.port) as client:
        stub.release.clear()
        try:
            streams = [await client.request(f"/s/{i}") for i in range(30)]
            await wait_until(lambda: len(stub.hits) == 30, timeout=TIMEOUT, what="all hits")
        finally:
            stub.release.set()
        for i, stream_id in enumerate(streams):
            response = await client.response(stream_id)
            assert response.status == 200, (i, response.headers, response.reset)
            assert response.ended
            assert json.loads(response.body)["path"] == f"/s/{i}"
        assert client.terminated is None


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
async def test_a_megabyte_request_body_arrives_whole(tmp_path, stub, certs, tls):
    config = h2_config(tmp_path, stub, tls=tls)
    payload = os.urandom(1024 * 1024 + 17)
    async with running_gateway(config) as gw:
        client = h2_client(certs) if tls else h2c_client()
        base = tls_url(gw) if tls else url(gw)
        async with client:
            r = await client.post(f"{base}/upload", content=payload)
            assert r.http_version == "HTTP/2"
            assert r.status_code == 200
            assert r.json()["received"] == len(payload)
            # The echo route keeps what it got: the same bytes, in order.
            r = await client.put(f"{base}/echo", content=payload)
            assert r.status_code == 200
            assert r.json()["body_length"] == len(payload)
            assert stub.hits[-1]["body"] == payload

            # Without a length (a streamed body), the upstream gets it all too.
            async def parts():
                for start in range(0, len(payload), 100_000):
                    yield payload[start : start + 100_000]

            r = await client.post(f"{base}/echo", content=parts())
            assert r.status_code == 200
            assert stub.hits[-1]["body"] == payload


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "streamed"])
async def test_a_request_body_over_max_body_is_413(tmp_path, stub, with_length):
    routes = [
        {"name": "small", "match": {"prefix": "/small"}, "upstream": "a", "max_body": 1000},
        {"name": "a", "match": {"prefix": "/"}, "upstream": "a"},
    ]
    config = h2_config(tmp_path, stub, server={"max_body": 65536}, routes=routes)
    async with running_gateway(config) as gw:
        answers = {}
        # The route's limit, then the server's (beyond the first stream window).
        for path, size in (("/small/x", 5000), ("/big/x", 300_000)):
            async with raw_h2(gw.port) as client:
                headers = [(b"content-length", str(size).encode())] if with_length else []
                stream_id = await client.request(
                    path, method="POST", headers=headers, body=b"a" * size
                )
                response = await client.response(stream_id)
                answers[path] = (
                    response.status,
                    response.headers.get(b"content-type"),
                    json.loads(response.body).get("status") if response.body else None,
                )
        problem = (413, b"application/problem+json", 413)
        assert answers == {"/small/x": problem, "/big/x": problem}
        # No upstream got a whole body over the limit.
        assert not stub.hits
        # Within the limit it goes through.
        async with h2c_client() as client:
            r = await client.post(url(gw, "/upload"), content=b"a" * 60_000)
            assert r.status_code == 200
            assert r.json()["received"] == 60_000


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
async def test_a_streamed_response_of_megabytes_arrives_whole(tmp_path, stub, certs, tls):
    config = h2_config(tmp_path, stub, tls=tls)
    size = 4 * 1024 * 1024 + 3
    async with running_gateway(config) as gw:
        client = h2_client(certs) if tls else h2c_client()
        base = tls_url(gw) if tls else url(gw)
        async with client:
            r = await client.get(f"{base}/big?size={size}")
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        assert "transfer-encoding" not in r.headers
        assert "connection" not in r.headers
        assert len(r.content) == size
        assert r.content.count(b"x") == size


async def test_a_response_respects_a_small_flow_control_window(tmp_path, stub):
    """A client announcing a 4 KiB stream window gets the whole body, window by window
    (h2 refuses any DATA beyond the window with a FlowControlError)."""
    config = h2_config(tmp_path, stub)
    size = 1_000_000
    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4096}
    async with running_gateway(config) as gw, raw_h2(gw.port, settings=settings) as client:
        stream_id = await client.request(f"/big?size={size}")
        response = await client.response(stream_id)
        assert response.status == 200
        assert response.ended
        assert len(response.body) == size
        assert client.terminated is None


async def test_head_gets_the_head_only(tmp_path, stub):
    config = h2_config(tmp_path, stub)
    async with running_gateway(config) as gw, h2c_client() as client:
        r = await client.head(url(gw, "/orders/1"))
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        assert r.content == b""
        assert r.headers["x-stub"] == "a"
        assert "x-request-id" in r.headers
        assert stub.hits[-1]["method"] == "HEAD"
        # The connection goes on: the next request on it is answered whole.
        r = await client.get(url(gw, "/orders/1"))
        assert r.status_code == 200
        assert r.json()["method"] == "GET"
    async with running_gateway(config) as gw, raw_h2(gw.port) as client:
        stream_id = await client.request("/orders/2", method="HEAD")
        response = await client.response(stream_id)
        assert response.status == 200
        assert response.ended
        assert response.body == b""


async def test_websockets_stay_on_http1(tmp_path, stub):
    """No extended CONNECT (RFC 8441): a WebSocket over HTTP/2 is refused, over HTTP/1.1
    on the same listener it works as before."""
    routes = [{"name": "ws", "match": {"prefix": "/ws"}, "upstream": "a", "websocket": True}]
    config = h2_config(tmp_path, stub, routes=routes)
    async with running_gateway(config) as gw:
        async with raw_h2(gw.port) as client:
            client.conn.config.validate_outbound_headers = False  # h2 would not send it
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                stream_id,
                [
                    (b":method", b"CONNECT"),
                    (b":protocol", b"websocket"),
                    (b":scheme", b"http"),
                    (b":authority", b"127.0.0.1"),
                    (b":path", b"/ws"),
                    (b"sec-websocket-version", b"13"),
                ],
            )
            await client.flush()
            response = await client.response(stream_id)
            refused = response.reset is not None or client.terminated is not None or client.closed
            assert refused or (response.status or 0) >= 400, response.headers
        assert not stub.hits
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws") as ws:
            await ws.send("hello")
            assert await ws.recv() == "a:hello"


# --- errors as problem+json ------------------------------------------------------------------


async def test_refusals_over_h2_are_problems_with_the_usual_status(tmp_path, stub, certs):
    routes = [
        {"name": "secure", "match": {"prefix": "/secure"}, "upstream": "a", "auth": "jwt"},
        {"name": "keyed", "match": {"prefix": "/keyed"}, "upstream": "a", "auth": "api_key"},
        {
            "name": "limited",
            "match": {"prefix": "/limited"},
            "upstream": "a",
            "rate_limit": {"rate": 0.001, "burst": 1, "per": "ip"},
        },
        {"name": "open", "match": {"prefix": "/open"}, "upstream": "a"},
    ]
    config = h2_config(
        tmp_path,
        stub,
        tls=True,
        routes=routes,
        auth={
            "jwt": {"algorithms": ["HS256"], "hs256_secret": SECRET},
            "api_keys": {"keys": [{"name": "partner", "key": "pk-0123456789abcdef"}]},
        },
    )
    async with running_gateway(config) as gw, h2_client(certs) as client:
        r = await client.get(tls_url(gw, "/secure/x"))
        assert r.http_version == "HTTP/2"
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["www-authenticate"] == 'Bearer realm="atoll"'
        problem = r.json()
        assert problem["status"] == 401
        assert problem["route"] == "secure"
        assert problem["request_id"] == r.headers["x-request-id"]
        r = await client.get(tls_url(gw, "/secure/x"), headers={"authorization": "Bearer x.y.z"})
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert not stub.hits
        token = mint_token(subject="alice", secret=SECRET.encode())
        r = await client.get(tls_url(gw, "/secure/x"), headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert stub.hits[-1]["headers"]["x-auth-method"] == "jwt"
        assert stub.hits[-1]["headers"]["x-auth-subject"] == "alice"
        r = await client.get(tls_url(gw, "/keyed/x"))
        assert r.status_code == 401
        r = await client.get(tls_url(gw, "/keyed/x"), headers={"x-api-key": "pk-0123456789abcdef"})
        assert r.status_code == 200
        assert stub.hits[-1]["headers"]["x-auth-method"] == "api_key"
        r = await client.get(tls_url(gw, "/nowhere"))
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 404
        first = await client.get(tls_url(gw, "/limited"))
        second = await client.get(tls_url(gw, "/limited"))
        assert (first.status_code, second.status_code) == (200, 429)
        assert second.headers["content-type"] == "application/problem+json"
        assert int(second.headers["retry-after"]) >= 1
        assert {r.http_version for r in (first, second)} == {"HTTP/2"}
        async with httpx.AsyncClient() as plain:
            metrics = (await plain.get(admin_url(gw, "/metrics"))).text
        assert 'atoll_gateway_requests_total{code="401",route="secure"} 2.0' in metrics
        assert 'atoll_gateway_requests_total{code="429",route="limited"} 1.0' in metrics


# --- hostile clients -------------------------------------------------------------------------


def header_cases():
    return {
        "one big field": [(b"x-big", b"a" * 8000)],
        "many fields": [(b"x-h%d" % i, b"1234567890") for i in range(400)],
        "continuation frames": [(b"x-big", os.urandom(20000).hex().encode())],
    }


@pytest.mark.parametrize("case", list(header_cases()))
async def test_oversized_header_blocks_are_refused_without_harm(tmp_path, stub, case):
    config = h2_config(tmp_path, stub, server={"max_header_bytes": 4096})
    async with running_gateway(config) as gw:
        async with raw_h2(gw.port) as client:
            stream_id = await client.request("/x", headers=header_cases()[case])
            response = await client.response(stream_id)
            refused = (
                response.reset is not None
                or client.terminated is not None
                or (client.closed and response.status is None)
            )
            if not refused:
                assert response.status == 431, (response.headers, response.body[:200])
                assert response.headers[b"content-type"] == b"application/problem+json"
                assert json.loads(response.body)["status"] == 431
        assert not stub.hits
        # The gateway is fine: a new connection is served.
        async with h2c_client() as other:
            r = await other.get(url(gw, "/after"))
            assert r.status_code == 200
            assert r.http_version == "HTTP/2"
        # And a block within the limit passes.
        async with raw_h2(gw.port) as client:
            stream_id = await client.request("/fine", headers=[(b"x-ok", b"a" * 1000)])
            response = await client.response(stream_id)
            assert response.status == 200
            assert stub.hits[-1]["headers"]["x-ok"] == "a" * 1000


def _hpack_block(path="/x", authority=b"127.0.0.1"):
    return hpack.Encoder().encode(
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path.encode()),
        ]
    )


#: Bytes sent after a good preface and SETTINGS, and the GOAWAY codes RFC 9113 names for
#: them (a connection error in each case).
BAD_FRAMES = {
    # Its first 9 bytes read as a frame header announcing 16 MiB, over the 16 KiB
    # SETTINGS_MAX_FRAME_SIZE: refused from the header, not after buffering 16 MiB.
    "garbage": (b"\xff" * 64, {ErrorCodes.FRAME_SIZE_ERROR, ErrorCodes.PROTOCOL_ERROR}),
    "an oversized frame sent whole": (
        frame(0x6, 0, 0, b"p" * 20000),
        {ErrorCodes.FRAME_SIZE_ERROR, ErrorCodes.PROTOCOL_ERROR},
    ),
    "data on stream 0": (frame(0x0, 0, 0, b"abcd"), {ErrorCodes.PROTOCOL_ERROR}),
    "headers on an even stream": (frame(0x1, 0x5, 2, _hpack_block()), {ErrorCodes.PROTOCOL_ERROR}),
    "settings of a bad length": (
        frame(0x4, 0, 0, b"\x00\x03\x00"),
        {ErrorCodes.FRAME_SIZE_ERROR, ErrorCodes.PROTOCOL_ERROR},
    ),
    "window update of zero": (frame(0x8, 0, 0, b"\x00\x00\x00\x00"), {ErrorCodes.PROTOCOL_ERROR}),
    # RFC 9113 4.3 names COMPRESSION_ERROR; h2 reports PROTOCOL_ERROR (also a connection
    # error, which is what matters here).
    "undecodable header block": (
        frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\x0f"),
        {ErrorCodes.COMPRESSION_ERROR, ErrorCodes.PROTOCOL_ERROR},
    ),
    "continuation without headers": (
        frame(0x9, 0x4, 1, _hpack_block()),
        {ErrorCodes.PROTOCOL_ERROR},
    ),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_protocol_errors_end_the_connection_with_goaway(tmp_path, stub, case):
    data, codes = BAD_FRAMES[case]
    config = h2_config(tmp_path, stub)
    async with running_gateway(config) as gw:
        async with h2c_client() as bystander:
            assert (await bystander.get(url(gw, "/before"))).status_code == 200
            async with raw_h2(gw.port) as client:
                await client.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
                await client.send_raw(data)
                goaway = await client.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
                assert goaway is not None, "closed without a GOAWAY"
                assert goaway.error_code in codes, goaway
                await client.until_closed()  # and the gateway closes it
            # Other connections go on, the one opened before included.
            r = await bystander.get(url(gw, "/after"))
            assert r.status_code == 200
        async with h2c_client() as fresh:
            assert (await fresh.get(url(gw, "/fresh"))).status_code == 200
        assert [hit["path"] for hit in stub.hits] == ["/before", "/after", "/fresh"]


async def test_rapid_reset_gets_enhance_your_calm(tmp_path, stub):
    """CVE-2023-44487: streams opened and cancelled at once, by the thousand."""
    config = h2_config(tmp_path, stub)
    async with running_gateway(config) as gw, h2c_client() as bystander:
        assert (await bystander.get(url(gw, "/before"))).status_code == 200
        attacker = await RawH2.open(gw.port)
        reading = asyncio.create_task(attacker.until_closed(timeout=2 * TIMEOUT))
        try:
            headers = attacker.request_headers("/flood")
            opened = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TIMEOUT
            while (
                opened < 5_000
                and attacker.terminated is None
                and not attacker.closed
                and loop.time() < deadline
            ):
                for _ in range(50):
                    stream_id = attacker.conn.get_next_available_stream_id()
                    attacker.conn.send_headers(stream_id, headers, end_stream=True)
                    attacker.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    opened += 1
                try:
                    await attacker.flush()
                except (ConnectionError, ssl.SSLError):
                    break
                await asyncio.sleep(0)  # a turn for the reader, to see a GOAWAY
            done, _ = await asyncio.wait([reading], timeout=TIMEOUT)
            goaway = attacker.terminated
            assert goaway is not None, f"no GOAWAY after {opened} reset streams"
            assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, goaway
            assert reading in done, "the connection stayed open after the GOAWAY"
            reading.result()
            assert attacker.closed
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await attacker.close()
        # Everyone else is served, on the connection they had and on new ones.
        r = await bystander.get(url(gw, "/after"))
        assert r.status_code == 200
        async with h2c_client() as fresh:
            assert (await fresh.get(url(gw, "/fresh"))).status_code == 200
        # The cancelled streams left nothing behind.
        await wait_until(lambda: gw.in_flight == 0, timeout=TIMEOUT, what="no request in flight")


# --- what a review of the first version found -----------------------------------------


def raw_unchecked(raw: RawH2) -> RawH2:
    """Let ``raw`` send headers h2's own checks would refuse to send."""
    raw.conn.config.validate_outbound_headers = False
    raw.conn.config.normalize_outbound_headers = False
    return raw


async def test_a_graceful_stop_answers_the_streams_in_flight(tmp_path, stub):
    """httpx's HTTP/2 client fails a stream still waiting when a GOAWAY comes: the
    GOAWAY goes out with the last answer, and new streams are refused meanwhile."""
    async with running_gateway(h2_config(tmp_path, stub)) as gw, h2c_client() as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        stub.release.clear()
        waiting = asyncio.create_task(client.get(url(gw, "/slow")))
        await wait_until(lambda: gw.in_flight == 1, timeout=TIMEOUT, what="the slow request")
        stopping = asyncio.create_task(gw.stop(drain_timeout=TIMEOUT))
        await asyncio.sleep(0.1)
        stub.release.set()
        response = await waiting
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        await stopping


async def test_a_client_goaway_still_gets_its_answers(tmp_path, stub):
    async with running_gateway(h2_config(tmp_path, stub)) as gw, raw_h2(gw.port) as raw:
        stub.release.clear()
        stream_id = await raw.request("/slow")
        await wait_until(lambda: gw.in_flight == 1, timeout=TIMEOUT, what="the slow request")
        await raw.send_raw(frame(0x7, 0, 0, struct.pack(">II", stream_id, 0)))
        stub.release.set()
        response = await raw.response(stream_id)
        assert response.status == 200
        assert response.ended
        await raw.until_closed()  # and then the connection ends


@pytest.mark.parametrize(
    ("pseudo", "extra"),
    [
        ({":method": b"GET /internal/admin?"}, ()),
        ({":path": b"/public/x HTTP/1.1"}, ()),
        ({":path": b"/public/x?a b"}, ()),
        ({":path": b"/public/x#fragment"}, ()),
        ({":method": b"G\x01T"}, ()),
        ({}, ((b"x-a", b"v\x01\x7f"),)),
        ({}, ((b"x(a)", b"v"),)),
    ],
    ids=[
        "method with a target",
        "target with a version",
        "space",
        "fragment",
        "control",
        "control in a value",
        "name not a token",
    ],
)
async def test_what_would_break_the_upstream_request_line_is_a_400(tmp_path, stub, pseudo, extra):
    """Method and target go into the HTTP/1.1 request line sent upstream: over HTTP/2 they
    are refused as HTTP/1.1's parser refuses them, before any upstream call."""
    async with running_gateway(h2_config(tmp_path, stub)) as gw, raw_h2(gw.port) as raw:
        raw_unchecked(raw)
        headers = dict(raw.request_headers("/public/x"))
        headers.update({k.encode(): v for k, v in pseudo.items()})
        stream_id = raw.conn.get_next_available_stream_id()
        raw.conn.send_headers(stream_id, [*headers.items(), *extra], end_stream=True)
        await raw.flush()
        response = await raw.response(stream_id)
        assert response.status == 400, response.headers
        assert json.loads(bytes(response.body))["status"] == 400
        assert not stub.hits
        # The connection goes on.
        again = await raw.request("/public/ok")
        assert (await raw.response(again)).status == 200


@pytest.mark.parametrize(
    ("declared", "sent"),
    [(5, b"0123456789"), (10, b"01234")],
    ids=["more than declared", "less than declared"],
)
async def test_a_body_that_breaks_its_content_length_resets_its_stream_only(
    tmp_path, stub, declared, sent
):
    """RFC 9113 8.1.1: a malformed request is a stream error (PROTOCOL_ERROR), not the
    connection's; and no byte past the declared length reaches the upstream."""
    async with running_gateway(h2_config(tmp_path, stub)) as gw, raw_h2(gw.port) as raw:
        stub.release.clear()
        held = await raw.request("/public/held")
        await wait_until(lambda: gw.in_flight == 1, timeout=TIMEOUT, what="one held request")
        stream_id = raw.conn.get_next_available_stream_id()
        headers = raw.request_headers("/public/upload", method="POST")
        raw.conn.send_headers(stream_id, [*headers, (b"content-length", b"%d" % declared)])
        raw.conn.send_data(stream_id, sent, end_stream=True)
        await raw.flush()
        response = await raw.response(stream_id)
        assert response.reset == ErrorCodes.PROTOCOL_ERROR, response.__dict__
        assert raw.terminated is None
        # The stream held before it, and streams after it, are answered.
        again = await raw.request("/public/after")
        stub.release.set()
        assert (await raw.response(held)).status == 200
        assert (await raw.response(again)).status == 200
        await wait_until(lambda: gw.in_flight == 0, timeout=TIMEOUT, what="nothing in flight")
        # The upstream saw no whole request on that stream (its body was cut off).
        assert [hit["path"] for hit in stub.hits] == ["/public/held", "/public/after"]


async def test_a_request_with_no_body_but_a_content_length_is_a_400(tmp_path, stub):
    async with running_gateway(h2_config(tmp_path, stub)) as gw, raw_h2(gw.port) as raw:
        stream_id = await raw.request(
            "/public/x", method="POST", headers=[(b"content-length", b"5")]
        )
        response = await raw.response(stream_id)
        assert response.status == 400, response.headers
        assert "Content-Length" in json.loads(bytes(response.body))["detail"]
        assert not stub.hits
        again = await raw.request("/public/ok")
        assert (await raw.response(again)).status == 200


async def test_a_content_length_that_is_not_digits_is_a_400_on_its_stream(tmp_path, stub):
    """h2 would end the connection for it; it is one request's error."""
    async with running_gateway(h2_config(tmp_path, stub)) as gw, raw_h2(gw.port) as raw:
        raw_unchecked(raw)
        stream_id = await raw.request(
            "/public/x", method="POST", headers=[(b"content-length", b"5x")], body=b"12345"
        )
        response = await raw.response(stream_id)
        assert response.status == 400, response.headers
        assert raw.terminated is None
        assert not stub.hits
        again = await raw.request("/public/ok")
        assert (await raw.response(again)).status == 200


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([(b"authorization", b"Bearer ")], "surrounded by whitespace"),
        ([(b"connection", b"keep-alive")], "connection-specific"),
        ([(b"te", b"gzip")], "te header"),
        ([(b"x-a", b"1"), (b":path", b"/late")], "pseudo-header"),
    ],
    ids=["value with whitespace", "connection field", "te not trailers", "late pseudo-header"],
)
async def test_a_malformed_header_block_is_a_400_on_its_stream_only(tmp_path, stub, fields, reason):
    """RFC 9113 8.1.1: h2 would end the connection (every stream of the client) for what
    makes one request malformed. An empty token (``Bearer `` with the variable unset) is
    the usual way to meet it, and over HTTP/1.1 it is a 401 that says why."""
    async with running_gateway(h2_config(tmp_path, stub)) as gw, raw_h2(gw.port) as raw:
        raw_unchecked(raw)
        stub.release.clear()
        held = await raw.request("/public/held")
        await wait_until(lambda: gw.in_flight == 1, timeout=TIMEOUT, what="one held request")
        stream_id = raw.conn.get_next_available_stream_id()
        raw.conn.send_headers(
            stream_id, [*raw.request_headers("/public/x"), *fields], end_stream=True
        )
        await raw.flush()
        response = await raw.response(stream_id)
        assert response.status == 400, response.__dict__
        detail = json.loads(bytes(response.body))["detail"]
        assert reason in detail.lower(), detail
        assert "Bearer" not in detail  # a value is never quoted back: it may be a secret
        assert raw.terminated is None
        stub.release.set()
        assert (await raw.response(held)).status == 200
        again = await raw.request("/public/after")
        assert (await raw.response(again)).status == 200
        assert [hit["path"] for hit in stub.hits] == ["/public/held", "/public/after"]


async def test_malformed_trailers_reset_their_stream_only(tmp_path, stub):
    async with running_gateway(h2_config(tmp_path, stub)) as gw, raw_h2(gw.port) as raw:
        raw_unchecked(raw)
        stub.release.clear()
        stream_id = raw.conn.get_next_available_stream_id()
        raw.conn.send_headers(stream_id, raw.request_headers("/public/upload", method="POST"))
        raw.conn.send_data(stream_id, b"part")
        raw.conn.send_headers(stream_id, [(b"x-checksum", b" padded ")], end_stream=True)
        await raw.flush()
        response = await raw.response(stream_id)
        stub.release.set()
        assert response.reset == ErrorCodes.PROTOCOL_ERROR, response.__dict__
        assert raw.terminated is None
        again = await raw.request("/public/after")
        assert (await raw.response(again)).status == 200


async def test_streams_past_the_limit_are_refused_not_the_connection(tmp_path, stub):
    config = h2_config(tmp_path, stub, server={"http2_max_streams": 4})
    async with running_gateway(config) as gw, raw_h2(gw.port) as raw:
        stub.release.clear()
        held = [await raw.request(f"/held/{n}") for n in range(4)]
        await wait_until(lambda: gw.in_flight == 4, timeout=TIMEOUT, what="four held requests")
        extra = await raw.request("/one-too-many")
        assert (await raw.response(extra)).reset == h2.errors.ErrorCodes.REFUSED_STREAM
        stub.release.set()
        for stream_id in held:
            assert (await raw.response(stream_id)).status == 200
        assert raw.terminated is None


async def test_reset_streams_do_not_multiply_the_work_sent_upstream(tmp_path, stub):
    """A stream the client resets keeps its place until its handler returns, so opening
    and cancelling streams in a loop cannot put more requests upstream than the limit."""
    config = h2_config(tmp_path, stub, server={"http2_max_streams": 10})
    async with running_gateway(config) as gw, raw_h2(gw.port) as raw:
        stub.release.clear()
        headers = raw.request_headers("/flood")
        for _ in range(90):
            stream_id = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(stream_id, headers, end_stream=True)
            raw.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await raw.flush()
        await asyncio.sleep(0.3)
        assert gw.in_flight <= 10
        assert len(stub.hits) <= 10
        stub.release.set()
        await wait_until(lambda: gw.in_flight == 0, timeout=TIMEOUT, what="nothing in flight")


async def test_a_client_that_never_opens_its_window_is_let_go(tmp_path, stub):
    config = h2_config(tmp_path, stub, server={"idle_timeout": 0.5})
    window = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    async with running_gateway(config) as gw, raw_h2(gw.port, settings=window) as raw:
        stream_id = await raw.request("/big?size=300000")
        await raw.until(lambda e: isinstance(e, h2.events.ResponseReceived))
        await raw.until_closed(timeout=TIMEOUT)
        assert gw.state.http2_terminated.get("stalled") == 1
        await wait_until(lambda: gw.in_flight == 0, timeout=TIMEOUT, what="nothing in flight")
        del stream_id


async def test_a_larger_initial_window_lets_queued_data_go(tmp_path, stub):
    window = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    async with (
        running_gateway(h2_config(tmp_path, stub)) as gw,
        raw_h2(gw.port, settings=window) as raw,
    ):
        stream_id = await raw.request("/hello")
        await raw.until(lambda e: isinstance(e, h2.events.ResponseReceived))
        raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65_535})
        await raw.flush()
        response = await raw.response(stream_id)
        assert response.ended
        assert json.loads(bytes(response.body))["path"] == "/hello"


async def test_a_ping_flood_that_never_reads_stops_being_read(tmp_path, stub):
    """CVE-2019-9512: every PING asks for an answer; a client that never reads them must
    not make the gateway queue answers without bound. Reading stops while the write
    buffer is full, so the client's own sending blocks."""
    async with running_gateway(h2_config(tmp_path, stub)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(PREFACE + hyperframe.frame.SettingsFrame(0).serialize())
        pings = hyperframe.frame.PingFrame(0, opaque_data=b"12345678").serialize() * 4000

        def the_connection():
            return next(c for c in gw.state.connections if c.h2 is not None)

        await wait_until(
            lambda: any(c.h2 is not None for c in gw.state.connections),
            timeout=TIMEOUT,
            what="the HTTP/2 connection",
        )

        sent = 0
        paused = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * TIMEOUT
        try:
            while not paused and loop.time() < deadline:
                writer.write(pings)
                sent += len(pings)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await writer.drain()  # blocks once the gateway stops reading
                paused = not the_connection().transport.is_reading()
            assert paused, f"still reading after {sent} bytes of PINGs"
            assert the_connection().transport.get_write_buffer_size() < 16 * 1024 * 1024
        finally:
            writer.transport.abort()
        del reader
