import asyncio

import pytest

from atoll.testing import TcpProxy


async def echo(reader, writer):
    while data := await reader.read(100):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture
async def proxy():
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1])
    await proxy.start()
    yield proxy
    await proxy.close()
    server.close()
    await server.wait_closed()


async def roundtrip(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(100), 2)
    return reader, writer, data


async def test_forwards_cuts_blocks_and_recovers(proxy):
    reader, writer, data = await roundtrip(proxy.port)
    assert data == b"ping"
    proxy.cut()
    assert await asyncio.wait_for(reader.read(100), 2) == b"", "the cut connection stayed open"
    writer.close()
    proxy.block()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await asyncio.wait_for(reader.read(100), 2) == b"", "a blocked proxy accepted"
    writer.close()
    proxy.unblock()
    _, writer, data = await roundtrip(proxy.port)
    assert data == b"ping"
    writer.close()
