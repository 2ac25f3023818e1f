"""The HTTP/1.1 path and the upstream side at their edges (a review's findings; each
test failed before its fix): stray upstream answers, early answers to uploads, clients
leaving streams, request trailers, instances that time out, huge upstream heads, CORS
from both sides, HTTP/1.0 keep-alive."""

import asyncio
import contextlib

import httpx
from gateway_support import base_config, raw_request, running_gateway, url, write_config


class Scripted:
    """A raw upstream; ``handler(reader, writer)`` serves each connection."""

    def __init__(self, handler):
        self.handler, self.open = handler, 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        self.open += 1
        with contextlib.suppress(ConnectionError, EOFError, asyncio.CancelledError):
            await self.handler(reader, writer)
        self.open -= 1
        writer.close()


def config(tmp_path, targets, route=None, **extra):
    upstream = {"targets": targets, **extra.pop("upstream", {})}
    route = {"name": "a", "match": {"prefix": "/"}, "upstream": "a", **(route or {})}
    return write_config(tmp_path / "gw.yaml", base_config({"a": upstream}, [route], **extra))


async def test_1_a_stray_upstream_answer_never_hands_clients_each_others_responses(tmp_path):
    async def echo_path_then_stray_408(reader, writer):
        while True:
            path = (await reader.readuntil(b"\r\n\r\n")).split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(path), path))
            writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")

    async with (
        Scripted(echo_path_then_stray_408) as up,
        running_gateway(config(tmp_path, [up.address])) as gw,
        httpx.AsyncClient(timeout=2) as client,
    ):
        await client.get(url(gw, "/first"))
        paths = [f"/p{i}" for i in range(6)]
        got = await asyncio.gather(*(client.get(url(gw, p)) for p in paths), return_exceptions=True)
    assert [getattr(r, "text", repr(r)) for r in got] == paths


async def test_2_an_early_answer_to_an_upload_reaches_the_client(tmp_path, stub):
    path = config(tmp_path, [stub.address], route={"max_body": 1000})
    async with running_gateway(path) as gw, httpx.AsyncClient(timeout=10) as client:
        try:
            status = (await client.post(url(gw, "/u"), content=b"x" * 20_000_000)).status_code
        except httpx.HTTPError as exc:
            status = repr(exc)
    assert status == 413


async def test_3_a_client_leaving_a_stream_releases_the_upstream(tmp_path):
    async def sse(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:  # a heartbeat every 50 ms, as an event stream sends
            writer.write(b"7\r\ndata: x\r\n")
            await writer.drain()  # raises once the gateway has let go of the connection
            await asyncio.sleep(0.05)

    async with Scripted(sse) as up, running_gateway(config(tmp_path, [up.address])) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readuntil(b"data: x")
        writer.close()  # the browser tab closes
        await writer.wait_closed()
        await asyncio.sleep(1)
        left = (gw.in_flight, up.open, gw.gen.upstreams["a"].instances[0].outstanding)
    assert left == (0, 0, 0)


async def test_4_request_trailers_are_not_header_fields(tmp_path, stub):
    server = {"port": 8080, "access_log": False, "trusted_proxies": ["127.0.0.1"]}
    path = config(tmp_path, [stub.address], route={"allow_ips": ["10.0.0.0/8"]}, server=server)
    async with running_gateway(path) as gw:
        raw = await raw_request(
            gw.port,
            b"POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            b"x-forwarded-for: 203.0.113.9\r\n"  # the proxy in front: the real client
            b"transfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
            b"x-forwarded-for: 10.1.2.3\r\nx-smuggled: 1\r\n\r\n",
        )
    assert raw.startswith(b"HTTP/1.1 403"), raw[:40]


async def test_5_an_instance_that_times_out_is_ejected(tmp_path, stub):
    async def hang(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(3600)

    async with Scripted(hang) as up:
        passive = {"passive": {"failures": 2, "ejection": 30}, "policy": {"timeout": 0.2}}
        path = config(tmp_path, [up.address, stub.address], upstream=passive)
        async with running_gateway(path) as gw, httpx.AsyncClient() as client:
            statuses = [(await client.get(url(gw, "/x"))).status_code for _ in range(12)]
    assert statuses.count(504) <= 2, statuses


async def test_6_an_upstream_header_block_over_a_limit_is_502(tmp_path):
    async def huge_head(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(128):  # 8 MiB of fields
            writer.write(b"x-filler: " + b"a" * 65536 + b"\r\n")
            await writer.drain()
        writer.write(b"content-length: 2\r\n\r\nok")
        await reader.read()

    async with Scripted(huge_head) as up, running_gateway(config(tmp_path, [up.address])) as gw:
        raw = await raw_request(gw.port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 502"), raw[:40]


async def test_7_cors_origin_is_sent_once(tmp_path):
    async def cors_too(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\naccess-control-allow-origin: *\r\ncontent-length: 0\r\n\r\n"
        )
        await reader.read()

    cors = {"allow_origins": ["https://shop.example"], "allow_credentials": True}
    async with (
        Scripted(cors_too) as up,
        running_gateway(config(tmp_path, [up.address], cors=cors)) as gw,
    ):
        raw = await raw_request(
            gw.port,
            b"GET / HTTP/1.1\r\nhost: x\r\norigin: https://shop.example\r\n"
            b"connection: close\r\n\r\n",
        )
    assert raw.lower().count(b"access-control-allow-origin:") == 1, raw


async def test_8_http10_keep_alive_is_acknowledged(tmp_path, stub):
    async with running_gateway(config(tmp_path, [stub.address])) as gw:
        raw = await raw_request(
            gw.port, b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n", read_timeout=1
        )
    assert b"connection: keep-alive" in raw.lower().partition(b"\r\n\r\n")[0], raw[:300]


async def test_an_h2c_upgrade_is_answered_as_http11(tmp_path, stub):
    """What `curl --http2` sends on http://: the upgrade is ignored (RFC 7540 3.2 lets a
    server; RFC 9113 dropped it), the request answered as HTTP/1.1, and what follows on
    the connection read as usual."""
    async with running_gateway(config(tmp_path, [stub.address])) as gw:
        raw = await raw_request(
            gw.port,
            b"GET /first HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n"
            b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
            b"GET /second HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
    assert raw.count(b"HTTP/1.1 200") == 2, raw[:300]
    assert b"101" not in raw.split(b"\r\n", 1)[0]
    forwarded = [hit["headers"] for hit in stub.hits]
    assert [hit["path"] for hit in stub.hits] == ["/first", "/second"]
    assert "upgrade" not in forwarded[0]
    assert "http2-settings" not in forwarded[0]


async def test_a_client_leaving_a_silent_stream_releases_the_upstream_at_once(tmp_path):
    """An event stream that has nothing to say for minutes: the client's leaving must
    let go of the upstream then, not at the stream's next event."""

    async def quiet(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: x\r\n")
        await writer.drain()
        await reader.read()  # nothing more to send; returns when the gateway lets go

    async with Scripted(quiet) as up, running_gateway(config(tmp_path, [up.address])) as gw:
        for version in ("1.1", "2"):
            if version == "1.1":
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
                await reader.readuntil(b"data: x")
                writer.close()  # the browser tab closes
                await writer.wait_closed()
            else:
                from test_gateway_http2 import RawH2  # noqa: PLC0415

                client = await RawH2.open(gw.port)
                stream = await client.request("/events")
                await client.until(lambda e: getattr(e, "data", b"").endswith(b"data: x"))
                client.conn.reset_stream(stream)
                await client.flush()
            for _ in range(100):
                if up.open == 0 and gw.in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            left = (gw.in_flight, up.open, gw.gen.upstreams["a"].instances[0].outstanding)
            assert left == (0, 0, 0), version
            if version == "2":
                await client.close()
