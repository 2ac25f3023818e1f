"""A client leaving a streamed response must not abort the upstream connection once it
has gone back to the pool and carries another client's request."""

import asyncio
import socket

import httpx
from gateway_support import running_gateway, url
from test_gateway_proxy_edges import Scripted, config

SIZE = 8 * 1024 * 1024


async def test_a_client_leaving_a_relay_does_not_abort_another_clients_call(tmp_path):
    slow_seen = asyncio.Event()
    release = asyncio.Event()

    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b" /big " in head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % SIZE)
                block = b"x" * 65536
                for _ in range(SIZE // len(block)):
                    writer.write(block)
                    await writer.drain()
            else:
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                slow_seen.set()
                await release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async with Scripted(serve) as up, running_gateway(config(tmp_path, [up.address])) as gw:
        instance = gw.gen.upstreams["a"].instances[0]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        # Client A reads slowly, until the upstream's body has all reached the gateway
        # and its connection is back in the pool (the relay still has its tail to send).
        got = 0
        for _ in range(20000):
            if instance.idle_connections:
                break
            got += len(await reader.read(16384))
            await asyncio.sleep(0.001)
        assert instance.idle_connections == 1, got
        await asyncio.sleep(0.2)
        assert gw.in_flight == 1, "precondition: client A's relay is still streaming"
        # Client B's POST takes the pooled connection.
        async with httpx.AsyncClient(timeout=10) as client:
            pending = asyncio.ensure_future(client.post(url(gw, "/slow"), content=b"data"))
            await asyncio.wait_for(slow_seen.wait(), 5)
            assert up.open == 1  # B's request went on the connection A's response used
            # Client A leaves.
            writer.transport.abort()
            await asyncio.sleep(0.2)
            release.set()
            r = await pending
        assert r.status_code == 200, r.text
