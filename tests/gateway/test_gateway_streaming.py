"""Large bodies stream through without being held whole; WebSockets pass through."""

import asyncio
import tracemalloc

import httpx
import pytest
import websockets
from gateway_support import base_config, running_gateway, url, write_config


def stream_config(tmp_path, stub, **route):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a", "websocket": True, **route}],
            server={"port": 8080, "access_log": False, "max_body": "200 MiB"},
        ),
    )


async def test_large_response_streams_without_buffering(tmp_path, stub):
    size = 64 * 1024 * 1024
    async with (
        running_gateway(stream_config(tmp_path, stub)) as gw,
        httpx.AsyncClient(timeout=30) as client,
    ):
        tracemalloc.start()
        try:
            received = 0
            async with client.stream("GET", url(gw, f"/big?size={size}")) as r:
                assert r.status_code == 200
                assert r.headers["transfer-encoding"] == "chunked"
                async for chunk in r.aiter_raw():
                    received += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received == size
        # The whole test process (client, gateway and stub) never held a fraction of it.
        print(f"peak traced memory: {peak / 1e6:.1f} MB for {size / 1e6:.0f} MB streamed")
        assert peak < size / 8, peak


async def test_slow_client_pauses_the_upstream(tmp_path, stub):
    async with running_gateway(stream_config(tmp_path, stub)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /big?size=200000000 HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        await reader.read(65536)
        await asyncio.sleep(0.5)  # the client reads nothing meanwhile
        upstream_conn = next(iter(gw.state.connections))
        assert upstream_conn.writable is not None  # the gateway is waiting for the client
        instance = gw.gen.upstreams["a"].instances[0]
        assert instance.outstanding == 1
        writer.close()


async def test_large_upload_streams_to_the_upstream(tmp_path, stub):
    size = 32 * 1024 * 1024

    async def body():
        chunk = b"y" * 65536
        for _ in range(size // len(chunk)):
            yield chunk

    async with (
        running_gateway(stream_config(tmp_path, stub)) as gw,
        httpx.AsyncClient(timeout=30) as client,
    ):
        r = await client.post(url(gw, "/upload"), content=body())
        assert r.status_code == 200
        assert r.json()["received"] == size
        assert r.json()["chunks"] > 1  # it arrived in pieces, not as one buffered blob
        r = await client.put(url(gw, "/upload"), content=b"z" * (1024 * 1024))
        assert r.json()["received"] == 1024 * 1024


async def test_streamed_upload_over_the_limit_is_413(tmp_path, stub):
    limit = 1024 * 1024
    chunk = b"y" * 65536
    async with running_gateway(stream_config(tmp_path, stub, max_body=limit)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        # Chunked, so no length announces the size: only counting the body finds it.
        writer.write(b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(limit // len(chunk)):
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await writer.drain()
        # One byte over the limit, and no last chunk: the body never ends by itself,
        # so only the gateway's 413 answers this. Nothing more is sent, so the gateway
        # has read everything when it closes (unread bytes would make its close a reset).
        writer.write(b"1\r\ny\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        rest = await asyncio.wait_for(reader.read(), 5)  # the gateway may close after it
        writer.close()
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"application/problem+json" in head
    assert f"larger than {limit} bytes".encode() in rest


async def test_websocket_pass_through(tmp_path, stub):
    async with running_gateway(stream_config(tmp_path, stub)) as gw:
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws") as ws:
            for text in ("hello", "x" * 100000, "bye"):
                await ws.send(text)
                assert await ws.recv() == f"a:{text}"
        assert gw.in_flight == 0 or await _settles(gw)


async def _settles(gw):
    for _ in range(100):
        if gw.in_flight == 0:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_websocket_refused_on_routes_without_it(tmp_path, stub):
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
        ),
    )
    async with running_gateway(config) as gw:
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws"):
                pass
        assert info.value.response.status_code == 400


async def test_expect_100_continue_is_answered_after_the_checks(tmp_path, stub):
    async with running_gateway(stream_config(tmp_path, stub)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b'"received":5' in await reader.read(1000)
        writer.close()
